"""Continued pretraining LEARNS, judged as issue 10 asks: by the teacher's health and by kNN on held-out images.

A tiny DINOv2 run continued from the shipped generic start (``assets/generic_dinov2_tiny``, the demo's
start) on generated images of four texture classes, with the small-scale settings of docs/pretrain.md
("Why tiny runs sit at ln K"), must end with a teacher entropy clearly below ln K while several
prototypes stay in use (not the one-prototype collapse) and a non-trivial effective rank, and its
features must classify held-out images by kNN (scikit-learn, cosine, k=5) better than the start did.

What this test does NOT claim: a tiny v2/v3 run from a *random* init learns at this size; it does not
(LayerScale 1e-5 makes the CLS token input-independent, see the docs), and DINOv3's tiny plain-Linear
head has no shipped generic start.
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


@pytest.mark.slow
def test_continued_dinov2_tiny_learns_on_structured_images(tmp_path):
    from meddino.config import load_config
    from meddino.pretrain.config import PretrainConfig
    from meddino.pretrain.engine import run_pretrain

    paths, labels = _texture_images(tmp_path / "textures")
    held_out = np.arange(len(paths)) % 4 == 0  # every 4th image of each class is never pretrained on
    train_dir = tmp_path / "pretrain_images"
    train_dir.mkdir()
    for p, h in zip(paths, held_out):
        if not h:
            (train_dir / p.name).symlink_to(p)
    out = tmp_path / "run"
    cfg = load_config(PretrainConfig, "dinov2_tiny", [
        f"data.path={train_dir}", f"init={generic_start()}", f"out={out}", "train.iterations=150",
        "data.batch_size=32", "data.num_workers=0", "train.log_every=10", "train.checkpoint_every=150",
        "optim.momentum=0.95", "optim.momentum_end=0.995", "optim.teacher_temp=0.04",
        "head_warmup.frozen_iters=10", "head_warmup.ramp_iters=10",
    ], group="pretrain")
    run_pretrain(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
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
