"""ONNX export for deployment (``meddino export onnx SRC OUT``), checked against PyTorch when written.

One graph per export, input ``image`` ``[batch, 3, H, W]`` (normalised float32, the mean / std recorded
beside it), H x W fixed at export, the batch dynamic. What ``SRC`` is decides the outputs:

- a backbone spec (checkpoint, ``random:<arch>``, ``timm:<name>``): ``cls`` ``[B, D]``, ``patch``
  ``[B, N, D]`` and, with registers (DINOv2 ``*_reg``) or storage tokens (DINOv3), ``registers`` ``[B, R, D]``,
  the final-normed tokens of ``forward_features``;
- a run folder of ``meddino eval seg``: ``scores`` ``[B, C, H, W]``, the class scores ``predict seg``
  argmaxes (logits of the linear, U-Net and MONAI heads; for EoMT ``sum_q sigmoid(mask_q) softmax(class_q)``
  of its plain-ViT inference pass, the form mask annealing ends in);
- a run folder of ``meddino eval phase``: the frame model, ``features`` ``[B, D]`` (the CLS token the causal
  MS-TCN reads) and, when stage 1 trained a head, its ``logits`` ``[B, K]``.

Why baked: position embeddings resampled per forward (bicubic with DINO's offset) and RoPE computed from the
patch grid are where exports of the originals break (dynamic shapes, bicubic resizing, RoPE numerics). At a
fixed size both are constants: :func:`bake_input_size` computes them once, in float32, with the code PyTorch
runs, and the graph stores them, so it has no resize and no trigonometry left.

The check: the written file is run with onnxruntime on CPU at batch 1 and 3 (the trace used 2, so a batch
frozen into the graph fails) on seeded normal inputs, and every output is compared with the PyTorch module as
meddino runs it (fp32, CPU, positions resampled per forward). The largest absolute difference is printed per
output; one above ``max_abs_diff`` (1e-4), or a NaN, refuses the export and leaves nothing behind.

Exporters: ``torchscript`` (default; ``torch.onnx.export(dynamo=False)``, a trace, fast and enough for a
fixed-size graph; torch's deprecation and tracer warnings are silenced because the check is what verifies
the trace) or ``dynamo`` (``torch.export``, needs onnxscript), for when torch drops the first.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from meddino import __version__
from meddino.errors import CheckpointError, ConfigError, UserError, first_line
from meddino.models import resolve_backbone
from meddino.models.backbone import Backbone
from meddino.models.checkpoints import load_backbone, load_into_strict
from meddino.models.pos_embed import resample_pos_embed
from meddino.runlog import write_json

FORMAT = "meddino-onnx"
INPUT = "image"
MAX_ABS_DIFF = 1e-4  # fp32: onnxruntime against PyTorch, refused above
TRACE_BATCH = 2
CHECK_BATCHES = (1, 3)  # neither is the traced batch: a batch frozen into the graph fails the check
DEFAULT_OPSET = 18
SEG_FORMAT, PHASE_FORMAT = "meddino-seg", "meddino-phase"  # the model.json formats of eval seg / eval phase


class OnnxCheckError(UserError):
    """The exported graph does not reproduce PyTorch (difference above the limit, NaN, or it does not run)."""


@dataclass
class ExportForm:
    """What is exported: a module ``image -> tuple of tensors`` (eval, fp32, CPU), its output names, the fixed
    input size and normalisation, and what the sidecar records about the source."""

    kind: str  # backbone | seg | phase
    module: nn.Module
    outputs: tuple[str, ...]
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    info: dict[str, Any] = field(default_factory=dict)


class BackboneGraph(nn.Module):
    """``image -> (cls, patch[, registers])``: a backbone's final-normed tokens as tensors."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.registers = int(getattr(backbone, "num_registers", 0)) > 0

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.backbone.forward_features(image)
        return (out["cls"], out["patch"], out["registers"]) if self.registers else (out["cls"], out["patch"])


