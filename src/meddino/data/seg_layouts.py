"""Segmentation data sets on disk -> cases: the manifest, CholecSeg8k and MSD layouts, mask checks, reading.

Layouts (``data.layout`` of ``meddino eval seg``):

- ``manifest`` (:func:`manifest_layout`): a CSV with ``image``, ``mask``, ``patient`` columns (optionally a
  split column with train / val / test, or a fold-number column); paths relative to the CSV. Images may
  also be volumes (then masks are label volumes). Masks are PNGs of class indices (mode ``L``, ``P`` -- the
  palette index is the class -- or 16-bit); an RGB mask is accepted when its three channels are equal, or
  when a colour is given for each class. Class names are given (index = position, 0 = background).
- ``cholecseg8k`` (:func:`cholecseg8k_layout`): ``ROOT/videoXX/videoXX_NNNNN/frame_N_endo.png`` with
  ``frame_N_endo_watershed_mask.png``. Patient = video. Mask colours as in :mod:`meddino.data.seg_masks`;
  seed 000's excluded low-prevalence classes map to background by default (the pixels exist and belong to
  no kept class) or to ``ignore_index``.
- ``msd`` (:func:`msd_layout`): Medical Segmentation Decathlon / nnU-Net style ``ROOT/imagesTr`` +
  ``ROOT/labelsTr`` + ``dataset.json`` (labels in either the MSD ``{"0": "background", ...}`` or the nnU-Net
  v2 ``{"background": 0, ...}`` form); NIfTI, NRRD or MetaImage volumes read with
  :func:`meddino.data.volumes.read_volume` (a 4-D image keeps its first channel). Volumes are segmented slice
  by slice along the first array axis and reassembled for 3-D metrics with the volume's spacing (mm).
  Each volume is one patient. Volumes are kept in memory as uint8 (image windowed, labels) once read.

They live here, beside the image-level manifest adapters (:mod:`meddino.data.manifest`), because they are
about files on disk; the task's config, folds and torch dataset stay in :mod:`meddino.tasks.seg`.
:func:`scan` decodes every mask once before training: a mask whose size differs from its image, or a label
outside the class map (other than ``ignore_index``), raises :class:`~meddino.errors.DataError` naming the
file. :func:`read_case` loads one case (volumes windowed to uint8 RGB).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from meddino.data.io import image_size, is_volume_file, read_image
from meddino.data.seg_masks import (
    check_labels,
    cholecseg8k_table,
    decode_color_mask,
    read_label_volume,
    read_png_mask,
    rgb_key,
)
from meddino.data.volumes import read_volume, volume_shape, volume_window_range
from meddino.errors import ConfigError, DataError, require_file
from meddino.runlog import Progress


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


@dataclass
class LoadedCase:
    """A case in memory: uint8 RGB frames [S, H, W, 3] (S = 1 for an image), labels [S, H, W], spacing."""

    image: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, ...] | None  # (z, y, x) mm for volumes; None (pixels) for 2-D images


# ---------------------------------------------------------------------------------------------- layouts
def _manifest_cases(manifest: str | None, split_column: str | None, fold_column: str | None
                    ) -> tuple[list[SegCase], Path]:
    path = require_file(manifest, "data.manifest")
    base = path.parent
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        extra = [c for c in (split_column, fold_column) if c]
        need = ["image", "mask", "patient", *extra]
        missing = [c for c in need if c not in cols]
        if missing:
            raise DataError(f"manifest {path}: missing column(s) {', '.join(missing)} (has {', '.join(cols)})")
        cases = []
        for i, row in enumerate(reader):
            img, msk = (base / row["image"]).expanduser(), (base / row["mask"]).expanduser()
            kind = "volume" if is_volume_file(img) else "image"
            split = row[split_column].strip().lower() if split_column else None
            if split is not None:
                split = {"valid": "val", "validation": "val", "testing": "test"}.get(split, split)
                if split not in ("train", "val", "test"):
                    raise DataError(f"manifest {path} row {i + 2}: split '{split}' is not train, val or test")
            if fold_column:
                raw = row[fold_column].strip()
                if not raw.lstrip("-").isdigit():
                    raise DataError(f"manifest {path} row {i + 2}: fold '{raw}' is not an integer")
                split = f"fold{int(raw)}"
            cases.append(SegCase(id=Path(row["image"]).as_posix(), patient=str(row["patient"]), image=img,
                                 mask=msk, kind=kind, split=split))
    return cases, path


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


def _msd_classes(meta: dict, meta_path: Path) -> list[str]:
    """Class names from ``dataset.json``'s labels (MSD or nnU-Net v2 form)."""
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
    return [pairs[i] for i in range(len(pairs))]


def _msd_listed_pairs(root: Path, training: list, meta_path: Path) -> list[tuple[Path, Path]]:
    """(image, label) pairs of ``dataset.json``'s ``training`` entries."""
    pairs_list: list[tuple[Path, Path]] = []
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
    return pairs_list


