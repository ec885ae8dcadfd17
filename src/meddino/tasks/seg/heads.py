"""Segmentation heads on a DINO (or CNN) encoder: seed 001's linear and U-Net decoders, MONAI's U-Net.

- :class:`LinearDecoder` (seed 001): a 1x1 convolution on the last block's (final-normed) patch tokens laid
  out on the patch grid, logits upsampled bilinearly to the input size.
- :class:`UNetDecoder` (seed 001): four up-blocks, channels ``D -> D/2 -> D/4 -> D/8 -> classes``. For a
  ViT the skips are the patch tokens of four transformer blocks (all on the patch grid): evenly spaced
  ending at the last (``unet.skips: even``, the default) or the last four, as seed 001's code takes them
  (``last4``), or ``unet.blocks``. Each up-block doubles the resolution with a 2x2 transposed convolution,
  projects its skip with a 1x1 convolution, resizes it (bilinear) to the current resolution, concatenates,
  and applies ``unet.convs_per_stage`` 3x3 conv-BN-ReLU (2 by default, 1 in seed 001's code). The fourth
  up-block has no skip and ends in the 1x1 class convolution. With a CNN encoder the skips are the
  encoder's own multi-scale maps (the last four), so the same decoder is a classic U-Net decoder.
  Four 2x steps reach 16x the grid: for patch 16 that is the input size, for 14 and 8 the logits are
  resized (bilinear) to the input.
- :class:`MonaiUNet`: MONAI's ``UNet`` trained from scratch (seed 001's baseline), no encoder.

Every head (these three and :class:`~meddino.tasks.seg.eomt.EoMT`) has one entry in :data:`SEG_HEADS`
(:class:`SegHead`): its builder, the checks it makes on an encoder, its options (the ``SegConfig`` field,
``SegmentationModel`` keyword and ``model.json`` key that hold them, with their typed config where there is
one: :class:`~meddino.tasks.seg.config.UNetConfig` for the U-Net, :class:`~meddino.tasks.seg.config.EoMTConfig`
for EoMT) and what it consumes and how it trains. Code
outside asks the entry, never the head's name. :class:`SegmentationModel` puts a head on an encoder; a
frozen encoder runs under ``no_grad`` in eval mode (no drop path, no BN updates) whatever the module's mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from meddino.config import Schema
from meddino.errors import ConfigError
from meddino.tasks.seg.config import EoMTConfig, UNetConfig
from meddino.tasks.seg.eomt import EoMT, MaskClassificationLoss, resolve_num_blocks
from meddino.tasks.seg.tokens import tokens_to_map


def _need_four(depth: int) -> None:
    if depth < 4:
        raise ConfigError(f"the U-Net decoder needs an encoder with >= 4 blocks (this one has {depth})")


def default_unet_blocks(depth: int) -> list[int]:
    """Four evenly spaced 0-based block indices ending at the last block (12 blocks -> 2, 5, 8, 11)."""
    _need_four(depth)
    step = depth / 4
    return [int(round(step * (i + 1))) - 1 for i in range(4)]


def last_unet_blocks(depth: int) -> list[int]:
    """The last four 0-based block indices (12 blocks -> 8, 9, 10, 11): seed 001's skips, whose code takes
    ``get_intermediate_layers(x, 4)``."""
    _need_four(depth)
    return list(range(depth - 4, depth))


def resolve_unet_blocks(depth: int, options: UNetConfig) -> list[int]:
    """The four ViT blocks the decoder reads: ``options.blocks`` if given, else by ``options.skips``."""
    if options.blocks is not None:
        return list(options.blocks)
    return last_unet_blocks(depth) if options.skips == "last4" else default_unet_blocks(depth)


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
    """2x transposed-conv upsampling, optional skip (1x1 projection, resized), ``convs`` 3x3 conv-BN-ReLU."""

    def __init__(self, cin: int, cout: int, skip_channels: int | None, convs: int = 2):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)
        self.skip = nn.Conv2d(skip_channels, cout, kernel_size=1) if skip_channels else None
        first = _conv_bn_relu(cout * (2 if skip_channels else 1), cout)
        self.convs = nn.Sequential(first, *(_conv_bn_relu(cout, cout) for _ in range(convs - 1)))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        if self.skip is not None:
            s = self.skip(skip)
            if s.shape[-2:] != x.shape[-2:]:
                s = F.interpolate(s, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, s], dim=1)
        return self.convs(x)


class UNetDecoder(nn.Module):
    """Four up-blocks over four feature maps (shallow -> deep), channels D -> D/2 -> D/4 -> D/8 -> classes,
    ``convs_per_stage`` 3x3 conv-BN-ReLU in each (1 in seed 001's code, 2 by default)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, convs_per_stage: int = 2):
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError("UNetDecoder needs four feature maps")
        if convs_per_stage < 1:
            raise ValueError("UNetDecoder needs at least one conv per stage")
        d = int(in_channels[-1])
        widths = [max(d // 2, 8), max(d // 4, 8), max(d // 8, 8)]
        n = int(convs_per_stage)
        self.up1 = UpBlock(d, widths[0], in_channels[2], n)
        self.up2 = UpBlock(widths[0], widths[1], in_channels[1], n)
        self.up3 = UpBlock(widths[1], widths[2], in_channels[0], n)
        self.up4 = UpBlock(widths[2], widths[2], None, n)
        self.cls = nn.Conv2d(widths[2], num_classes, kernel_size=1)

    def forward(self, maps: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        x = self.up1(maps[3], maps[2])
        x = self.up2(x, maps[1])
        x = self.up3(x, maps[0])
        x = self.cls(self.up4(x))
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return x


def monai_multiple(channels: Sequence[int]) -> int:
    """Input sides of MONAI's U-Net must be a multiple of this (one halving per level after the first)."""
    return 2 ** (len(channels) - 1)


def _monai_unet_class() -> type[nn.Module]:
    try:  # heavy and needed by this head only: imported when it is built; a missing MONAI names the head
        from monai.networks.nets import UNet
    except ImportError:
        raise ConfigError("head=monai_unet needs MONAI (pip install monai)") from None
    return UNet


class MonaiUNet(nn.Module):
    """MONAI's 2-D ``UNet`` (residual units, instance norm), trained from scratch: seed 001's baseline."""

    def __init__(self, num_classes: int, channels: Sequence[int] = (16, 32, 64, 128, 256)):
        super().__init__()
        unet = _monai_unet_class()
        self.net = unet(spatial_dims=2, in_channels=3, out_channels=num_classes, channels=tuple(channels),
                        strides=(2,) * (len(channels) - 1), num_res_units=2)
        self.multiple = monai_multiple(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ---------------------------------------------------------------------------------------------- registry
def _is_cnn(backbone: nn.Module | None) -> bool:
    return backbone is not None and getattr(backbone, "version", "") == "cnn"


def _build_linear(backbone: nn.Module, num_classes: int, _options: None) -> tuple[nn.Module, None]:
    return LinearDecoder(backbone.embed_dim, num_classes), None


def unet_levels(backbone: nn.Module, options: UNetConfig) -> tuple[list[int], list[int]]:
    """(feature levels, their channel counts) of the U-Net decoder on ``backbone``: for a CNN its last four
    multi-scale maps, for a ViT four blocks (:func:`resolve_unet_blocks`)."""
    if _is_cnn(backbone):
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():  # channel counts of the levels (eval: no BN statistics update)
            probe = backbone.feature_maps(torch.zeros(1, 3, 64, 64))
        backbone.train(was_training)
        if len(probe) < 4:
            raise ConfigError("the U-Net decoder needs a CNN with >= 4 feature levels")
        levels = list(range(len(probe) - 4, len(probe)))
        return levels, [int(probe[i].shape[1]) for i in levels]
    chosen = resolve_unet_blocks(int(backbone.depth), options)
    for b in chosen:
        if not 0 <= b < backbone.depth:
            raise ConfigError(f"unet.blocks: block {b} out of range 0..{backbone.depth - 1}")
    return sorted(chosen), [backbone.embed_dim] * 4


def _build_unet(backbone: nn.Module, num_classes: int, options: UNetConfig) -> tuple[nn.Module, list[int]]:
    levels, channels = unet_levels(backbone, options)
    return UNetDecoder(channels, num_classes, options.convs_per_stage), levels


def _check_eomt(backbone: nn.Module, cfg: EoMTConfig) -> int:
    if _is_cnn(backbone):
        raise ConfigError("head=eomt needs a ViT backbone (EoMT joins queries to the token sequence)")
    return resolve_num_blocks(int(backbone.depth), cfg.num_blocks)


def _build_eomt(backbone: nn.Module, num_classes: int, cfg: EoMTConfig) -> tuple[nn.Module, None]:
    _check_eomt(backbone, cfg)
    # the backbone is registered once (SegmentationModel.backbone); EoMT holds only its own parameters and
    # receives the backbone at call time
    # masked attention without annealing keeps its masks at inference too (official EoMT)
    return EoMT(backbone, num_classes, num_queries=cfg.num_queries, num_blocks=cfg.num_blocks,
                masked_inference=not cfg.mask_annealing), None


def _eomt_criterion(num_classes: int, ignore_index: int, cfg: EoMTConfig) -> nn.Module:
    return MaskClassificationLoss(
        num_classes, ignore_index, num_points=cfg.num_points, oversample_ratio=cfg.oversample_ratio,
        importance_ratio=cfg.importance_ratio, no_object_weight=cfg.no_object_weight, mask_weight=cfg.mask_weight,
        dice_weight=cfg.dice_weight, class_weight=cfg.class_weight)


def _eomt_record(head: nn.Module, cfg: EoMTConfig) -> dict[str, Any]:
    # L2 as resolved for this backbone, and (for readers; rebuilt from mask_annealing) how inference attends
    return {**cfg.model_dump(), "num_blocks": head.num_blocks,
            "inference": "masked" if head.masked_inference else "plain"}


def _build_monai(_backbone: None, num_classes: int, channels: Sequence[int]) -> tuple[nn.Module, None]:
    return MonaiUNet(num_classes, channels), None


def _no_check(_backbone: nn.Module | None, _options: Any) -> None:
    return None


#: What a head consumes: the image itself (no encoder), the last block's patch map, four feature levels
#: (:attr:`SegmentationModel.unet_blocks`), or the backbone itself (the head runs the encoder's blocks).
HeadInputs = Literal["image", "last_block", "levels", "backbone"]


@dataclass(frozen=True)
class SegHead:
    """One segmentation head: how to check and build it on an encoder, its options, what it consumes and how
    it trains. ``build(backbone, num_classes, options) -> (module, feature levels or None)`` makes the same
    checks as ``check(backbone, options)`` (which builds nothing) before building."""

    name: str
    inputs: HeadInputs
    build: Callable[[Any, int, Any], tuple[nn.Module, list[int] | None]]
    check: Callable[[Any, Any], Any] = _no_check
    #: the ``SegConfig`` field, ``SegmentationModel`` keyword and ``model.json`` key holding this head's options
    option: str | None = None
    config: type[Schema] | None = None  # their typed config (passed whole to build / check / criterion)
    needs_backbone: bool = True
    #: trained as a mask transformer: ``criterion`` (set loss), deep supervision, mask annealing, the two-stage
    #: encoder warm-up; class scores from :meth:`EoMT.semantic_scores`
    mask_classification: bool = False
    criterion: Callable[[int, int, Any], nn.Module] | None = None  # its training loss (None: pixel CE)
    record: Callable[[nn.Module, Any], Any] | None = None  # model.json's ``eomt`` entry: options as resolved
    multiple: Callable[[Any], int] | None = None  # input-side multiple from the options (None: the encoder's)
    profile_name: str | None = None  # its name in ``meddino profile`` (None: not profiled, no encoder)

    def options(self, source: Any) -> Any:
        """This head's options from a ``SegConfig`` (or anything holding the same fields), typed."""
        return self.typed(getattr(source, self.option) if self.option else None)

    def typed(self, options: Any) -> Any:
        """A dict (or None: the defaults) -> the typed config, for heads that have one."""
        if self.config is not None and not isinstance(options, self.config):
            return self.config.model_validate(options or {})
        return options

    def _require_backbone(self, backbone: nn.Module | None) -> None:
        if self.needs_backbone and backbone is None:
            raise ConfigError(f"head={self.name} needs a backbone")

    def validate(self, backbone: nn.Module | None, options: Any) -> None:
        """Everything :meth:`make` would refuse, without building the head."""
        self._require_backbone(backbone)
        self.check(backbone, options)

    def make(self, backbone: nn.Module | None, num_classes: int, options: Any) -> tuple[nn.Module, list[int] | None]:
        self._require_backbone(backbone)
        return self.build(backbone, num_classes, options)

    def input_multiple(self, backbone: nn.Module | None, options: Any) -> int:
        """Input sides must be a multiple of this."""
        if self.multiple is not None:
            return self.multiple(options)
        return 32 if _is_cnn(backbone) else int(backbone.patch_size)


SEG_HEADS: dict[str, SegHead] = {h.name: h for h in (
    SegHead("linear", "last_block", _build_linear, profile_name="linear_seg"),
    SegHead("unet", "levels", _build_unet, check=unet_levels, option="unet", config=UNetConfig, profile_name="unet"),
    SegHead("eomt", "backbone", _build_eomt, check=_check_eomt, option="eomt", config=EoMTConfig,
            mask_classification=True, criterion=_eomt_criterion, record=_eomt_record, profile_name="eomt"),
    SegHead("monai_unet", "image", _build_monai, check=lambda _b, _c: _monai_unet_class(), option="monai_channels",
            needs_backbone=False, multiple=monai_multiple),
)}


def head_spec(name: str) -> SegHead:
    """The registry entry of head ``name``."""
    if name not in SEG_HEADS:
        raise ConfigError(f"unknown head '{name}' ({', '.join(SEG_HEADS)})")
    return SEG_HEADS[name]


# ---------------------------------------------------------------------------------------------- model
class SegmentationModel(nn.Module):
    """An encoder + a head (an entry of :data:`SEG_HEADS`) -> per-pixel class logits at the input size, or
    EoMT's mask / class predictions (:meth:`class_scores` gives class scores for every head).

    ``unet`` (a :class:`UNetConfig` or a dict of its fields), ``eomt`` (an :class:`EoMTConfig` or a dict) and
    ``monai_channels`` are the options of the heads that have them; each head reads its own only.
    ``unet_blocks`` holds the feature levels the U-Net decoder reads, as resolved for this encoder.
    """

    def __init__(self, backbone: nn.Module | None, head: str, num_classes: int, freeze_backbone: bool = True,
                 unet: UNetConfig | Mapping[str, Any] | None = None, eomt: EoMTConfig | Mapping[str, Any] | None = None,
                 monai_channels: Sequence[int] = (16, 32, 64, 128, 256)):
        super().__init__()
        spec = head_spec(head)
        options = {"unet": unet, "eomt": eomt, "monai_channels": monai_channels}
        self.spec = spec
        self.options = spec.typed(options[spec.option] if spec.option else None)
        self.head_name, self.num_classes = head, num_classes
        if not spec.needs_backbone:
            backbone = None
        self.freeze_backbone = bool(freeze_backbone) and backbone is not None
        self.backbone = backbone
        self.is_cnn = _is_cnn(backbone)
        head_module, levels = spec.make(backbone, num_classes, self.options)
        self.unet_blocks: list[int] | None = levels
        self.head = head_module
        if self.freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)

    @property
    def input_multiple(self) -> int:
        """Input sides must be a multiple of this."""
        return self.spec.input_multiple(self.backbone, self.options)

    def train(self, mode: bool = True) -> SegmentationModel:
        super().train(mode)
        if self.freeze_backbone and self.backbone is not None:
            self.backbone.eval()
        return self

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        bb = self.backbone
        if self.spec.inputs == "last_block":
            out = bb.forward_features(x)
            return [tokens_to_map(out["patch"], out["grid"])]
        if self.is_cnn:
            maps = bb.feature_maps(x)
            return [maps[i] for i in self.unet_blocks]
        feats = bb.get_intermediate_layers(x, blocks=self.unet_blocks, norm=True)
        grid = bb.grid_size(x.shape[-2:])
        return [tokens_to_map(f["patch"], grid) for f in feats]

    def forward(self, x: torch.Tensor, **eomt_kwargs: Any) -> Any:
        if self.spec.inputs == "image":
            return self.head(x)
        if self.spec.inputs == "backbone":
            return self.head(self.backbone, x, frozen=self.freeze_backbone, **eomt_kwargs)
        if self.freeze_backbone:
            with torch.no_grad():
                maps = self._features(x)
        else:
            maps = self._features(x)
        if self.spec.inputs == "last_block":
            return self.head(maps[0], x.shape[-2:])
        return self.head(maps, x.shape[-2:])

    @torch.no_grad()
    def class_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class scores [B, C, H, W] at the input size; argmax gives the semantic map."""
        if self.spec.mask_classification:
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