class SegGraph(nn.Module):
    """``image -> (scores,)``: a trained segmentation model's class scores at the input size."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model.class_scores(image),)


class PhaseGraph(nn.Module):
    """``image -> (features[, logits])``: the phase frame model (backbone CLS, then the stage-1 head)."""

    def __init__(self, backbone: nn.Module, head: nn.Module | None):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.backbone.forward_features(image)["cls"]
        return (features,) if self.head is None else (features, self.head(features))


class FixedRope(nn.Module):
    """A RoPE module for one patch grid: its embedding computed once (timm ``get_embed``'s interface)."""

    def __init__(self, embed: torch.Tensor, grid: tuple[int, int]):
        super().__init__()
        self.register_buffer("embed", embed.detach().clone())
        self.grid = tuple(int(g) for g in grid)

    def get_embed(self, shape: Any = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        if shape is not None and tuple(int(s) for s in shape) != self.grid:
            raise ValueError(f"this RoPE is baked for the {self.grid} patch grid, got {tuple(shape)}")
        return self.embed if dtype is None else self.embed.to(dtype)


# ---------------------------------------------------------------------------------------------- baking
def bake_input_size(module: nn.Module, size: tuple[int, int]) -> nn.Module:
    """Fix every backbone inside ``module`` (in place: give it a copy) to input ``size``: learned position
    embeddings resampled once to that grid in the backbone's own mode (so no forward resamples), RoPE computed
    once for it. The outputs at ``size`` are those of the module before."""
    for sub in list(module.modules()):
        if isinstance(sub, Backbone):
            _bake_backbone(sub, size)
    return module


def _bake_backbone(backbone: Backbone, size: tuple[int, int]) -> None:
    vit = backbone.vit
    grid = backbone.grid_size(size)
    if getattr(vit, "pos_embed", None) is not None:
        stored = tuple(int(s) for s in vit.patch_embed.grid_size)
        if grid != stored:
            n_prefix = 0 if getattr(vit, "no_embed_class", False) else int(vit.num_prefix_tokens)
            mode = backbone.pos_embed_resample or "timm"  # no meddino hook: timm's own resampling
            with torch.no_grad():
                pos = vit.pos_embed.detach()
                grid_pos = resample_pos_embed(pos[:, n_prefix:], grid, mode, stored)
                vit.pos_embed = nn.Parameter(torch.cat([pos[:, :n_prefix], grid_pos], dim=1), requires_grad=False)
            patch_embed = vit.patch_embed
            patch_embed.grid_size = grid
            patch_embed.num_patches = grid[0] * grid[1]
            patch_embed.img_size = (int(size[0]), int(size[1]))
    if backbone.uses_rope:
        with torch.no_grad():
            embed = vit.rope.get_embed(shape=list(grid))
        vit.rope = FixedRope(embed, grid)


# ---------------------------------------------------------------------------------------------- sources
def load_form(src: str, img_size: int | None = None, fold: int | None = None) -> ExportForm:
    """``SRC`` -> its :class:`ExportForm`: a run folder of ``eval seg`` / ``eval phase`` (by its
    ``model.json``), else a backbone spec. ``img_size``: the fixed size of a backbone export (default: the
    backbone's own); a trained model keeps the size it was trained at."""
    path = Path(src).expanduser()
    fmt, model_dir = _run_model(path)
    if fmt == FORMAT:
        raise ConfigError(f"{src}: is an ONNX export already (give the checkpoint or run folder it came from)")
    if fold is not None and fmt != SEG_FORMAT:
        raise ConfigError(f"fold={fold}: only a segmentation run folder has folds ({src} is not one)")
    if fmt == SEG_FORMAT:
        return _seg_form(path, img_size, fold)
    if fmt == PHASE_FORMAT:
        return _phase_form(model_dir, img_size)
    return _backbone_form(src, img_size)


def _run_model(path: Path) -> tuple[str | None, Path | None]:
    """(the ``format`` of a run folder's ``model.json``, its folder), or (None, None) for anything else."""
    if not path.is_dir():
        return None, None
    for meta_path in (path / "model" / "model.json", path / "model.json"):
        if meta_path.is_file():
            try:
                fmt = json.loads(meta_path.read_text()).get("format")
            except (json.JSONDecodeError, AttributeError):
                raise CheckpointError(f"{meta_path}: not valid JSON") from None
            return fmt, meta_path.parent
    return None, None


def _check_multiple(size: tuple[int, int], multiple: int, what: str) -> None:
    if any(s % multiple for s in size):
        raise ConfigError(f"img_size: {size[0]}x{size[1]} is not a multiple of {what} {multiple}")


def _backbone_form(src: str, img_size: int | None) -> ExportForm:
    backbone = resolve_backbone(src, img_size=img_size).eval()
    side = int(img_size or backbone.img_size)
    size = (side, side)
    if getattr(backbone, "version", "cnn") != "cnn":
        _check_multiple(size, int(backbone.patch_size), "the backbone's patch size")
    graph = BackboneGraph(backbone).eval()
    outputs = ("cls", "patch", "registers") if graph.registers else ("cls", "patch")
    info = {"arch": backbone.arch, "embed_dim": int(backbone.embed_dim), "img_size": img_size,
            "pos_embed_resample": getattr(backbone, "pos_embed_resample", None)}
    return ExportForm("backbone", graph, outputs, size, tuple(backbone.mean), tuple(backbone.std), info)


def _fixed_size(recorded: tuple[int, int], img_size: int | None, what: str) -> tuple[int, int]:
    if img_size is not None and (img_size, img_size) != tuple(recorded):
        raise ConfigError(f"img_size={img_size}: this {what} was trained at {recorded[0]}x{recorded[1]} and is "
                          "exported at that size (leave img_size out)")
    return recorded


def _seg_form(path: Path, img_size: int | None, fold: int | None) -> ExportForm:
    from meddino.tasks.seg.predict import load_seg_model  # why: the seg task only for a seg run folder

    model, meta = load_seg_model(path, fold)
    head = model.head
    if model.spec.mask_classification and getattr(head, "masked_inference", False):
        raise ConfigError(f"{path}: this EoMT was trained without mask annealing (eomt.mask_annealing=false), so "
                          "its inference keeps masked attention; export onnx takes EoMT in its plain-ViT "
                          "inference form only")
    size = _fixed_size(tuple(int(s) for s in meta["input_size"]), img_size, "segmentation model")
    _check_multiple(size, int(model.input_multiple), "the model's input multiple")
    info = {"head": meta["head"], "classes": list(meta["classes"]), "fold": int(meta["fold"]),
            "scores": "eomt semantic scores" if model.spec.mask_classification else "logits",
            "backbone_arch": meta.get("backbone_arch"), "dataset": meta.get("dataset")}
    return ExportForm("seg", SegGraph(model.float().eval()).eval(), ("scores",), size, tuple(meta["mean"]),
                      tuple(meta["std"]), info)


def _phase_form(model_dir: Path, img_size: int | None) -> ExportForm:
    meta = json.loads((model_dir / "model.json").read_text())
    phases = list(meta["phases"])
    side = int(meta["img_size"])
    size = _fixed_size((side, side), img_size, "phase model")
    backbone = load_backbone(model_dir / "backbone.safetensors", img_size=side).eval()
    head = None
    if meta.get("stage1"):
        weights = model_dir / "head.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{model_dir}: model.json says stage 1 trained a head, but {weights.name} is missing")
        head = nn.Linear(int(backbone.embed_dim), len(phases))
        try:
            state = load_file(str(weights))
        except (OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"unreadable phase head {weights}: {first_line(exc)}") from None
        load_into_strict(head, state, weights)
    outputs = ("features",) if head is None else ("features", "logits")
    info = {"phases": phases, "fps": meta.get("fps"), "feature": "cls", "arch": backbone.arch,
            "stage1": bool(meta.get("stage1"))}
    return ExportForm("phase", PhaseGraph(backbone, head).eval(), outputs, size, tuple(meta["mean"]),
                      tuple(meta["std"]), info)


# ---------------------------------------------------------------------------------------------- export
def _require_onnx() -> tuple[Any, Any]:
    try:  # optional: the ``onnx`` extra
        import onnx
        import onnxruntime
    except ImportError:
        raise ConfigError("export onnx needs onnx and onnxruntime: pip install 'meddino[onnx]'") from None
    return onnx, onnxruntime


def _check_opset(opset: int, exporter: str) -> None:
    if exporter == "torchscript":
        from torch.onnx import _constants  # why: the TorchScript exporter's supported range lives there

        top = int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))
        if not 17 <= opset <= top:
            raise ConfigError(f"opset={opset}: the torchscript exporter writes opsets 17..{top} "
                              "(17: the first with LayerNormalization)")
    elif opset < 18:
        raise ConfigError(f"opset={opset}: the dynamo exporter writes opset 18 or later")


