"""``meddino profile``: a backbone alone and with each task head, and a pretraining recipe's throughput.

Inference (seed 000's "online inference efficiency"): for the backbone and every requested head, the
parameter count (M) and the latency of one forward pass in eval mode under ``torch.inference_mode`` on a
random normalised input ``[batch_size, 3, img_size, img_size]``, median and p95 over ``repeats`` calls after
``warmup`` calls, and FPS = ``batch_size * 1000 / median ms``. What one call covers:

- ``backbone``: ``forward_features`` (CLS + patch tokens after the final norm);
- ``linear_seg`` / ``unet``: the frozen-encoder segmentation model of ``meddino eval seg`` producing logits
  at the input size (:class:`meddino.tasks.seg.heads.SegmentationModel`; the names are the
  ``profile_name`` of the heads' entries in :data:`meddino.tasks.seg.heads.SEG_HEADS`);
- ``eomt``: EoMT's semantic map at inference (queries joined before the last blocks, no masked attention,
  per-pixel class scores at the input size);
- ``phase``: one online frame step of seed 000's phase model: backbone CLS feature, then one step of the
  causal MS-TCN with its rolling state (:class:`meddino.tasks.phase.mstcn.OnlineMSTCN`).

A head that cannot be built for this backbone (U-Net on fewer than 4 blocks, EoMT on a CNN, a task module
missing from the installation) is listed with a note instead of a number.

An ``.onnx`` model (``backbone=OUT/model.onnx`` of ``meddino export onnx``) is timed twice on the same input
at its fixed size, in fp32: onnxruntime's ``session.run`` and, beside it, the PyTorch module it was exported
from, rebuilt from the source its ``model.json`` names (:func:`meddino.deploy.onnx.load_form`); both use the
same thread count. Without that ``model.json`` (a foreign ``.onnx``) only onnxruntime is timed.

Pretraining (``--config RECIPE``): the recipe's real training step (teacher targets, student forward, losses,
backward, clipping, AdamW, EMA update; :meth:`meddino.pretrain.engine.Trainer.train_step`) on synthetic
multi-crop batches, so the number is the model's cost without data loading; images/s over ``steps`` steps
after ``warmup`` steps. On CUDA the largest per-device batch that trains one step without running out of
memory is found by doubling from 1 and then bisecting between the last batch that fit and the first that
did not (``torch.cuda.OutOfMemoryError`` is caught and the cache emptied); on CPU it is reported as n/a.

Tracking (``log`` block, docs/tracking.md): every number of every row is logged at step 0 as
``HEAD[/RUNTIME]/KEY`` (``unet/latency_ms_median``, ``pretraining_step/images_per_s``,
``onnx_seg_unet/onnxruntime/fps``), the config as hyperparameters, and ``profile.json`` as a file.
"""

from __future__ import annotations

import contextlib
import gc
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field
from rich.console import Console
from rich.table import Table

from meddino import __version__
from meddino.config import Schema, load_config
from meddino.deploy.onnx import load_form, onnx_session, read_onnx_meta
from meddino.devices import autocast, pick_device
from meddino.errors import CheckpointError, ConfigError, UserError, first_line
from meddino.models import resolve_backbone
from meddino.pretrain.config import PretrainConfig
from meddino.pretrain.distributed import DistEnv
from meddino.pretrain.engine import Trainer
from meddino.profile.timing import count_params, latency_stats, machine_info, synchronize, time_calls
from meddino.runlog import RunDir, write_json
from meddino.tasks.seg.config import EoMTConfig
from meddino.tasks.seg.heads import SEG_HEADS, SegmentationModel
from meddino.tracking import LogConfig

#: the segmentation heads by their profile name (``linear_seg`` is the ``linear`` head)
SEG_PROFILED = {h.profile_name: h for h in SEG_HEADS.values() if h.profile_name}
HEADS = (*SEG_PROFILED, "phase")


class PretrainProfileConfig(Schema):
    batch_size: int | None = Field(None, ge=1, description="per-device batch for images/s (default: the recipe's)")
    steps: int = Field(5, ge=1)
    warmup: int = Field(2, ge=0)
    max_batch: bool = True  # search the largest batch (CUDA only)
    max_batch_limit: int = Field(4096, ge=1)


