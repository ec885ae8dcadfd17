"""Segmentation data layouts, mask decoding, patient-level folds, heads' shapes, model save/load.

Also holds the generators of tiny CholecSeg8k / MSD / manifest fixtures that test_seg_cli.py reuses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meddino.errors import ConfigError, DataError
from meddino.models import build_backbone
from meddino.data.seg_layouts import read_case
from meddino.data.seg_masks import CHOLECSEG8K_GREY, CHOLECSEG8K_RGB, cholecseg8k_table, decode_color_mask
from meddino.tasks.seg.config import SegDataConfig
from meddino.tasks.seg.data import FrameDataset, augment, load_seg_data
from meddino.tasks.seg.folds import make_folds, patient_folds, split_val
from meddino.tasks.seg.heads import SegmentationModel, UNetDecoder, default_unet_blocks

# CholecSeg8k grey codes of the classes drawn in the fixtures
LIVER, GRASPER, GALLBLADDER, BLOOD, BACKGROUND = 21, 31, 22, 24, 50


# ---------------------------------------------------------------------------------------------- fixtures
def make_cholec(root: Path, videos: int = 4, frames: int = 2, h: int = 40, w: int = 48, seed: int = 0) -> Path:
    """CholecSeg8k layout: videoXX/videoXX_00080/frame_N_endo.png + grey watershed masks (R = G = B)."""
    rng = np.random.default_rng(seed)
    for v in range(1, videos + 1):
        d = root / f"video{v:02d}" / f"video{v:02d}_00080"
        d.mkdir(parents=True, exist_ok=True)
        for f in range(frames):
            grey = np.full((h, w), BACKGROUND, np.uint8)
            img = rng.integers(0, 40, (h, w, 3)).astype(np.uint8)
            for code, col in ((LIVER, (200, 30, 30)), (GRASPER, (30, 200, 30)), (GALLBLADDER, (30, 30, 200))):
                y0, x0 = rng.integers(0, h - 14), rng.integers(0, w - 14)
                grey[y0 : y0 + 12, x0 : x0 + 12] = code
                img[y0 : y0 + 12, x0 : x0 + 12] = col
            grey[0, :] = 255  # the annotation tool's white edge
            Image.fromarray(img).save(d / f"frame_{80 + f}_endo.png")
            Image.fromarray(np.repeat(grey[..., None], 3, -1)).save(d / f"frame_{80 + f}_endo_watershed_mask.png")
    return root


def make_msd(root: Path, cases: int = 4, shape: tuple[int, int, int] = (5, 32, 32), seed: int = 0) -> Path:
    """MSD layout: imagesTr/labelsTr NIfTI (x, y, z on disk) + dataset.json; spacing (z, y, x) = (3, 1.25, 1.5)."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for c in range(cases):
        lab = np.zeros(shape, np.uint8)
        vol = rng.normal(0, 10, shape).astype(np.float32)
        y0, x0 = rng.integers(4, 14, 2)
        lab[1:4, y0 : y0 + 12, x0 : x0 + 10] = 1
        lab[2:3, y0 + 3 : y0 + 7, x0 + 2 : x0 + 6] = 2
        vol[lab == 1] += 100
        vol[lab == 2] += 200
        affine = np.diag([1.5, 1.25, 3.0, 1.0])
        affine[:3, 3] = [10, -5, 2]
        name = f"heart_{c:03d}.nii.gz"
        nib.save(nib.Nifti1Image(np.transpose(vol, (2, 1, 0)), affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(np.transpose(lab, (2, 1, 0)), affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    labels = {"0": "background", "1": "heart", "2": "core"}
    (root / "dataset.json").write_text(json.dumps({"name": "Heart", "labels": labels, "training": training}))
    return root


def make_manifest(root: Path, n: int = 6, h: int = 24, w: int = 32, mode: str = "L") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = ["image,mask,patient"]
    for i in range(n):
        img = np.zeros((h, w, 3), np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[4:12, 4 + i : 14 + i] = 1
        mask[14:20, 10:20] = 2
        img[mask == 1] = (255, 0, 0)
        img[mask == 2] = (0, 255, 0)
        Image.fromarray(img).save(root / f"img{i}.png")
        if mode == "P":
            m = Image.fromarray(mask, mode="L").convert("P")
            m.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
            m.save(root / f"mask{i}.png")
        else:
            Image.fromarray(mask).save(root / f"mask{i}.png")
        rows.append(f"img{i}.png,mask{i}.png,p{i // 2}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root / "pairs.csv"


# ---------------------------------------------------------------------------------------------- CholecSeg8k
def test_cholecseg8k_colour_table_and_exclusion():
    classes, table = cholecseg8k_table(["blood", "cystic duct", "hepatic vein", "liver ligament"], "background", 255)
    assert classes == ["black background", "abdominal wall", "liver", "gastrointestinal tract", "fat", "grasper",
                       "connective tissue", "l-hook electrocautery", "gallbladder"]
    rgb = np.array([[[g, g, g] for g in (50, 11, 21, 13, 12, 31, 23, 32, 22, 24, 25, 33, 5, 0, 255)]], np.uint8)
    got = decode_color_mask(rgb, table, "m.png")[0].tolist()
    #                 kept classes in order      | excluded -> background | unlabelled -> ignore
    assert got == [0, 1, 2, 3, 4, 5, 6, 7, 8] + [0, 0, 0, 0] + [255, 255]
    # the colour masks' RGB codes decode to the same indices
    rgb2 = np.array([[CHOLECSEG8K_RGB[i] for i in (2, 5, 10, 7)]], np.uint8)
    assert decode_color_mask(rgb2, table, "m.png")[0].tolist() == [2, 5, 8, 0]
    _, table_ign = cholecseg8k_table(["blood"], "ignore", 255)
    assert decode_color_mask(np.array([[[24, 24, 24]]], np.uint8), table_ign, "m.png").item() == 255
    assert len(CHOLECSEG8K_GREY) == len(CHOLECSEG8K_RGB) == 13
    with pytest.raises(DataError, match=r"m\.png: unknown colour \(1, 2, 3\)"):
        decode_color_mask(np.array([[[1, 2, 3]]], np.uint8), table, "m.png")
    with pytest.raises(ConfigError, match="unknown CholecSeg8k class 'bloood'"):
        cholecseg8k_table(["bloood"], "background", 255)


def test_cholecseg8k_layout_and_patient_folds(tmp_path):
    root = make_cholec(tmp_path / "c", videos=5, frames=2)
    cfg = SegDataConfig(layout="cholecseg8k", root=str(root), folds=5)
    data = load_seg_data(cfg)
    assert len(data.cases) == 10 and data.patients == [f"video{v:02d}" for v in range(1, 6)]
    loaded = read_case(data, data.cases[0])
    assert loaded.image.shape == (1, 40, 48, 3) and loaded.mask.shape == (1, 40, 48)
    assert set(np.unique(loaded.mask)) <= {0, 2, 5, 8, 255} and (loaded.mask[0, 0] == 255).all()
    folds = make_folds(data, cfg, seed=0)
    tests = [p for f in folds for p in f.test]
    assert sorted(tests) == data.patients  # every patient tested exactly once
    for f in folds:
        assert not set(f.train) & set(f.test) and not set(f.val) & set(f.test) and not set(f.train) & set(f.val)
        assert sorted(f.train + f.val + f.test) == data.patients


def test_patient_folds_are_balanced_and_seeded():
    ids = [f"p{i}" for i in range(11)]
    folds = patient_folds(ids, 5, seed=0)
    assert sorted(len(f) for f in folds) == [2, 2, 2, 2, 3]
    assert sorted(p for f in folds for p in f) == sorted(ids)
    assert folds == patient_folds(ids, 5, seed=0) and folds != patient_folds(ids, 5, seed=1)
    with pytest.raises(DataError, match="cannot make 5 folds"):
        patient_folds(ids[:3], 5, 0)
    train, val = split_val([f"p{i}" for i in range(8)], 0.125, 0)
    assert len(val) == 1 and len(train) == 7 and not set(train) & set(val)
    assert split_val(["a"], 0.5, 0) == (["a"], ["a"])


# ---------------------------------------------------------------------------------------------- manifest / msd
@pytest.mark.parametrize("mode", ["L", "P"])
def test_manifest_layout(tmp_path, mode):
    csv = make_manifest(tmp_path / "m", mode=mode)
    cfg = SegDataConfig(manifest=str(csv), classes=["background", "a", "b"], folds=3)
    data = load_seg_data(cfg)
    assert data.num_classes == 3 and data.patients == ["p0", "p1", "p2"]
    loaded = read_case(data, data.cases[1])
    assert loaded.mask[0, 5, 6] == 1 and loaded.mask[0, 15, 12] == 2 and loaded.spacing is None


def test_msd_layout_reads_volumes_with_spacing(tmp_path):
    root = make_msd(tmp_path / "msd", cases=2)
    data = load_seg_data(SegDataConfig(layout="msd", root=str(root), folds=2))
    assert data.classes == ["background", "heart", "core"] and data.volumetric
    loaded = read_case(data, data.cases[0])
    assert loaded.image.shape == (5, 32, 32, 3) and loaded.mask.shape == (5, 32, 32)
    assert loaded.spacing == pytest.approx((3.0, 1.25, 1.5))
    assert set(np.unique(loaded.mask)) == {0, 1, 2}
    ds = FrameDataset(data, data.cases, (16, 16), (0.5,) * 3, (0.25,) * 3)
    assert len(ds) == 10  # every slice of both volumes
    x, y = ds[2]
    assert x.shape == (3, 16, 16) and y.shape == (16, 16) and y.dtype == torch.long


# ---------------------------------------------------------------------------------------------- bad input
def test_size_mismatch_and_out_of_range_labels(tmp_path):
    csv = make_manifest(tmp_path / "m", n=2)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "m" / "mask1.png")
    cfg = SegDataConfig(manifest=str(csv), classes=["background", "a", "b"], folds=2)
    with pytest.raises(DataError, match=r"mask1\.png: size 10x10 differs from its image .*img1\.png"):
        load_seg_data(cfg)
    bad = np.zeros((24, 32), np.uint8)
    bad[3, 3] = 7
    Image.fromarray(bad).save(tmp_path / "m" / "mask1.png")
    with pytest.raises(DataError, match=r"mask1\.png: label 7 outside the class map"):
        load_seg_data(cfg)


def test_empty_dataset_and_unknown_colour(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image/mask pairs found"):
        load_seg_data(SegDataConfig(layout="cholecseg8k", root=str(tmp_path / "empty")))
    root = make_cholec(tmp_path / "c", videos=2, frames=1)
    mask = next(root.rglob("*_watershed_mask.png"))
    arr = np.asarray(Image.open(mask)).copy()
    arr[5, 5] = (12, 200, 7)
    Image.fromarray(arr).save(mask)
    with pytest.raises(DataError, match=r"watershed_mask\.png: unknown colour \(12, 200, 7\)"):
        load_seg_data(SegDataConfig(layout="cholecseg8k", root=str(root)))


# ---------------------------------------------------------------------------------------------- transforms
def test_augment_moves_image_and_mask_together():
    x = torch.arange(16.0).view(1, 4, 4).repeat(3, 1, 1)
    y = torch.arange(16).view(4, 4)
    for seed in range(20):
        xa, ya = augment(x, y, torch.Generator().manual_seed(seed), ignore_index=255, degrees=0.0)
        # with a 0-degree rotation only flips act: the mask must follow the image exactly
        assert torch.equal(xa[0].long(), ya)
    xa, ya = augment(x, y, torch.Generator().manual_seed(0), ignore_index=255, degrees=90.0, p=1.0)
    assert ya.dtype == torch.long and set(ya.unique().tolist()) <= set(range(16)) | {255}


# ---------------------------------------------------------------------------------------------- heads
def test_unet_blocks_and_channels():
    assert default_unet_blocks(12) == [2, 5, 8, 11]
    assert default_unet_blocks(4) == [0, 1, 2, 3]
    dec = UNetDecoder([64] * 4, 5)
    assert [dec.up1.up.out_channels, dec.up2.up.out_channels, dec.up3.up.out_channels, dec.cls.out_channels] \
        == [32, 16, 8, 5]  # D -> D/2 -> D/4 -> D/8 -> classes
    maps = [torch.randn(2, 64, 4, 4) for _ in range(4)]
    assert dec(maps, (32, 32)).shape == (2, 5, 32, 32)


@pytest.mark.parametrize("head", ["linear", "unet"])
def test_frozen_heads_train_only_the_decoder(head):
    torch.manual_seed(0)
    model = SegmentationModel(build_backbone("dinov2_tiny"), head, 3, freeze_backbone=True)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    opt = torch.optim.AdamW(model.trainable_groups()[0], lr=1e-2)
    model.train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    assert not model.backbone.training  # a frozen encoder stays in eval mode


def _convs_per_up_block(decoder: UNetDecoder) -> list[int]:
    return [sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in up.convs.modules())
            for up in (decoder.up1, decoder.up2, decoder.up3, decoder.up4)]


def test_unet_seed001_variant_reads_the_last_four_blocks_with_one_conv_per_stage(monkeypatch):
    """Seed 001's code: get_intermediate_layers(x, 4) (the last four blocks) and one 3x3 conv-BN-ReLU per
    decoder block; the evenly spaced two-conv decoder stays the default. Checked on the built module, on the
    blocks the forward really asks the encoder for, and by the output shape."""
    torch.manual_seed(0)
    backbone = build_backbone("dinov2_tiny", depth=6)
    seed = SegmentationModel(backbone, "unet", 3, unet={"skips": "last4", "convs_per_stage": 1}).eval()
    even = SegmentationModel(backbone, "unet", 3).eval()
    assert seed.unet_blocks == [2, 3, 4, 5]
    assert even.unet_blocks == [1, 2, 3, 5]  # round(6 / 4 * k) - 1: evenly spaced, ending at the last block
    assert _convs_per_up_block(seed.head) == [1, 1, 1, 1]
    assert _convs_per_up_block(even.head) == [2, 2, 2, 2]
    asked = []
    real = backbone.get_intermediate_layers

    def spy(x, blocks=1, norm=True):
        asked.append(list(blocks))
        return real(x, blocks=blocks, norm=norm)

    monkeypatch.setattr(backbone, "get_intermediate_layers", spy)
    x = torch.randn(2, 3, 32, 32)
    assert seed(x).shape == (2, 3, 32, 32) and even(x).shape == (2, 3, 32, 32)
    assert asked == [[2, 3, 4, 5], [1, 2, 3, 5]]
    # the two options are independent; explicit blocks win over skips
    mixed = SegmentationModel(backbone, "unet", 3, unet={"skips": "even", "convs_per_stage": 1,
                                                          "blocks": [0, 2, 4, 5]})
    assert mixed.unet_blocks == [0, 2, 4, 5] and _convs_per_up_block(mixed.head) == [1, 1, 1, 1]


def test_seed001_unet_recipe_sets_the_seed_variant_and_model_json_keeps_it(tmp_path):
    from meddino.config import load_config
    from meddino.tasks.seg.config import SegConfig
    from meddino.tasks.seg.predict import build_from_meta, load_seg_model, model_meta, save_fold_model

    cfg = load_config(SegConfig, "seed001_unet", ["data.manifest=pairs.csv"], group="seg")
    assert (cfg.unet.skips, cfg.unet.convs_per_stage, cfg.unet.blocks) == ("last4", 1, None)
    default = load_config(SegConfig, "seg_tiny", ["data.manifest=pairs.csv"], group="seg")
    assert (default.unet.skips, default.unet.convs_per_stage) == ("even", 2)
    with pytest.raises(ConfigError, match="unet.convs_per_stage.*1 or 2"):
        load_config(SegConfig, "seed001_unet", ["data.manifest=pairs.csv", "unet.convs_per_stage=3"], group="seg")
    torch.manual_seed(0)
    model = SegmentationModel(build_backbone("dinov2_tiny", depth=6), "unet", 3, unet=cfg.unet).eval()
    meta = model_meta(model, ["bg", "a", "b"], (32, 32), (0.5,) * 3, (0.2,) * 3, 255, "x")
    assert meta["unet_blocks"] == [2, 3, 4, 5] and meta["unet"]["convs_per_stage"] == 1
    save_fold_model(tmp_path / "model", model, meta, 0, {"best_val_dice": 0.5})
    loaded, _ = load_seg_model(tmp_path)  # a strict load: a decoder with two convs per stage would not fit
    assert loaded.unet_blocks == [2, 3, 4, 5] and _convs_per_up_block(loaded.head) == [1, 1, 1, 1]
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(model(x), loaded(x), atol=1e-6)
    # a model.json written before the "unet" entry existed describes the original two-conv decoder
    old = {k: v for k, v in meta.items() if k != "unet"}
    assert _convs_per_up_block(build_from_meta(old).head) == [2, 2, 2, 2]


def test_cnn_unet_uses_encoder_scales():
    model = SegmentationModel(__import__("meddino.models", fromlist=["resolve_backbone"]).resolve_backbone(
        "timm:resnet18"), "unet", 4, freeze_backbone=False)
    assert model.unet_blocks == [1, 2, 3, 4]
    out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 4, 64, 64)


def test_model_save_load_roundtrip(tmp_path):
    from meddino.tasks.seg.predict import load_seg_model, model_meta, save_fold_model

    torch.manual_seed(0)
    for head in ("unet", "eomt"):
        model = SegmentationModel(build_backbone("dinov3_tiny"), head, 3, freeze_backbone=False,
                                  eomt={"num_queries": 4} if head == "eomt" else None).eval()
        eomt = {"num_queries": 4, "num_blocks": model.head.num_blocks} if head == "eomt" else None
        meta = model_meta(model, ["bg", "a", "b"], (32, 32), (0.5,) * 3, (0.2,) * 3, 255, "x", eomt=eomt)
        save_fold_model(tmp_path / head / "model", model, meta, 0, {"best_val_dice": 0.5})
        save_fold_model(tmp_path / head / "model", model, meta, 1, {"best_val_dice": 0.7})
        loaded, meta2 = load_seg_model(tmp_path / head)
        assert meta2["fold"] == 1  # best validation Dice
        x = torch.randn(1, 3, 32, 32)
        assert torch.allclose(model.class_scores(x), loaded.class_scores(x), atol=1e-6)


def test_manifest_split_and_fold_columns(tmp_path):
    csv_path = make_manifest(tmp_path / "m", n=6)  # patients p0, p1, p2 (two images each)
    lines = csv_path.read_text().strip().splitlines()
    splits = {"p0": ("train", 0), "p1": ("val", 1), "p2": ("test", 1)}
    out = [lines[0] + ",split,fold"] + [f"{ln},{splits[ln.split(',')[2]][0]},{splits[ln.split(',')[2]][1]}" for ln in lines[1:]]
    csv_path.write_text("\n".join(out) + "\n")
    cfg = SegDataConfig(manifest=str(csv_path), classes=["bg", "a", "b"], split_column="split")
    (fold,) = make_folds(load_seg_data(cfg), cfg, seed=0)
    assert (fold.train, fold.val, fold.test) == (["p0"], ["p1"], ["p2"])
    cfg = SegDataConfig(manifest=str(csv_path), classes=["bg", "a", "b"], fold_column="fold")
    folds = make_folds(load_seg_data(cfg), cfg, seed=0)
    assert [f.test for f in folds] == [["p0"], ["p1", "p2"]]
    # a patient in two folds is refused
    bad = out[:2] + [out[2].rsplit(",", 1)[0] + ",1"] + out[3:]
    csv_path.write_text("\n".join(bad) + "\n")
    with pytest.raises(DataError, match=r"^patient p0 is in both fold 0 and fold 1 \(data.fold_column 'fold' in "
                                        r".*pairs.csv: img0.png in fold 0, img1.png in fold 1\)$"):
        make_folds(load_seg_data(cfg), cfg, seed=0)
    # and so is a patient in two splits: p0's second image in test
    bad = out[:2] + [out[2].replace(",train,", ",test,")] + out[3:]
    csv_path.write_text("\n".join(bad) + "\n")
    cfg = SegDataConfig(manifest=str(csv_path), classes=["bg", "a", "b"], split_column="split")
    with pytest.raises(DataError, match=r"^patient p0 is in both train and test \(data.split_column 'split' in "
                                        r".*pairs.csv: img0.png in train, img1.png in test\)$"):
        make_folds(load_seg_data(cfg), cfg, seed=0)


# ---------------------------------------------------------------------------------------------- schedules
def test_plateau_scale_matches_torch_reduce_on_plateau():
    from meddino.tasks.loop import PlateauScale

    rng = np.random.default_rng(0)
    values = np.concatenate([np.linspace(0.1, 0.5, 5), np.full(8, 0.45), [0.6], rng.uniform(0, 0.6, 20)])
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=3, threshold=0.0)
    ours = PlateauScale(patience=3, factor=0.5)
    for v in values:
        ref.step(float(v))
        assert ours.step(float(v)) == pytest.approx(opt.param_groups[0]["lr"])
    assert ours.scale < 1.0


def test_eomt_backbone_warmup():
    from meddino.tasks.loop import backbone_warmup

    assert [backbone_warmup(s, 3, 4) for s in range(9)] == [0, 0, 0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert backbone_warmup(0, 0, 0) == 1.0


def test_baseline_heads_and_bad_combinations():
    from meddino.models import resolve_backbone

    model = SegmentationModel(None, "monai_unet", 3)
    assert model.input_multiple == 16 and model(torch.randn(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    with pytest.raises(ConfigError, match="head=eomt needs a ViT backbone"):
        SegmentationModel(resolve_backbone("timm:resnet18"), "eomt", 3)
    with pytest.raises(ConfigError, match="unet.blocks: block 9 out of range"):
        SegmentationModel(build_backbone("dinov2_tiny"), "unet", 3, unet={"blocks": [0, 1, 2, 9]})