def _run_exporter(graph: nn.Module, example: torch.Tensor, path: Path, outputs: tuple[str, ...], opset: int,
                  exporter: str) -> None:
    takes_dynamo = "dynamo" in inspect.signature(torch.onnx.export).parameters
    kwargs: dict[str, Any] = {"input_names": [INPUT], "output_names": list(outputs), "opset_version": opset}
    if exporter == "dynamo":
        if not takes_dynamo:
            raise ConfigError(f"exporter=dynamo needs a torch with the dynamo ONNX exporter (this is {torch.__version__})")
        try:
            import onnxscript  # noqa: F401  # why: the dynamo exporter's translator; named if missing
        except ImportError:
            raise ConfigError("exporter=dynamo needs onnxscript: pip install 'meddino[onnx]'") from None
        n_bytes = sum(p.numel() * p.element_size() for p in graph.parameters())
        kwargs.update(dynamo=True, dynamic_shapes={INPUT: {0: torch.export.Dim("batch")}}, verbose=False,
                      external_data=n_bytes > 1.8 * 2**30)  # one file below protobuf's 2 GB limit
    else:
        kwargs.update(dynamic_axes={name: {0: "batch"} for name in (INPUT, *outputs)}, do_constant_folding=True)
        if takes_dynamo:
            kwargs["dynamo"] = False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*(TorchScript-based ONNX export|feature will be removed).*")
        # an InstanceNorm without running statistics (MONAI's U-Net) normalises with the input's own in eval
        # too, which the exporter calls "train=True"; the check compares it with PyTorch's eval output
        warnings.filterwarnings("ignore", message=r".*operator 'instance_norm' is set to train=True.*")
        torch.onnx.export(graph, (example,), str(path), **kwargs)


