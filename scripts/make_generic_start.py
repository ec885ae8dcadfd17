"""Rebuild a shipped "generic" start checkpoint: a tiny DINOv2 (or DINOv3) ViT pretrained by meddino on natural photos.

The seeds compare a generic-domain start (ImageNet / LVD weights) with the same model continued in-domain.
``meddino demo`` does the same offline with this checkpoint, shipped as
``src/meddino/assets/generic_dinov2_tiny.safetensors`` (+ ``.json``). It is made from the natural photos
that installed packages carry: scikit-image's sample images (astronaut, camera, cat, coffee, horse,
rocket, ...; its biomedical samples are left out on purpose), scikit-learn's two sample photos and
matplotlib's Grace Hopper portrait. Each photo is cut into many random square crops (saved as PNG, so
``meddino pretrain`` reads them as any image folder), then ``meddino pretrain --config dinov2_tiny`` runs
from random init with the overrides below and the teacher backbone is exported.

    pip install scikit-image        # only needed to rebuild; the demo itself does not use it
    python scripts/make_generic_start.py [--iterations 1500] [--out src/meddino/assets]
    python scripts/make_generic_start.py --arch dinov3_tiny --iterations 600   # generic_dinov3_tiny

``--arch dinov3_tiny`` builds the v3 architecture (RoPE, registers, LayerScale, qkv bias) with the same
DINOv2 objective (``--config dinov2_tiny model.arch=dinov3_tiny``): from a random init the DINOv3
objective's plain-Linear head cannot leave its uniform start in a CPU-sized run (its targets carry ~1e-4
nats about the image; docs/pretrain.md, "Why tiny runs sit at ln K"), while the v2 objective gives the
backbone features that tell images apart. What the start is for -- continuing it with the DINOv3 objective,
as ``tests/test_pretrain_learns.py`` does -- is then a test of that objective alone.

Prints one JSON object: the data, the command, its final training-health diagnostics and the wall time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from meddino.models import export_backbone, load_backbone

SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "grass", "gravel", "horse",
                  "hubble_deep_field", "moon", "rocket", "page", "text", "logo", "colorwheel")


def natural_photos() -> list[tuple[str, np.ndarray]]:
    """(name, HxWx3 uint8) of every bundled natural photo."""
    import matplotlib
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = []
    for name in SKIMAGE_PHOTOS:
        img = np.asarray(getattr(skimage.data, name)())
        photos.append((f"skimage_{name}", img))
    left, right, _ = skimage.data.stereo_motorcycle()
    photos += [("skimage_motorcycle_left", left), ("skimage_motorcycle_right", right)]
    for name, img in zip(("china", "flower"), load_sample_images().images):
        photos.append((f"sklearn_{name}", np.asarray(img)))
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    photos.append(("matplotlib_grace_hopper", np.asarray(Image.open(hopper))))
    out = []
    for name, img in photos:
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        img = img[..., :3]
        if img.dtype != np.uint8:
            f = img.astype(np.float64)
            img = (255 * (f - f.min()) / max(float(np.ptp(f)), 1e-9)).astype(np.uint8)
        out.append((name, img))
    return out


def write_crops(folder: Path, n_per_photo: int, size: int, seed: int) -> int:
    """Random square crops (side 20-70% of the shorter edge) of every photo, resized to ``size``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for name, img in natural_photos():
        h, w = img.shape[:2]
        for i in range(n_per_photo):
            side = int(min(h, w) * rng.uniform(0.2, 0.7))
            top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = Image.fromarray(img[top:top + side, left:left + side]).resize((size, size), Image.BICUBIC)
            crop.save(folder / f"{name}_{i:03d}.png")
            n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=48, help="crop size written to disk and used as global crop")
    p.add_argument("--crops-per-photo", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", default="dinov2_tiny", choices=("dinov2_tiny", "dinov3_tiny"),
                   help="architecture; always trained with the DINOv2 objective (see the docstring)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "src/meddino/assets")
    args = p.parse_args()

    overrides = [
        *([f"model.arch={args.arch}"] if args.arch != "dinov2_tiny" else []),
        f"train.iterations={args.iterations}", f"data.batch_size={args.batch}", f"train.seed={args.seed}",
        f"crops.global_size={args.size}", f"crops.local_size={args.size // 2 // 8 * 8 or 8}",
        # small-scale settings (docs/pretrain.md, "Why tiny runs sit at ln K")
        "optim.momentum=0.95", "optim.momentum_end=0.995", "optim.teacher_temp=0.04",
        f"train.checkpoint_every={args.iterations}", "train.log_every=25",
    ]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        n = write_crops(tmp_path / "photos", args.crops_per_photo, args.size, args.seed)
        run = tmp_path / "run"
        cmd = [sys.executable, "-m", "meddino", "pretrain", "--config", "dinov2_tiny",
               f"data.path={tmp_path / 'photos'}", f"out={run}", *overrides]
        subprocess.run(cmd, check=True, stdout=sys.stderr)  # keep stdout for the JSON
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        args.out.mkdir(parents=True, exist_ok=True)
        # re-exported (not copied) so the JSON names its own weights file
        export_backbone(load_backbone(run / "teacher_backbone.safetensors"), args.out / f"generic_{args.arch}.safetensors")
    last = rows[-1]
    keys = ("dino", "ibot", "koleo", "teacher_entropy", "ln_k", "prototype_usage", "effective_rank")
    print(json.dumps({
        "script": "make_generic_start",
        "photos": [name for name, _ in natural_photos()],
        "n_crops": n,
        "command": "meddino pretrain --config dinov2_tiny " + " ".join(overrides),
        "final": {k: last.get(k) for k in keys},
        "min_teacher_entropy_over_ln_k": min(r["teacher_entropy"] for r in rows if "teacher_entropy" in r) / last["ln_k"],
        "wall_s": round(time.perf_counter() - t0, 1),
        "out": str(args.out / f"generic_{args.arch}.safetensors"),
    }, indent=1))


if __name__ == "__main__":
    main()