def _msd_folder_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(image, label) pairs of ``imagesTr/`` + ``labelsTr/`` (no ``training`` list in dataset.json)."""
    img_dir, lab_dir = root / "imagesTr", root / "labelsTr"
    if not img_dir.is_dir() or not lab_dir.is_dir():
        raise DataError(f"MSD layout: {root} needs imagesTr/ and labelsTr/ folders")
    pairs_list: list[tuple[Path, Path]] = []
    for img in sorted(p for p in img_dir.iterdir() if is_volume_file(p) and not p.name.startswith(".")):
        stem = _strip_volume_ext(img.name)
        ext = img.name[len(stem):]
        case = stem[:-5] if re.search(r"_\d{4}$", stem) else stem
        if re.search(r"_\d{4}$", stem) and not stem.endswith("_0000"):
            continue  # extra modality channels of nnU-Net v2: the first one is used
        lab = lab_dir / f"{case}{ext}"
        if not lab.exists():
            raise DataError(f"MSD layout: image {img} has no label {lab}")
        pairs_list.append((img, lab))
    return pairs_list


def _msd_cases(root: Path, classes: list[str] | None) -> tuple[list[SegCase], list[str]]:
    meta_path = root / "dataset.json"
    meta = {}
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{meta_path}: not valid JSON") from None
    if classes is None:
        classes = _msd_classes(meta, meta_path)
    training = meta.get("training")
    pairs_list = _msd_listed_pairs(root, training, meta_path) if training else _msd_folder_pairs(root)
    cases = []
    for img, lab in pairs_list:
        for p in (img, lab):
            if not p.exists():
                raise DataError(f"MSD layout: file not found: {p}")
        case = _strip_volume_ext(lab.name)
        cases.append(SegCase(id=case, patient=case, image=img, mask=lab, kind="volume"))
    return cases, classes


@dataclass
class SegLayout:
    """What a layout reader finds: the cases, the class names, a display name, how 2-D masks decode."""

    cases: list[SegCase]
    classes: list[str]
    name: str
    decode: Callable[[Path], np.ndarray] | None  # None: volumes, decoded by read_case


def manifest_layout(manifest: str | None, classes: Sequence[str] | None, colors: Sequence[Sequence[int]] | None,
                    split_column: str | None = None, fold_column: str | None = None) -> SegLayout:
    """The ``manifest`` layout: a CSV of image / mask / patient (+ split or fold) rows; ``classes`` by
    position, ``colors`` the RGB of each class for colour-coded masks."""
    cases, path = _manifest_cases(manifest, split_column, fold_column)
    if not classes:
        raise ConfigError("data.classes: give the class names (index = position, 0 = background)")
    classes = list(classes)
    table: dict[int, int] | None = None
    if colors is not None:
        if len(colors) != len(classes) or any(len(c) != 3 for c in colors):
            raise ConfigError("data.colors: one [R, G, B] per class in data.classes")
        table = {rgb_key(tuple(c)): i for i, c in enumerate(colors)}
    return SegLayout(cases, classes, path.stem, lambda p: read_png_mask(p, table))


def cholecseg8k_layout(root: str | None, exclude: Sequence[str], excluded_to: str, ignore_index: int) -> SegLayout:
    """The ``cholecseg8k`` layout: ``ROOT/videoXX/videoXX_NNNNN/frame_N_endo.png`` + watershed masks."""
    folder = require_file(root, "data.root")
    classes, table = cholecseg8k_table(exclude, excluded_to, ignore_index)
    cases = _cholec_cases(folder)

    def decode(p: Path) -> np.ndarray:
        with Image.open(p) as im:
            rgb = np.asarray(im.convert("RGB"))
        return decode_color_mask(rgb, table, p)

    return SegLayout(cases, classes, "cholecseg8k", decode)


def msd_layout(root: str | None, classes: list[str] | None) -> SegLayout:
    """The ``msd`` layout: ``imagesTr/`` + ``labelsTr/`` + ``dataset.json`` (classes from it unless given)."""
    folder = require_file(root, "data.root")
    cases, names = _msd_cases(folder, classes)
    return SegLayout(cases, names, folder.name, None)


# ---------------------------------------------------------------------------------------------- reading
def scan(data: SegData) -> None:
    """Read every mask once: size against its image, labels against the class map (fails naming the file)."""
    with Progress(len(data.cases), "checking masks", unit="mask") as bar:
        for case in data.cases:
            require_file(case.image, "image")
            require_file(case.mask, "mask")
            if case.kind == "volume":
                shape_i, shape_m = volume_shape(case.image), volume_shape(case.mask)
                if shape_i != shape_m:
                    raise DataError(f"mask {case.mask}: shape {shape_m} differs from its volume {case.image} {shape_i}")
                labels = read_label_volume(case.mask)
                check_labels(labels, data.num_classes, data.ignore_index, case.mask)
            else:
                w, h = image_size(case.image)
                mask = data.decode(case.mask)
                if mask.shape != (h, w):
                    raise DataError(f"mask {case.mask}: size {mask.shape[1]}x{mask.shape[0]} differs from its "
                                    f"image {case.image} ({w}x{h})")
                check_labels(mask, data.num_classes, data.ignore_index, case.mask)
            bar.advance(1)


def read_case(data: SegData, case: SegCase) -> LoadedCase:
    """One case in memory: a volume windowed to uint8 RGB (``data.window``), or an image and its decoded mask."""
    if case.kind == "volume":
        vol, spacing = read_volume(case.image)
        labels = check_labels(read_label_volume(case.mask), data.num_classes, data.ignore_index, case.mask)
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
