"""DINO multi-crop augmentation (v1, v2, v3), reproducing the official per-view probabilities, made fast.

What each version does (facts in shared/reference/dino-recipes.md), per image: 2 global crops and
``n_local`` local crops, each

    bicubic RandomResizedCrop(scale, ratio 3/4..4/3) -> horizontal flip p 0.5
    -> colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, random order) p 0.8
    -> grayscale p 0.2 -> Gaussian blur (sigma U(0.1, 2)) with the view's probability
    -> solarisation (threshold 128) p 0.2 on global crop 2 only -> normalise (ImageNet mean/std)

Blur probabilities (global 1 / global 2 / local): v1 1.0 / 0.1 / 0.5. v2 and v3 pass ``1 - p`` to
RandomApply by mistake, so the released models were trained with 0.0 / 0.9 / 0.5; that quirk is the default
here for v2/v3 (``blur_quirk=True``) and ``blur_quirk=False`` gives the intended 1.0 / 0.1 / 0.5.
Default crop scales are the version's own: v1 global (0.4, 1) local (0.05, 0.4); v2/v3 (0.32, 1) and
(0.05, 0.32). Blur kernel: v2/v3 use a 9-tap Gaussian (torchvision ``GaussianBlur(9, sigma)``, reflect
padding); v1 uses PIL's ``GaussianBlur(radius=sigma)``, reproduced here by a 13-tap Gaussian (+-3 sigma at
the largest sigma).

How it is fast without changing the output distribution:

1. All random parameters of all views are drawn first, from the image size alone (the JPEG header), with
   the same distributions as torchvision's samplers (:meth:`MultiCropAugmentation.sample_params`).
2. Knowing every crop box, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8 via ``Image.draft``)
   at which every box still has at least as many pixels as its output, so no crop is ever upsampled more
   than from the full-size image (large frames, e.g. 1080p surgical video, decode at 1/2). A full-size RGB
   or greyscale JPEG is decoded by torchvision's CPU decoder: PIL's pixels, about a quarter faster.
3. Each crop is cut as a view of the decoded uint8 array and resized with the native uint8 bicubic
   antialiased kernel (no PIL round trip, no per-crop float copy of the source).
4. Flips are done on the uint8 crops. Colour ops run in float32 on [0, 1], in place, in one batch per crop
   size whose rows are ordered so that the jittered views and the blurred views are each one contiguous
   slice; the two costly ops (hue, blur) run once per crop size on that slice with per-view parameters,
   hue split out of each view's random jitter order so that every view still gets its own ops in its own
   order; one gather then puts the rows back in view order and the normalisation is a broadcast
   multiply-add. Blur is a sum of shifted slices (several times faster on CPU than a grouped conv2d); hue
   is an exact HSV rotation without boolean masks or a modulo (see
   :func:`~meddino.data.augment_ops.adjust_hue`). Those pixel kernels live in :mod:`meddino.data.augment_ops`;
   this module is the recipe: which view gets which op, with which parameters, in which order.

Deliberate differences from the PIL reference, all below one grey level: PIL quantises to uint8 after
every colour op and stores hue as a byte; here colour ops stay in float32 and are clamped to [0, 1] after
each op, as torchvision's tensor kernels do. With draft decoding, crop boxes are rounded to the pixel grid
of the reduced image.

Seeding: every sample's randomness comes from a ``torch.Generator`` seeded by :func:`sample_seed` from
``(seed, epoch, index)``, so a resumed run, any worker count and any order see the same augmentations.

:meth:`MultiCropAugmentation.render` takes the views of one image or of a whole batch, on any device: the
GPU data path (:mod:`meddino.data.device_crops`, ``crops.device=cuda``) renders every view of a batch
there; on a non-CPU device the kernels take their GPU forms (float resize, colour jitter batched by
position in the random order, no host reads), which the suite checks on CPU tensors.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from meddino.data import io
from meddino.data.augment_ops import (
    _COLOR_OPS_,
    _gpu_forms,
    adjust_hue,
    color_op_batch_,
    gaussian_blur,
    resized_crop_uint8,
    rgb_to_gray,
    to_device,
)
from meddino.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from meddino.errors import DataError


VERSIONS = ("v1", "v2", "v3")
#: (global scale, local scale) per version.
DEFAULT_SCALES = {
    "v1": ((0.4, 1.0), (0.05, 0.4)),
    "v2": ((0.32, 1.0), (0.05, 0.32)),
    "v3": ((0.32, 1.0), (0.05, 0.32)),
}
INTENDED_BLUR = (1.0, 0.1, 0.5)  # global 1, global 2, local
QUIRK_BLUR = (0.0, 0.9, 0.5)  # v2/v3 as released: RandomApply(p = 1 - p)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
P_JITTER, P_GRAY, P_FLIP, P_SOLARIZE = 0.8, 0.2, 0.5, 0.2
SIGMA = (0.1, 2.0)

_N_ATTEMPTS = 10
_N_UNIFORMS = 2 * _N_ATTEMPTS + 2 + 1 + 1 + 4 + 4 + 1 + 1 + 1 + 1  # see sample_params


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample, from (seed, epoch, index) (numpy SeedSequence hashing)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch), int(index)]).generate_state(
        2, np.uint32
    )
    return (int(state[0]) << 31) ^ int(state[1])


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded for one sample: same (seed, epoch, index) -> same augmentation."""
    return torch.Generator().manual_seed(sample_seed(seed, epoch, index))


