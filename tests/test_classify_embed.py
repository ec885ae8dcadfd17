"""Embedding: preprocessing vs numpy/PIL, features vs the backbone's own outputs, volumes = mean of slices,
the cache round trip, and a CNN baseline through the same path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from meddino.data.manifest import Manifest
from meddino.models import build_backbone, resolve_backbone
from meddino.data.transforms import to_tensor
from meddino.tasks.classify.embed import (
    embed_manifest,
    extract_features,
    feature_set,
    load_cache,
    save_cache,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_to_tensor_normalisation_and_resize():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    x = to_tensor(img, 16, MEAN, STD).numpy()
    ref = ((img / 255.0 - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)
    np.testing.assert_allclose(x, ref, atol=1e-6)
    # downscale: antialiased bicubic, as PIL's BICUBIC resize (independent implementation)
    smooth = np.clip(np.add.outer(np.arange(64), np.arange(64)) * 2, 0, 255).astype(np.uint8)
    big = np.stack([smooth, smooth.T, 255 - smooth], axis=-1)
    x = to_tensor(big, 32, (0.0,) * 3, (1.0,) * 3).numpy().transpose(1, 2, 0) * 255
    pil = np.asarray(Image.fromarray(big).resize((32, 32), Image.BICUBIC), dtype=np.float64)
    assert np.abs(x - pil).max() < 2.5


def _manifest(paths, labels) -> Manifest:
    n = len(paths)
    return Manifest(images=[p.name for p in paths], paths=list(paths), patients=np.array([f"p{i}" for i in range(n)]),
                    labels=np.asarray(labels), task="binary", names=["0", "1"], label_columns=["label"],
                    split=np.array(["train"] * (n - 1) + ["test"]), dataset="toy")


def test_features_match_backbone_outputs_and_batching(tmp_path):
    torch.manual_seed(0)
    bb = build_backbone("dinov2_tiny").eval()
    rng = np.random.default_rng(1)
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(40, 24, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    feats = embed_manifest(bb, _manifest(paths, [0, 1, 0, 1, 0]), img_size=32, batch_size=2, blocks=2)
    x = torch.stack([to_tensor(np.asarray(Image.open(p).convert("RGB")), 32, bb.mean, bb.std) for p in paths])
    with torch.no_grad():
        ff = bb.forward_features(x)
        inter = bb.get_intermediate_layers(x, blocks=[2], norm=True)[0]
    torch.testing.assert_close(feats["cls"], ff["cls"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats["mean_patch"], ff["patch"].mean(dim=1), rtol=1e-4, atol=1e-5)
    assert feats["cls_blocks"].shape == (5, 2 * 64)
    torch.testing.assert_close(feats["cls_blocks"][:, :64], inter["cls"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats["cls_blocks"][:, 64:], ff["cls"], rtol=1e-4, atol=1e-5)
    assert feature_set(feats, "cls_patch_last4").shape == (5, 3 * 64)
    assert not any(p.requires_grad for p in bb.parameters())


def test_volume_embedding_is_the_mean_of_slice_embeddings(tmp_path):
    import nibabel as nib

    from meddino.data.volumes import read_volume, volume_slices

    rng = np.random.default_rng(2)
    vol = rng.normal(size=(24, 24, 5)).astype(np.float32)  # (x, y, z) on disk: 5 axial slices
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))
    torch.manual_seed(0)
    bb = build_backbone("dinov1_tiny").eval()
    feats = embed_manifest(bb, _manifest([path], [1]), img_size=32, batch_size=2, volume_min_foreground=None)
    data, _ = read_volume(path)
    slices = [s for _, _, s in volume_slices(data, axes=(0,))]
    assert len(slices) == 5
    x = torch.stack([to_tensor(s, 32, bb.mean, bb.std) for s in slices])
    ref = extract_features(bb, x, blocks=4)
    for key in ("cls", "mean_patch", "cls_blocks"):
        torch.testing.assert_close(feats[key][0], ref[key].mean(dim=0), rtol=1e-4, atol=1e-5)


def test_cache_round_trip(tmp_path):
    m = _manifest([tmp_path / "a.png", tmp_path / "b.png"], [0, 1])
    feats = {k: torch.randn(2, 8) for k in ("cls", "mean_patch", "cls_blocks", "mean_patch_blocks")}
    save_cache(tmp_path / "cache", feats, m, {"backbone": "random:x", "model": "x"})
    c = load_cache(tmp_path / "cache")
    for k, v in feats.items():
        assert torch.equal(c.features[k], v)
    assert c.manifest.labels.tolist() == [0, 1] and c.manifest.split.tolist() == ["train", "test"]
    assert c.manifest.names == ["0", "1"] and c.meta["backbone"] == "random:x" and c.manifest.fold is None
    (tmp_path / "cache" / "rows.csv").unlink()
    from meddino.errors import DataError

    with pytest.raises(DataError, match="rows.csv missing"):
        load_cache(tmp_path / "cache")


def test_cnn_baseline_features(tmp_path):
    paths = []
    for i in range(2):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((32, 32, 3), 60 * i, dtype=np.uint8)).save(p)
        paths.append(p)
    torch.manual_seed(0)
    bb = resolve_backbone("timm:resnet18")
    feats = embed_manifest(bb, _manifest(paths, [0, 1]), img_size=32, batch_size=2)
    assert feats["cls"].shape == (2, 512) and feats["cls_blocks"].shape == (2, 64 + 128 + 256 + 512)