class ProfileConfig(Schema):
    backbone: str | None = None
    recipe: str | None = None
    recipe_overrides: list[str] = []
    head: str = "all"  # backbone | linear_seg | unet | eomt | phase | all | comma-separated list
    img_size: int = Field(224, ge=8)
    batch_size: int = Field(1, ge=1)
    warmup: int = Field(5, ge=0)
    repeats: int = Field(50, ge=1)
    num_classes: int = Field(8, ge=1)  # segmentation classes of the profiled heads
    num_queries: int = Field(100, ge=1)  # EoMT queries (100 in the paper; seed 000's surgical configs: 13)
    num_phases: int = Field(7, ge=2)  # phase classes (AutoLaparo: 7)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    out: str = "runs/profile"
    pretrain: PretrainProfileConfig = PretrainProfileConfig()
    log: LogConfig = LogConfig()


def parse_heads(spec: str) -> list[str]:
    """``all`` -> every head; otherwise a comma-separated subset of backbone + :data:`HEADS`."""
    names = [h.strip() for h in spec.split(",") if h.strip()]
    if names == ["all"]:
        return list(HEADS)
    bad = [h for h in names if h not in (*HEADS, "backbone")]
    if bad or not names:
        raise ConfigError(f"head: unknown {', '.join(bad) or '(empty)'}; use one of backbone, "
                          f"{', '.join(HEADS)}, all (or a comma-separated list)")
    return [h for h in names if h != "backbone"]


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16" and device.type != "cuda":
        raise ConfigError("precision=bf16 needs CUDA (CPU runs in fp32)")
    return autocast(device, enabled=precision in ("auto", "bf16"))


def build_head(name: str, backbone: torch.nn.Module, cfg: ProfileConfig) -> tuple[torch.nn.Module, Any]:
    """(module holding every parameter used, callable input -> output) for one head; raises ConfigError /
    ImportError when the head is not available for this backbone."""
    if name in SEG_PROFILED:
        model = SegmentationModel(backbone, SEG_PROFILED[name].name, cfg.num_classes, freeze_backbone=True,
                                  eomt=EoMTConfig(num_queries=cfg.num_queries))
        return model, model.class_scores
    if name == "phase":
        # imported here on purpose: a phase module missing from the installation is an ImportError that
        # profile_inference turns into a skipped row (module docstring)
        from meddino.tasks.phase.mstcn import MSTCN, MSTCNConfig, OnlineMSTCN

        mstcn = MSTCN(MSTCNConfig(in_dim=int(backbone.embed_dim), num_classes=cfg.num_phases))
        online = OnlineMSTCN(mstcn.eval())
        model = torch.nn.ModuleDict({"backbone": backbone, "mstcn": mstcn})

        def step(x: torch.Tensor) -> torch.Tensor:
            return online.step(backbone(x).float())

        return model, step
    raise ConfigError(f"unknown head {name!r}")


