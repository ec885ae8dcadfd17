"""The demo's data: real medical images that installed packages already carry (no download).

- nilearn ships the MNI152 2009 T1 template (2 mm) with grey-matter and white-matter probability maps and a
  brain mask: its slices along the three axes are the unlabeled pretraining images, and the tissue maps give
  real segmentation labels (background / grey matter / white matter, by the larger probability above 0.5).
- pydicom ships CT, MR, US and NM test images: added to the unlabeled set (mixed-modality pretraining) and
  to the PCA panels.

Classification labels are anatomical levels: the tercile of the slice position along its own axis
(inferior/middle/superior, posterior/middle/anterior, left/middle/right). "Patients" are blocks of
neighbouring slices, so a patient-level split never puts adjacent, near-identical slices on both sides.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from meddino.data.io import read_image

AXIS_NAMES = ("sagittal", "coronal", "axial")
LEVELS = ("low", "middle", "high")
SEG_CLASSES = ("background", "grey_matter", "white_matter")


@dataclass
class DemoData:
    root: Path
    unlabeled: Path  # folder of PNG slices + DICOM files
    classify_manifest: Path  # image,label,patient
    seg_manifest: Path  # image,mask,patient
    viz_images: list[Path]


def _square_resize(arr: np.ndarray, size: int, resample: int) -> np.ndarray:
    h, w = arr.shape[:2]
    side = max(h, w)
    pad = [((side - h) // 2, side - h - (side - h) // 2), ((side - w) // 2, side - w - (side - w) // 2)]
    pad += [(0, 0)] * (arr.ndim - 2)
    squared = np.pad(arr, pad)
    return np.asarray(Image.fromarray(squared).resize((size, size), resample))


def _load_mni() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from nilearn import datasets  # why: nilearn is slow to import; only the demo's MNI volume needs it

    def arr(img) -> np.ndarray:
        return np.asarray(img.get_fdata(), dtype=np.float32)

    t1 = arr(datasets.load_mni152_template(resolution=2))
    gm = arr(datasets.load_mni152_gm_template(resolution=2))
    wm = arr(datasets.load_mni152_wm_template(resolution=2))
    brain = arr(datasets.load_mni152_brain_mask(resolution=2)) > 0.5
    return t1, gm, wm, brain


def _bundled_dicoms() -> list[Path]:
    import pydicom  # why: pydicom only for the demo's sample DICOMs
    from pydicom.data import get_testdata_file  # why: as above

    names = ["CT_small.dcm", "MR_small.dcm", "693_J2KI.dcm", "examples_overlay.dcm", "image_dfl.dcm",
             "examples_palette.dcm", "JPEG2000.dcm"]
    found = []
    for name in names:
        path = get_testdata_file(name, download=False)
        if path is None:
            continue
        try:  # some need optional decoders; keep only what decodes here
            pydicom.dcmread(path).pixel_array
        except Exception:  # noqa: BLE001 - a test file we cannot decode is simply not used
            continue
        found.append(Path(path))
    return found


def build_demo_data(root: str | Path, size: int = 64, step: int = 2, block: int = 6) -> DemoData:
    """Write the demo data set under ``root`` (idempotent: reuses a complete earlier build)."""
    root = Path(root)
    done = root / ".complete"
    stamp = f"size={size} step={step} block={block}\n"
    data = DemoData(root, root / "unlabeled", root / "classify.csv", root / "seg.csv", [])
    if done.exists() and done.read_text() == stamp:
        data.viz_images = sorted((root / "viz").glob("*"))
        return data

    for sub in ("unlabeled", "slices", "masks", "viz"):
        shutil.rmtree(root / sub, ignore_errors=True)
    cls_rows, seg_rows = _write_mni_slices(root, size, step, block)
    for dicom in _bundled_dicoms():
        target = root / "unlabeled" / dicom.name
        target.write_bytes(dicom.read_bytes())

    for name in ("CT_small.dcm", "MR_small.dcm"):
        if (root / "unlabeled" / name).exists():
            rgb = _square_resize(read_image(root / "unlabeled" / name), size, Image.BICUBIC)
            Image.fromarray(rgb).save(root / "viz" / f"{Path(name).stem}.png")
    for path, rows in ((data.classify_manifest, cls_rows), (data.seg_manifest, seg_rows)):
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    done.write_text(stamp)
    data.viz_images = sorted((root / "viz").glob("*"))
    return data


def _write_mni_slices(root: Path, size: int, step: int,
                      block: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Every ``step``-th MNI slice along each axis that is mostly inside the head, as a PNG (slices/ and
    unlabeled/) with its tissue mask (masks/), the middle one of each axis also in viz/; returns the rows
    of the classification and segmentation manifests."""
    t1, gm, wm, brain = _load_mni()
    lo, hi = np.percentile(t1[brain], [0.5, 99.5])
    (root / "unlabeled").mkdir(parents=True, exist_ok=True)
    (root / "slices").mkdir(exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    (root / "viz").mkdir(exist_ok=True)
    cls_rows, seg_rows = [], []
    for axis, axis_name in enumerate(AXIS_NAMES):
        n = t1.shape[axis]
        for index in range(0, n, step):
            take = [slice(None)] * 3
            take[axis] = index
            if brain[tuple(take)].mean() < 0.08:
                continue  # mostly outside the head
            t1_slice = np.rot90(t1[tuple(take)])
            gm_slice, wm_slice, brain_slice = (np.rot90(v[tuple(take)]) for v in (gm, wm, brain))
            grey = (np.clip((t1_slice - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
            rgb = _square_resize(np.stack([grey] * 3, -1), size, Image.BICUBIC)
            label = np.zeros(t1_slice.shape, np.uint8)
            label[(gm_slice > 0.5) & (gm_slice >= wm_slice) & brain_slice] = 1
            label[(wm_slice > 0.5) & (wm_slice > gm_slice) & brain_slice] = 2
            mask = _square_resize(label, size, Image.NEAREST)
            name = f"mni_{axis_name}_{index:03d}.png"
            Image.fromarray(rgb).save(root / "slices" / name)
            Image.fromarray(rgb).save(root / "unlabeled" / name)
            Image.fromarray(mask).save(root / "masks" / name)
            patient = f"{axis_name}_{index // (block * step):02d}"
            level = LEVELS[min(2, 3 * index // n)]
            cls_rows.append({"image": f"slices/{name}", "label": level, "patient": patient})
            seg_rows.append({"image": f"slices/{name}", "mask": f"masks/{name}", "patient": patient})
            if index == (n // 2) - (n // 2) % step:
                Image.fromarray(rgb).save(root / "viz" / name)
    return cls_rows, seg_rows