def onnx_session(path: str | Path, device: str = "cpu") -> Any:
    """An onnxruntime session on CPU (or CUDA when asked and available) with torch's thread count, so both
    runtimes share the cores meddino chose (:func:`meddino.devices.configure_cpu_threads`)."""
    _, ort = _require_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    providers = ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def check_onnx(path: Path, form: ExportForm, max_abs_diff: float = MAX_ABS_DIFF) -> dict[str, float]:
    """Largest |onnxruntime - PyTorch| per output over seeded inputs at :data:`CHECK_BATCHES`; raises
    :class:`OnnxCheckError` when one is above ``max_abs_diff`` or not a number."""
    try:
        session = onnx_session(path, "cpu")
    except UserError:
        raise
    except Exception as exc:  # onnxruntime raises its own types for a graph it cannot load
        raise OnnxCheckError(f"onnxruntime cannot load the exported graph: {first_line(exc)}") from None
    gen = torch.Generator().manual_seed(1)
    diffs = {name: 0.0 for name in form.outputs}
    for batch in CHECK_BATCHES:
        x = torch.randn(batch, 3, *form.input_size, generator=gen)
        with torch.no_grad():
            expected = [t.float().numpy() for t in form.module(x)]
        try:
            got = session.run(list(form.outputs), {INPUT: x.numpy()})
        except Exception as exc:  # a shape frozen into the graph, an operator onnxruntime lacks
            raise OnnxCheckError(f"onnxruntime cannot run the exported graph at batch {batch}: {first_line(exc)}") from None
        for name, ref, out in zip(form.outputs, expected, got):
            if tuple(out.shape) != tuple(ref.shape):
                raise OnnxCheckError(f"output '{name}' at batch {batch}: onnxruntime gives shape {tuple(out.shape)}, "
                                     f"PyTorch {tuple(ref.shape)}")
            d = float(np.max(np.abs(out.astype(np.float64) - ref.astype(np.float64)))) if ref.size else 0.0
            if math.isnan(d) or (not math.isnan(diffs[name]) and d > diffs[name]):
                diffs[name] = d
    worst = max(diffs, key=lambda k: math.inf if math.isnan(diffs[k]) else diffs[k])
    if not diffs[worst] <= max_abs_diff:  # NaN fails too
        raise OnnxCheckError(f"onnxruntime (CPU) differs from PyTorch by {diffs[worst]:.3g} in output '{worst}', "
                             f"above max_abs_diff={max_abs_diff:g} (fp32); nothing written")
    return diffs


def _output_shapes(form: ExportForm) -> dict[str, list[Any]]:
    with torch.no_grad():
        outs = form.module(torch.zeros(1, 3, *form.input_size))
    return {name: ["batch", *[int(s) for s in t.shape[1:]]] for name, t in zip(form.outputs, outs)}


