"""Patch tokens laid out on the patch grid: the one helper both the decoders (:mod:`.heads`) and EoMT
(:mod:`.eomt`) need.

It lives in its own module, below both, so that :mod:`.heads` can import :mod:`.eomt` (to build it) while
:mod:`.eomt` imports nothing from :mod:`.heads`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def tokens_to_map(patch: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """[B, N, D] patch tokens -> [B, D, h, w]."""
    b, n, d = patch.shape
    h, w = int(grid[0]), int(grid[1])
    if n != h * w:
        raise ValueError(f"{n} patch tokens do not fill a {h}x{w} grid")
    return patch.transpose(1, 2).reshape(b, d, h, w)