def profile_inference(cfg: ProfileConfig, device: torch.device) -> list[dict[str, Any]]:
    """One row per (backbone, head) with params, latency median / p95 and FPS (see module docstring)."""
    if cfg.backbone.endswith(".onnx"):
        return profile_onnx(cfg, device)
    backbone = resolve_backbone(cfg.backbone, img_size=cfg.img_size).to(device).eval()
    patch = int(getattr(backbone, "patch_size", 1) or 1)
    if getattr(backbone, "version", "") != "cnn" and cfg.img_size % patch:
        raise ConfigError(f"img_size: {cfg.img_size} is not a multiple of the backbone's patch size {patch}")
    x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=device)
    n_backbone = count_params(backbone)
    base = {"model": cfg.backbone, "img_size": cfg.img_size, "batch_size": cfg.batch_size,
            "device": str(device), "precision": "bf16" if device.type == "cuda" and cfg.precision != "fp32" else "fp32"}
    rows = []
    ac = _autocast(device, cfg.precision)

    def measure(fn: Any) -> dict[str, float]:
        def call() -> None:
            with torch.inference_mode(), ac:
                fn(x)

        return latency_stats(time_calls(call, cfg.warmup, cfg.repeats, device), cfg.batch_size)

    rows.append({**base, "head": "backbone", "params_m": n_backbone / 1e6, "head_params_m": 0.0,
                 **measure(backbone.forward_features), "note": ""})
    for name in parse_heads(cfg.head):
        try:
            model, fn = build_head(name, backbone, cfg)
        except (ConfigError, ImportError, ValueError) as exc:
            rows.append({**base, "head": name, "note": f"skipped: {str(exc).splitlines()[0]}"})
            continue
        model = model.to(device).eval()
        total = count_params(model)
        rows.append({**base, "head": name, "params_m": total / 1e6, "head_params_m": (total - n_backbone) / 1e6,
                     **measure(fn), "note": "online step: backbone CLS + causal MS-TCN" if name == "phase" else ""})
        del model, fn
    return rows


_ONNX_HEADS = {"backbone": "backbone", "seg": "segmentation", "phase": "phase frame model"}


def profile_onnx(cfg: ProfileConfig, device: torch.device) -> list[dict[str, Any]]:
    """An exported ``.onnx``: onnxruntime's latency and, beside it, PyTorch's for the module it came from."""
    path = Path(cfg.backbone).expanduser()
    if not path.is_file():
        raise CheckpointError(f"backbone: {path} not found")
    if cfg.precision == "bf16":
        raise ConfigError("precision=bf16: an .onnx model is profiled in fp32, the precision of its graph")
    meta = read_onnx_meta(path)
    try:
        session = onnx_session(path, device.type)
    except UserError:
        raise
    except Exception as exc:  # onnxruntime's own error types
        raise CheckpointError(f"{path}: onnxruntime cannot load it: {first_line(exc)}") from None
    inp = session.get_inputs()[0]
    if len(inp.shape) != 4 or not all(isinstance(s, int) for s in inp.shape[1:]):
        raise ConfigError(f"{path}: input '{inp.name}' has shape {inp.shape}; profile needs [batch, 3, H, W] "
                          "with H and W fixed")
    h, w = int(inp.shape[2]), int(inp.shape[3])
    if "img_size" in cfg.model_fields_set and (cfg.img_size, cfg.img_size) != (h, w):
        raise ConfigError(f"img_size={cfg.img_size}: {path.name} has the fixed input size {h}x{w} chosen at "
                          "export (leave img_size out)")
    x = torch.randn(cfg.batch_size, 3, h, w)
    kind = (meta or {}).get("kind")
    head = _ONNX_HEADS.get(kind, "onnx") + (f" ({meta['head']})" if kind == "seg" and meta.get("head") else "")
    base = {"model": str(path), "head": head, "img_size": h if h == w else f"{h}x{w}",
            "batch_size": cfg.batch_size, "precision": "fp32"}
    rows: list[dict[str, Any]] = []
    params = None
    pytorch = {**base, "runtime": "pytorch", "device": str(device)}
    if meta is None:
        rows.append({**pytorch, "note": f"skipped: no meddino {path.with_suffix('.json').name} beside it"})
    else:
        try:
            form = load_form(meta["source"], meta.get("img_size"), meta.get("fold"))
        except UserError as exc:
            rows.append({**pytorch, "note": f"skipped: {first_line(exc)}"})
        else:
            module = form.module.to(device).eval()
            params = count_params(module)
            xd = x.to(device)

            def call() -> None:
                with torch.inference_mode():
                    module(xd)

            rows.append({**pytorch, "params_m": params / 1e6,
                         **latency_stats(time_calls(call, cfg.warmup, cfg.repeats, device), cfg.batch_size),
                         "note": f"rebuilt from {meta['source']}"})
    provider = session.get_providers()[0]
    feed = {inp.name: x.numpy()}
    note = provider
    if provider == "CUDAExecutionProvider":
        note += "; input and outputs copied between host and device in every call"
    elif device.type == "cuda":
        note += " (this onnxruntime has no CUDA provider)"
    # session.run returns host arrays, so it has finished when it returns: timed as a CPU call
    stats = latency_stats(time_calls(lambda: session.run(None, feed), cfg.warmup, cfg.repeats, torch.device("cpu")),
                          cfg.batch_size)
    rows.append({**base, "runtime": "onnxruntime", "device": "cuda" if provider == "CUDAExecutionProvider" else "cpu",
                 "params_m": params / 1e6 if params is not None else None, **stats, "note": note})
    return rows


