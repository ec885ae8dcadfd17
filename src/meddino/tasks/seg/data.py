"""Image/mask pairs for segmentation: three layouts, patient-level folds, a torch dataset.

Layouts (``data.layout``):

- ``manifest``: a CSV with ``image``, ``mask``, ``patient`` columns (optionally a split column with
  train / val / test named by ``data.split_column``, or a fold-number column named by ``data.fold_column``);
  paths relative to the CSV. Images may also be volumes (then masks are label volumes). Masks are PNGs
  of class indices (mode ``L``, ``P`` -- the palette index is the class -- or 16-bit); an RGB mask is
  accepted when its three channels are equal, or when ``data.colors`` gives each class's RGB colour.
  Class names come from ``data.classes`` (index = position, 0 = background).
- ``cholecseg8k``: ``ROOT/videoXX/videoXX_NNNNN/frame_N_endo.png`` with ``frame_N_endo_watershed_mask.png``.
  Patient = video. Watershed masks are grey (R = G = B) with the codes of :data:`CHOLECSEG8K_GREY`; the
  colour masks' RGB codes (:data:`CHOLECSEG8K_RGB`) are accepted too. Grey 0 (unannotated pixels) and 255
  (the 1-pixel white edge the annotation tool draws between regions) are not classes: they become
  ``ignore_index``. Any other value is an error naming the file and the colour. Seed 000's excluded
  low-prevalence classes (``data.exclude_classes``) map to background by default (``data.excluded_to=
  background``: the pixels exist and belong to no kept class) or to ``ignore_index``.
- ``msd``: Medical Segmentation Decathlon / nnU-Net style ``ROOT/imagesTr`` + ``ROOT/labelsTr`` +
  ``dataset.json`` (labels in either the MSD ``{"0": "background", ...}`` or the nnU-Net v2
  ``{"background": 0, ...}`` form); NIfTI, NRRD or MetaImage volumes read with
  :func:`meddino.data.io.read_volume` (a 4-D image keeps its first channel). Volumes are segmented slice by
  slice along the first array axis and reassembled for 3-D metrics with the volume's spacing (mm).
  Each volume is one patient. Volumes are kept in memory as uint8 (image windowed, labels) once read.

Every mask is decoded once before training starts: a mask whose size differs from its image, or a label
outside the class map (other than ``ignore_index``), raises :class:`~meddino.errors.DataError` naming the
file. No pair at all is a DataError too.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from meddino.errors import ConfigError, DataError, require_file
from meddino.tasks.seg.config import SegDataConfig

# ---------------------------------------------------------------------------------------------- CholecSeg8k
#: The 13 classes of CholecSeg8k (Hong et al. 2020), in the dataset's own index order.
CHOLECSEG8K_CLASSES: tuple[str, ...] = (
    "black background", "abdominal wall", "liver", "gastrointestinal tract", "fat", "grasper",
    "connective tissue", "blood", "cystic duct", "l-hook electrocautery", "gallbladder", "hepatic vein",
    "liver ligament",
)
#: Grey value of each class in the ``*_watershed_mask.png`` files (the Kaggle page writes them as
#: "#505050", "#111111", ...: the decimal value repeated on R, G and B).
CHOLECSEG8K_GREY: tuple[int, ...] = (50, 11, 21, 13, 12, 31, 23, 24, 25, 32, 22, 33, 5)
#: RGB of each class in the ``*_color_mask.png`` files (also accepted).
CHOLECSEG8K_RGB: tuple[tuple[int, int, int], ...] = (
    (127, 127, 127), (210, 140, 140), (255, 114, 114), (231, 70, 156), (186, 183, 75), (170, 255, 0),
    (255, 85, 0), (255, 0, 0), (255, 255, 0), (169, 255, 184), (255, 160, 165), (0, 50, 128), (111, 74, 0),
)
#: Unannotated (0) and region-edge (255) grey values: ignored, not classes.
CHOLECSEG8K_UNLABELLED_GREY: tuple[int, ...] = (0, 255)


def _key(rgb: tuple[int, int, int] | np.ndarray) -> int:
    r, g, b = (int(v) for v in rgb)
    return (r << 16) | (g << 8) | b


def cholecseg8k_table(exclude: Sequence[str], excluded_to: str, ignore_index: int) -> tuple[list[str], dict[int, int]]:
    """Kept class names and the colour-key -> new index table (keys: 24-bit RGB of grey and colour codes)."""
    known = {n.lower(): i for i, n in enumerate(CHOLECSEG8K_CLASSES)}
    excluded = set()
    for name in exclude:
        if name.lower() not in known:
            raise ConfigError(f"data.exclude_classes: unknown CholecSeg8k class '{name}' "
                              f"(known: {', '.join(CHOLECSEG8K_CLASSES)})")
        if known[name.lower()] == 0:
            raise ConfigError("data.exclude_classes: the background class cannot be excluded")
        excluded.add(known[name.lower()])
    kept = [i for i in range(len(CHOLECSEG8K_CLASSES)) if i not in excluded]
    new_index = {old: new for new, old in enumerate(kept)}
    drop_to = 0 if excluded_to == "background" else ignore_index
    table: dict[int, int] = {}
    for old in range(len(CHOLECSEG8K_CLASSES)):
        target = new_index.get(old, drop_to)
        g = CHOLECSEG8K_GREY[old]
        table[_key((g, g, g))] = target
        table[_key(CHOLECSEG8K_RGB[old])] = target
    for g in CHOLECSEG8K_UNLABELLED_GREY:
        table[_key((g, g, g))] = ignore_index
    return [CHOLECSEG8K_CLASSES[i] for i in kept], table


def decode_color_mask(rgb: np.ndarray, table: dict[int, int], path: Path | str) -> np.ndarray:
    """[H, W, 3] uint8 colours -> [H, W] uint8 indices via ``table`` (24-bit key -> index).

    An unknown colour raises a DataError naming the file and the colour.
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if np.array_equal(r, g) and np.array_equal(r, b):  # grey masks (watershed): a 256-entry lookup
        lut = np.full(256, -1, dtype=np.int16)
        for v in range(256):
            lut[v] = table.get(_key((v, v, v)), -1)
        out = lut[r]
        if (out < 0).any():
            v = int(r[out < 0].ravel()[0])
            raise DataError(f"mask {path}: unknown colour ({v}, {v}, {v}) (not in the class colour table)")
        return out.astype(np.uint8)
    keys = (r.astype(np.int64) << 16) | (g.astype(np.int64) << 8) | b
    uniq, inverse = np.unique(keys, return_inverse=True)
    lut = np.empty(len(uniq), dtype=np.uint8)
    for i, k in enumerate(uniq.tolist()):
        if k not in table:
            r, g, b = (k >> 16) & 255, (k >> 8) & 255, k & 255
            raise DataError(f"mask {path}: unknown colour ({r}, {g}, {b}) (not in the class colour table)")
        lut[i] = table[k]
    return lut[inverse.reshape(keys.shape)]


