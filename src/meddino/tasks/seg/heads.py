"""Segmentation heads on a DINO (or CNN) encoder: seed 001's linear and U-Net decoders, MONAI's U-Net.

- :class:`LinearDecoder` (seed 001): a 1x1 convolution on the last block's (final-normed) patch tokens laid
  out on the patch grid, logits upsampled bilinearly to the input size.
- :class:`UNetDecoder` (seed 001): four up-blocks, channels ``D -> D/2 -> D/4 -> D/8 -> classes``. For a
  ViT the skips are the patch tokens of four transformer blocks (all on the patch grid); each up-block
  doubles the resolution with a 2x2 transposed convolution, projects its skip with a 1x1 convolution,
  resizes it (bilinear) to the current resolution, concatenates, and applies two 3x3 conv-BN-ReLU. The
  fourth up-block has no skip and ends in the 1x1 class convolution. With a CNN encoder the skips are the
  encoder's own multi-scale maps (the last four), so the same decoder is a classic U-Net decoder.
  Four 2x steps reach 16x the grid: for patch 16 that is the input size, for 14 and 8 the logits are
  resized (bilinear) to the input.
- :class:`MonaiUNet`: MONAI's ``UNet`` trained from scratch (seed 001's baseline), no encoder.

:class:`SegmentationModel` puts a head on an encoder; a frozen encoder runs under ``no_grad`` in eval mode
(no drop path, no BN updates) whatever the module's mode. EoMT lives in :mod:`.eomt`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meddino.errors import ConfigError
from meddino.tasks.seg.eomt import EoMT
from meddino.tasks.seg.tokens import tokens_to_map


def default_unet_blocks(depth: int) -> list[int]:
    """Four evenly spaced 0-based block indices ending at the last block (12 blocks -> 2, 5, 8, 11)."""
    if depth < 4:
        raise ConfigError(f"the U-Net decoder needs an encoder with >= 4 blocks (this one has {depth})")
    step = depth / 4
    return [int(round(step * (i + 1))) - 1 for i in range(4)]


class LinearDecoder(nn.Module):
    """1x1 conv on the last layer's patch tokens; bilinear upsampling to the input size."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, num_classes, kernel_size=1)

    def forward(self, fmap: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return F.interpolate(self.conv(fmap), size=tuple(size), mode="bilinear", align_corners=False)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UpBlock(nn.Module):
    """2x transposed-conv upsampling, optional skip (1x1 projection, resized), two 3x3 conv-BN-ReLU."""

    def __init__(self, cin: int, cout: int, skip_channels: int | None):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)
        self.skip = nn.Conv2d(skip_channels, cout, kernel_size=1) if skip_channels else None
        self.convs = nn.Sequential(_conv_bn_relu(cout * (2 if skip_channels else 1), cout), _conv_bn_relu(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        if self.skip is not None:
            s = self.skip(skip)
            if s.shape[-2:] != x.shape[-2:]:
                s = F.interpolate(s, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, s], dim=1)
        return self.convs(x)


class UNetDecoder(nn.Module):
    """Four up-blocks over four feature maps (shallow -> deep), channels D -> D/2 -> D/4 -> D/8 -> classes."""

    def __init__(self, in_channels: Sequence[int], num_classes: int):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError("UNetDecoder needs four feature maps")
        d = int(in_channels[-1])
        widths = [max(d // 2, 8), max(d // 4, 8), max(d // 8, 8)]
        self.up1 = UpBlock(d, widths[0], in_channels[2])
        self.up2 = UpBlock(widths[0], widths[1], in_channels[1])
        self.up3 = UpBlock(widths[1], widths[2], in_channels[0])
        self.up4 = UpBlock(widths[2], widths[2], None)
        self.cls = nn.Conv2d(widths[2], num_classes, kernel_size=1)

    def forward(self, maps: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        x = self.up1(maps[3], maps[2])
        x = self.up2(x, maps[1])
        x = self.up3(x, maps[0])
        x = self.cls(self.up4(x))
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return x


class MonaiUNet(nn.Module):
    """MONAI's 2-D ``UNet`` (residual units, instance norm), trained from scratch: seed 001's baseline."""

    def __init__(self, num_classes: int, channels: Sequence[int] = (16, 32, 64, 128, 256)):
        super().__init__()
        try:
            from monai.networks.nets import UNet
        except ImportError:
            raise ConfigError("head=monai_unet needs MONAI (pip install monai)") from None
        self.net = UNet(spatial_dims=2, in_channels=3, out_channels=num_classes, channels=tuple(channels),
                        strides=(2,) * (len(channels) - 1), num_res_units=2)
        self.multiple = 2 ** (len(channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SegmentationModel(nn.Module):
    """An encoder + a head -> per-pixel class logits at the input size (``head`` in linear/unet/monai_unet),
    or an :class:`~meddino.tasks.seg.eomt.EoMT` (``head == "eomt"``)."""

    def __init__(self, backbone: nn.Module | None, head: str, num_classes: int, freeze_backbone: bool = True,
                 unet_blocks: Sequence[int] | None = None, eomt: dict[str, Any] | None = None,
                 monai_channels: Sequence[int] = (16, 32, 64, 128, 256)):
        super().__init__()
        self.head_name, self.num_classes = head, num_classes
        self.freeze_backbone = bool(freeze_backbone) and backbone is not None
        self.backbone = backbone
        self.unet_blocks: list[int] | None = None
        self.is_cnn = backbone is not None and getattr(backbone, "version", "") == "cnn"
        if head == "monai_unet":
            self.backbone = None
            self.head = MonaiUNet(num_classes, monai_channels)
        elif backbone is None:
            raise ConfigError(f"head={head} needs a backbone")
        elif head == "linear":
            self.head = LinearDecoder(backbone.embed_dim, num_classes)
        elif head == "unet":
            if self.is_cnn:
                was_training = backbone.training
                backbone.eval()
                with torch.no_grad():  # channel counts of the levels (eval: no BN statistics update)
                    probe = backbone.feature_maps(torch.zeros(1, 3, 64, 64))
                backbone.train(was_training)
                if len(probe) < 4:
                    raise ConfigError("the U-Net decoder needs a CNN with >= 4 feature levels")
                self.unet_blocks = list(range(len(probe) - 4, len(probe)))
                channels = [int(probe[i].shape[1]) for i in self.unet_blocks]
            else:
                blocks = list(unet_blocks) if unet_blocks is not None else default_unet_blocks(backbone.depth)
                for b in blocks:
                    if not 0 <= b < backbone.depth:
                        raise ConfigError(f"unet_blocks: block {b} out of range 0..{backbone.depth - 1}")
                self.unet_blocks = sorted(blocks)
                channels = [backbone.embed_dim] * 4
            self.head = UNetDecoder(channels, num_classes)
        elif head == "eomt":
            if self.is_cnn:
                raise ConfigError("head=eomt needs a ViT backbone (EoMT joins queries to the token sequence)")
            # the backbone is registered once (self.backbone); EoMT holds only its own parameters and
            # receives the backbone at call time
            self.head = EoMT(backbone, num_classes, **(eomt or {}))
        else:
            raise ConfigError(f"unknown head '{head}' (linear, unet, eomt, monai_unet)")
        if self.freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)

    @property
    def input_multiple(self) -> int:
        """Input sides must be a multiple of this."""
        if self.head_name == "monai_unet":
            return self.head.multiple
        return int(self.backbone.patch_size) if not self.is_cnn else 32

    def train(self, mode: bool = True) -> SegmentationModel:
        super().train(mode)
        if self.freeze_backbone and self.backbone is not None:
            self.backbone.eval()
        return self

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        bb = self.backbone
        if self.head_name == "linear":
            out = bb.forward_features(x)
            return [tokens_to_map(out["patch"], out["grid"])]
        if self.is_cnn:
            maps = bb.feature_maps(x)
            return [maps[i] for i in self.unet_blocks]
        feats = bb.get_intermediate_layers(x, blocks=self.unet_blocks, norm=True)
        grid = bb.grid_size(x.shape[-2:])
        return [tokens_to_map(f["patch"], grid) for f in feats]

    def forward(self, x: torch.Tensor, **eomt_kwargs: Any) -> Any:
        if self.head_name == "monai_unet":
            return self.head(x)
        if self.head_name == "eomt":
            return self.head(self.backbone, x, frozen=self.freeze_backbone, **eomt_kwargs)
        if self.freeze_backbone:
            with torch.no_grad():
                maps = self._features(x)
        else:
            maps = self._features(x)
        if self.head_name == "linear":
            return self.head(maps[0], x.shape[-2:])
        return self.head(maps, x.shape[-2:])

    @torch.no_grad()
    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class scores [B, C, H, W] at the input size; argmax gives the semantic map."""
        if self.head_name == "eomt":
            return self.head.semantic_scores(self.backbone, x)
        return self(x)

    def trainable_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(head parameters, encoder parameters that train)."""
        enc: list[nn.Parameter] = []
        if self.backbone is not None and not self.freeze_backbone:
            enc = [p for p in self.backbone.parameters() if p.requires_grad]
        enc_ids = {id(p) for p in enc}
        frozen_ids = {id(p) for p in self.backbone.parameters()} if self.backbone is not None else set()
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in enc_ids and id(p) not in frozen_ids]
        return head, enc
