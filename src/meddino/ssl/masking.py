"""iBOT block masks for the student's global crops (DINOv2 and DINOv3 recipes).

Reproduces the official collate-time masking: ``int(n_images * mask_probability)`` images get a mask, with
per-image ratio bounds from ``linspace(min, max, n_masked + 1)`` so that the batch covers the whole ratio
range; the rest get none; the list is shuffled. Blocks follow BEiT's ``MaskingGenerator`` (used by both
originals): rectangles with a target area drawn from [4, min(remaining, 0.5 N)] patches (the rounded
block may be smaller and is kept, as officially), aspect ratio log-uniform in [0.3, 1/0.3], up to 10
placement tries per block, a block only accepted if the patches it newly covers fit in the remaining
budget.

Randomness comes from one explicit generator (no global RNG), so masks are reproducible per
(seed, rank, step): pass a ``torch.Generator`` seeded from those, a ``numpy.random.Generator`` or an int.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["block_masks", "BlockMaskGenerator"]


def _as_numpy_rng(generator: torch.Generator | np.random.Generator | int | None) -> np.random.Generator:
    """A numpy Generator for the many scalar draws (fast), derived reproducibly from ``generator``.

    A torch.Generator is advanced by one 63-bit draw that seeds the numpy stream, so consecutive calls with
    the same torch generator give different, reproducible masks.
    """
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator):
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator).item())
        return np.random.default_rng(seed)
    if generator is None:
        return np.random.default_rng(int(torch.randint(0, 2**63 - 1, (1,)).item()))
    return np.random.default_rng(int(generator))


class BlockMaskGenerator:
    """BEiT-style rectangular block masking on an (H, W) patch grid.

    ``__call__(n_target, rng)`` returns an [H, W] bool mask with at most ``n_target`` patches, filled with
    random blocks; ``exact=True`` (DINOv3) then tops the mask up with random single patches to exactly
    ``n_target``. Block placement follows the official ``MaskingGenerator._mask`` (see
    :meth:`_add_block`): the target AREA is drawn from ``[min_num_patches, budget]``, but a placed block is
    never thrown away for being small, so 1- to 3-patch blocks occur after rounding or when less than
    ``min_num_patches`` of budget remain; the fill loop ends at the first call that places nothing (10
    failed tries). With the official parameters (14 x 14 grid, collate ratios) about 7% of DINOv2 masks
    end short of their target.
    """

    def __init__(
        self,
        grid_hw: tuple[int, int],
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_tries: int = 10,
    ) -> None:
        self.height, self.width = int(grid_hw[0]), int(grid_hw[1])
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"grid_hw must be positive, got {grid_hw}")
        self.num_patches = self.height * self.width
        self.min_num_patches = min_num_patches
        self.max_num_patches = 0.5 * self.num_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.max_tries = max_tries

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Try up to ``max_tries`` rectangles; place the first that adds 1..budget new patches.

        As the official ``_mask``: the target area is ``U(min_num_patches, budget)`` written as
        ``a + (b - a) * U(0, 1)`` (Python's ``random.uniform``), so a budget below ``min_num_patches``
        draws from ``[budget, min_num_patches]``; the rounded ``h * w`` may be below ``min_num_patches``
        and such a block is still placed. Only ``h < H`` and ``w < W`` and the new-patch budget are checked.
        """
        lo = float(self.min_num_patches)
        for _ in range(self.max_tries):
            area = lo + (float(budget) - lo) * rng.random()
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h >= self.height or w >= self.width:
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            window = mask[top : top + h, left : left + w]
            new = h * w - int(window.sum())
            if 0 < new <= budget:
                window[...] = True
                return new
        return 0

    def __call__(self, n_target: int, rng: np.random.Generator, exact: bool = False) -> np.ndarray:
        n_target = max(0, min(int(n_target), self.num_patches))
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < n_target:
            added = self._add_block(mask, int(min(n_target - count, self.max_num_patches)), rng)
            if added == 0:
                break
            count += added
        if exact and count < n_target:
            free = np.flatnonzero(~mask.reshape(-1))
            mask.reshape(-1)[rng.choice(free, size=n_target - count, replace=False)] = True
        return mask


def block_masks(
    n_images: int,
    grid_hw: tuple[int, int],
    version: str | int,
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    generator: torch.Generator | np.random.Generator | int | None = None,
) -> torch.Tensor:
    """Boolean iBOT masks [n_images, H*W] for one local batch of global crops (n_images = 2 * B).

    ``int(n_images * mask_probability)`` images are masked; image i of them gets the ratio bounds
    ``(r_i, r_{i+1})`` of ``linspace(min, max, n_masked + 1)``. DINOv2 (``version`` "v2"/2): target
    ``int(N * U(r_i, r_{i+1}))`` patches in blocks (may end a few short when no block fits). DINOv3
    ("v3"/3): target ``int(N * r_{i+1})`` in blocks, then topped up with single patches to exactly that.
    The masked and unmasked images are shuffled together, as the originals do.
    """
    v = str(version).lower().removeprefix("v")
    if v not in {"2", "3"}:
        raise ValueError(f"block_masks: version must be 'v2' or 'v3' (iBOT masking), got {version!r}")
    lo, hi = float(mask_ratio_min_max[0]), float(mask_ratio_min_max[1])
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"block_masks: need 0 <= min <= max <= 1, got {mask_ratio_min_max}")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"block_masks: mask_probability must be in [0, 1], got {mask_probability}")
    rng = _as_numpy_rng(generator)
    gen = BlockMaskGenerator(grid_hw)
    n = gen.num_patches
    n_masked = int(n_images * mask_probability)
    bounds = np.linspace(lo, hi, n_masked + 1)
    out = np.zeros((n_images, n), dtype=bool)
    for i in range(n_masked):
        if v == "2":
            target = int(n * rng.uniform(bounds[i], bounds[i + 1]))
            out[i] = gen(target, rng).reshape(-1)
        else:
            out[i] = gen(int(n * bounds[i + 1]), rng, exact=True).reshape(-1)
    out = out[rng.permutation(n_images)]
    return torch.from_numpy(out)
