"""CPU threads on a shared machine: the thread-count rule, its env precedence, and that the OpenMP wait
policy reaches torch's OpenMP runtime (it only does when set before torch is imported)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from meddino.devices import SPIN_COUNT, choose_num_threads, threads_from_env
from meddino.errors import ConfigError

_OURS = ("MEDDINO_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
         "OMP_DISPLAY_ENV", "MEDDINO_DEBUG")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """``python -c CODE`` with none of the thread variables set (conftest sets OMP_NUM_THREADS=1) but ``env``."""
    clean = {k: v for k, v in os.environ.items() if k not in _OURS}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**clean, **env}, check=True)


# ---------------------------------------------------------------------------------------------- the rule
def test_quiet_machine_uses_every_core():
    assert choose_num_threads(2, 0.0, None) == 2
    assert choose_num_threads(8, 0.3, None) == 8
    assert choose_num_threads(4, None, None) == 4  # no load figure (e.g. Windows): all cores


def test_loaded_machine_uses_the_free_cores_and_at_least_one():
    assert choose_num_threads(8, 2.0, None) == 6
    assert choose_num_threads(2, 2.0, None) == 1
    assert choose_num_threads(2, 30.0, None) == 1
    assert choose_num_threads(4, 1.4, None) == 3  # a core counts as taken when others keep it > half busy
    assert choose_num_threads(4, 1.6, None) == 2
    assert choose_num_threads(1, 5.0, None) == 1
    assert choose_num_threads(4, float("nan"), None) == 4


def test_user_setting_wins():
    assert choose_num_threads(2, 30.0, 3) == 3
    assert choose_num_threads(16, 0.0, 1) == 1


def test_env_precedence():
    assert threads_from_env({}) is None
    assert threads_from_env({"MKL_NUM_THREADS": "3"}) == ("MKL_NUM_THREADS", 3)
    assert threads_from_env({"MKL_NUM_THREADS": "3", "OMP_NUM_THREADS": "4,2"}) == ("OMP_NUM_THREADS", 4)
    both = {"MKL_NUM_THREADS": "3", "OMP_NUM_THREADS": "4", "MEDDINO_NUM_THREADS": "5"}
    assert threads_from_env(both) == ("MEDDINO_NUM_THREADS", 5)
    assert threads_from_env({"MEDDINO_NUM_THREADS": "auto", "OMP_NUM_THREADS": "2"}) == ("OMP_NUM_THREADS", 2)
    assert threads_from_env({"OMP_NUM_THREADS": "lots"}) is None  # someone else's variable: skipped
    with pytest.raises(ConfigError, match="MEDDINO_NUM_THREADS"):
        threads_from_env({"MEDDINO_NUM_THREADS": "lots"})


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux /proc/stat")
def test_other_processes_load_sees_a_busy_neighbour():
    from meddino.devices import available_cores, other_processes_load

    hog = subprocess.Popen([sys.executable, "-c", "import time; t = time.time() + 30\nwhile time.time() < t: pass"])
    try:
        import time

        time.sleep(0.3)
        busy = other_processes_load(window_s=0.5)
    finally:
        hog.kill()
        hog.wait()
    assert 0.5 <= busy <= available_cores() + 0.1


# ---------------------------------------------------------------------------------------------- in a fresh process
_PROBE = ("import os, sys; from meddino.devices import configure_cpu_threads; n = configure_cpu_threads(); "
          "import torch; print(n, torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY'), "
          "os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_NUM_THREADS'))")


def test_configure_sets_passive_wait_and_torch_threads_before_torch_loads():
    n, torch_threads, policy, spin, omp = _python(_PROBE).stdout.split()
    assert 1 <= int(n) <= len(os.sched_getaffinity(0))
    assert int(torch_threads) == int(n) and omp == n
    assert (policy, spin) == ("PASSIVE", SPIN_COUNT)


def test_configure_respects_the_user():
    assert _python(_PROBE, MEDDINO_NUM_THREADS="3", OMP_NUM_THREADS="1").stdout.split()[:2] == ["3", "3"]
    out = _python(_PROBE, OMP_NUM_THREADS="2", OMP_WAIT_POLICY="ACTIVE").stdout.split()
    assert out == ["2", "2", "ACTIVE", "None", "2"]
    out = _python(_PROBE, MEDDINO_NUM_THREADS="off").stdout.split()
    assert out[0] == "None" and out[2:] == ["None", "None", "None"]  # off: torch's and OpenMP's defaults


def test_openmp_runtime_sees_the_wait_policy():
    """libgomp prints the settings it started with (OMP_DISPLAY_ENV): the spin count must be ours, not its
    default 300000, so the variables were in place before torch loaded it."""
    err = _python("from meddino.devices import configure_cpu_threads; configure_cpu_threads()",
                  OMP_DISPLAY_ENV="VERBOSE").stderr
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in err and f"GOMP_SPINCOUNT = '{SPIN_COUNT}'" in err


def test_cli_sets_the_wait_policy_without_importing_torch():
    code = ("import os, sys; from meddino.cli import main\n"
            "for argv in (['--help'], ['recipes']):\n"
            "    try: main(argv)\n"
            "    except SystemExit: pass\n"
            "print('torch' in sys.modules, os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))")
    res = _python(code)
    assert res.stdout.split()[-3:] == ["False", "PASSIVE", SPIN_COUNT]
    assert res.stderr == ""


def test_cli_verb_chooses_threads_quietly_unless_debug(tmp_path):
    argv = [sys.executable, "-m", "meddino", "data", "split", str(tmp_path / "missing.csv"), f"out={tmp_path}"]
    clean = {k: v for k, v in os.environ.items() if k not in _OURS}
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=clean)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "manifest not found" in res.stderr
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**clean, "MEDDINO_DEBUG": "1"})
    first, second = res.stderr.splitlines()
    assert "CPU threads" in first and "OMP_WAIT_POLICY=PASSIVE" in first and "manifest not found" in second
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**clean, "MEDDINO_NUM_THREADS": "x"})
    assert res.returncode == 2 and "MEDDINO_NUM_THREADS" in res.stderr


def test_dataloader_workers_use_one_thread():
    import torch

    class Probe(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> int:
            return torch.get_num_threads()

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        loader = torch.utils.data.DataLoader(Probe(), batch_size=None, num_workers=1)
        assert [int(x) for x in loader] == [1, 1]
    finally:
        torch.set_num_threads(old)
