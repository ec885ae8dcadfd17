"""The pixel operations of the DINO multi-crop recipe, apart from the recipe itself (:mod:`.multicrop`).

Pure tensor kernels with no randomness: a uint8 resized crop, the colour-jitter ops (brightness, contrast,
saturation, hue), luma grayscale, a separable Gaussian blur and solarisation. Each matches torchvision's
tensor kernel (or PIL, for solarise) and is tested against it on its own; :mod:`.multicrop` only decides
which op runs on which view with which parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL and torchvision
#: Tests only: use the forms written for GPU tensors (float resize, tensor mean luma) on CPU tensors too.
FORCE_GPU_FORMS = False


def _gpu_forms(x: torch.Tensor) -> bool:
    return FORCE_GPU_FORMS or x.device.type != "cpu"


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (parameters, indices) onto ``device``: to a GPU from pinned memory without
    blocking, so that the copy does not wait for the kernels already queued."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# ---------------------------------------------------------------------------------------------- crop
def resized_crop_uint8(src: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """Crop ``box`` (top, left, h, w) of a uint8 [3, H, W] image and resize to ``size`` x ``size`` with
    antialiased bicubic, as PIL/torchvision's bicubic RandomResizedCrop; returns uint8 [1, 3, size, size]."""
    top, left, h, w = box
    crop = src[:, top : top + h, left : left + w].unsqueeze(0)
    if (h, w) == (size, size):
        return crop.contiguous()
    if _gpu_forms(src):  # torch's antialiased uint8 resize exists on the CPU only
        return _resize_via_float(crop, size)
    return F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def _resize_via_float(crop: torch.Tensor, size: int) -> torch.Tensor:
    """The uint8 kernel's result from float32 passes: horizontal, rounded and clipped to uint8 levels, then
    vertical, as PIL (and torch's uint8 kernel, which reproduces it) resample; within a grey level of it
    (fixed-point rounding). One 2-D float pass would skip the clip between passes: up to 6 levels apart
    at sharp edges, where bicubic overshoots."""
    x = F.interpolate(crop.float(), size=(crop.shape[-2], size), mode="bicubic", align_corners=False,
                      antialias=True).round_().clamp_(0.0, 255.0)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return x.round_().clamp_(0.0, 255.0).to(torch.uint8)


