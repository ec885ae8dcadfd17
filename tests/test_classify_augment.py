"""Seed 002's fine-tuning recipe: MediDino's augmentation (each op against a hand computation on a synthetic
image, the draws' ranges, seeding, training images only) and its optimiser (Adam, no weight decay, no
gradient clipping)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from meddino.config import load_config
from meddino.data.geometric import GeometricAugment, crop_box, resized_crop, rotate, sample_seed, shear_x, translate
from meddino.data.io import read_image
from meddino.data.transforms import to_tensor
from meddino.models import build_backbone
from meddino.tasks.classify import finetune as ft
from meddino.tasks.classify.config import ClassifyConfig
from meddino.tasks.classify.embed import ImageDataset

SEED002 = "seed002_binary_cv"


def _seed002(*overrides: str) -> ClassifyConfig:
    return load_config(ClassifyConfig, SEED002, ["data.img_size=32", *overrides], group="classify")


def _nearest_warp(src: np.ndarray, source_of, fill: float) -> np.ndarray:
    """out[r, c] = src[round(source_of(r, c))], ``fill`` outside: a nearest-neighbour warp written out."""
    h, w = src.shape
    out = np.full_like(src, fill)
    for r in range(h):
        for c in range(w):
            sr, sc = source_of(r, c)
            ir, ic = int(np.rint(sr)), int(np.rint(sc))
            if 0 <= ir < h and 0 <= ic < w:
                out[r, c] = src[ir, ic]
    return out


# ---------------------------------------------------------------------------------------------- kernels
def test_rotation_is_counter_clockwise_about_the_centre():
    x = torch.zeros(3, 11, 11)
    x[:, 2, 5] = 1.0  # three rows above the centre (5, 5)
    assert rotate(x, 90.0, [0.0] * 3)[0].nonzero().tolist() == [[5, 2]]  # now three columns left of it
    assert rotate(x, -90.0, [0.0] * 3)[0].nonzero().tolist() == [[5, 8]]
    # any angle: each output pixel takes the source pixel at the inverse rotation of its offset (y down)
    src = torch.rand(1, 11, 11, generator=torch.Generator().manual_seed(0))
    theta = math.radians(37.0)  # no source coordinate lands on a rounding tie (30 degrees would: sin = 1/2)

    def source_of(r, c):
        dx, dy = c - 5, r - 5
        return 5 + dx * math.sin(theta) + dy * math.cos(theta), 5 + dx * math.cos(theta) - dy * math.sin(theta)

    want = _nearest_warp(src[0].numpy(), source_of, fill=-1.0)
    np.testing.assert_array_equal(rotate(src, 37.0, [-1.0])[0].numpy(), want)


def test_shear_moves_each_row_by_its_offset_times_tan():
    src = torch.rand(1, 11, 11, generator=torch.Generator().manual_seed(1))
    t = math.tan(math.radians(10.0))
    # the pixel dy rows below the centre moves -dy * tan(angle) columns; rows stay
    want = _nearest_warp(src[0].numpy(), lambda r, c: (r, c + (r - 5) * t), fill=-1.0)
    np.testing.assert_array_equal(shear_x(src, 10.0, [-1.0])[0].numpy(), want)
    line = torch.zeros(1, 9, 9)
    line[0, :, 4] = 1.0
    cols = shear_x(line, 20.0, [0.0])[0].argmax(dim=1).tolist()
    assert cols == [round(4 - (r - 4) * math.tan(math.radians(20.0))) for r in range(9)]  # top right, bottom left


def test_translate_shifts_by_whole_pixels_and_fills_the_uncovered_border():
    src = torch.rand(3, 8, 10, generator=torch.Generator().manual_seed(2))
    fill = [-1.0, -2.0, -3.0]
    out = translate(src, 3, -2, fill)
    assert torch.equal(out[:, :-2, 3:], src[:, 2:, :-3])  # out[r + dy, c + dx] = src[r, c], dx 3, dy -2
    for ch, f in enumerate(fill):
        assert (out[ch, :, :3] == f).all() and (out[ch, -2:, :] == f).all()


def test_resized_crop_is_the_box_resized():
    src = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(resized_crop(src, (3, 5, 20, 24), (20, 24)), src[:, 3:23, 5:29])  # no resize: the box
    # resized: the box through PIL's bilinear resize (an independent implementation), per channel
    got = resized_crop(src, (3, 5, 20, 24), (32, 32))
    for ch in range(3):
        box = Image.fromarray(src[ch, 3:23, 5:29].numpy().astype(np.float32), mode="F")
        ref = np.asarray(box.resize((32, 32), Image.BILINEAR))
        np.testing.assert_allclose(got[ch].numpy(), ref, atol=2e-3)


def test_crop_box_draws_the_inception_crop():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # a fixed area and ratio: the size is exact, the place uniform inside the image
        top, left, h, w = crop_box(gen, 32, 32, (0.5, 0.5), (1.0, 1.0))
        assert (h, w) == (23, 23) and 0 <= top <= 9 and 0 <= left <= 9
    areas = []
    for _ in range(300):  # seed 002's (0.9, 1.1): a fraction above 1 never fits, so 90-100 % of the image
        top, left, h, w = crop_box(gen, 32, 32, (0.9, 1.1), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 32 and 0 <= left and left + w <= 32
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
        areas.append(h * w / 1024)
    assert 0.87 <= min(areas) < 0.93 and max(areas) == 1.0
    assert crop_box(gen, 32, 32, (1.2, 1.3), (3 / 4, 4 / 3)) == (0, 0, 32, 32)  # nothing fits: the whole image
    assert crop_box(gen, 20, 40, (1.2, 1.3), (3 / 4, 4 / 3)) == (0, 6, 20, 27)  # central, ratio clamped to 4/3


def test_draws_stay_in_the_seed_ranges_and_take_both_signs():
    aug = GeometricAugment(rotation=10.0, hflip=0.5, crop_scale=(0.9, 1.1), shear=10.0, translate=0.1)
    gen = torch.Generator().manual_seed(0)
    draws = [aug.sample(gen, 224, 224) for _ in range(400)]
    angles = np.array([d["angle"] for d in draws])
    shears = np.array([d["shear"] for d in draws])
    shifts = np.array([d["shift"] for d in draws])
    flips = np.array([d["flip"] for d in draws])
    assert np.abs(angles).max() <= 10 and angles.min() < -8 and angles.max() > 8
    assert np.abs(shears).max() <= 10 and shears.min() < -8 and shears.max() > 8
    assert np.abs(shifts).max() <= round(0.1 * 224) and shifts.min() < -18 and shifts.max() > 18
    assert shifts.dtype.kind == "i" and 0.4 < flips.mean() < 0.6
    assert GeometricAugment(rotation=10.0).sample(gen, 8, 8).keys() == {"angle"}  # off ops draw nothing
    assert not GeometricAugment().active


def test_apply_runs_the_ops_in_the_seed_order():
    """Rotate, flip, crop, shear, translate, each the kernel above."""
    x = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(4))
    p = {"angle": 7.0, "flip": True, "box": (1, 2, 14, 12), "shear": -4.0, "shift": (2, -1)}
    fill = [0.0, 0.0, 0.0]
    want = translate(shear_x(resized_crop(rotate(x, 7.0, fill).flip(-1), (1, 2, 14, 12), (16, 16)), -4.0, fill),
                     2, -1, fill)
    assert torch.equal(GeometricAugment.apply(x, p, fill), want)


# ---------------------------------------------------------------------------------------------- datasets
def _images(root, n: int = 4) -> list:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(root / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_training_augmentation_is_seeded_per_seed_epoch_and_image(tmp_path):
    paths = _images(tmp_path)
    aug = ft.train_augment(_seed002().finetune)
    ds = ImageDataset(paths, 32, (0.5,) * 3, (0.25,) * 3, augment=aug, seed=3)
    first = [ds[i][0] for i in range(4)]
    again = ImageDataset(paths, 32, (0.5,) * 3, (0.25,) * 3, augment=aug, seed=3)
    assert all(torch.equal(a, again[i][0]) for i, a in enumerate(first))  # reproducible
    plain = [to_tensor(read_image(p), 32, (0.5,) * 3, (0.25,) * 3) for p in paths]
    assert all(not torch.equal(a, b) for a, b in zip(first, plain))  # and augmented
    ds.set_epoch(1)
    assert not any(torch.equal(a, ds[i][0]) for i, a in enumerate(first))  # fresh draws each epoch
    other = ImageDataset(paths, 32, (0.5,) * 3, (0.25,) * 3, augment=aug, seed=4)
    assert not torch.equal(other[0][0], first[0])
    assert sample_seed(3, 0, 1) != sample_seed(3, 1, 0) != sample_seed(4, 0, 0)
    # a loader worker draws what the main process draws
    loader = torch.utils.data.DataLoader(again, batch_size=4, num_workers=1)
    (x, idx), = list(loader)
    assert all(torch.equal(x[k], first[int(i)]) for k, i in enumerate(idx))


def test_uncovered_pixels_are_black(tmp_path):
    path = tmp_path / "white.png"
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(path)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ds = ImageDataset([path], 32, mean, std, augment=GeometricAugment(translate=0.25), seed=0)
    x = ds[0][0]
    black = torch.tensor([-m / s for m, s in zip(mean, std)]).view(3, 1)
    white = torch.tensor([(1 - m) / s for m, s in zip(mean, std)]).view(3, 1)
    flat = x.flatten(1)
    is_black = torch.isclose(flat, black).all(0)
    assert is_black.any() and (is_black | torch.isclose(flat, white).all(0)).all()


def test_only_training_images_are_augmented(tmp_path):
    paths = _images(tmp_path, 6)
    cfg = _seed002()
    m = SimpleNamespace(paths=paths)
    unit = SimpleNamespace(train=np.array([0, 1]), val=np.array([2, 3]), test=np.array([4, 5]))
    norm = ((0.5,) * 3, (0.25,) * 3)
    train, val, test = ft.unit_datasets(cfg, m, unit, norm, seed=0)
    assert train.augment == GeometricAugment(rotation=10.0, hflip=0.5, crop_scale=(0.9, 1.1),
                                             crop_ratio=(0.75, 4 / 3), shear=10.0, translate=0.1)
    assert val.augment is None and test.augment is None
    for ds, rows in ((val, (2, 3)), (test, (4, 5))):
        for k, j in enumerate(rows):
            assert torch.equal(ds[k][0], to_tensor(read_image(paths[j]), 32, *norm))
    for k, j in enumerate((0, 1)):
        assert not torch.equal(train[k][0], to_tensor(read_image(paths[j]), 32, *norm))
    # the other recipes keep their flip-only training transform
    lora = load_config(ClassifyConfig, "seed001_lora", ["data.img_size=32"], group="classify")
    train, _, _ = ft.unit_datasets(lora, m, unit, norm, seed=0)
    assert train.augment == GeometricAugment(hflip=0.5)


# ---------------------------------------------------------------------------------------------- optimiser
def _model() -> ft.Classifier:
    torch.manual_seed(0)
    model = ft.Classifier(build_backbone("dinov2_tiny"), 1, head="mlp", hidden=8)
    ft.configure(model, "full", _seed002().finetune)
    return model


def test_seed002_optimiser_is_adam_without_weight_decay():
    fc = _seed002().finetune
    assert (fc.optimizer, fc.weight_decay, fc.grad_clip) == ("adam", 0.0, None)
    model = _model()
    groups = ft.param_groups(model, 1e-5, fc.weight_decay, fc.layer_decay, fc.head_lr_scale)
    opt = ft.make_optimizer(groups, 1e-5, fc.optimizer)
    assert type(opt) is torch.optim.Adam  # AdamW subclasses Adam: the exact class
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)
    assert not opt.defaults.get("decoupled_weight_decay", False)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())
    default = load_config(ClassifyConfig, "seed001_finetune", group="classify").finetune
    assert default.optimizer == "adamw" and default.grad_clip == 1.0
    groups = ft.param_groups(model, 1e-5, 0.05)
    assert type(ft.make_optimizer(groups, 1e-5, default.optimizer)) is torch.optim.AdamW


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_gradient_clipping_runs_only_when_asked(tmp_path, monkeypatch, grad_clip):
    calls = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(1) or real(*a, **k))
    fc = _seed002("finetune.epochs=1", f"finetune.grad_clip={'null' if grad_clip is None else grad_clip}").finetune
    paths = _images(tmp_path)
    ds = ImageDataset(paths, 32, (0.5,) * 3, (0.25,) * 3, augment=ft.train_augment(fc), seed=0)
    y = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    ft.train_model(_model(), ds, y, ds, y, "binary", fc, 1e-4, 2, torch.device("cpu"), seed=0)
    assert len(calls) == (0 if grad_clip is None else 2)  # two steps


def test_results_json_records_optimiser_clipping_and_augmentation(tmp_path):
    import csv

    rows = []
    for p in range(6):
        rel = f"{p}.png"
        Image.fromarray(np.full((32, 32, 3), 60 + 120 * (p % 2), dtype=np.uint8)).save(tmp_path / rel)
        rows.append({"image": rel, "label": p % 2, "patient": f"P{p}", "fold": p % 3})
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "label", "patient", "fold"])
        w.writeheader()
        w.writerows(rows)
    cfg = _seed002(f"data.manifest={tmp_path / 'm.csv'}", "backbone=random:dinov2_tiny", f"out={tmp_path / 'run'}",
                   "finetune.lrs=[0.0001]", "finetune.batch_sizes=[4]", "finetune.epochs=1", "finetune.head_hidden=8")
    ft.run_finetune(cfg)
    hp = json.loads((tmp_path / "run/results.json").read_text())["hyperparameters"]
    assert (hp["optimizer"], hp["weight_decay"], hp["grad_clip"], hp["hflip"]) == ("adam", 0.0, None, 0.5)
    assert hp["augment"] == {"rotation": 10.0, "crop_scale": [0.9, 1.1], "crop_ratio": [0.75, 4 / 3],
                             "shear": 10.0, "translate": 0.1}