def _stamp(path: Path, props: dict[str, str]) -> int:
    """Write ``props`` into the file's metadata (what onnxruntime's ``get_modelmeta()`` shows) and return the
    default-domain opset it declares. External weights stay where the exporter put them."""
    onnx, _ = _require_onnx()
    model = onnx.load(str(path), load_external_data=False)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def export_onnx(form: ExportForm, out: str | Path, source: str, opset: int = DEFAULT_OPSET,
                exporter: str = "torchscript", max_abs_diff: float = MAX_ABS_DIFF) -> dict[str, Any]:
    """Write ``OUT/model.onnx`` (baked at ``form.input_size``, dynamic batch) and ``OUT/model.json``, after
    :func:`check_onnx` passed on the written file; returns the sidecar. Files appear only once checked."""
    onnx, ort = _require_onnx()
    _check_opset(opset, exporter)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    graph = bake_input_size(copy.deepcopy(form.module), form.input_size).eval()
    example = torch.randn(TRACE_BATCH, 3, *form.input_size, generator=torch.Generator().manual_seed(0))
    h, w = form.input_size
    props = {"meddino_format": FORMAT, "meddino_kind": form.kind, "input_size": json.dumps([h, w]),
             "mean": json.dumps(list(form.mean)), "std": json.dumps(list(form.std)),
             "outputs": json.dumps(list(form.outputs)), "meddino_version": __version__}
    for key in ("classes", "phases", "head"):
        if key in form.info:
            props[key] = json.dumps(form.info[key])
    with tempfile.TemporaryDirectory(prefix=".model.onnx.", dir=out) as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            _run_exporter(graph, example, path, form.outputs, opset, exporter)
        except UserError:
            raise
        except Exception as exc:  # an operator the exporter cannot translate: named, with the exporter
            other = "dynamo" if exporter == "torchscript" else "torchscript"
            raise OnnxCheckError(f"the {exporter} exporter failed on this model: {first_line(exc)} "
                                 f"(exporter={other} may get through)") from None
        opset_used = _stamp(path, props)
        diffs = check_onnx(path, form, max_abs_diff)
        for name in sorted(os.listdir(tmp)):  # model.onnx and any external weight files
            os.replace(Path(tmp) / name, out / name)
    shown = ", ".join(f"{k} {v:.2g}" for k, v in diffs.items())
    print(f"onnxruntime vs PyTorch on CPU (fp32, batch {' and '.join(map(str, CHECK_BATCHES))}): max |diff| "
          f"{shown} (limit {max_abs_diff:g})")
    meta = {
        "format": FORMAT, "format_version": 1, "kind": form.kind, "source": _source(source),
        "onnx": "model.onnx", "opset": opset_used, "exporter": exporter,
        "input": {"name": INPUT, "shape": ["batch", 3, h, w], "dtype": "float32"},
        "outputs": _output_shapes(form), "input_size": [h, w], "mean": list(form.mean), "std": list(form.std),
        "positions": f"baked at {h}x{w}" if any(isinstance(m, Backbone) for m in form.module.modules()) else None,
        "check": {"runtime": "onnxruntime CPUExecutionProvider", "batches": list(CHECK_BATCHES),
                  "max_abs_diff": diffs, "limit": max_abs_diff, "precision": "fp32"},
        "versions": {"meddino": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": ort.__version__},
        **form.info,
    }
    write_json(out / "model.json", meta)
    return meta


def _source(src: str) -> str:
    """A path as an absolute path (so ``meddino profile`` finds it from anywhere); specs as given."""
    if src.startswith(("random:", "timm:")):
        return src
    return str(Path(src).expanduser().resolve())


def read_onnx_meta(path: str | Path) -> dict[str, Any] | None:
    """The sidecar ``model.json`` beside an exported ``.onnx`` (None when there is none: a foreign file)."""
    meta_path = Path(path).expanduser().with_suffix(".json")
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{meta_path}: not valid JSON") from None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def run_export_onnx(cfg: Any) -> int:
    """``meddino export onnx SRC OUT``: build the form, export, check, write; one summary line."""
    _check_opset(cfg.opset, cfg.exporter)  # before any model is loaded
    form = load_form(cfg.src, cfg.img_size, cfg.fold)
    meta = export_onnx(form, cfg.out, cfg.src, cfg.opset, cfg.exporter, cfg.max_abs_diff)
    h, w = form.input_size
    what = {"backbone": "backbone", "seg": f"segmentation model ({form.info.get('head')})",
            "phase": "phase frame model"}[form.kind]
    print(f"wrote {Path(cfg.out) / 'model.onnx'} and model.json: {what}, input [batch, 3, {h}, {w}], outputs "
          f"{', '.join(form.outputs)}, opset {meta['opset']} ({cfg.exporter})")
    return 0
