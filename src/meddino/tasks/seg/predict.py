"""Saving / loading trained segmentation models, inference on images and volumes, ``meddino predict seg``.

A run folder of ``meddino eval seg`` holds ``model/model.json`` (everything needed to rebuild the network:
head, classes, input size, normalisation, the backbone's timm architecture, head options) and
``model/fold{k}.safetensors`` (the full state dict of fold k's best-on-validation model). Loading rebuilds
the module from the JSON and loads the weights strictly (no pickle anywhere).

Predictions: a 2-D image gives ``NAME_mask.png`` (class indices, 8-bit greyscale) and ``NAME_overlay.png``
(the image blended with the class colours); a volume gives ``NAME_mask.nii.gz`` with the input's affine
(NIfTI input; NRRD / MetaImage inputs keep their own format and geometry through SimpleITK) and overlay PNGs
of the slices where something was predicted. In a folder, ``*_mask.*`` / ``*_overlay.*`` files and
``labels*`` sub-folders are not inputs (they are the masks beside the images).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from meddino.data.io import file_suffix, is_image_file, is_volume_file, read_image
from meddino.data.seg_masks import CHOLECSEG8K_CLASSES, CHOLECSEG8K_RGB
from meddino.data.transforms import to_tensor
from meddino.data.volumes import read_volume, volume_window_range
from meddino.devices import autocast, pick_device
from meddino.errors import CheckpointError, DataError, require_file
from meddino.models.checkpoints import load_into_strict
from meddino.models.factory import build_from_timm, build_timm_backbone
from meddino.runlog import atomic_path, atomic_write, write_json
from meddino.tasks.seg.config import EoMTConfig, UNetConfig
from meddino.tasks.seg.heads import SegmentationModel

MODEL_FORMAT = "meddino-seg"


# ---------------------------------------------------------------------------------------------- save / load
def model_meta(model: SegmentationModel, classes: Sequence[str], size: Sequence[int], mean: Sequence[float],
               std: Sequence[float], ignore_index: int, dataset: str, window: Any = None,
               eomt: dict[str, Any] | None = None, monai_channels: Sequence[int] | None = None) -> dict[str, Any]:
    bb = model.backbone
    return {
        "format": MODEL_FORMAT,
        "format_version": 1,
        "head": model.head_name,
        "classes": list(classes),
        "ignore_index": int(ignore_index),
        "input_size": [int(s) for s in size],
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "backbone_arch": dict(bb.arch) if bb is not None else None,
        "freeze_backbone": model.freeze_backbone,
        "unet_blocks": model.unet_blocks,
        "unet": model.options.model_dump() if isinstance(model.options, UNetConfig) else None,
        "eomt": eomt,
        "monai_channels": list(monai_channels) if monai_channels is not None else None,
        "dataset": dataset,
        "window": window,
        "folds": {},
    }


def save_fold_model(model_dir: Path, model: SegmentationModel, meta: dict[str, Any], fold: int,
                    info: dict[str, Any]) -> Path:
    """Write ``fold{k}.safetensors`` and update ``model.json`` (atomic writes)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / f"fold{fold}.safetensors"
    state = {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": MODEL_FORMAT})
    meta.setdefault("folds", {})[str(fold)] = {"weights": path.name, **info}
    write_json(model_dir / "model.json", meta)
    return path


def build_from_meta(meta: dict[str, Any]) -> SegmentationModel:
    """Rebuild the (randomly initialised) module described by ``model.json``."""
    arch = meta.get("backbone_arch")
    backbone = None
    if arch is not None:
        if arch.get("version") == "cnn":
            backbone = build_timm_backbone(arch["timm_name"])
        else:
            backbone = build_from_timm(arch["timm_name"], arch["version"], dict(arch.get("kwargs", {})))
    return SegmentationModel(
        backbone, meta["head"], len(meta["classes"]), freeze_backbone=meta.get("freeze_backbone", True),
        unet=_unet_config(meta), eomt=_eomt_config(meta.get("eomt")),
        monai_channels=meta.get("monai_channels") or (16, 32, 64, 128, 256),
    )


def _unet_config(meta: dict[str, Any]) -> UNetConfig:
    """``model.json``'s U-Net options: the blocks as resolved (``unet_blocks``) and the conv count of the
    ``unet`` entry; a model.json written before that entry existed had two convs per up-block."""
    recorded = meta.get("unet") or {}
    blocks = meta.get("unet_blocks")
    try:
        return UNetConfig(blocks=list(blocks) if blocks else None,
                          convs_per_stage=recorded.get("convs_per_stage", 2), skips=recorded.get("skips", "even"))
    except ValidationError as exc:
        raise CheckpointError(f"model.json: invalid unet entry ({str(exc).splitlines()[0]})") from None


def _eomt_config(recorded: dict[str, Any] | None) -> EoMTConfig:
    """``model.json``'s ``eomt`` entry (None for other heads) -> the typed config; keys this version does not
    know are left out, so a model written by another version still loads."""
    known = {k: v for k, v in (recorded or {}).items() if k in EoMTConfig.model_fields}
    try:
        return EoMTConfig.model_validate(known)
    except ValidationError as exc:
        raise CheckpointError(f"model.json: invalid eomt entry ({str(exc).splitlines()[0]})") from None


def load_seg_model(path: str | Path, fold: int | None = None) -> tuple[SegmentationModel, dict[str, Any]]:
    """A run folder (or its ``model/`` folder) -> (model in eval mode, meta). Default fold: best val Dice."""
    p = require_file(path, "model")
    model_dir = p / "model" if (p / "model" / "model.json").exists() else p
    meta_path = model_dir / "model.json"
    if not meta_path.exists():
        raise CheckpointError(f"{p}: no model/model.json (is it a `meddino eval seg` run folder?)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{meta_path}: not valid JSON") from None
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{meta_path}: not a meddino segmentation model")
    folds = meta.get("folds", {})
    if not folds:
        raise CheckpointError(f"{meta_path}: no trained fold recorded")
    if fold is None:
        fold = int(max(folds, key=lambda k: (folds[k].get("best_val_dice") or -1.0, -int(k))))
    if str(fold) not in folds:
        raise CheckpointError(f"{meta_path}: no fold {fold} (have {', '.join(sorted(folds))})")
    weights = model_dir / folds[str(fold)]["weights"]
    model = build_from_meta(meta)
    try:
        state = load_file(str(require_file(weights, "model weights")))
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"unreadable model weights {weights}: {str(exc).splitlines()[0]}") from None
    load_into_strict(model, state, weights)
    meta["fold"] = fold
    return model.eval(), meta


