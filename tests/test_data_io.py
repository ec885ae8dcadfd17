"""Readers on generated files: every format, every conversion rule, checked against numpy/pydicom/nibabel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from meddino.data import io, volumes
from meddino.errors import DataError, UserError

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------- 2D images
def test_rgb_png_is_exact(tmp_path: Path) -> None:
    arr = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    out = io.read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out, arr)


def test_greyscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = RNG.integers(0, 256, (16, 12), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = io.read_image(tmp_path / "g.png")
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_rgba_composited_over_black(tmp_path: Path) -> None:
    rgba = RNG.integers(0, 256, (10, 11, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    expected = np.rint(rgba[..., :3].astype(np.float64) * rgba[..., 3:4] / 255.0)
    out = io.read_image(tmp_path / "a.png").astype(np.float64)
    assert np.abs(out - expected).max() <= 1.0


def test_palette_image(tmp_path: Path) -> None:
    rgb = RNG.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as im:
        expected = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(io.read_image(tmp_path / "p.png"), expected)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_min_max_scaled(tmp_path: Path, suffix: str) -> None:
    raw = RNG.integers(1000, 50000, (14, 9)).astype(np.uint16)
    Image.fromarray(raw).save(tmp_path / f"x{suffix}")
    lo, hi = raw.min(), raw.max()
    expected = np.rint((raw.astype(np.float64) - lo) * 255.0 / (hi - lo)).astype(np.uint8)
    out = io.read_image(tmp_path / f"x{suffix}")
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 2], expected)


def test_16bit_constant_image_is_black(tmp_path: Path) -> None:
    Image.fromarray(np.full((5, 5), 700, np.uint16)).save(tmp_path / "c.png")
    assert io.read_image(tmp_path / "c.png").max() == 0


def test_jpeg_size_hint_uses_reduced_decode(tmp_path: Path) -> None:
    arr = RNG.integers(0, 256, (600, 800, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "big.jpg", quality=90)
    assert io.read_image(tmp_path / "big.jpg").shape == (600, 800, 3)
    assert io.read_image(tmp_path / "big.jpg", size_hint=(200, 150)).shape == (150, 200, 3)  # 1/4
    out = io.read_image(tmp_path / "big.jpg", size_hint=(300, 200))  # never below the hint: 1/2
    assert out.shape == (300, 400, 3)
    assert io.image_size(tmp_path / "big.jpg") == (800, 600)


@pytest.mark.parametrize("name,content", [("zero.png", b""), ("garbage.png", b"not an image at all" * 10)])
def test_unreadable_image_is_one_line_data_error(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as err:
        io.read_image(tmp_path / name)
    msg = str(err.value)
    assert name in msg and "\n" not in msg
    assert isinstance(err.value, UserError)


def test_truncated_jpeg_is_data_error(tmp_path: Path) -> None:
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.jpg")
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.jpg"):
        io.read_image(tmp_path / "t.jpg")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.png"):
        io.read_image(tmp_path / "nope.png")


def test_file_kinds(tmp_path: Path) -> None:
    assert io.is_image_file("a/B.JPG") and io.is_image_file("x.tiff") and not io.is_image_file("x.nii.gz")
    assert io.is_video_file("clip.MP4") and not io.is_video_file("x.png")
    assert io.is_volume_file("ct.nii.gz") and io.is_volume_file("ct.nii") and io.is_volume_file("x.mha")
    assert io.is_volume_file("x.nrrd") and not io.is_volume_file("x.gz")
    assert io.is_dicom_file("x.dcm")
    (tmp_path / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    (tmp_path / "README").write_bytes(b"hello" * 40)
    assert io.is_dicom_file(tmp_path / "IM0001") and not io.is_dicom_file(tmp_path / "README")


# ---------------------------------------------------------------------------------------------- DICOM
def _write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **tags) -> Path:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def _pydicom_reference(path: Path) -> np.ndarray:
    """Modality LUT + VOI window by pydicom's own implementation, rescaled from its output range to 0..255
    (pydicom maps the window onto the rescaled range of the stored values, [intercept, max * slope + intercept])."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds)
    y = apply_voi_lut(hu, ds)
    y_min = float(ds.RescaleIntercept)
    y_max = (2**ds.BitsStored - 1) * float(ds.RescaleSlope) + y_min
    return np.rint((y - y_min) / (y_max - y_min) * 255.0)


def test_dicom_rescale_and_window_match_pydicom(tmp_path: Path) -> None:
    stored = RNG.integers(0, 2500, (24, 20)).astype(np.uint16)
    path = _write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope=1.0, RescaleIntercept=-1024.0,
                        WindowCenter=40.0, WindowWidth=400.0)
    out = io.read_image(path)
    assert out.shape == (24, 20, 3) and out.dtype == np.uint8
    assert np.abs(out[..., 0].astype(float) - _pydicom_reference(path)).max() <= 1.0
    # hand check: HU = stored - 1024; window 40/400 spans about [-160, 240]
    hu = stored.astype(float) - 1024
    assert (out[..., 0][hu <= -161] == 0).all() and (out[..., 0][hu >= 241] == 255).all()