# ---------------------------------------------------------------------------------------------- records
@dataclass
class SegCase:
    """One unit of evaluation: a 2-D image (kind ``image``) or a volume (kind ``volume``)."""

    id: str
    patient: str
    image: Path
    mask: Path
    kind: str = "image"
    split: str | None = None


@dataclass
class SegData:
    """All cases of a data set plus how to decode their masks."""

    cases: list[SegCase]
    classes: list[str]
    ignore_index: int
    name: str
    decode: Callable[[Path], np.ndarray] = field(repr=False)
    window: object = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def volumetric(self) -> bool:
        return any(c.kind == "volume" for c in self.cases)

    @property
    def patients(self) -> list[str]:
        return sorted({c.patient for c in self.cases})


def read_png_mask(path: Path, colors: dict[int, int] | None = None) -> np.ndarray:
    """A class-index mask image -> [H, W] integer array (see the module docstring for the modes)."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
                arr = np.asarray(im).astype(np.int64)
            elif mode in ("RGB", "RGBA", "LA"):
                rgb = np.asarray(im.convert("RGB"))
                if colors is not None:
                    return decode_color_mask(rgb, colors, path).astype(np.int64)
                if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                    raise DataError(f"mask {path}: colour-coded RGB mask; give data.colors (RGB per class) "
                                    "or save class indices (mode L or P)")
                arr = rgb[..., 0].astype(np.int64)
            else:
                raise DataError(f"mask {path}: unsupported image mode {mode}")
    except DataError:
        raise
    except (OSError, ValueError) as exc:
        raise DataError(f"unreadable mask {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return arr


def check_labels(mask: np.ndarray, num_classes: int, ignore_index: int, path: Path | str) -> np.ndarray:
    """Labels must be in [0, num_classes) or ``ignore_index``; returns the mask as uint8."""
    bad = ((mask < 0) | (mask >= num_classes)) & (mask != ignore_index)
    if bad.any():
        value = mask[bad].ravel()[0]
        raise DataError(f"mask {path}: label {value} outside the class map (0..{num_classes - 1}, "
                        f"ignore {ignore_index})")
    return mask.astype(np.uint8)


# ---------------------------------------------------------------------------------------------- layouts
def _manifest_cases(cfg: SegDataConfig) -> tuple[list[SegCase], Path]:
    path = require_file(cfg.manifest, "data.manifest")
    base = path.parent
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        extra = [c for c in (cfg.split_column, cfg.fold_column) if c]
        need = ["image", "mask", "patient", *extra]
        missing = [c for c in need if c not in cols]
        if missing:
            raise DataError(f"manifest {path}: missing column(s) {', '.join(missing)} (has {', '.join(cols)})")
        cases = []
        for i, row in enumerate(reader):
            img, msk = (base / row["image"]).expanduser(), (base / row["mask"]).expanduser()
            kind = "volume" if _is_volume(img) else "image"
            split = row[cfg.split_column].strip().lower() if cfg.split_column else None
            if split is not None:
                split = {"valid": "val", "validation": "val", "testing": "test"}.get(split, split)
                if split not in ("train", "val", "test"):
                    raise DataError(f"manifest {path} row {i + 2}: split '{split}' is not train, val or test")
            if cfg.fold_column:
                raw = row[cfg.fold_column].strip()
                if not raw.lstrip("-").isdigit():
                    raise DataError(f"manifest {path} row {i + 2}: fold '{raw}' is not an integer")
                split = f"fold{int(raw)}"
            cases.append(SegCase(id=Path(row["image"]).as_posix(), patient=str(row["patient"]), image=img,
                                 mask=msk, kind=kind, split=split))
    return cases, path


def _is_volume(path: Path) -> bool:
    from meddino.data.io import is_volume_file

    return is_volume_file(path)


_FRAME_RE = re.compile(r"^frame_(\d+)_endo\.png$")


def _cholec_cases(root: Path) -> list[SegCase]:
    cases = []
    for img in sorted(root.glob("*/*/frame_*_endo.png")):
        if not _FRAME_RE.match(img.name):
            continue
        video = img.parent.parent.name
        mask = img.with_name(img.name[: -len(".png")] + "_watershed_mask.png")
        if not mask.exists():
            raise DataError(f"CholecSeg8k frame {img} has no watershed mask ({mask.name})")
        cases.append(SegCase(id=img.relative_to(root).as_posix(), patient=video, image=img, mask=mask))
    return cases


def _strip_volume_ext(name: str) -> str:
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _msd_cases(root: Path, classes: list[str] | None) -> tuple[list[SegCase], list[str]]:
    meta_path = root / "dataset.json"
    meta = {}
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{meta_path}: not valid JSON") from None
    if classes is None:
        labels = meta.get("labels")
        if not labels:
            raise DataError(f"{meta_path}: no 'labels' (or give data.classes)")
        try:
            if all(str(k).isdigit() for k in labels):  # MSD: {"0": "background", "1": "..."}
                pairs = {int(k): str(v) for k, v in labels.items()}
            else:  # nnU-Net v2: {"background": 0, "...": 1}
                pairs = {int(v): str(k) for k, v in labels.items()}
        except (TypeError, ValueError):
            raise DataError(f"{meta_path}: 'labels' must map indices to names (region labels unsupported)") from None
        if sorted(pairs) != list(range(len(pairs))):
            raise DataError(f"{meta_path}: labels must be 0..N-1, got {sorted(pairs)}")
        classes = [pairs[i] for i in range(len(pairs))]
    pairs_list: list[tuple[Path, Path]] = []
    training = meta.get("training")
    if training:
        for entry in training:
            img, lab = entry.get("image"), entry.get("label")
            if not img or not lab:
                raise DataError(f"{meta_path}: a 'training' entry lacks image or label")
            img_p = (root / img).resolve()
            if not img_p.exists():  # nnU-Net style entries name the case without the _0000 channel suffix
                stem, ext = _strip_volume_ext(img_p.name), img_p.name[len(_strip_volume_ext(img_p.name)):]
                alt = img_p.with_name(f"{stem}_0000{ext}")
                img_p = alt if alt.exists() else img_p
            pairs_list.append((img_p, (root / lab).resolve()))
    else:
        img_dir, lab_dir = root / "imagesTr", root / "labelsTr"
        if not img_dir.is_dir() or not lab_dir.is_dir():
            raise DataError(f"MSD layout: {root} needs imagesTr/ and labelsTr/ folders")
        for img in sorted(p for p in img_dir.iterdir() if _is_volume(p) and not p.name.startswith(".")):
            stem = _strip_volume_ext(img.name)
            ext = img.name[len(stem):]
            case = stem[:-5] if re.search(r"_\d{4}$", stem) else stem
            if re.search(r"_\d{4}$", stem) and not stem.endswith("_0000"):
                continue  # extra modality channels of nnU-Net v2: the first one is used
            lab = lab_dir / f"{case}{ext}"
            if not lab.exists():
                raise DataError(f"MSD layout: image {img} has no label {lab}")
            pairs_list.append((img, lab))
    cases = []
    for img, lab in pairs_list:
        for p in (img, lab):
            if not p.exists():
                raise DataError(f"MSD layout: file not found: {p}")
        case = _strip_volume_ext(lab.name)
        cases.append(SegCase(id=case, patient=case, image=img, mask=lab, kind="volume"))
    return cases, classes


def load_seg_data(cfg: SegDataConfig, check: bool = True) -> SegData:
    """Build the case list for ``cfg.layout``, decode every mask once (``check``) and validate it."""
    ignore = cfg.ignore_index
    colors: dict[int, int] | None = None
    if cfg.layout == "manifest":
        cases, path = _manifest_cases(cfg)
        if not cfg.classes:
            raise ConfigError("data.classes: give the class names (index = position, 0 = background)")
        classes = list(cfg.classes)
        if cfg.colors is not None:
            if len(cfg.colors) != len(classes) or any(len(c) != 3 for c in cfg.colors):
                raise ConfigError("data.colors: one [R, G, B] per class in data.classes")
            colors = {_key(tuple(c)): i for i, c in enumerate(cfg.colors)}
        name = path.stem
        decode = lambda p: read_png_mask(p, colors)  # noqa: E731
    elif cfg.layout == "cholecseg8k":
        root = require_file(cfg.root, "data.root")
        classes, table = cholecseg8k_table(cfg.exclude_classes, cfg.excluded_to, ignore)
        cases = _cholec_cases(root)
        name = "cholecseg8k"

        def decode(p: Path) -> np.ndarray:
            with Image.open(p) as im:
                rgb = np.asarray(im.convert("RGB"))
            return decode_color_mask(rgb, table, p)
    else:
        root = require_file(cfg.root, "data.root")
        cases, classes = _msd_cases(root, cfg.classes)
        name = root.name
        decode = None  # volumes are decoded by read_case
    if ignore < len(classes):
        raise ConfigError(f"data.ignore_index {ignore} collides with a class index (there are {len(classes)} classes)")
    if cfg.max_items is not None:
        cases = cases[: cfg.max_items]
    if not cases:
        where = cfg.manifest if cfg.layout == "manifest" else cfg.root
        raise DataError(f"no image/mask pairs found in {where} (layout {cfg.layout})")
    data = SegData(cases=cases, classes=classes, ignore_index=ignore, name=name,
                   decode=decode or (lambda p: read_png_mask(p)), window=cfg.window)
    if check:
        scan(data)
    return data


def scan(data: SegData) -> None:
    """Read every mask once: size against its image, labels against the class map (fails naming the file)."""
    from meddino.data.io import image_size, volume_shape
    from meddino.runlog import Progress

    with Progress(len(data.cases), "checking masks", unit="mask") as bar:
        for case in data.cases:
            require_file(case.image, "image")
            require_file(case.mask, "mask")
            if case.kind == "volume":
                shape_i, shape_m = volume_shape(case.image), volume_shape(case.mask)
                if shape_i != shape_m:
                    raise DataError(f"mask {case.mask}: shape {shape_m} differs from its volume {case.image} {shape_i}")
                labels = _read_label_volume(case.mask)
                check_labels(labels, data.num_classes, data.ignore_index, case.mask)
            else:
                w, h = image_size(case.image)
                mask = data.decode(case.mask)
                if mask.shape != (h, w):
                    raise DataError(f"mask {case.mask}: size {mask.shape[1]}x{mask.shape[0]} differs from its "
                                    f"image {case.image} ({w}x{h})")
                check_labels(mask, data.num_classes, data.ignore_index, case.mask)
            bar.advance(1)


def _read_label_volume(path: Path) -> np.ndarray:
    from meddino.data.io import read_volume

    vol, _ = read_volume(path)
    rounded = np.rint(vol)
    if not np.allclose(vol, rounded, atol=1e-3):
        raise DataError(f"label volume {path}: non-integer labels")
    return rounded.astype(np.int64)


@dataclass
class LoadedCase:
    """A case in memory: uint8 RGB frames [S, H, W, 3] (S = 1 for an image), labels [S, H, W], spacing."""

    image: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, ...] | None  # (z, y, x) mm for volumes; None (pixels) for 2-D images


def read_case(data: SegData, case: SegCase) -> LoadedCase:
    from meddino.data.io import read_image, read_volume, volume_window_range

    if case.kind == "volume":
        vol, spacing = read_volume(case.image)
        labels = check_labels(_read_label_volume(case.mask), data.num_classes, data.ignore_index, case.mask)
        if vol.shape != labels.shape:
            raise DataError(f"mask {case.mask}: shape {labels.shape} differs from its volume {case.image} {vol.shape}")
        window = tuple(data.window) if isinstance(data.window, list) else data.window
        lo, hi = volume_window_range(vol, window)
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        gray = np.clip(np.rint((vol - lo) * scale), 0, 255).astype(np.uint8)
        rgb = np.repeat(gray[..., None], 3, axis=-1)
        return LoadedCase(rgb, labels, tuple(float(s) for s in spacing))
    rgb = read_image(case.image)
    mask = check_labels(data.decode(case.mask), data.num_classes, data.ignore_index, case.mask)
    if mask.shape != rgb.shape[:2]:
        raise DataError(f"mask {case.mask}: size {mask.shape[1]}x{mask.shape[0]} differs from its image "
                        f"{case.image} ({rgb.shape[1]}x{rgb.shape[0]})")
    return LoadedCase(rgb[None], mask[None], None)


# ---------------------------------------------------------------------------------------------- splits
@dataclass
class Fold:
    index: int
    train: list[str]
    val: list[str]
    test: list[str]


def patient_folds(patients: Sequence[str], k: int, seed: int) -> list[list[str]]:
    """Patient-level k-fold test sets (seed 000: 5 folds, 80/20), from :func:`meddino.data.splits.patient_kfold`.

    Every patient is in exactly one test set; set sizes differ by at most one.
    """
    from meddino.data.splits import patient_kfold

    ids = sorted(set(patients))
    if len(ids) < k:
        raise DataError(f"{len(ids)} patient(s) cannot make {k} folds (lower data.folds)")
    fold = patient_kfold(ids, None, k, seed)
    return [[p for p, f in zip(ids, fold) if f == i] for i in range(k)]


def split_val(train: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out ``ceil(fraction * n)`` training patients for model selection (at least one patient stays
    for training; with a single training patient, validation uses the training patient itself)."""
    ids = sorted(train)
    if fraction <= 0 or len(ids) < 2:
        return ids, list(ids)
    n_val = min(max(1, math.ceil(fraction * len(ids))), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    val = sorted(ids[j] for j in order[:n_val])
    return [p for p in ids if p not in set(val)], val


def make_folds(data: SegData, cfg: SegDataConfig, seed: int) -> list[Fold]:
    """Folds from the manifest's split column if given, else patient-level k-fold CV."""
    if cfg.split_column:
        by = {s: sorted({c.patient for c in data.cases if c.split == s}) for s in ("train", "val", "test")}
        if not by["train"] or not by["test"]:
            raise DataError(f"data.split_column '{cfg.split_column}': needs train and test rows")
        val = by["val"]
        train = by["train"]
        if not val:
            train, val = split_val(train, cfg.val_fraction, seed)
        return [Fold(0, train, val, by["test"])]
    if cfg.fold_column:
        fold_ids = sorted({int(c.split[4:]) for c in data.cases})
        by_fold = {f: sorted({c.patient for c in data.cases if c.split == f"fold{f}"}) for f in fold_ids}
        for f in fold_ids:
            for g in fold_ids:
                if f < g and set(by_fold[f]) & set(by_fold[g]):
                    both = sorted(set(by_fold[f]) & set(by_fold[g]))[0]
                    raise DataError(f"data.fold_column: patient '{both}' is in folds {f} and {g}")
        if len(fold_ids) < 2:
            raise DataError("data.fold_column: needs at least two folds")
        test_sets = [by_fold[f] for f in fold_ids]
    else:
        test_sets = patient_folds(data.patients, cfg.folds, seed)
    folds = []
    for i, test in enumerate(test_sets):
        rest = [p for p in data.patients if p not in set(test)]
        train, val = split_val(rest, cfg.val_fraction, seed + i)
        folds.append(Fold(i, train, val, test))
    if cfg.run_folds is not None:
        bad = [f for f in cfg.run_folds if not 0 <= f < len(folds)]
        if bad:
            raise ConfigError(f"data.run_folds: fold {bad[0]} out of range 0..{len(folds) - 1}")
        folds = [f for f in folds if f.index in set(cfg.run_folds)]
    return folds


# ---------------------------------------------------------------------------------------------- tensors
def to_input(rgb: np.ndarray, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [H, W, 3] (or [B, H, W, 3]) -> normalised float [(B,) 3, h, w], bicubic resize (antialiased)."""
    x = torch.from_numpy(np.array(rgb, dtype=np.float32))  # a writable float copy
    single = x.ndim == 3
    if single:
        x = x[None]
    x = x.permute(0, 3, 1, 2) / 255.0
    if tuple(x.shape[-2:]) != tuple(size):
        x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    x = (x - m) / s
    return x[0] if single else x


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """[H, W] labels -> [h, w] long, nearest neighbour (labels are never interpolated)."""
    m = torch.from_numpy(np.array(mask, dtype=np.int64))
    if tuple(m.shape) == tuple(size):
        return m
    return torch.nn.functional.interpolate(m[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, ignore_index: int,
            degrees: float = 30.0, p: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Seed 000's augmentation: horizontal flip, vertical flip and a rotation, each with probability ``p``.

    The rotation angle is uniform in [-degrees, degrees]; the image is filled with 0 (after
    normalisation, the mean colour) and the mask with ``ignore_index`` where the rotation uncovers pixels.
    """
    from torchvision.transforms.v2 import functional as TF
    from torchvision.transforms import InterpolationMode

    draws = torch.rand(4, generator=gen).tolist()
    if draws[0] < p:
        x, y = x.flip(-1), y.flip(-1)
    if draws[1] < p:
        x, y = x.flip(-2), y.flip(-2)
    if draws[2] < p:
        angle = (2 * draws[3] - 1) * degrees
        x = TF.rotate(x, angle, interpolation=InterpolationMode.BILINEAR, fill=0.0)
        y = TF.rotate(y[None].to(torch.uint8), angle, interpolation=InterpolationMode.NEAREST,
                      fill=float(ignore_index))[0].long()
    return x, y


class FrameDataset(torch.utils.data.Dataset):
    """Training / validation frames: every 2-D image, every slice of every volume (read once, cached)."""

    def __init__(self, data: SegData, cases: Sequence[SegCase], size: tuple[int, int],
                 mean: Sequence[float], std: Sequence[float], train: bool = False, seed: int = 0,
                 rotation_degrees: float = 30.0):
        self.data, self.cases = data, list(cases)
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.train, self.seed, self.epoch = train, seed, 0
        self.rotation_degrees = rotation_degrees
        self._cache: dict[int, LoadedCase] = {}
        from meddino.data.io import volume_shape

        self.index: list[tuple[int, int]] = []
        for ci, case in enumerate(self.cases):
            depth = volume_shape(case.image)[0] if case.kind == "volume" else 1
            self.index.extend((ci, s) for s in range(depth))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index)

    def _case(self, ci: int) -> LoadedCase:
        case = self.cases[ci]
        if case.kind != "volume":
            return read_case(self.data, case)
        if ci not in self._cache:
            self._cache[ci] = read_case(self.data, case)
        return self._cache[ci]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ci, s = self.index[i]
        loaded = self._case(ci)
        x = to_input(loaded.image[s], self.size, self.mean, self.std)
        y = resize_mask(loaded.mask[s], self.size)
        if self.train:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
            x, y = augment(x, y, gen, self.data.ignore_index, self.rotation_degrees)
        return x, y
