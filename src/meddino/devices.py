"""Device choice, CPU threads and mixed precision, the same for every verb: CUDA with bf16 autocast where
available, CPU fp32 otherwise, one code path.

torch is imported inside the functions, not here: :func:`configure_cpu_threads` must run before torch (and
its OpenMP runtime) is loaded, and ``meddino --help`` must not load it at all.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from meddino.errors import ConfigError

if TYPE_CHECKING:
    import torch


def pick_device(spec: str = "auto") -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; an impossible choice is a ConfigError."""
    import torch  # why: loaded only after the thread settings (module docstring)

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"device: cannot parse {spec!r} (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {spec} asked for but CUDA is not available (use auto or cpu)")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (tasks whose runs must repeat exactly)."""
    import numpy as np  # why: as torch: its BLAS reads the thread settings when loaded
    import torch  # why: loaded only after the thread settings (module docstring)

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool = True) -> Any:
    """bf16 autocast on CUDA; nothing (fp32) on CPU."""
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    import torch  # why: loaded only after the thread settings (module docstring)

    return torch.autocast("cuda", dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------- CPU threads
#: Thread-count variables, highest precedence first: the first one set to a positive integer wins.
THREAD_ENV_VARS = ("MEDDINO_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: GNU OpenMP spins before a waiting thread sleeps, unless the user set a wait policy. libgomp's default is
#: 300,000; on a busy machine 10,000 ran tiny pretraining 3.4x faster than 100,000 with two threads
#: (benchmarks/results/shared_machine_cpu.json, paired_checks).
SPIN_COUNT = "10000"
#: How long :func:`other_processes_load` watches the CPUs.
LOAD_WINDOW_S = 0.2
_CPU_STATE: dict[str, Any] = {}


def choose_num_threads(available_cores: int, load_average: float | None, own_threads_env: int | None) -> int:
    """torch's intra-op threads for this process.

    ``own_threads_env`` (a positive count the user set, see :func:`threads_from_env`) wins. Otherwise: the
    cores this process may run on less the cores other processes keep busy (``load_average``, in cores,
    this process excluded), rounded to the nearest (a core counts as taken when others keep it more than
    half busy), at least 1 and at most ``available_cores``.
    """
    if own_threads_env is not None and own_threads_env > 0:
        return int(own_threads_env)
    cores = max(1, int(available_cores))
    busy = float(load_average) if load_average is not None and math.isfinite(load_average) else 0.0
    return max(1, min(cores, math.floor(cores - max(0.0, busy) + 0.5)))


def threads_from_env(environ: MutableMapping[str, str] | None = None) -> tuple[str, int] | None:
    """``(name, count)`` of the first of :data:`THREAD_ENV_VARS` set to a positive integer, else None.

    ``MEDDINO_NUM_THREADS`` may also be ``auto`` (or empty, or 0: choose from the free cores) or ``off``
    (handled by :func:`configure_cpu_threads`); anything else is a ConfigError. For the OpenMP and MKL
    variables the first entry of a list (``4,2``) counts and an unreadable value is skipped.
    """
    env = os.environ if environ is None else environ
    for name in THREAD_ENV_VARS:
        raw = env.get(name, "").strip()
        if name == "MEDDINO_NUM_THREADS" and raw.lower() in ("", "auto", "off", "0"):
            continue
        head = raw.split(",")[0].strip() if name != "MEDDINO_NUM_THREADS" else raw
        if head.isdigit() and int(head) > 0:
            return name, int(head)
        if name == "MEDDINO_NUM_THREADS":
            raise ConfigError(f"MEDDINO_NUM_THREADS={raw!r}: use a positive integer, auto or off")
    return None


def _cpu_set() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota where one is set."""
    cores = len(_cpu_set())
    quota = None
    try:  # cgroup v2 "max 100000" / "150000 100000", else v1
        with open("/sys/fs/cgroup/cpu.max") as f:
            text = f.read().split()
        if text and text[0] != "max":
            quota = int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError, ZeroDivisionError):
        try:
            with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
                q = int(f.read())
            if q > 0:
                with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
                    quota = q / int(f.read())
        except (OSError, ValueError, ZeroDivisionError):
            pass
    if quota:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cpu_ticks(cpus: set[int]) -> dict[int, tuple[int, int]] | None:
    """``{cpu: (all ticks, idle + iowait ticks)}`` from /proc/stat for ``cpus``; None without /proc/stat."""
    out = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3:4].isdigit():
                    name, *vals = line.split()
                    if int(name[3:]) in cpus:
                        v = [int(x) for x in vals[:8]]  # user nice system idle iowait irq softirq steal
                        out[int(name[3:])] = (sum(v), v[3] + v[4])
    except (OSError, ValueError):
        return None
    return out or None