# ---------------------------------------------------------------------------------------------- pretraining
def _pretrain_trainer(cfg: ProfileConfig, device: torch.device, tmp: Path) -> Any:
    """A :class:`~meddino.pretrain.engine.Trainer` of the recipe, set up on a one-image folder (the data is
    never read: the profile feeds synthetic batches)."""
    data = tmp / "data"
    data.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(data / "blank.png")
    overrides = [*cfg.recipe_overrides, f"data.path={data}", f"out={tmp / 'out'}", "data.num_workers=0",
                 f"train.device={device.type}", "monitor.every=0"]
    if cfg.precision == "fp32":
        overrides.append("train.precision=fp32")
    pcfg = load_config(PretrainConfig, cfg.recipe, overrides, "pretrain")
    trainer = Trainer(pcfg, DistEnv(0, 1, 0, device))
    trainer.setup(require_batch=False)  # the steps get synthetic batches: the one blank image only indexes
    return trainer


def _synthetic_batch(trainer: Any, batch: int, device: torch.device) -> dict[str, Any]:
    c = trainer.cfg.crops
    g = torch.randn(2, batch, 3, c.global_size, c.global_size, device=device)
    loc = torch.randn(c.n_local, batch, 3, c.local_size, c.local_size, device=device)
    return {"global": g, "local": loc, "slot": torch.arange(batch), "size": batch, "skipped": []}


def _train_steps(trainer: Any, batch: int, n: int, start: int, device: torch.device) -> float:
    """``n`` real training steps at per-device batch ``batch``; seconds taken."""
    trainer.global_batch = batch  # iBOT masks are drawn for the global batch (single process here)
    data = _synthetic_batch(trainer, batch, device)
    synchronize(device)
    t0 = time.perf_counter()
    for it in range(start, start + n):
        trainer.train_step(it, data)
    synchronize(device)
    return time.perf_counter() - t0


def _first_trained_iteration(trainer: Any) -> int:
    """Continued-pretraining recipes keep the backbone frozen for the first iterations (head warm-up); the
    profile times steps where the backbone trains."""
    return int(getattr(trainer.sched, "frozen_iters", 0) or 0)


