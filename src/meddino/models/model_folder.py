"""``meddino export folder RUN``: a pretraining run as a model folder that others load without meddino.

The folder holds what timm and the Hugging Face Hub expect, plus meddino's own sidecar:

- ``model.safetensors``: the teacher backbone in timm's key layout (:func:`export_backbone`, byte-reproducible);
- ``model.json``: meddino's sidecar of that file (mask token, position-embedding resampling mode), so
  ``backbone=FOLDER`` loads it exactly as ``RUN/teacher_backbone.safetensors``;
- ``config.json``: timm's model config (``architecture``, ``model_args``, ``pretrained_cfg`` with the input
  size, mean/std and an empty ``license``) and a ``meddino`` section (registers, LayerNorm eps, ...), read by
  ``timm.create_model("local-dir:FOLDER", pretrained=True)`` or, after an upload, ``"hf-hub:ORG/NAME"``;
- ``README.md``: a model card generated from the run: data summary, recipe and resolved config,
  iterations, the kNN monitor, the training-health diagnostics at the end, and a license left to the user.

The card reads the run folder's files (``config.yaml``, ``metrics.jsonl``, ``data_summary.json``,
``meddino_run.json``) as data, so this module imports nothing from the pretraining layer above it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import model_validator

from meddino.config import Schema
from meddino.errors import UserError
from meddino.runlog import atomic_write, read_metrics, read_run_marker, write_json

WEIGHTS = "model.safetensors"
FILES = (WEIGHTS, "model.json", "config.json", "README.md")
FOLDER_FORMAT = "meddino-model-folder"
RUN_WEIGHTS = "teacher_backbone.safetensors"
HEALTH = ("teacher_entropy", "ln_k", "teacher_information", "prototype_usage", "effective_rank")


class ExportFolderConfig(Schema):
    """``meddino export folder RUN [out=DIR] [name=NAME]``."""

    run: str  # a `meddino pretrain` run folder
    out: str | None = None  # default: RUN/model
    name: str | None = None  # the model's name in the card (default: the run folder's name)

    @model_validator(mode="after")
    def _out(self) -> ExportFolderConfig:
        # RUN is checked here, before out= is claimed: the default out (RUN/model) must not create RUN
        check_run(Path(self.run).expanduser())
        if self.out is None:
            self.out = str(Path(self.run) / "model")
        elif Path(self.out).expanduser().resolve() == Path(self.run).expanduser().resolve():
            raise ValueError(f"out={self.out} is the run folder itself; give the model a new folder "
                             "(default RUN/model)")
        return self


def run_export_folder(cfg: ExportFolderConfig) -> int:
    from meddino.models.checkpoints.load import load_backbone  # torch: only once the verb runs

    run = Path(cfg.run).expanduser()
    weights = check_run(run)
    backbone = load_backbone(weights)
    out = write_model_folder(backbone, cfg.out or run / "model", run, cfg.name)
    n_params = sum(p.numel() for p in backbone.parameters()) - backbone.mask_token.numel()
    print(f"wrote {out}: {', '.join(FILES)} ({backbone.arch['timm_name']}, DINO{backbone.version}, "
          f"{n_params / 1e6:.2f} M parameters); set the license in README.md and config.json before sharing it")
    return 0


def check_run(run: Path) -> Path:
    """The final teacher export of the pretraining run ``run``; anything else is one line naming it."""
    if not run.exists():
        raise UserError(f"export folder: run folder not found: {run}")
    if not run.is_dir():
        raise UserError(f"export folder: {run} is a file; give the folder `meddino pretrain` wrote (out=)")
    marker = read_run_marker(run)
    owner = marker.get("verb")
    if owner is not None and owner != "pretrain":
        raise UserError(f"export folder: {run} holds a `meddino {owner}` run, not a pretraining run; give the "
                        "folder `meddino pretrain` wrote")
    weights = run / RUN_WEIGHTS
    if weights.is_file():
        return weights
    if owner == "pretrain":
        raise UserError(f"export folder: {run}: the pretraining run has not finished (no {RUN_WEIGHTS} yet); "
                        f"`meddino pretrain ... out={run} resume=auto` finishes it")
    raise UserError(f"export folder: {run} is not a pretraining run folder (no {RUN_WEIGHTS} and no "
                    "meddino_run.json)")


def write_model_folder(backbone: Any, out: str | Path, run: Path | None = None, name: str | None = None) -> Path:
    """Write the four files of the folder (module docstring) for ``backbone``, the card from ``run``."""
    from meddino.models.checkpoints.export import export_backbone

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    export_backbone(backbone, out / WEIGHTS)  # + model.json, meddino's sidecar
    info = read_run(run) if run is not None else {}
    name = name or (run.resolve().name if run is not None else out.resolve().name)
    config = timm_config(backbone, info, name)
    write_json(out / "config.json", config)
    with atomic_write(out / "README.md", "w") as fh:
        fh.write(model_card(backbone, config, info, name))
    return out


def _layer_norm_eps(backbone: Any) -> float | None:
    from torch import nn

    return next((float(m.eps) for m in backbone.modules() if isinstance(m, nn.LayerNorm)), None)


def timm_config(backbone: Any, info: dict[str, Any], name: str) -> dict[str, Any]:
    """timm's ``config.json``: what ``create_model`` rebuilds the module from (``model_args``), the
    preprocessing (``pretrained_cfg``), and meddino's facts timm has no field for."""
    kwargs = dict(backbone.arch.get("kwargs", {}))
    norm_eps = kwargs.pop("norm_eps", None)  # not a timm option (model card: set it after create_model)
    mode = kwargs.pop("pos_embed_resample", None)
    model_args = {**kwargs, "num_classes": 0, "global_pool": "token", "dynamic_img_size": True}
    size = int(backbone.img_size)
    data = info.get("data") or {}
    samples = f" on {data['samples']} samples" if data.get("samples") else ""
    return {
        "architecture": backbone.arch["timm_name"],
        "num_classes": 0,
        "num_features": int(backbone.embed_dim),
        "global_pool": "token",
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "fixed_input_size": False,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": [float(v) for v in backbone.mean],
            "std": [float(v) for v in backbone.std],
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": None,  # left for the user: it depends on their data and on the start's license
            "description": f"{name}: DINO{backbone.version} {backbone.arch['timm_name']} pretrained with meddino"
                           f"{samples}",
        },
        "meddino": {
            "format": FOLDER_FORMAT,
            "format_version": 1,
            "meddino_version": _meddino_version(),
            "dino_version": backbone.version,
            "patch_size": int(backbone.patch_size),
            "embed_dim": int(backbone.embed_dim),
            "depth": int(backbone.depth),
            "num_heads": int(backbone.blocks[0].attn.num_heads),
            "num_registers": int(backbone.num_registers),
            "img_size": size,
            "layer_norm_eps": norm_eps if norm_eps is not None else _layer_norm_eps(backbone),
            "layer_norm_eps_set_after_create": norm_eps is not None,
            "pos_embed_resample": mode,
            "weights": WEIGHTS,
            "sidecar": "model.json",
            "iterations": info.get("last_step"),
        },
    }


