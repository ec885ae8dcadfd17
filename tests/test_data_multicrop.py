"""Multi-crop: shapes, each version's probabilities, parameter laws vs torchvision, kernels vs torchvision/PIL,
whole-view parity with a PIL + torchvision rendering of the same parameters, seeding, collate."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from scipy import stats

from meddino.data import augment_ops as ops
from meddino.data import multicrop as mc
from meddino.data.multicrop import MultiCropAugmentation, ViewParams, collate_multicrop, sample_generator
from meddino.data.sources import Skipped

RNG = np.random.default_rng(0)
H, W = 48, 64
N_DRAWS = 2000


def _image(h: int = H, w: int = W) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 100 * np.sin(xx / 7.0), 128 + 100 * np.cos(yy / 5.0), (xx + yy) % 256], -1)
    return np.clip(img + RNG.normal(0, 10, img.shape), 0, 255).astype(np.uint8)


def _draws(aug: MultiCropAugmentation, n: int = N_DRAWS) -> list[list[ViewParams]]:
    return [aug.sample_params(H, W, sample_generator(1, 0, i)) for i in range(n)]


def _assert_rate(hits: int, n: int, p: float) -> None:
    """Binomial tolerance: 4.5 standard deviations (exact for p in {0, 1})."""
    if p in (0.0, 1.0):
        assert hits == int(p * n), (hits, n, p)
        return
    sd = math.sqrt(n * p * (1 - p))
    assert abs(hits - n * p) <= 4.5 * sd, (hits, n, p)


# ---------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("version", ["v1", "v2", "v3"])
def test_output_shapes_and_dtype(version: str, tmp_path: Path) -> None:
    aug = MultiCropAugmentation(version, global_size=32, local_size=16, n_local=3)
    img = _image()
    out = aug(img, sample_generator(0, 0, 0))
    assert out["global"].shape == (2, 3, 32, 32) and out["local"].shape == (3, 3, 16, 16)
    assert out["global"].dtype == torch.float32 and torch.isfinite(out["global"]).all()
    Image.fromarray(img).save(tmp_path / "x.jpg")
    from_path = aug(tmp_path / "x.jpg", sample_generator(0, 0, 0))
    assert from_path["local"].shape == (3, 3, 16, 16)
    from_tensor = aug(torch.from_numpy(img).permute(2, 0, 1), sample_generator(0, 0, 0))
    torch.testing.assert_close(from_tensor["global"], out["global"])


def test_grey_input_and_bad_input() -> None:
    aug = MultiCropAugmentation("v2", 24, 12, 2)
    assert aug(_image()[..., 0], sample_generator(0, 0, 0))["global"].shape == (2, 3, 24, 24)
    with pytest.raises(ValueError):
        aug(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError):
        MultiCropAugmentation("v4")
    with pytest.raises(ValueError):
        MultiCropAugmentation("v2", global_scale=(0.5, 1.2))


# ---------------------------------------------------------------------------------------------- probabilities
@pytest.mark.parametrize(
    "version,quirk,blur",
    [("v1", True, (1.0, 0.1, 0.5)), ("v2", True, (0.0, 0.9, 0.5)), ("v3", True, (0.0, 0.9, 0.5)),
     ("v2", False, (1.0, 0.1, 0.5)), ("v3", False, (1.0, 0.1, 0.5))],
)
def test_blur_and_solarise_rates(version: str, quirk: bool, blur: tuple[float, float, float]) -> None:
    aug = MultiCropAugmentation(version, 32, 16, n_local=4, blur_quirk=quirk)
    draws = _draws(aug)
    n = len(draws)
    _assert_rate(sum(d[0].blur_sigma is not None for d in draws), n, blur[0])
    _assert_rate(sum(d[1].blur_sigma is not None for d in draws), n, blur[1])
    _assert_rate(sum(v.blur_sigma is not None for d in draws for v in d[2:]), 4 * n, blur[2])
    _assert_rate(sum(d[1].solarize for d in draws), n, 0.2)
    assert not any(d[0].solarize or any(v.solarize for v in d[2:]) for d in draws)
    sigmas = np.array([v.blur_sigma for d in draws for v in d if v.blur_sigma is not None])
    assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0
    assert stats.kstest((sigmas - 0.1) / 1.9, "uniform").pvalue > 1e-4


def test_jitter_grey_flip_rates_and_factor_laws() -> None:
    draws = _draws(MultiCropAugmentation("v2", 32, 16, n_local=2))
    views = [v for d in draws for v in d]
    n = len(views)
    _assert_rate(sum(v.jitter is not None for v in views), n, 0.8)
    _assert_rate(sum(v.gray for v in views), n, 0.2)
    _assert_rate(sum(v.flip for v in views), n, 0.5)
    f = np.array([v.jitter for v in views if v.jitter is not None])
    for col, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        assert stats.kstest((f[:, col] - lo) / (hi - lo), "uniform").pvalue > 1e-4
    # the jitter order is a uniform random permutation: each op first a quarter of the time
    firsts = np.bincount([v.order[0] for v in views if v.jitter is not None], minlength=4)
    assert stats.chisquare(firsts).pvalue > 1e-4
    assert all(sorted(v.order) == [0, 1, 2, 3] for v in views)


def test_crop_boxes_follow_torchvision_random_resized_crop() -> None:
    """Area fraction and aspect ratio of our boxes vs torchvision's own RandomResizedCrop.get_params."""
    from torchvision.transforms import RandomResizedCrop

    aug = MultiCropAugmentation("v2", 32, 16, n_local=1)
    draws = _draws(aug, 1500)
    torch.manual_seed(0)
    img = Image.new("RGB", (W, H))
    for k, scale in ((0, (0.32, 1.0)), (2, (0.05, 0.32))):
        ours = np.array([(d[k].height * d[k].width, d[k].width / d[k].height) for d in draws], dtype=float)
        ref = np.array([(h * w, w / h) for _, _, h, w in
                        (RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3)) for _ in range(len(draws)))],
                       dtype=float)
        assert stats.ks_2samp(ours[:, 0], ref[:, 0]).pvalue > 1e-3
        assert stats.ks_2samp(ours[:, 1], ref[:, 1]).pvalue > 1e-3
        tops = np.array([d[k].top for d in draws])
        assert tops.min() >= 0 and all(d[k].top + d[k].height <= H and d[k].left + d[k].width <= W for d in draws)