# ---------------------------------------------------------------------------------------------- colour
# Colour kernels act on one float image [3, H, W] in [0, 1] with a scalar parameter and return a new
# tensor clamped to [0, 1] (the semantics of torchvision's tensor kernels).
def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] float -> [..., 1, H, W] luma (0.299 R + 0.587 G + 0.114 B)."""
    r, g, b = x.unbind(-3)
    return (r * GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(-3)


def _factor(f: float | torch.Tensor, x: torch.Tensor) -> float | torch.Tensor:
    """A scalar, or one factor per image of a [N, 3, H, W] batch (broadcast over C, H, W)."""
    return f if isinstance(f, (int, float)) else f.to(x.device, x.dtype).view(-1, *([1] * (x.dim() - 1)))


def adjust_brightness(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """Blend with black: ``clamp(f x)``. ``factor``: a float or one per image of a batch."""
    return (x * _factor(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma: ``clamp(f x + (1 - f) mean(gray))``."""
    f = _factor(factor, x)
    mean = rgb_to_gray(x).mean(dim=(-3, -2, -1), keepdim=True)
    return (x * f).add_(mean * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_saturation(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """Blend with the grayscale image: ``clamp(f x + (1 - f) gray)``."""
    f = _factor(factor, x)
    if isinstance(f, float):
        return (x * f).add_(rgb_to_gray(x), alpha=1.0 - f).clamp_(0.0, 1.0)
    return (x * f).add_(rgb_to_gray(x) * (1.0 - f)).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: float | torch.Tensor, out: torch.Tensor | None = None,
               max_shift: float | None = None) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` (fraction of a turn, in [-0.5, 0.5]) keeping S and V.

    Hue ``h`` in sextants from the hexcone formulas (R max: (G-B)/d, G max: 2+(B-R)/d, B max: 4+(R-G)/d,
    d = max - min, ties R before G before B as torchvision), in [-1, 5), plus ``6 shift``; it is wrapped into
    [0, 6) only when |shift| > 1/6, so h lies in [-2, 6] (ColorJitter's hue 0.1 never wraps).
    HSV -> RGB: ``c_n = max - d clamp(min(k_n, 4 - k_n), 0, 1)``, ``k_n = (n + h) mod 6``, n = 5, 3, 1 for
    R, G, B; that is ``max - d clamp(2 - dist_n, 0, 1)`` with ``dist_n`` the circular distance (period 6)
    from h to 3, 5, 1. With ``a = | |h - centre| - 3 |``, ``dist = 3 - a`` when ``|h - centre| <= 6``; for
    ``6 < |h - centre| <= 7`` (only |h - 5| gets there) ``dist <= 1`` and ``a - 1 >= 2``, both clamp to 1.
    So ``c_n = max - d clamp(a - 1, 0, 1)`` exactly, without a modulo: 7 passes per channel. A grey pixel
    (d = 0) stays unchanged. ``out`` may be ``x`` itself (in place): every read of ``x`` comes first.
    ``max_shift``: ``max |shift|`` when the caller knows it, which saves reading it back from a GPU.
    """
    r, g, b = x.unbind(-3)
    # In-place ops and few temporaries: fresh large allocations (page faults) dominate otherwise.
    maxc = torch.maximum(r, g)
    torch.maximum(maxc, b, out=maxc)
    delta = torch.minimum(r, g)
    torch.minimum(delta, b, out=delta)
    torch.sub(maxc, delta, out=delta)
    inv = delta.clamp(min=1e-12).reciprocal_()
    # Which channel is the max, as exact 0/1 floats (ties: R before G before B): comparisons written into a
    # float tensor are as cheap as a subtraction, unlike boolean masks and torch.where.
    is_r = torch.empty_like(maxc)
    torch.eq(r, maxc, out=is_r)
    is_g = torch.empty_like(maxc)
    torch.eq(g, maxc, out=is_g)
    is_g.addcmul_(is_g, is_r, value=-1.0)
    hue = torch.sub(r, g).mul_(inv).add_(4.0)  # B is max
    d_r = torch.sub(g, b).mul_(inv).sub_(hue)  # R is max, minus the B formula
    d_g = torch.sub(b, r).mul_(inv).add_(2.0).sub_(hue)
    hue.addcmul_(is_r, d_r).addcmul_(is_g, d_g)
    hue.add_(6.0 * shift if isinstance(shift, (int, float)) else 6.0 * _factor(shift, hue))
    if isinstance(shift, (int, float)):
        max_shift = abs(float(shift))
    elif max_shift is None:
        max_shift = float(shift.abs().max()) if shift.numel() else 0.0
    if 6.0 * max_shift > 1.0:  # h could leave [-2, 6]: wrap it into [0, 6) (ColorJitter's 0.1 never needs it)
        hue.sub_(torch.mul(hue, 1.0 / 6.0).floor_().mul_(6.0))
    if out is None:
        out = torch.empty_like(x)
    k = d_r
    for c, centre in enumerate((3.0, 5.0, 1.0)):
        torch.sub(hue, centre, out=k).abs_().sub_(3.0).abs_().sub_(1.0).clamp_(0.0, 1.0)
        # c = min + d (1 - k) = max - d k (max - d is min up to rounding; this is torchvision's form)
        torch.addcmul(maxc, delta, k, value=-1.0, out=out.select(-3, c))
    return out.clamp_(0.0, 1.0)


def _COLOR_OPS_(op: int, x: torch.Tensor, f: float) -> None:
    """Brightness (0), contrast (1) or saturation (2) of one float image, in place: the same arithmetic as
    :func:`adjust_brightness` etc. without their output copy. Hue (3) is batched separately."""
    if op == 0:
        x.mul_(f)
    elif op == 1:
        mean = _mean_luma(x, not _gpu_forms(x))  # before x changes
        x.mul_(f).add_(mean * (1.0 - f))
    elif op == 2:
        gray = rgb_to_gray(x)
        x.mul_(f).add_(gray, alpha=1.0 - f)
    else:
        x.copy_(adjust_hue(x, f))
        return
    x.clamp_(0.0, 1.0)


def color_op_batch_(op: int, x: torch.Tensor, f: torch.Tensor, max_shift: float | None = None) -> None:
    """Brightness (0), contrast (1), saturation (2) or hue (3) of a float batch [N, 3, H, W], in place, one
    factor per image (``f`` [N] on ``x``'s device): the arithmetic of :func:`_COLOR_OPS_` for N views in
    one set of kernels (the GPU form: few launches, no host reads)."""
    if op == 3:
        adjust_hue(x, f, out=x, max_shift=max_shift)
        return
    fv = f.to(x.dtype).view(-1, 1, 1, 1)
    if op == 0:
        x.mul_(fv)
    elif op == 1:
        m = x.mean(dim=(-2, -1))  # [N, 3]: the mean luma as the luma of the channel means
        mean = (m[:, 0] * GRAY_WEIGHTS[0]).add_(m[:, 1], alpha=GRAY_WEIGHTS[1]).add_(m[:, 2], alpha=GRAY_WEIGHTS[2])
        x.mul_(fv).add_(mean.view(-1, 1, 1, 1) * (1.0 - fv))
    else:
        gray = rgb_to_gray(x).mul_(1.0 - fv)  # before x changes
        x.mul_(fv).add_(gray)
    x.clamp_(0.0, 1.0)


def _mean_luma(x: torch.Tensor, as_float: bool) -> float | torch.Tensor:
    """Mean luma of one float image as the luma of its channel means (one reduction pass instead of a grey
    image): a Python float (``as_float``, the CPU's fast form) or a 0-dim tensor, which on a GPU avoids a
    device-to-host wait per view."""
    if as_float:
        m = x.mean(dim=(-2, -1)).tolist()
        return m[0] * GRAY_WEIGHTS[0] + m[1] * GRAY_WEIGHTS[1] + m[2] * GRAY_WEIGHTS[2]
    m = x.mean(dim=(-2, -1))  # scalar weights: no host-to-device copy (which would wait for the GPU)
    return (m[0] * GRAY_WEIGHTS[0]).add_(m[1], alpha=GRAY_WEIGHTS[1]).add_(m[2], alpha=GRAY_WEIGHTS[2])


# ---------------------------------------------------------------------------------------------- blur, solarise
def gaussian_kernel1d(sigma: float | torch.Tensor, taps: int) -> torch.Tensor:
    """Normalised 1-D Gaussian(s) of ``taps`` samples centred on 0, as torchvision's
    ``_get_gaussian_kernel1d``: [taps] for a float sigma, [N, taps] for N sigmas."""
    half = (taps - 1) / 2
    pos = torch.linspace(-half, half, taps, dtype=torch.float64)
    sig = torch.as_tensor(sigma, dtype=torch.float64)
    k = torch.exp(-0.5 * (pos / sig.unsqueeze(-1)) ** 2)
    return (k / k.sum(dim=-1, keepdim=True)).to(torch.float32)


def gaussian_blur(x: torch.Tensor, sigma: float | torch.Tensor, taps: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Separable Gaussian blur of [C, H, W] (one sigma) or [N, C, H, W] (a float or N sigmas), reflect
    padding (replicate when the image is smaller than the kernel), as a sum of shifted slices: several
    times faster on CPU than a grouped conv2d. ``out`` (same shape as ``x``, may be ``x`` itself): where to
    write the result."""
    squeeze = x.dim() == 3
    if squeeze:
        x = x.unsqueeze(0)
    n, c, h, w = x.shape
    pad = taps // 2
    k = to_device(gaussian_kernel1d(sigma, taps), x.device)
    k = k.expand(n, taps) if k.dim() == 1 else k
    kv = k.view(n, 1, 1, 1, taps)
    mode = "reflect" if pad < h and pad < w else "replicate"
    xp = F.pad(x, (pad, pad, pad, pad), mode=mode)  # [N, C, h + 2p, w + 2p]
    rows = xp[..., :, 0:w] * kv[..., 0]
    for i in range(1, taps):
        rows.addcmul_(xp[..., :, i : i + w], kv[..., i])
    res = torch.mul(rows[..., 0:h, :], kv[..., 0], out=out.view(n, c, h, w) if out is not None else None)
    for i in range(1, taps):
        res.addcmul_(rows[..., i : i + h, :], kv[..., i])
    if out is not None:
        return out
    return res[0] if squeeze else res


def solarize(x: torch.Tensor, threshold: float = 128.0) -> torch.Tensor:
    """Invert pixels at or above ``threshold`` grey levels (of 255), as PIL ``ImageOps.solarize(img, 128)``;
    on float [0, 1] the cut is placed half a level lower so that it agrees with rounding to uint8."""
    if threshold == 128.0:
        return torch.minimum(x, 1.0 - x)  # the same map for the cut at 0.5, in two cheap ops
    cut = (threshold - 0.5) / 255.0
    return torch.where(x >= cut, 1.0 - x, x)