def _meddino_version() -> str:
    from meddino import __version__

    return __version__


def read_run(run: Path) -> dict[str, Any]:
    """What the card says about the run, from its files: the resolved config, the metric rows, the data
    summary, the recipe the marker recorded. A missing file leaves its part out."""
    info: dict[str, Any] = {"run": run}
    try:
        info["config"] = yaml.safe_load((run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        info["config"] = {}
    with_text = run / "config.yaml"
    info["config_text"] = with_text.read_text() if with_text.is_file() else ""
    rows = read_metrics(run)
    info["rows"] = rows
    info["last_step"] = max((int(r["step"]) for r in rows if "step" in r), default=None)
    try:
        info["data"] = json.loads((run / "data_summary.json").read_text())
    except (OSError, ValueError):
        info["data"] = None
    info["recipe"] = read_run_marker(run).get("recipe")
    return info


# ------------------------------------------------------------------------------------------------ card
def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return "-" if value is None else str(value)


def _get(cfg: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def model_card(backbone: Any, config: dict[str, Any], info: dict[str, Any], name: str) -> str:
    """The README.md: Hub front matter (license left empty), how to load it, then what the run did."""
    arch = config["architecture"]
    version = backbone.version
    parts = [
        "---",
        "library_name: timm",
        "license:  # left for you: it depends on your data and on the license of the weights you started from",
        "pipeline_tag: image-feature-extraction",
        "tags:",
        "- image-feature-extraction",
        "- timm",
        "- meddino",
        f"- dino{version}",
        "---",
        "",
        f"# {name}",
        "",
        _summary(backbone, config, info),
        "",
        "This card was generated by `meddino export folder` from the run's files. Before sharing the folder, "
        "set the license (above and `pretrained_cfg.license` in config.json), describe the data in words, and "
        "check the resolved config below: it names local paths.",
        "",
        _usage(arch, config, backbone),
        _model_table(backbone, config),
        _data_section(info),
        _recipe_section(info),
        _training_section(info),
        _knn_section(info),
        _health_section(info),
        "## License",
        "",
        "Not set. Choose one that your data's terms and the license of the starting weights allow (released "
        f"DINO{version} weights come with their own license), and write it in the front matter and in config.json.",
        "",
    ]
    return "\n".join(parts)


def _summary(backbone: Any, config: dict[str, Any], info: dict[str, Any]) -> str:
    cfg = info.get("config") or {}
    data = info.get("data") or {}
    init = cfg.get("init")
    start = f"continued from `{Path(str(init)).name}`" if init else "pretrained from a random initialisation"
    on = ""
    if data.get("samples"):
        kinds = ", ".join(f"{n} {k}{'s' if n != 1 else ''}" for k, n in data.get("by_kind", {}).items())
        on = f" on {data['samples']} samples ({kinds})"
    steps = info.get("last_step")
    its = f" for {steps} iterations" if steps else ""
    return (f"A DINO{backbone.version} ViT (`{config['architecture']}`, patch {backbone.patch_size}, width "
            f"{backbone.embed_dim}, depth {backbone.depth}) {start} with meddino's DINO{backbone.version} "
            f"objective{on}{its}. Its outputs are features (CLS and patch tokens), not classes.")


def _usage(arch: str, config: dict[str, Any], backbone: Any) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in config["model_args"].items())
    pc = config["pretrained_cfg"]
    size = pc["input_size"][-1]
    # the preprocessing too: without it timm takes the registry's default for the architecture
    preprocessing = (f"input_size=(3, {size}, {size}), mean={tuple(pc['mean'])}, std={tuple(pc['std'])}, "
                     f"crop_pct={pc['crop_pct']}")
    meta = config["meddino"]
    lines = [
        "## Use it",
        "",
        "With timm, from this folder (or, once uploaded, `\"hf-hub:ORG/NAME\"`):",
        "",
        "```python",
        "import timm",
        'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()',
        "# or, naming the architecture and the weights file:",
        f'model = timm.create_model("{arch}", pretrained=True,',
        '                          pretrained_cfg_overlay=dict(file="PATH/TO/THIS/FOLDER/model.safetensors",',
        f"                                                      {preprocessing}),",
        f"                          {args}).eval()",
        "data_config = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**data_config)  # resize, then config.json's mean/std",
        "features = model.forward_features(transform(image).unsqueeze(0))  # [1, prefix + patches, width]",
        "```",
        "",
        "With meddino, the folder is a backbone spec like any checkpoint:",
        "",
        "```",
        "meddino eval knn --config seed001_knn data.manifest=labels.csv backbone=PATH/TO/THIS/FOLDER out=runs/knn",
        "```",
        "```python",
        "from meddino.models import load_backbone",
        'backbone = load_backbone("PATH/TO/THIS/FOLDER")  # forward_features(x) -> {"cls", "patch", ...}',
        "```",
        "",
        f"Inputs are RGB images of {size} x {size} px (any size that is a multiple of {backbone.patch_size} "
        "works) normalised with the mean and std in config.json.",
    ]
    if meta["pos_embed_resample"] and meta["pos_embed_resample"] != "timm":
        lines.append(
            f"At {size} px timm and meddino give the same features; at other sizes meddino resamples the position "
            f"embeddings the way DINO{backbone.version} does (`{meta['pos_embed_resample']}`) and timm its own way, "
            "so the features differ slightly.")
    if meta["layer_norm_eps_set_after_create"]:
        lines.append(
            f"Its LayerNorm eps is {meta['layer_norm_eps']:g}, not timm's default: after `create_model`, set it "
            "with `for m in model.modules(): m.eps = EPS if isinstance(m, torch.nn.LayerNorm) else None` "
            "(meddino does this itself).")
    lines.append("")
    return "\n".join(lines)


def _model_table(backbone: Any, config: dict[str, Any]) -> str:
    meta = config["meddino"]
    pc = config["pretrained_cfg"]
    n_params = sum(p.numel() for p in backbone.vit.parameters())
    rows = [
        ("timm architecture", f"`{config['architecture']}`"),
        ("DINO version", version_name(backbone.version)),
        ("parameters", f"{n_params / 1e6:.2f} M"),
        ("patch size", meta["patch_size"]),
        ("width (embedding dim)", meta["embed_dim"]),
        ("depth (blocks)", meta["depth"]),
        ("attention heads", meta["num_heads"]),
        ("registers", meta["num_registers"]),
        ("image size (stored position grid)", f"{meta['img_size']} px"),
        ("position encoding", "RoPE" if backbone.uses_rope else f"learned, resampled per input size "
                                                                 f"(`{meta['pos_embed_resample']}`)"),
        ("LayerNorm eps", _fmt(meta["layer_norm_eps"])),
        ("mean / std", f"{_fmt_list(pc['mean'])} / {_fmt_list(pc['std'])}"),
    ]
    return "## Model\n\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"


def version_name(version: str) -> str:
    return {"v1": "DINOv1", "v2": "DINOv2", "v3": "DINOv3"}.get(version, version)


def _fmt_list(values: list[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _data_section(info: dict[str, Any]) -> str:
    cfg = info.get("config") or {}
    data = info.get("data")
    lines = ["## Data", ""]
    if not data:
        last = next((r for r in reversed(info.get("rows", [])) if "skipped_files" in r), {})
        lines += [f"Trained on `{_get(cfg, 'data.path', '?')}`. The run did not record its data summary (it "
                  "predates `data_summary.json`): the samples by kind are not known here."]
        if last:
            lines.append(f"Unreadable files skipped: {last['skipped_files']}.")
        return "\n".join(lines) + "\n"
    kinds = {"image": "images", "dicom": "DICOM images", "frame": "video frames", "slice": "volume slices"}
    rows = [("source (`data.path`)", f"`{data.get('path')}`")]
    if data.get("kind") and data["kind"] != "auto":
        rows.append(("kind kept (`data.kind`)", data["kind"]))
    rows.append(("samples", data.get("samples")))
    rows += [(f"&nbsp;&nbsp;{kinds.get(k, k)}", n) for k, n in (data.get("by_kind") or {}).items()]
    rows.append(("files", data.get("files")))
    rows.append(("unreadable files skipped", data.get("skipped_files", 0)))
    if _get(cfg, "data.fps") is not None and "frame" in (data.get("by_kind") or {}):
        rows.append(("video frames sampled at", f"{_get(cfg, 'data.fps')} fps"))
    lines.append("| | |\n|---|---|\n" + "\n".join(f"| {k} | {_fmt(v)} |" for k, v in rows))
    skipped = data.get("skipped") or []
    if skipped:
        more = data.get("skipped_files", len(skipped)) - len(skipped)
        lines += ["", "Skipped files:", ""] + [f"- `{s}`" for s in skipped]
        if more > 0:
            lines.append(f"- ... and {more} more")
    return "\n".join(lines) + "\n"


def _recipe_section(info: dict[str, Any]) -> str:
    cfg = info.get("config") or {}
    method = cfg.get("method") or {}
    objective = ["DINO (CLS)"]
    if _get(method, "ibot.enabled"):
        objective.append(f"iBOT (masked patches, weight {_fmt(_get(method, 'ibot.weight'))})")
    if method.get("koleo_weight"):
        objective.append(f"KoLeo (weight {_fmt(method['koleo_weight'])})")
    if _get(method, "gram.enabled"):
        objective.append(f"Gram anchoring (teacher {_get(method, 'gram.teacher')})")
    crops = cfg.get("crops") or {}
    rows = [
        ("recipe (`--config`)", f"`{info['recipe']}`" if info.get("recipe") else "not recorded"),
        ("start (`init`)", f"`{cfg['init']}`" if cfg.get("init") else f"random `{_get(cfg, 'model.arch')}`"),
        ("objective", " + ".join(objective)),
        ("centering", method.get("centering")),
        ("crops", f"{2} x {crops.get('global_size')} px global + {crops.get('n_local')} x {crops.get('local_size')} "
                  "px local"),
        ("batch (`data.batch_size`, per process)", _get(cfg, "data.batch_size")),
        ("base learning rate (`optim.lr`)", _get(cfg, "optim.lr")),
        ("teacher momentum", f"{_fmt(_get(cfg, 'optim.momentum'))} -> {_fmt(_get(cfg, 'optim.momentum_end'))}"),
        ("drop path", _get(cfg, "model.drop_path")),
        ("seed", _get(cfg, "train.seed")),
    ]
    lines = ["## Recipe", "", "| | |\n|---|---|\n" + "\n".join(f"| {k} | {_fmt(v)} |" for k, v in rows)]
    text = info.get("config_text")
    if text:
        lines += ["", "<details><summary>The resolved config (config.yaml)</summary>", "", "```yaml",
                  text.rstrip("\n"), "```", "", "</details>"]
    return "\n".join(lines) + "\n"


def _training_section(info: dict[str, Any]) -> str:
    cfg = info.get("config") or {}
    rows = [r for r in info.get("rows", []) if "loss" in r]
    lines = ["## Training", ""]
    total = _get(cfg, "train.iterations")
    last = rows[-1] if rows else {}
    table = [("iterations", f"{info.get('last_step')} of {total} (`train.iterations`)")]
    if "epoch" in last:
        table.append(("epochs at the last log step", _fmt(last["epoch"], 3)))
    if rows:
        table.append(("loss, first -> last log step", f"{_fmt(rows[0]['loss'])} -> {_fmt(last['loss'])}"))
        terms = [k for k in ("dino", "ibot", "koleo", "gram") if k in last]
        if terms:
            table.append(("last loss terms", ", ".join(f"{k} {_fmt(last[k])}" for k in terms)))
        speed = [r["images_per_s"] for r in rows if isinstance(r.get("images_per_s"), (int, float))]
        if speed:
            table.append(("images / s (median over log steps)", _fmt(sorted(speed)[len(speed) // 2], 3)))
    last_skipped = next((r["skipped_files"] for r in reversed(rows) if "skipped_files" in r), None)
    if last_skipped is not None:
        table.append(("unreadable files met", last_skipped))
    lines.append("| | |\n|---|---|\n" + "\n".join(f"| {k} | {_fmt(v)} |" for k, v in table))
    return "\n".join(lines) + "\n"


def _knn_section(info: dict[str, Any]) -> str:
    cfg = info.get("config") or {}
    rows = [r for r in info.get("rows", []) if isinstance(r.get("knn_top1"), (int, float))]
    lines = ["## kNN monitor", ""]
    if not rows:
        lines.append("Not run (`monitor.manifest` and `monitor.every` were not set): no kNN accuracy was measured "
                     "during pretraining.")
        return "\n".join(lines) + "\n"
    manifest = _get(cfg, "monitor.manifest")
    k = _get(cfg, "monitor.k")
    n_val = rows[-1].get("knn_n_val")
    best = max(rows, key=lambda r: r["knn_top1"])
    lines.append(f"Weighted kNN (k {k}) top-1 accuracy of the teacher's CLS features on the held-out images of "
                 f"`{Path(str(manifest)).name}` ({n_val} images), every {_get(cfg, 'monitor.every')} iterations; "
                 f"best {best['knn_top1']:.4f} at iteration {best['step']}, last {rows[-1]['knn_top1']:.4f}.")
    shown = rows if len(rows) <= 12 else [rows[round(i * (len(rows) - 1) / 11)] for i in range(12)]
    lines += ["", "| iteration | kNN top-1 |", "|---|---|"]
    lines += [f"| {r['step']} | {r['knn_top1']:.4f} |" for r in shown]
    return "\n".join(lines) + "\n"


def _health_section(info: dict[str, Any]) -> str:
    cfg = info.get("config") or {}
    rows = [r for r in info.get("rows", []) if all(isinstance(r.get(k), (int, float)) for k in HEALTH)]
    lines = ["## Training health at the end", ""]
    if not rows:
        lines.append("Not logged (`health.enabled=false`, or no log step).")
        return "\n".join(lines) + "\n"
    last = rows[-1]
    h, ln_k, info_nats = last["teacher_entropy"], last["ln_k"], last["teacher_information"]
    usage, rank = last["prototype_usage"], last["effective_rank"]
    tol = float(_get(cfg, "health.entropy_tolerance", 0.02))
    min_info = float(_get(cfg, "health.min_information", 0.005))
    min_rank = float(_get(cfg, "health.min_effective_rank", 1.5))
    table = [
        ("teacher entropy / ln K", f"{h:.4g} / {ln_k:.4g} = {h / ln_k:.3f}" if ln_k else _fmt(h)),
        ("teacher information (nats)", _fmt(info_nats)),
        ("prototype usage", _fmt(usage)),
        ("effective rank of the CLS features", _fmt(rank)),
    ]
    uniform = ln_k and h >= (1 - tol) * ln_k and info_nats < min_info
    dimensional = min_rank > 0 and rank < min_rank
    if uniform and dimensional:
        verdict = "both collapse conditions of meddino's detector hold: uniform targets that carry no " \
                  "information about the image, and features of (almost) one direction"
    elif uniform:
        verdict = (f"the teacher's targets are uniform (entropy within {tol:g} of ln K) and carry less than "
                   f"{min_info:g} nats about the image: uniform collapse")
    elif dimensional:
        verdict = f"the CLS features use fewer than {min_rank:g} directions: dimensional collapse"
    else:
        verdict = "neither collapse condition of meddino's detector holds"
    lines.append(f"At the last log step (iteration {last['step']}): {verdict}. The detector warns only when a "
                 f"condition holds for `health.patience` log steps in a row; docs/pretrain.md defines each value.")
    lines += ["", "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in table)]
    return "\n".join(lines) + "\n"