def test_dicom_slope_and_preset_window(tmp_path: Path) -> None:
    stored = RNG.integers(0, 2000, (16, 16)).astype(np.uint16)
    path = _write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope=2.0, RescaleIntercept=-2000.0,
                        WindowCenter=40.0, WindowWidth=400.0)
    hu = stored.astype(np.float64) * 2.0 - 2000.0
    c, w = -600.0, 1500.0  # ct_lung
    expected = np.clip(np.rint(((hu - (c - 0.5)) / (w - 1) + 0.5) * 255.0), 0, 255)
    out = io.read_image(path, window="ct_lung")
    np.testing.assert_array_equal(out[..., 1], expected.astype(np.uint8))
    np.testing.assert_array_equal(io.read_image(path, window=(c, w)), out)
    with pytest.raises(DataError, match="unknown window preset"):
        io.read_image(path, window="ct_nonsense")


def test_dicom_without_window_is_min_max_and_monochrome1_inverted(tmp_path: Path) -> None:
    stored = RNG.integers(100, 900, (10, 10)).astype(np.uint16)
    m2 = io.read_image(_write_dicom(tmp_path / "m2.dcm", stored))
    expected = np.rint((stored - stored.min()) * 255.0 / (stored.max() - stored.min())).astype(np.uint8)
    np.testing.assert_array_equal(m2[..., 0], expected)
    m1 = io.read_image(_write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(m1[..., 0], 255 - expected)


def test_extensionless_dicom_by_magic(tmp_path: Path) -> None:
    stored = RNG.integers(0, 500, (8, 8)).astype(np.uint16)
    _write_dicom(tmp_path / "x.dcm", stored)
    (tmp_path / "x.dcm").rename(tmp_path / "IM0001")
    assert io.is_dicom_file(tmp_path / "IM0001")
    assert io.read_image(tmp_path / "IM0001").shape == (8, 8, 3)
    assert io.image_size(tmp_path / "IM0001") == (8, 8)


def test_corrupt_dicom(tmp_path: Path) -> None:
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 20)
    with pytest.raises(DataError, match="bad.dcm"):
        io.read_image(tmp_path / "bad.dcm")


# ---------------------------------------------------------------------------------------------- volumes
def _vol_xyz() -> np.ndarray:
    return RNG.normal(0, 100, (7, 6, 5)).astype(np.float32)  # (x, y, z) as stored on disk


def test_nifti(tmp_path: Path) -> None:
    import nibabel as nib

    data = _vol_xyz()
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "v.nii.gz"))
    vol, spacing = volumes.read_volume(tmp_path / "v.nii.gz")
    np.testing.assert_allclose(vol, data.transpose(2, 1, 0), rtol=1e-6)
    assert spacing == (4.0, 3.0, 2.0)
    assert volumes.volume_shape(tmp_path / "v.nii.gz") == vol.shape == (5, 6, 7)


def test_nrrd(tmp_path: Path) -> None:
    import nrrd

    data = _vol_xyz()
    nrrd.write(str(tmp_path / "v.nrrd"), data, {"spacings": [0.5, 0.7, 2.5]})
    vol, spacing = volumes.read_volume(tmp_path / "v.nrrd")
    np.testing.assert_array_equal(vol, data.transpose(2, 1, 0))
    assert spacing == pytest.approx((2.5, 0.7, 0.5))
    assert volumes.volume_shape(tmp_path / "v.nrrd") == (5, 6, 7)


def test_mha(tmp_path: Path) -> None:
    import SimpleITK as sitk

    zyx = RNG.integers(-1000, 1000, (5, 6, 7)).astype(np.int16)
    img = sitk.GetImageFromArray(zyx)
    img.SetSpacing((0.8, 0.9, 3.0))  # (x, y, z)
    sitk.WriteImage(img, str(tmp_path / "v.mha"))
    vol, spacing = volumes.read_volume(tmp_path / "v.mha")
    np.testing.assert_array_equal(vol, zyx.astype(np.float32))
    assert spacing == pytest.approx((3.0, 0.9, 0.8))
    assert volumes.volume_shape(tmp_path / "v.mha") == (5, 6, 7)


def test_volume_slices_window_and_empty_skip() -> None:
    vol = np.full((4, 8, 9), -1000.0, np.float32)  # air
    vol[1, 2:6, 2:7] = 40.0
    vol[2] = 300.0
    slices = list(volumes.volume_slices(vol, axes=(0, 1), window="ct_soft"))
    assert [(a, i) for a, i, _ in slices] == [(0, i) for i in range(4)] + [(1, i) for i in range(8)]
    assert all(s.shape == ((8, 9, 3) if a == 0 else (4, 9, 3)) and s.dtype == np.uint8 for a, _, s in slices)
    axial = {i: s for a, i, s in slices if a == 0}
    # ct_soft = 40/400: air -> 0, 40 HU -> mid-grey, 300 HU -> 255 (by the DICOM linear formula)
    assert axial[0].max() == 0 and axial[2].min() == 255
    assert axial[1][3, 3, 0] == np.uint8(np.rint(((40 - 39.5) / 399 + 0.5) * 255))
    kept = [(a, i) for a, i, _ in volumes.volume_slices(vol, (0,), "ct_soft", min_foreground=0.05)]
    assert kept == [(0, 1), (0, 2)]
    with pytest.raises(DataError):
        list(volumes.volume_slices(vol, axes=(3,)))


def test_unreadable_volume(tmp_path: Path) -> None:
    (tmp_path / "bad.nii.gz").write_bytes(b"xx" * 100)
    (tmp_path / "empty.nrrd").write_bytes(b"")
    for name in ("bad.nii.gz", "empty.nrrd"):
        with pytest.raises(DataError, match=name.replace(".", r"\.")):
            volumes.read_volume(tmp_path / name)
