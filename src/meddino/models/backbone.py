"""DINO backbones: a timm ViT (v1/v2) or Eva (v3) behind one interface, plus CNN baselines.

:class:`Backbone` adds what the DINO objectives and the downstream heads need on top of timm:
a learned mask token that replaces masked patch embeddings before the blocks (iBOT, all versions; the
official code inserts it before adding position embeddings, and so do we), a dict of final-normed
``cls`` / ``patch`` / ``registers`` tokens, intermediate block outputs, and token-level access to the blocks
(``prepare_tokens`` / ``run_blocks``) for heads that join their own tokens to the sequence (EoMT).
The module is the same in training (drop path active in ``train()``) and inference.

Stochastic depth follows each version's rule (see :mod:`meddino.models.droppath`): DINOv1 linear over blocks
with a per-sample coin, DINOv2/v3 uniform over blocks with the batch-subset form where the originals use it.

Learned position embeddings (v1/v2) stay at the grid they are stored at; every forward whose patch grid
differs (local crops, other evaluation sizes) resamples them from that stored grid in the version's official
mode (``arch["kwargs"]["pos_embed_resample"]``, see :mod:`meddino.models.pos_embed`), through a hook on the
timm module's ``_pos_embed`` in place of timm's own ``dynamic_img_size`` formula. DINOv3 uses RoPE.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from meddino.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from meddino.models.pos_embed import install_pos_embed_hook



class Backbone(nn.Module):
    """A DINO-family ViT with mask-token support and dict outputs.

    ``arch`` is the JSON-serialisable recipe (``timm_name``, ``version``, ``kwargs``) that rebuilds the
    same module; it is written beside every export.
    """

    def __init__(self, vit: nn.Module, version: str, arch: dict[str, Any]):
        super().__init__()
        self.vit = vit
        self.version = version
        self.arch = arch
        self.embed_dim: int = int(vit.embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))
        self.patch_size: int = int(vit.patch_embed.patch_size[0])
        self.depth: int = len(vit.blocks)
        self.num_prefix_tokens: int = int(vit.num_prefix_tokens)
        has_cls = getattr(vit, "cls_token", None) is not None
        self.num_registers: int = self.num_prefix_tokens - int(has_cls)
        self.img_size: int = int(vit.patch_embed.img_size[0])
        self.uses_rope: bool = getattr(vit, "rope", None) is not None
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.grad_checkpointing = False
        mode = arch.get("kwargs", {}).get("pos_embed_resample")
        if mode is not None:
            install_pos_embed_hook(vit, mode)

    @property
    def pos_embed_resample(self) -> str | None:
        """How position embeddings are resampled to a crop's grid (None: RoPE, nothing to resample)."""
        return getattr(self.vit, "pos_embed_resample", None)

    @pos_embed_resample.setter
    def pos_embed_resample(self, mode: str) -> None:
        install_pos_embed_hook(self.vit, mode)
        self.arch.setdefault("kwargs", {})["pos_embed_resample"] = mode

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vit.blocks

    @property
    def norm(self) -> nn.Module:
        return self.vit.norm

    def grid_size(self, hw: Sequence[int]) -> tuple[int, int]:
        return int(hw[0]) // self.patch_size, int(hw[1]) // self.patch_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def prepare_tokens(
        self, x: torch.Tensor, masks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
        """Patch-embed ``x``, swap masked patches for the mask token, add prefix tokens and positions.

        Returns (tokens [B, P+N, D], rope embedding or None, grid (h, w)).
        """
        vit = self.vit
        emb = vit.patch_embed(x)  # [B, h, w, D] (dynamic image size)
        batch, h, w, dim = emb.shape
        if masks is not None:
            if masks.shape != (batch, h * w):
                raise ValueError(f"masks must be [B, N] = {(batch, h * w)}, got {tuple(masks.shape)}")
            emb = torch.where(masks.view(batch, h, w, 1), self.mask_token.to(emb.dtype), emb)
        if self.uses_rope:
            tokens, rope = vit._pos_embed(emb)
        else:
            tokens, rope = vit._pos_embed(emb), None
            tokens = vit.patch_drop(tokens)
        tokens = vit.norm_pre(tokens)
        return tokens, rope, (h, w)

    def run_blocks(
        self,
        tokens: torch.Tensor,
        rope: torch.Tensor | None,
        start: int = 0,
        end: int | None = None,
        extra_prefix: int = 0,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``blocks[start:end]``; ``extra_prefix`` tokens prepended by the caller get no RoPE."""
        with self._extra_prefix(extra_prefix):
            for block in self.blocks[start:end]:
                kwargs: dict[str, Any] = {}
                if self.uses_rope:
                    kwargs["rope"] = rope
                if attn_mask is not None:
                    kwargs["attn_mask"] = attn_mask
                if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                    tokens = checkpoint(block, tokens, use_reentrant=False, **kwargs)
                else:
                    tokens = block(tokens, **kwargs)
        return tokens

    @contextlib.contextmanager
    def _extra_prefix(self, n: int) -> Iterator[None]:
        if n == 0 or not self.uses_rope:
            yield
            return
        attns = [block.attn for block in self.blocks]
        for attn in attns:
            attn.num_prefix_tokens += n
        try:
            yield
        finally:
            for attn in attns:
                attn.num_prefix_tokens -= n

    def split_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> dict[str, Any]:
        """[B, P+N, D] -> {"cls", "patch", "registers"?, "grid"}."""
        out: dict[str, Any] = {"cls": tokens[:, 0], "patch": tokens[:, self.num_prefix_tokens :], "grid": grid}
        if self.num_registers:
            out["registers"] = tokens[:, 1 : self.num_prefix_tokens]
        return out

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, Any]:
        tokens, rope, grid = self.prepare_tokens(x, masks)
        tokens = self.run_blocks(tokens, rope)
        return self.split_tokens(self.norm(tokens), grid)

    def get_intermediate_layers(
        self, x: torch.Tensor, blocks: Sequence[int] | int = 1, norm: bool = True
    ) -> list[dict[str, Any]]:
        """Outputs of the chosen blocks (0-based; an int n means the last n blocks), final norm applied."""
        wanted = list(range(self.depth - blocks, self.depth)) if isinstance(blocks, int) else list(blocks)
        for b in wanted:
            if not -self.depth <= b < self.depth:
                raise ValueError(f"block index {b} out of range for a {self.depth}-block backbone")
        wanted = [b % self.depth for b in wanted]
        tokens, rope, grid = self.prepare_tokens(x)
        outputs: dict[int, torch.Tensor] = {}
        for i in range(max(wanted) + 1):
            tokens = self.run_blocks(tokens, rope, i, i + 1)
            if i in wanted:
                outputs[i] = self.norm(tokens) if norm else tokens
        return [self.split_tokens(outputs[b], grid) for b in wanted]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["cls"]


class CNNBackbone(nn.Module):
    """Any timm model without tokens (ResNet, DenseNet, ConvNeXt, ...) behind the Backbone interface.

    ``cls`` is the global average of the last feature map, ``patch`` its positions flattened; this is
    what the seeds' CNN baselines feed to the same heads.
    """

    version = "cnn"
    num_registers = 0
    num_prefix_tokens = 0

    def __init__(self, model: nn.Module, arch: dict[str, Any]):
        super().__init__()
        self.model = model
        self.arch = arch
        self.embed_dim = int(model.num_features)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        self.std = tuple(cfg.get("std", IMAGENET_STD))
        self.img_size = int(cfg.get("input_size", (3, 224, 224))[-1])
        self.patch_size = int(getattr(model, "feature_info", [{}])[-1].get("reduction", 32))
        self.depth = len(getattr(model, "feature_info", [])) or 1

    def grid_size(self, hw: Sequence[int]) -> tuple[int, int]:
        return int(hw[0]) // self.patch_size, int(hw[1]) // self.patch_size

    def _last_map(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.model.forward_features(x)
        if fmap.ndim != 4:
            raise ValueError(f"{self.arch.get('timm_name')} does not return a [B, C, H, W] feature map")
        return fmap

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict[str, Any]:
        if masks is not None:
            raise ValueError("mask tokens need a ViT backbone")
        fmap = self._last_map(x)
        return {
            "cls": fmap.mean(dim=(2, 3)),
            "patch": fmap.flatten(2).transpose(1, 2),
            "grid": tuple(fmap.shape[-2:]),
        }

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale maps [B, C_i, H_i, W_i], finest first (for U-Net decoders)."""
        return list(self.model.forward_intermediates(x, intermediates_only=True))

    def get_intermediate_layers(
        self, x: torch.Tensor, blocks: Sequence[int] | int = 1, norm: bool = True
    ) -> list[dict[str, Any]]:
        maps = self.feature_maps(x)
        wanted = list(range(len(maps) - blocks, len(maps))) if isinstance(blocks, int) else list(blocks)
        out = []
        for b in wanted:
            fmap = maps[b]
            out.append({"cls": fmap.mean(dim=(2, 3)), "patch": fmap.flatten(2).transpose(1, 2),
                        "grid": tuple(fmap.shape[-2:])})
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["cls"]