def _fits(trainer: Any, batch: int, device: torch.device) -> bool:
    try:
        _train_steps(trainer, batch, 1, _first_trained_iteration(trainer), device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()


def largest_batch(fits: Any, limit: int) -> tuple[int, int | None]:
    """Largest ``b`` in 1..limit with ``fits(b)`` assuming monotonicity: doubling, then bisection.

    Returns ``(largest fitting batch or 0, smallest failing batch or None when limit was reached)``.
    """
    if not fits(1):
        return 0, 1
    ok, bad = 1, None
    while bad is None:
        nxt = min(ok * 2, limit)
        if nxt == ok:
            return ok, None
        if fits(nxt):
            ok = nxt
        else:
            bad = nxt
    while bad - ok > 1:
        mid = (ok + bad) // 2
        if fits(mid):
            ok = mid
        else:
            bad = mid
    return ok, bad


def profile_pretrain(cfg: ProfileConfig, device: torch.device) -> dict[str, Any]:
    """Images/s of the recipe's training step and (CUDA) the largest batch that fits."""
    with tempfile.TemporaryDirectory(prefix="meddino-profile-") as tmp:
        trainer = _pretrain_trainer(cfg, device, Path(tmp))
        p = cfg.pretrain
        batch = p.batch_size or trainer.cfg.data.batch_size
        c = trainer.cfg.crops
        row: dict[str, Any] = {
            "model": cfg.recipe, "head": "pretraining step", "arch": trainer.cfg.model.arch,
            "method": trainer.cfg.method.version, "img_size": c.global_size, "local_size": c.local_size,
            "n_local": c.n_local, "batch_size": batch, "device": str(device),
            "precision": "bf16" if trainer.autocast else "fp32",
            "params_m": count_params(trainer.student) / 1e6,
        }
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        it0 = _first_trained_iteration(trainer)
        if p.warmup:
            _train_steps(trainer, batch, p.warmup, it0, device)
        seconds = _train_steps(trainer, batch, p.steps, it0 + p.warmup, device)
        row["images_per_s"] = batch * p.steps / seconds
        row["s_per_step"] = seconds / p.steps
        if device.type == "cuda":
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            if p.max_batch:
                ok, bad = largest_batch(lambda b, t=trainer: _fits(t, b, device), p.max_batch_limit)
                row["max_batch"] = ok
                row["note"] = (f"largest batch by doubling + bisection (first failing: {bad})" if bad
                               else f"reached max_batch_limit={p.max_batch_limit} without running out of memory")
        else:
            row["max_batch"] = "n/a"
            row["note"] = "max batch: n/a on CPU (no device memory limit to search; host RAM would swap)"
        del trainer
        gc.collect()
    return row


def run_profile(cfg: ProfileConfig) -> Path:
    """Measure, print a table, write ``OUT/profile.json``; returns the JSON path."""
    if not cfg.backbone and not cfg.recipe:
        raise ConfigError("profile: give backbone=CKPT and/or --config RECIPE")
    device = pick_device(cfg.device)
    torch.manual_seed(0)
    rows = profile_inference(cfg, device) if cfg.backbone else []
    if cfg.recipe:
        rows.append(profile_pretrain(cfg, device))
    payload = {"task": "profile", "meddino_version": __version__, "machine": machine_info(device),
               "config": cfg.model_dump(mode="json"), "rows": rows}
    # the folder is written once everything is measured: a refused input leaves nothing there
    with RunDir(Path(cfg.out), cfg) as run:  # config.yaml and the trackers of cfg.log
        path = run / "profile.json"
        write_json(path, payload)
        run.log(0, **tracked_numbers(rows))
        run.artifact(path)
    print_table(rows, payload["machine"])
    return path


#: the numbers of a profile row that are measurements (the rest: sizes and settings, in the config)
TRACKED_KEYS = ("params_m", "head_params_m", "latency_ms_median", "latency_ms_p95", "fps", "images_per_s",
                "max_batch")


def tracked_numbers(rows: list[dict[str, Any]]) -> dict[str, float]:
    """``{"HEAD[/RUNTIME]/KEY": value}`` of every measured number of every row, the names cut to what
    MLflow accepts in a metric name (a head such as ``seg (unet)`` becomes ``seg_unet``)."""
    out: dict[str, float] = {}
    for row in rows:
        name = "/".join(_metric_name(str(row[k])) for k in ("head", "runtime") if row.get(k))
        for key in TRACKED_KEYS:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{name}/{key}"] = float(value)
    return out


def _metric_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "row"


def print_table(rows: list[dict[str, Any]], machine: dict[str, Any]) -> None:
    table = Table(title=f"meddino profile on {machine.get('device_name', machine.get('device'))}")
    cols = [("model", "model"), ("head", "head"), ("runtime", "runtime"), ("params (M)", "params_m"), ("batch", "batch_size"),
            ("median ms", "latency_ms_median"), ("p95 ms", "latency_ms_p95"), ("FPS", "fps"),
            ("img/s (train)", "images_per_s"), ("max batch", "max_batch"), ("note", "note")]
    cols = [(t, k) for t, k in cols if any(r.get(k) not in (None, "") for r in rows)]
    for title, _ in cols:
        table.add_column(title)
    for r in rows:
        table.add_row(*[_cell(r.get(k)) for _, k in cols])
    Console(width=160).print(table)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 0.01 else f"{v:.4f}"
    return str(v)