def blur_probabilities(version: str, blur_quirk: bool = True) -> tuple[float, float, float]:
    """(global 1, global 2, local) blur probabilities of a version, with or without the v2/v3 quirk."""
    if version not in VERSIONS:
        raise ValueError(f"unknown DINO version '{version}' (use one of {', '.join(VERSIONS)})")
    return QUIRK_BLUR if version != "v1" and blur_quirk else INTENDED_BLUR


@dataclass(frozen=True)
class ViewParams:
    """Every random choice for one view; the box is in pixels of the full-size source image."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    jitter: tuple[float, float, float, float] | None  # brightness, contrast, saturation factors, hue shift
    order: tuple[int, int, int, int]  # order of the 4 jitter ops (0 b, 1 c, 2 s, 3 h)
    gray: bool
    blur_sigma: float | None
    solarize: bool


def random_resized_crop_box(
    height: int, width: int, scale: tuple[float, float], u: Sequence[float], ratio: tuple[float, float] = RATIO
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box sampler on given uniforms ``u`` (2 per attempt, then 2 for the
    position): up to 10 tries of area U(scale) * H * W and log-uniform aspect ratio; otherwise the central
    crop clamped to the ratio range. Returns (top, left, h, w)."""
    area = height * width
    log_r0, log_r1 = math.log(ratio[0]), math.log(ratio[1])
    for attempt in range(_N_ATTEMPTS):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * attempt])
        aspect = math.exp(log_r0 + (log_r1 - log_r0) * u[2 * attempt + 1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u[2 * _N_ATTEMPTS] * (height - h + 1)), height - h)
            left = min(int(u[2 * _N_ATTEMPTS + 1] * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class MultiCropAugmentation:
    """DINO multi-crop: image -> ``{"global": float32 [2, 3, G, G], "local": float32 [n_local, 3, L, L]}``.

    ``image`` may be a file path (decoded with :mod:`meddino.data.io`, JPEGs at reduced size when the crops
    allow it), a uint8 ``(H, W, 3)``/``(H, W)`` numpy array, a uint8 ``[3, H, W]`` tensor or a PIL image.
    ``generator``: a ``torch.Generator`` (see :func:`sample_generator`); None uses a fresh random one.
    """

    def __init__(
        self,
        version: str = "v2",
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        global_scale: tuple[float, float] | None = None,
        local_scale: tuple[float, float] | None = None,
        blur_quirk: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        draft: bool = True,
    ):
        self.version = version
        self.blur_p = blur_probabilities(version, blur_quirk)
        g_scale, l_scale = DEFAULT_SCALES[version]
        self.global_scale = tuple(global_scale) if global_scale is not None else g_scale
        self.local_scale = tuple(local_scale) if local_scale is not None else l_scale
        for name, sc in (("global_scale", self.global_scale), ("local_scale", self.local_scale)):
            if not (len(sc) == 2 and 0 < sc[0] <= sc[1] <= 1):
                raise ValueError(f"{name} must be (lo, hi) with 0 < lo <= hi <= 1, got {sc}")
        if global_size < 1 or local_size < 1 or n_local < 0:
            raise ValueError("global_size and local_size must be >= 1 and n_local >= 0")
        self.global_size, self.local_size, self.n_local = int(global_size), int(local_size), int(n_local)
        self.blur_quirk = blur_quirk
        self.blur_taps = 13 if version == "v1" else 9
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self._norm_scale = 1.0 / self.std
        self._norm_bias = -self.mean / self.std
        self.draft = draft

    def __repr__(self) -> str:
        return (
            f"MultiCropAugmentation(version={self.version!r}, global={self.global_size}x2 {self.global_scale}, "
            f"local={self.local_size}x{self.n_local} {self.local_scale}, blur={self.blur_p})"
        )

    # ------------------------------------------------------------------------------------ parameters
    def sample_params(self, height: int, width: int, generator: torch.Generator | None = None) -> list[ViewParams]:
        """Draw every view's parameters (2 global first, then the locals) for a ``height x width`` image.

        Per view one block of uniforms: 20 for the crop attempts, 2 position, flip, jitter coin, 4 jitter
        factors, 4 for a uniform random op order (argsort), grayscale coin, blur coin, sigma, solarise coin.
        """
        n_views = 2 + self.n_local
        u = torch.rand(n_views, _N_UNIFORMS, generator=generator, dtype=torch.float64).tolist()
        b, c, s, h = JITTER
        views = []
        for v in range(n_views):
            row = u[v]
            is_global = v < 2
            scale = self.global_scale if is_global else self.local_scale
            top, left, hh, ww = random_resized_crop_box(height, width, scale, row[:22])
            k = 22
            flip = row[k] < P_FLIP
            jitter = None
            if row[k + 1] < P_JITTER:
                f = row[k + 2 : k + 6]
                jitter = (1 - b + 2 * b * f[0], 1 - c + 2 * c * f[1], 1 - s + 2 * s * f[2], -h + 2 * h * f[3])
            order = tuple(int(i) for i in np.argsort(row[k + 6 : k + 10], kind="stable"))
            gray = row[k + 10] < P_GRAY
            p_blur = self.blur_p[v] if is_global else self.blur_p[2]
            sigma = SIGMA[0] + (SIGMA[1] - SIGMA[0]) * row[k + 12] if row[k + 11] < p_blur else None
            solarize = v == 1 and row[k + 13] < P_SOLARIZE
            views.append(ViewParams(top, left, hh, ww, flip, jitter, order, gray, sigma, solarize))  # type: ignore[arg-type]
        return views

    def max_reduction(self, views: Sequence[ViewParams]) -> float:
        """The largest decode down-scaling at which every crop still has >= its output size in pixels."""
        r = math.inf
        for v, p in enumerate(views):
            size = self.global_size if v < 2 else self.local_size
            r = min(r, p.height / size, p.width / size)
        return max(r, 1.0)

    # ------------------------------------------------------------------------------------ entry point
    def __call__(self, image: Any, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        src, views, (full_h, full_w) = self._load(image, generator)
        return self.apply(src, views, full_h, full_w)

    def _load(self, image: Any, generator: torch.Generator) -> tuple[torch.Tensor, list[ViewParams], tuple[int, int]]:
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            if not io.is_dicom_file(path):
                im = io.open_image(path)
                try:
                    width, height = im.size
                    views = self.sample_params(height, width, generator)
                    hint = None
                    if self.draft and im.format == "JPEG":
                        r = self.max_reduction(views)
                        if r >= 2:
                            hint = (math.ceil(width / r), math.ceil(height / r))
                    if hint is None and im.format == "JPEG" and im.mode in io.TORCH_JPEG_MODES:
                        return _decode_full_jpeg(path), views, (height, width)
                    arr = io.pil_to_rgb(im, size_hint=hint, where=str(path))
                finally:
                    im.close()
                return _hwc_to_chw(arr), views, (height, width)
            image = io.read_image(path)
        if isinstance(image, Image.Image):
            image = io.pil_to_rgb(image)
        if isinstance(image, np.ndarray):
            if image.ndim == 2:
                image = np.repeat(image[..., None], 3, axis=2)
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected a uint8 (H, W, 3) array, got {image.dtype} {image.shape}")
            tensor = _hwc_to_chw(image)
        elif isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"expected a uint8 [3, H, W] tensor, got {image.dtype} {tuple(image.shape)}")
            tensor = image
        else:
            raise TypeError(f"unsupported image type {type(image).__name__}")
        height, width = int(tensor.shape[1]), int(tensor.shape[2])
        return tensor, self.sample_params(height, width, generator), (height, width)

    # ------------------------------------------------------------------------------------ pixels
    @torch.no_grad()  # not inference_mode: its tensors could not be saved for backward by the model
    def apply(self, src: torch.Tensor, views: Sequence[ViewParams], full_h: int, full_w: int,
              trace: list[tuple[int, str]] | None = None) -> dict[str, torch.Tensor]:
        """Apply sampled ``views`` to a uint8 [3, h, w] source that may be a reduced decode of a
        ``full_h x full_w`` image (boxes are rescaled to it). ``trace``: see :meth:`render`."""
        sy, sx = src.shape[1] / full_h, src.shape[2] / full_w
        items = [(src, p, sy, sx) for p in views]
        out = {"global": self.render(items[:2], self.global_size, trace)}
        out["local"] = self.render(items[2:], self.local_size, trace)
        return out

    @torch.no_grad()
    def render(self, items: Sequence[tuple[torch.Tensor, ViewParams, float, float]], size: int,
               trace: list[tuple[int, str]] | None = None) -> torch.Tensor:
        """Crop+resize (+flip) each view in uint8, then apply its ops on its slice of one float batch.

        ``items``: ``(source, params, sy, sx)`` per view, the views of one image (:meth:`apply`) or of a
        whole batch of images (:mod:`meddino.data.device_crops`); the sources may live on any device and the
        result is on theirs. ``sy, sx``: the source's scale against the image the box was drawn for.

        The views are stacked in an order that makes the jittered ones one contiguous block and the blurred
        ones another (jitter only, jitter + blur, blur only, neither), so the two costly ops (hue, blur) run
        once on a slice of the batch, in place, with per-view parameters and no gather/scatter; one gather
        puts the rows back in view order before the normalisation. Hue is split out of each view's random
        jitter order: the ops before it run first, then hue on every jittered view at once, then the ops
        after it -- every view still gets its own ops in its own order. The cheap per-view ops run in place.
        ``trace`` (a list, tests only): gets ``(row, op)`` for every op as it is applied.
        """
        n = len(items)
        if not n:
            device = items[0][0].device if items else torch.device("cpu")
            return torch.empty(0, 3, size, size, device=device)
        views = [it[1] for it in items]
        device = items[0][0].device
        jit = [p.jitter is not None for p in views]
        blr = [p.blur_sigma is not None for p in views]
        perm = sorted(range(n), key=lambda i: (0 if not blr[i] else 1) if jit[i] else (2 if blr[i] else 3))
        crops = []
        for i in perm:
            src, p, sy, sx = items[i]
            crop = resized_crop_uint8(src, _scale_box(p, sy, sx, src.shape[1], src.shape[2]), size)
            crops.append(crop.flip(-1) if p.flip else crop)  # flip is the first op: exact on uint8
            if trace is not None and p.flip:
                trace.append((i, "flip"))
        x = torch.div(torch.cat(crops), 255.0)  # float [N, 3, S, S] in one pass, rows in ``perm`` order
        n_jit, n_blur = sum(jit), sum(blr)
        by_position = n_jit > 0 and _gpu_forms(x)
        if by_position:  # on a GPU: every jitter op of every view in a few batched kernels
            _jitter_by_position(x[:n_jit], [views[i] for i in perm[:n_jit]], perm[:n_jit], trace)
        else:
            for pos, i in enumerate(perm[:n_jit]):
                p = views[i]
                for op in p.order[: p.order.index(3)]:
                    _COLOR_OPS_(op, x[pos], p.jitter[op])  # type: ignore[index]
                    if trace is not None:
                        trace.append((i, _OP_NAMES[op]))
        if n_jit and not by_position:
            hue = [views[i].jitter[3] for i in perm[:n_jit]]  # type: ignore[index]
            adjust_hue(x[:n_jit], to_device(torch.tensor(hue), device), out=x[:n_jit],
                       max_shift=max(abs(v) for v in hue))
            if trace is not None:
                trace.extend((i, "hue") for i in perm[:n_jit])
        for pos, i in enumerate(perm):
            p = views[i]
            view = x[pos]
            if p.jitter is not None and not by_position:
                for op in p.order[p.order.index(3) + 1 :]:
                    _COLOR_OPS_(op, view, p.jitter[op])
                    if trace is not None:
                        trace.append((i, _OP_NAMES[op]))
            if p.gray:
                view.copy_(rgb_to_gray(view).expand(3, -1, -1))
                if trace is not None:
                    trace.append((i, "gray"))
        if n_blur:
            lo = sum(1 for i in range(n) if jit[i] and not blr[i])
            sigmas = torch.tensor([views[i].blur_sigma for i in perm[lo : lo + n_blur]], dtype=torch.float64)
            gaussian_blur(x[lo : lo + n_blur], sigmas, self.blur_taps, out=x[lo : lo + n_blur])
            if trace is not None:
                trace.extend((i, "blur") for i in perm[lo : lo + n_blur])
        for pos, i in enumerate(perm):
            if views[i].solarize:
                view = x[pos]
                torch.minimum(view, 1.0 - view, out=view)
                if trace is not None:
                    trace.append((i, "solarize"))
        if perm != list(range(n)):
            inv = [0] * n
            for pos, i in enumerate(perm):
                inv[i] = pos
            x = x.index_select(0, to_device(torch.tensor(inv), device))
        # normalise: (x - mean) / std as x * (1 / std) - mean / std (within 1e-6 of it; broadcast mul_/add_
        # are the fastest form on CPU, a broadcast addcmul is several times slower)
        scale, bias = self._norm_on(device)
        return x.mul_(scale).add_(bias)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_norm_cache", None)  # device copies stay in the process that made them
        return state

    def _norm_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalisation's scale and bias on ``device`` (copied there once)."""
        if device.type == "cpu":
            return self._norm_scale, self._norm_bias
        cache = self.__dict__.setdefault("_norm_cache", {})
        if device not in cache:
            cache[device] = (self._norm_scale.to(device), self._norm_bias.to(device))
        return cache[device]


_OP_NAMES = ("brightness", "contrast", "saturation", "hue")


def _jitter_by_position(x: torch.Tensor, views: Sequence[ViewParams], rows: Sequence[int],
                        trace: list[tuple[int, str]] | None = None) -> None:
    """Each view's four jitter ops in its own order, batched by position in the order: for position t
    and op o, the views whose t-th op is o get it together (at most 16 batched ops, whatever the number of
    views), with per-view factors. The GPU form of the per-view loop in :meth:`MultiCropAugmentation.render`
    (a few kernel launches per crop size instead of about ten per view); the same arithmetic. ``x``: the
    jittered rows [N, 3, S, S], in place; ``rows``: their view numbers, for ``trace``."""
    groups = [(op, [j for j, v in enumerate(views) if v.order[t] == op]) for t in range(4) for op in range(4)]
    groups = [(op, pos) for op, pos in groups if pos]
    flat = [j for _, pos in groups for j in pos]
    factors = torch.tensor([views[j].jitter[op] for op, pos in groups for j in pos])  # type: ignore[index]
    index = to_device(torch.tensor(flat), x.device)  # one host-to-device copy each for all groups
    factors = to_device(factors, x.device)
    start = 0
    for op, pos in groups:
        idx, f = index[start : start + len(pos)], factors[start : start + len(pos)]
        sub = x.index_select(0, idx)
        max_shift = max(abs(views[j].jitter[3]) for j in pos) if op == 3 else None  # type: ignore[index]
        color_op_batch_(op, sub, f, max_shift)
        x.index_copy_(0, idx, sub)
        if trace is not None:
            trace.extend((rows[j], _OP_NAMES[op]) for j in pos)
        start += len(pos)


# ---------------------------------------------------------------------------------------------- helpers
def _hwc_to_chw(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> [3, H, W] view (channels-last strides, which the uint8 resize kernel prefers)."""
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = np.array(arr, copy=True, order="C")
    return torch.from_numpy(arr).permute(2, 0, 1)


def _decode_full_jpeg(path: Path) -> torch.Tensor:
    """A JPEG at full size with torchvision's CPU decoder: PIL's pixels, faster (see
    :func:`meddino.data.io.decode_jpeg_torch`), already in the channels-last strides the resize prefers."""
    try:
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
        return io.decode_jpeg_torch(data)
    except OSError as exc:
        raise DataError(f"unreadable image {path}: {exc.strerror or exc}") from None
    except RuntimeError as exc:
        raise DataError(f"unreadable image {path}: {io.decoder_reason(exc)}") from None


def _scale_box(p: ViewParams, sy: float, sx: float, h: int, w: int) -> tuple[int, int, int, int]:
    if sy == 1.0 and sx == 1.0:
        return p.top, p.left, p.height, p.width
    t0 = min(int(round(p.top * sy)), h - 1)
    l0 = min(int(round(p.left * sx)), w - 1)
    t1 = max(min(int(round((p.top + p.height) * sy)), h), t0 + 1)
    l1 = max(min(int(round((p.left + p.width) * sx)), w), l0 + 1)
    return t0, l0, t1 - t0, l1 - l0


# ---------------------------------------------------------------------------------------------- batching
def collate_multicrop(batch: Sequence[Any]) -> dict[str, Any]:
    """List of per-image outputs -> ``{"global": [2, B, 3, G, G], "local": [n, B, 3, L, L], "skipped": [...]}``.

    Crop-major, so the engine runs all local crops of a batch in one forward pass with ``.flatten(0, 1)``.
    Items that are ``None`` or a :class:`meddino.data.sources.Skipped` sentinel (unreadable files) are
    dropped and returned in ``skipped``; when nothing is left, ``global`` and ``local`` are None. Extra keys
    present in every item (e.g. ``index``) are collected into tensors/lists.
    """
    kept = [item for item in batch if isinstance(item, dict)]
    skipped = [item for item in batch if not isinstance(item, dict)]
    if not kept:
        return {"global": None, "local": None, "skipped": skipped, "size": 0}
    out: dict[str, Any] = {
        "global": torch.stack([item["global"] for item in kept], dim=1),
        "local": torch.stack([item["local"] for item in kept], dim=1),
        "skipped": skipped,
        "size": len(kept),
    }
    for key in kept[0]:
        if key in out:
            continue
        values = [item.get(key) for item in kept]
        out[key] = torch.tensor(values) if all(isinstance(v, (int, float)) for v in values) else values
    return out