# ---------------------------------------------------------------------------------------------- inference
@torch.no_grad()
def predict_frames(model: SegmentationModel, frames: np.ndarray, size: Sequence[int], mean: Sequence[float],
                   std: Sequence[float], device: torch.device, batch_size: int = 8, amp: bool = True) -> np.ndarray:
    """uint8 RGB frames [S, H, W, 3] -> class maps [S, H, W] uint8 at the frames' own size.

    Frames are resized (bicubic) to the network input; class scores are resized back (bilinear) before
    the argmax, so metrics are computed at the native resolution.
    """
    model.eval()
    out = np.zeros(frames.shape[:3], dtype=np.uint8)
    h, w = frames.shape[1:3]
    for start in range(0, len(frames), batch_size):
        x = to_tensor(frames[start : start + batch_size], tuple(size), mean, std).to(device)
        with autocast(device, enabled=amp):
            scores = model.class_scores(x)
        scores = F.interpolate(scores.float(), size=(h, w), mode="bilinear", align_corners=False)
        out[start : start + batch_size] = scores.argmax(1).to(torch.uint8).cpu().numpy()
    return out


def palette(classes: Sequence[str], dataset: str | None = None) -> np.ndarray:
    """[n, 3] uint8 class colours: CholecSeg8k's own colours (by class name) for that data set, else a
    fixed palette (background black)."""
    n = len(classes)
    if dataset == "cholecseg8k":
        by_name = dict(zip(CHOLECSEG8K_CLASSES, CHOLECSEG8K_RGB))
        if all(c in by_name for c in classes):
            return np.asarray([by_name[c] for c in classes], dtype=np.uint8)
    base = np.asarray([
        (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
        (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128),
        (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0),
        (255, 215, 180), (0, 0, 128),
    ], dtype=np.uint8)
    if n <= len(base):
        return base[:n]
    rng = np.random.default_rng(0)
    return np.concatenate([base, rng.integers(0, 256, size=(n - len(base), 3), dtype=np.uint8)])


def overlay(rgb: np.ndarray, mask: np.ndarray, colors: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend class colours over the image; class 0 (background) is left untouched."""
    out = rgb.astype(np.float32).copy()
    fg = mask > 0
    col = colors[np.clip(mask, 0, len(colors) - 1)].astype(np.float32)
    out[fg] = (1 - alpha) * out[fg] + alpha * col[fg]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def write_png_mask(path: Path, mask: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(mask.astype(np.uint8), mode="L").save(tmp, format="PNG")


def write_volume_mask(path: Path, mask_zyx: np.ndarray, reference: Path) -> Path:
    """Write a [D, H, W] label volume with the geometry of ``reference`` (NIfTI: its affine and header)."""
    suffix = file_suffix(reference)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".nii", ".nii.gz"):
        ref = nib.load(str(reference))
        data = np.transpose(mask_zyx.astype(np.uint8), (2, 1, 0))  # back to the file's (x, y, z)
        header = ref.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1.0, 0.0)
        raw = nib.Nifti1Image(data, ref.affine, header).to_bytes()
        if path.name.endswith(".gz"):
            raw = gzip.compress(raw, compresslevel=6)
        with atomic_write(path) as fh:
            fh.write(raw)
        return path
    ref = sitk.ReadImage(str(reference))
    img = sitk.GetImageFromArray(mask_zyx.astype(np.uint8))
    if img.GetSize() == ref.GetSize():
        img.CopyInformation(ref)
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, str(tmp))
    return path


def volume_mask_name(reference: Path) -> str:
    suffix = file_suffix(reference)
    stem = reference.name[: -len(suffix)] if suffix else reference.name
    return f"{stem}_mask{'.nii.gz' if suffix in ('.nii', '.nii.gz') else suffix}"


def _is_label_file(rel: Path) -> bool:
    """Masks and overlays beside the images (``*_mask.*``, ``*_overlay.*``, ``labelsTr/``) are no inputs."""
    stem = rel.name[: -len(file_suffix(rel))] if file_suffix(rel) else rel.name
    return stem.endswith(("_mask", "_overlay")) or any(p.lower().startswith("labels") for p in rel.parts[:-1])


def _inputs(path: Path) -> list[Path]:
    if path.is_file():
        if not (is_image_file(path) or is_volume_file(path)):
            raise DataError(f"{path}: not an image or volume file")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and (is_image_file(p) or is_volume_file(p)) and not _is_label_file(p.relative_to(path)))
    if not files:
        raise DataError(f"no images or volumes found in {path}")
    return files


def run_predict_seg(cfg: Any) -> int:
    """``meddino predict seg``: masks + overlays for an image, a folder or a volume."""
    device = pick_device(cfg.device)
    model, meta = load_seg_model(cfg.model, cfg.fold)
    model.to(device)
    src = require_file(cfg.input, "input")
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    colors = palette(meta["classes"], meta.get("dataset"))
    size, mean, std = meta["input_size"], meta["mean"], meta["std"]
    window = cfg.window if cfg.window is not None else meta.get("window")
    files = _inputs(src)
    n_written = 0
    for f in files:
        rel = f.relative_to(src) if src.is_dir() else Path(f.name)
        target_dir = out / rel.parent
        if is_volume_file(f):
            vol, _spacing = read_volume(f)
            lo, hi = volume_window_range(vol, tuple(window) if isinstance(window, list) else window)
            scale = 255.0 / (hi - lo) if hi > lo else 0.0
            gray = np.clip(np.rint((vol - lo) * scale), 0, 255).astype(np.uint8)
            frames = np.repeat(gray[..., None], 3, axis=-1)
            pred = predict_frames(model, frames, size, mean, std, device, cfg.batch_size)
            mask_path = write_volume_mask(target_dir / volume_mask_name(f), pred, f)
            ov_dir = target_dir / (mask_path.name.split("_mask")[0] + "_overlay")
            for z in np.nonzero(pred.reshape(len(pred), -1).max(1) > 0)[0]:
                ov_dir.mkdir(parents=True, exist_ok=True)
                with atomic_path(ov_dir / f"slice_{int(z):04d}.png") as tmp:
                    Image.fromarray(overlay(frames[z], pred[z], colors, cfg.overlay_alpha)).save(tmp, format="PNG")
        else:
            rgb = read_image(f)
            pred = predict_frames(model, rgb[None], size, mean, std, device, cfg.batch_size)[0]
            stem = rel.name.rsplit(".", 1)[0]
            write_png_mask(target_dir / f"{stem}_mask.png", pred)
            with atomic_path(target_dir / f"{stem}_overlay.png") as tmp:
                Image.fromarray(overlay(rgb, pred, colors, cfg.overlay_alpha)).save(tmp, format="PNG")
        n_written += 1
    print(f"wrote masks and overlays of {n_written} input(s) to {out} (model {cfg.model}, fold {meta['fold']})")
    return 0