def test_random_resized_crop_fallback_is_central() -> None:
    # impossible attempts (all uniforms push area beyond the image) -> central crop clamped to the ratio
    top, left, h, w = mc.random_resized_crop_box(10, 100, (1.0, 1.0), [1.0] * 22)
    assert (h, w) == (10, round(10 * 4 / 3)) and top == 0 and left == (100 - w) // 2


# ---------------------------------------------------------------------------------------------- kernels
def _float_img(h: int = 20, w: int = 24) -> torch.Tensor:
    x = torch.from_numpy(_image(h, w)).permute(2, 0, 1).float() / 255
    x[:, :3] = torch.tensor([0.5, 0.5, 0.2]).view(3, 1, 1)  # ties between channels
    x[:, 3:5] = 0.3  # grey pixels
    return x


@pytest.mark.parametrize("shift", [-0.5, -0.1, 0.0, 0.03, 0.1, 0.5])
def test_hue_matches_torchvision(shift: float) -> None:
    x = _float_img()
    torch.testing.assert_close(ops.adjust_hue(x, shift), TF.adjust_hue(x, shift), atol=2e-6, rtol=0)
    batch = torch.stack([x, x.flip(-1)])
    expected = torch.stack([TF.adjust_hue(x, shift), TF.adjust_hue(x.flip(-1), -shift / 2)])
    torch.testing.assert_close(ops.adjust_hue(batch, torch.tensor([shift, -shift / 2])), expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("factor", [0.6, 1.0, 1.37])
def test_brightness_contrast_saturation_match_torchvision(factor: float) -> None:
    # luma weights: ours are PIL's exact 0.299 (the reference pipeline runs on PIL), torchvision's tensor
    # kernels use 0.2989 -> differences up to 1e-4 (1/40 of a grey level)
    x = _float_img()
    torch.testing.assert_close(ops.adjust_brightness(x, factor), TF.adjust_brightness(x, factor))
    torch.testing.assert_close(ops.adjust_contrast(x, factor), TF.adjust_contrast(x, factor), atol=1.5e-4, rtol=0)
    torch.testing.assert_close(ops.adjust_saturation(x, factor), TF.adjust_saturation(x, factor), atol=1.5e-4, rtol=0)
    torch.testing.assert_close(ops.rgb_to_gray(x), TF.rgb_to_grayscale(x), atol=1.5e-4, rtol=0)
    u8 = (x * 255).round().byte().permute(1, 2, 0).numpy()
    pil_l = np.asarray(Image.fromarray(u8).convert("L")).astype(np.float64)
    ours = ops.rgb_to_gray(torch.from_numpy(u8).permute(2, 0, 1).double())[0].numpy()
    assert np.abs(ours - pil_l).max() <= 0.5 + 1e-9  # PIL rounds the same weighted sum


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_blur_matches_torchvision(sigma: float) -> None:
    x = _float_img(30, 26)
    torch.testing.assert_close(ops.gaussian_blur(x, sigma, 9), TF.gaussian_blur(x, [9, 9], [sigma, sigma]),
                               atol=1e-6, rtol=0)
    batch = torch.stack([x, 1 - x])
    out = ops.gaussian_blur(batch, torch.tensor([sigma, 1.5]), 9)
    torch.testing.assert_close(out[1], TF.gaussian_blur(1 - x, [9, 9], [1.5, 1.5]), atol=1e-6, rtol=0)
    tiny = torch.rand(3, 4, 4)  # smaller than the kernel: replicate padding, still finite and averaging
    assert torch.isfinite(ops.gaussian_blur(tiny, 2.0, 9)).all()


def test_solarize_matches_pil() -> None:
    u8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgb = np.stack([u8, u8[::-1], u8.T], -1)
    ref = np.asarray(ImageOps.solarize(Image.fromarray(rgb), 128))
    ours = ops.solarize(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255) * 255
    np.testing.assert_array_equal(ours.round().byte().permute(1, 2, 0).numpy(), ref)


def test_views_match_pil_torchvision_rendering_of_the_same_parameters() -> None:
    """Each view's pixels against PIL crop+bicubic resize and torchvision's functional ops, same params."""
    img = _image(60, 80)
    aug = MultiCropAugmentation("v2", 32, 16, n_local=4, mean=(0, 0, 0), std=(1, 1, 1))
    pil = Image.fromarray(img)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    worst = 0.0
    for i in range(12):
        views = aug.sample_params(60, 80, sample_generator(3, 0, i))
        out = aug.apply(torch.from_numpy(img).permute(2, 0, 1), views, 60, 80)
        crops = list(out["global"]) + list(out["local"])
        for k, p in enumerate(views):
            size = 32 if k < 2 else 16
            ref = pil.crop((p.left, p.top, p.left + p.width, p.top + p.height)).resize((size, size), Image.BICUBIC)
            t = TF.to_tensor(ref)
            if p.flip:
                t = t.flip(-1)
            if p.jitter is not None:
                for op in p.order:
                    t = ops[op](t, p.jitter[op])
            if p.gray:
                t = TF.rgb_to_grayscale(t, 3)
            if p.blur_sigma is not None:
                t = TF.gaussian_blur(t, [9, 9], [p.blur_sigma, p.blur_sigma])
            if p.solarize:
                t = torch.where(t >= 127.5 / 255, 1 - t, t)
            diff = (crops[k] - t).abs()
            assert diff.mean() < 1.0 / 255, (i, k, float(diff.mean()))
            worst = max(worst, float(diff.max()))
    assert worst < 6.0 / 255  # resampling rounding (uint8 in both) plus float colour ops


def test_draft_decode_keeps_the_output(tmp_path: Path) -> None:
    """A large JPEG whose crops allow a 1/2 or 1/4 decode gives nearly the same crops as a full decode."""
    img = np.asarray(Image.fromarray(_image(60, 80)).resize((960, 720), Image.BICUBIC))
    Image.fromarray(img).save(tmp_path / "big.jpg", quality=95)
    aug = MultiCropAugmentation("v2", 48, 24, n_local=2, global_scale=(0.6, 1.0), local_scale=(0.3, 0.5))
    full = MultiCropAugmentation("v2", 48, 24, n_local=2, global_scale=(0.6, 1.0), local_scale=(0.3, 0.5),
                                 draft=False)
    views = aug.sample_params(720, 960, sample_generator(0, 0, 7))
    assert aug.max_reduction(views) >= 2  # so the reduced decode is really exercised
    a = aug(tmp_path / "big.jpg", sample_generator(0, 0, 7))
    b = full(tmp_path / "big.jpg", sample_generator(0, 0, 7))
    for key in ("global", "local"):
        assert (a[key] - b[key]).abs().mean() < 0.05  # normalised units (about 3 grey levels)


# ---------------------------------------------------------------------------------------------- seeding
def test_reproducible_from_seed_epoch_index() -> None:
    aug = MultiCropAugmentation("v3", 24, 12, 2)
    img = _image()
    a = aug(img, sample_generator(5, 2, 11))
    b = aug(img, sample_generator(5, 2, 11))
    torch.testing.assert_close(a["global"], b["global"], rtol=0, atol=0)
    torch.testing.assert_close(a["local"], b["local"], rtol=0, atol=0)
    for other in (sample_generator(5, 2, 12), sample_generator(5, 3, 11), sample_generator(6, 2, 11)):
        assert not torch.equal(aug(img, other)["global"], a["global"])
    assert mc.sample_seed(1, 2, 3) == mc.sample_seed(1, 2, 3) != mc.sample_seed(1, 3, 2)


def test_collate_is_crop_major_and_drops_skipped() -> None:
    aug = MultiCropAugmentation("v2", 24, 12, 3)
    items = [dict(aug(_image(), sample_generator(0, 0, i)), index=i) for i in range(4)]
    batch = collate_multicrop([items[0], Skipped("bad.jpg", "truncated"), items[1], None, items[2], items[3]])
    assert batch["global"].shape == (2, 4, 3, 24, 24) and batch["local"].shape == (3, 4, 3, 12, 12)
    torch.testing.assert_close(batch["local"][1, 2], items[2]["local"][1])
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["size"] == 4
    assert len(batch["skipped"]) == 2
    empty = collate_multicrop([Skipped("a", "b")])
    assert empty["global"] is None and empty["size"] == 0 and len(empty["skipped"]) == 1


def test_hue_per_pixel_against_torchvision_many_shifts() -> None:
    """The modulo-free hue rotation is exact: every pixel of random and tie-heavy images (quantised levels,
    grey pixels, equal channels), for shifts over the whole [-0.5, 0.5] range, scalar, batched and in place,
    agrees with torchvision's HSV adjust_hue up to float32 rounding (2e-6, no approximation)."""
    gen = torch.Generator().manual_seed(0)
    for shift in torch.linspace(-0.5, 0.5, 41).tolist():
        x = torch.rand(3, 40, 48, generator=gen)
        x[:, :10] = torch.randint(0, 256, (3, 10, 48), generator=gen) / 255.0  # many exact ties
        x[:, 10:14] = x[0:1, 10:14]  # grey
        x[1, 14:18] = x[0, 14:18]  # R == G
        x[2, 18:22] = x[1, 18:22]  # G == B
        torch.testing.assert_close(ops.adjust_hue(x, shift), TF.adjust_hue(x, shift), atol=2e-6, rtol=0)
    batch = torch.rand(6, 3, 24, 24, generator=gen)
    shifts = torch.rand(6, generator=gen) - 0.5
    expected = torch.stack([TF.adjust_hue(batch[i], float(shifts[i])) for i in range(6)])
    torch.testing.assert_close(ops.adjust_hue(batch, shifts), expected, atol=2e-6, rtol=0)
    small = shifts * 0.2  # the ColorJitter range (|shift| <= 0.1): the path without any wrap
    expected = torch.stack([TF.adjust_hue(batch[i], float(small[i])) for i in range(6)])
    inplace = batch.clone()
    assert ops.adjust_hue(inplace, small, out=inplace) is inplace
    torch.testing.assert_close(inplace, expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("factor", [0.6, 1.0, 1.37])
def test_in_place_colour_ops_match_the_functional_kernels(factor: float) -> None:
    x = _float_img()
    for op, fn in enumerate((ops.adjust_brightness, ops.adjust_contrast, ops.adjust_saturation)):
        y = x.clone()
        ops._COLOR_OPS_(op, y, factor)
        torch.testing.assert_close(y, fn(x, factor), atol=1e-6, rtol=0)
    y = x.clone()
    ops._COLOR_OPS_(3, y, factor / 20)
    torch.testing.assert_close(y, ops.adjust_hue(x, factor / 20), atol=0, rtol=0)


def test_blur_in_place_into_a_batch_slice() -> None:
    x = torch.rand(4, 3, 20, 22)
    sig = torch.tensor([0.3, 1.9], dtype=torch.float64)
    expected = ops.gaussian_blur(x[1:3].clone(), sig, 9)
    assert ops.gaussian_blur(x[1:3], sig, 9, out=x[1:3]).data_ptr() == x[1:3].data_ptr()
    torch.testing.assert_close(x[1:3], expected, atol=0, rtol=0)
