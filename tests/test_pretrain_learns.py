"""Continued pretraining LEARNS, judged as issue 10 asks: by the teacher's health and by kNN on held-out images.

A tiny DINOv2 run continued from the shipped generic start (``assets/generic_dinov2_tiny``, the demo's
start) on generated images of four texture classes, with the small-scale settings of docs/pretrain.md
("Why tiny runs sit at ln K"), must end with a teacher entropy clearly below ln K while several
prototypes stay in use (not the one-prototype collapse) and a non-trivial effective rank, and its
features must classify held-out images by kNN (scikit-learn, cosine, k=5) better than the start did.

A tiny DINOv3 run is continued the same way from the shipped ``assets/generic_dinov3_tiny`` (the v3
architecture pretrained on natural photos with the DINOv2 objective, ``scripts/make_generic_start.py
--arch dinov3_tiny`` says why), so what is tested is the DINOv3 objective alone (Sinkhorn-Knopp centring,
plain-Linear heads, separate iBOT head, KoLeo). Its plain-Linear last layer starts every run with teacher
logits of std 0.02 / teacher_temp, an entropy within 2% of ln K, and sharpens only as those weights grow,
so the v3 test asks for that: the entropy falling from its start, the teacher's targets carrying more and
more information about the image (``teacher_information``), the detector quiet, and held-out kNN above
the start. The weights must grow within 120 iterations, hence its one setting beyond the v2 test's: a
4x base lr (measured: 0.75 -> 0.825 and 0.80 over two seeds; at the recipe's lr the teacher still
sharpens, 0.98 -> 0.88 ln K over 240 iterations, but kNN stays at 0.75).

What these tests do NOT claim: a tiny v2/v3 run from a *random* init learns at this size; it does not
(LayerScale 1e-5 makes the CLS token input-independent, see the docs).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from meddino.demo import generic_start

SIZE = 32


def _texture_images(folder, n_per_class: int = 40, seed: int = 0):
    """Four texture classes (vertical / horizontal stripes, checker, rings) with random frequency, phase,
    contrast and strong pixel noise: classes invariant to crops, flips and colour jitter, images not."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:48, 0:48].astype(np.float32)
    paths, labels = [], []
    for c in range(4):
        for i in range(n_per_class):
            f, ph = rng.uniform(0.3, 0.9), rng.uniform(0, 2 * np.pi)
            v = [np.sin(f * xx + ph), np.sin(f * yy + ph), np.sin(f * xx + ph) * np.sin(f * yy + ph),
                 np.sign(np.sin(0.5 * f * np.hypot(xx - 24, yy - 24) + ph))][c]
            amp, base = rng.uniform(40, 110), rng.uniform(70, 180)
            img = (base + amp * v + rng.normal(0, 45, v.shape)).clip(0, 255).astype(np.uint8)
            path = folder / f"c{c}_{i:03d}.png"
            Image.fromarray(img).convert("RGB").save(path)
            paths.append(path)
            labels.append(c)
    return paths, np.array(labels)


def _knn_accuracy(spec, paths, labels, train_mask) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    from meddino.models import load_backbone

    model = load_backbone(str(spec)).eval()
    mean = torch.tensor(model.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.std).view(1, 3, 1, 1)
    x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((SIZE, SIZE)))).permute(2, 0, 1)
                     for p in paths]).float() / 255
    with torch.no_grad():
        feats = torch.nn.functional.normalize(model.forward_features((x - mean) / std)["cls"], dim=-1).numpy()
    knn = KNeighborsClassifier(5, metric="cosine").fit(feats[train_mask], labels[train_mask])
    return float(knn.score(feats[~train_mask], labels[~train_mask]))