def other_processes_load(window_s: float = LOAD_WINDOW_S) -> float:
    """Cores' worth of CPU that other processes use now on this process's CPUs.

    On Linux: the busy share of each allowed CPU over ``window_s`` (/proc/stat; hypervisor steal counts
    as busy) less this process's own CPU time in that window. Elsewhere: the 1-minute load average. A
    snapshot beats the load average, which still counts a run that ended a minute ago (a pipeline of verbs
    would fall to one thread on a quiet machine), and beats a count of runnable tasks, which misses bursty
    neighbours.
    """
    import resource  # why: Unix-only; at the top it would break importing this module elsewhere

    cpus = _cpu_set()
    before, own0 = _cpu_ticks(cpus), resource.getrusage(resource.RUSAGE_SELF)
    if before is None:
        try:
            return max(0.0, os.getloadavg()[0])
        except (AttributeError, OSError):
            return 0.0
    t0 = time.monotonic()
    time.sleep(window_s)
    after, own1 = _cpu_ticks(cpus) or {}, resource.getrusage(resource.RUSAGE_SELF)
    elapsed = time.monotonic() - t0
    busy = 0.0
    for cpu, (total, idle) in after.items():
        d_total = total - before.get(cpu, (total, idle))[0]
        if d_total > 0:
            busy += 1.0 - (idle - before[cpu][1]) / d_total
    own = (own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime) / max(elapsed, 1e-6)
    return max(0.0, busy - own)


def set_openmp_wait_policy() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless set, and ``GOMP_SPINCOUNT=`` :data:`SPIN_COUNT` unless either is
    set, in ``os.environ``: waiting OpenMP threads then sleep soon instead of spinning on a core another
    process needs. OpenMP reads them when it loads, so this must run before torch is imported (``meddino``'s
    ``main`` calls it first thing). Nothing with ``MEDDINO_NUM_THREADS=off``."""
    env = os.environ
    if env.get("MEDDINO_NUM_THREADS", "").strip().lower() == "off":
        return
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["GOMP_SPINCOUNT"] = SPIN_COUNT
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def configure_cpu_threads() -> int | None:
    """Fit this process's CPU threads to the cores free now, once per process; returns the thread count.

    1. :func:`set_openmp_wait_policy`.
    2. threads: ``MEDDINO_NUM_THREADS``, else ``OMP_NUM_THREADS``, else ``MKL_NUM_THREADS``, else
       :func:`choose_num_threads` of :func:`available_cores` and :func:`other_processes_load`.
    3. ``OMP_NUM_THREADS`` is exported with that count unless the user set it or ``MKL_NUM_THREADS``, so
       numpy's BLAS, scikit-learn and child processes start with it too (DataLoader workers: torch sets
       them to one thread).
    4. ``torch.set_num_threads`` and, once, ``torch.set_num_interop_threads`` (torch refuses the latter
       after inter-op work has started; that is ignored).

    Call it before torch is imported (the CLI does, before a verb runs) or the wait policy comes too late.
    ``MEDDINO_NUM_THREADS=off`` changes nothing (torch's and OpenMP's own defaults) and returns None.
    ``MEDDINO_DEBUG=1`` prints one line on stderr with the choice.
    """
    env = os.environ
    if env.get("MEDDINO_NUM_THREADS", "").strip().lower() == "off":
        return None
    state = _CPU_STATE
    if "threads" in state:
        return state["threads"]
    late = "torch" in sys.modules
    set_openmp_wait_policy()
    override = threads_from_env(env)
    cores = available_cores()
    load = None if override else other_processes_load()
    threads = choose_num_threads(cores, load, override[1] if override else None)
    if "OMP_NUM_THREADS" not in env and "MKL_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(threads)
    import torch  # why: loaded only after the thread settings (module docstring)

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(threads)
    state["threads"] = threads
    if env.get("MEDDINO_DEBUG", "") not in ("", "0"):
        why = f"{override[0]}={override[1]}" if override else f"{cores} cores, others busy {load:.2f}"
        note = " (torch was already loaded: wait policy not applied)" if late else ""
        print(f"meddino: {threads} CPU threads ({why}); OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']} "
              f"GOMP_SPINCOUNT={env.get('GOMP_SPINCOUNT', 'default')}{note}", file=sys.stderr)
    return threads


def describe_versions(version: str) -> str:
    """``meddino --version``: meddino, Python, torch (and the CUDA it was built for), timm, and the
    accelerator torch sees, one fact per line (what a bug report needs). Imports torch: only when asked."""
    import platform

    import torch  # why: --version names torch and the device; nothing else in --help loads it
    import timm

    lines = [f"meddino {version}",
             f"python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}"]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        names = [torch.cuda.get_device_name(i) for i in range(n)]
        kinds = ", ".join(f"{names.count(name)} x {name}" for name in dict.fromkeys(names))
        lines.append(f"device: CUDA {torch.version.cuda}, {kinds}")
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        lines.append("device: Apple MPS (no CUDA device)")
    else:
        built = f", torch built for CUDA {torch.version.cuda}" if torch.version.cuda else ", CPU-only torch"
        lines.append(f"device: CPU only (no CUDA device visible{built})")
    return "\n".join(lines)
