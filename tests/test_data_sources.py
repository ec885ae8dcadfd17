"""PretrainSource over a mixed folder with corrupt, truncated, zero-byte and 16-bit files; manifests; skipping
and counting across DataLoader workers; determinism; lazy indexing."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from meddino.data.multicrop import MultiCropAugmentation, collate_multicrop
from meddino.data.sources import PretrainSource, SkipCounter, Skipped, collate_skip_none
from meddino.errors import DataError

from test_data_video import write_video

RNG = np.random.default_rng(0)
N_GOOD_IMAGES = 5  # 3 RGB png + 1 16-bit png + 1 grey jpg
N_BAD = 3  # corrupt, truncated, zero-byte


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import nibabel as nib

    root = tmp_path_factory.mktemp("mixed")
    (root / "patient1" / "deep").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / "patient1" / f"rgb{i}.png")
    Image.fromarray(RNG.integers(0, 60000, (40, 30)).astype(np.uint16)).save(root / "patient1" / "deep" / "x16.png")
    Image.fromarray(RNG.integers(0, 256, (36, 36), dtype=np.uint8), mode="L").save(root / "grey.jpg")
    (root / "corrupt.png").write_bytes(RNG.bytes(300))
    good = (root / "grey.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "zero.jpg").write_bytes(b"")
    write_video(root / "clip.mp4")  # 3.5 s -> 4 frames at 1 fps
    vol = np.zeros((30, 20, 4), np.float32)  # (x, y, z): 4 axial slices
    vol[5:25, 5:15, 1:3] = 100.0
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(root / "ct.nii.gz"))
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"")
    return root


def small_aug() -> MultiCropAugmentation:
    return MultiCropAugmentation("v2", global_size=32, local_size=16, n_local=2)


def test_index_counts_by_kind(mixed: Path) -> None:
    ds = PretrainSource(mixed)
    assert ds.counts() == {"image": N_GOOD_IMAGES + N_BAD, "frame": 4, "slice": 4}
    assert len(ds) == N_GOOD_IMAGES + N_BAD + 8
    frames = [ds.describe(i) for i in range(len(ds)) if ds.describe(i)["kind"] == "frame"]
    assert [f["time_s"] for f in frames] == [0.0, 1.0, 2.0, 3.0]
    slices = [ds.describe(i)["slice"] for i in range(len(ds)) if ds.describe(i)["kind"] == "slice"]
    assert slices == [0, 1, 2, 3]
    assert not any(".hidden" in f or f.endswith(".txt") for f in ds.files)


def test_samples_are_uint8_rgb(mixed: Path) -> None:
    ds = PretrainSource(mixed)
    arrays = [ds[i] for i in range(len(ds))]
    bad = [a for a in arrays if isinstance(a, Skipped)]
    assert sorted(Path(s.path).name for s in bad) == ["corrupt.png", "truncated.jpg", "zero.jpg"]
    good = [a for a in arrays if not isinstance(a, Skipped)]
    assert all(a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 for a in good)
    x16 = next(ds[i] for i in range(len(ds)) if ds.describe(i)["path"].endswith("x16.png"))
    assert x16.min() == 0 and x16.max() == 255  # 16-bit: min-max scaled


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_skips_and_counts_bad_files(mixed: Path, workers: int) -> None:
    ds = PretrainSource(mixed, transform=small_aug(), seed=3)
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_multicrop, num_workers=workers)
    counter = SkipCounter()
    seen = []
    for batch in loader:
        counter.add(batch["skipped"])
        if batch["global"] is not None:
            assert batch["global"].shape[:2] == (2, batch["size"]) and batch["global"].shape[2:] == (3, 32, 32)
            assert batch["local"].shape[:2] == (2, batch["size"])
            seen += batch["index"].tolist()
    assert counter.count == N_BAD
    assert len(seen) == len(ds) - N_BAD and len(set(seen)) == len(seen)
    assert "3 unreadable sample(s) skipped" in counter.summary()


def test_collate_skip_none_generic(mixed: Path) -> None:
    ds = PretrainSource(mixed, transform=lambda a: torch.from_numpy(a).float().mean())
    batch, skipped = collate_skip_none([ds[i] for i in range(len(ds))])
    assert batch.shape == (len(ds) - N_BAD,) and len(skipped) == N_BAD
    assert collate_skip_none([Skipped("a", "b"), None]) == (None, [Skipped("a", "b"), Skipped("<unknown>", "dataset returned None")])


def test_deterministic_per_seed_epoch_index(mixed: Path) -> None:
    ds = PretrainSource(mixed, transform=small_aug(), seed=7)
    i = next(k for k in range(len(ds)) if ds.describe(k)["path"].endswith("rgb1.png"))
    a, b = ds[i], ds[i]
    torch.testing.assert_close(a["global"], b["global"], rtol=0, atol=0)
    again = PretrainSource(mixed, transform=small_aug(), seed=7)[i]  # a fresh dataset (e.g. a resumed run)
    torch.testing.assert_close(a["local"], again["local"], rtol=0, atol=0)
    assert not torch.equal(ds[(1, i)]["global"], a["global"])  # another epoch
    ds.set_epoch(1)
    torch.testing.assert_close(ds[i]["global"], PretrainSource(mixed, transform=small_aug(), seed=7)[(1, i)]["global"])
    assert not torch.equal(PretrainSource(mixed, transform=small_aug(), seed=8)[i]["global"], a["global"])


def test_manifest_with_patient_column(mixed: Path, tmp_path: Path) -> None:
    shutil.copy(mixed / "grey.jpg", tmp_path / "g.jpg")
    (tmp_path / "list.csv").write_text(
        "image,patient\n"
        "g.jpg,P1\n"
        f"{mixed / 'patient1' / 'rgb0.png'},P2\n"
        f"{mixed / 'clip.mp4'},P3\n"
        "missing.png,P4\n"
    )
    ds = PretrainSource(tmp_path / "list.csv")
    assert len(ds) == 1 + 1 + 4 + 1
    assert [ds.describe(i)["patient"] for i in range(len(ds))] == ["P1", "P2"] + ["P3"] * 4 + ["P4"]
    assert isinstance(ds[len(ds) - 1], Skipped)  # a listed file that does not exist is skipped, not fatal
    (tmp_path / "nocol.csv").write_text("path\ng.jpg\n")
    with pytest.raises(DataError, match="column 'image'"):
        PretrainSource(tmp_path / "nocol.csv")


def test_corrupt_video_is_skipped_at_index_time(tmp_path: Path) -> None:
    write_video(tmp_path / "ok.mp4", n=12)
    (tmp_path / "bad.mp4").write_bytes(b"garbage" * 40)
    ds = PretrainSource(tmp_path, fps=2.0)
    assert len(ds) == 3 and len(ds.index_skipped) == 1 and "bad.mp4" in ds.index_skipped[0].path
    counter = SkipCounter()
    counter.add(ds.index_skipped)
    assert counter.count == 1


def test_volume_axes_and_empty_slice_skipping(mixed: Path, tmp_path: Path) -> None:
    shutil.copy(mixed / "ct.nii.gz", tmp_path / "ct.nii.gz")
    ds = PretrainSource(tmp_path, axes=(0, 2))
    assert len(ds) == 4 + 30  # (z, y, x) = (4, 20, 30)
    assert ds[0].shape == (20, 30, 3) and ds[4].shape == (4, 20, 3)
    kept = PretrainSource(tmp_path, axes=(0,), min_foreground=0.05)
    assert [kept.describe(i)["slice"] for i in range(len(kept))] == [1, 2]
    with pytest.raises(Exception, match="axes"):
        PretrainSource(tmp_path, axes=(3,))


def test_indexing_opens_no_image(mixed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Index building must not decode or even open images (millions of frames)."""
    import builtins

    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if str(file).endswith((".png", ".jpg")):
            raise AssertionError(f"opened {file} while indexing")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(Image, "open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Image.open")))
    ds = PretrainSource(mixed / "patient1")
    assert len(ds) == 4


def test_empty_or_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        PretrainSource(tmp_path / "nope")
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no usable"):
        PretrainSource(tmp_path)


def test_a_skip_line_names_the_path_once():
    from meddino.data.sources import Skipped

    assert str(Skipped("a/x.png", "unreadable image a/x.png: truncated")) == "unreadable image a/x.png: truncated"
    assert str(Skipped("a/x.png", "decoder said no")) == "a/x.png: decoder said no"