def _textures_and_pretrain_folder(tmp_path):
    """The texture images, the held-out mask (every 4th image of each class, never pretrained on) and a
    folder of symlinks to the others."""
    paths, labels = _texture_images(tmp_path / "textures")
    held_out = np.arange(len(paths)) % 4 == 0
    train_dir = tmp_path / "pretrain_images"
    train_dir.mkdir()
    for p, h in zip(paths, held_out):
        if not h:
            (train_dir / p.name).symlink_to(p)
    return paths, labels, held_out, train_dir


# the small-scale settings of docs/pretrain.md ("Why tiny runs sit at ln K")
SMALL_SCALE = ["data.batch_size=32", "data.num_workers=0", "train.log_every=10",
               "optim.momentum=0.95", "optim.momentum_end=0.995", "optim.teacher_temp=0.04"]


def _pretrain(recipe, train_dir, out, iterations, *overrides):
    from meddino.config import load_config
    from meddino.pretrain.config import PretrainConfig
    from meddino.pretrain.engine import run_pretrain

    cfg = load_config(PretrainConfig, recipe, [
        f"data.path={train_dir}", f"out={out}", f"train.iterations={iterations}",
        f"train.checkpoint_every={iterations}", *SMALL_SCALE, *overrides], group="pretrain")
    run_pretrain(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return cfg, rows


@pytest.mark.slow
def test_continued_dinov2_tiny_learns_on_structured_images(tmp_path):
    paths, labels, held_out, train_dir = _textures_and_pretrain_folder(tmp_path)
    out = tmp_path / "run"
    cfg, rows = _pretrain("dinov2_tiny", train_dir, out, 150, f"init={generic_start()}",
                          "head_warmup.frozen_iters=10", "head_warmup.ramp_iters=10")
    last = rows[-1]
    ln_k = math.log(cfg.model.head.out_dim)
    assert last["ln_k"] == pytest.approx(ln_k)
    assert last["teacher_entropy"] < 0.6 * ln_k, f"teacher entropy {last['teacher_entropy']:.3f} vs ln K {ln_k:.3f}"
    assert last["dino"] < 0.8 * ln_k
    assert last["prototype_usage"] * cfg.model.head.out_dim >= 3, "one-prototype collapse"
    assert last["effective_rank"] > 4
    assert not any("collapse_warning" in r for r in rows)

    train_mask = ~held_out
    start = _knn_accuracy(generic_start(), paths, labels, train_mask)
    continued = _knn_accuracy(out / "teacher_backbone.safetensors", paths, labels, train_mask)
    assert continued > start, f"kNN on held-out images: continued {continued:.3f} vs start {start:.3f}"


@pytest.mark.slow
def test_continued_dinov3_tiny_learns_on_structured_images(tmp_path):
    paths, labels, held_out, train_dir = _textures_and_pretrain_folder(tmp_path)
    start_ckpt = generic_start("dinov3_tiny")
    out = tmp_path / "run"
    cfg, rows = _pretrain("dinov3_tiny", train_dir, out, 120, f"init={start_ckpt}", "optim.lr=0.016")
    assert cfg.method.version == "v3" and cfg.method.centering == "sinkhorn"
    logged = [r for r in rows if "teacher_information" in r]
    ln_k = math.log(cfg.model.head.out_dim)
    first, last = logged[0], logged[-1]
    assert first["teacher_entropy"] > 0.97 * ln_k  # the plain-Linear head's start (docstring)
    assert last["teacher_entropy"] < first["teacher_entropy"] - 0.03 * ln_k, [r["teacher_entropy"] for r in logged]
    assert last["teacher_information"] > max(0.2, 2 * first["teacher_information"])
    assert last["prototype_usage"] * cfg.model.head.out_dim >= 16
    assert last["effective_rank"] > 4
    assert not any("collapse_warning" in r for r in rows)

    train_mask = ~held_out
    before = _knn_accuracy(start_ckpt, paths, labels, train_mask)
    continued = _knn_accuracy(out / "teacher_backbone.safetensors", paths, labels, train_mask)
    assert continued > before, f"kNN on held-out images: continued {continued:.3f} vs start {before:.3f}"
