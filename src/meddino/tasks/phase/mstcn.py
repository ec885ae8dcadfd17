"""Multi-stage temporal convolutional network (MS-TCN) for surgical phase recognition, causal by construction.

Reproduces the architecture of MS-TCN (Farha and Gall, CVPR 2019) in the causal form used for online surgical
phase recognition (TeCNO, Czempiel et al. 2020; seed 000's stage 2):

- a stage = 1x1 conv (input -> channels), ``num_layers`` dilated residual layers with dilation 2^i
  (dilated conv k -> ReLU -> 1x1 conv -> dropout -> residual add, times the sequence mask), 1x1 conv to the
  classes;
- stages after the first take the softmax of the previous stage's logits;
- **causal**: every dilated conv is padded on the LEFT ONLY by ``dilation * (kernel_size - 1)`` zeros, so the
  output at frame t depends on frames <= t for every kernel size (no trimming after the fact, which public
  code gets right only for k = 3). ``causal=False`` gives the original symmetric padding (offline model).

Defaults follow seed 000 / TeCNO (2 stages x 8 layers, 64 channels, kernel 3) rather than the 4 x 10 of the
original action-segmentation paper: surgical videos at 1 fps are long, and 8 layers already give a receptive
field of 2^9 - 1 = 511 frames (8.5 minutes) per stage.

:class:`OnlineMSTCN` runs a trained model one frame at a time with a rolling state (one ring buffer of the last
``dilation * (kernel_size - 1)`` inputs per layer); its output at t equals the offline causal output at t.
:func:`mstcn_loss` is cross-entropy on logits (no softmax before it) plus the truncated-MSE smoothing term.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class MSTCNConfig:
    """Architecture hyper-parameters (saved next to the weights so ``predict phase`` can rebuild the model)."""

    in_dim: int
    num_classes: int
    num_stages: int = 2
    num_layers: int = 8
    channels: int = 64
    kernel_size: int = 3
    causal: bool = True
    dropout: float = 0.5

    def to_dict(self) -> dict:
        return asdict(self)


def _as_mask(mask: Tensor | None, x: Tensor) -> Tensor:
    """``None`` | [B, T] | [B, 1, T] -> float [B, 1, T] on x's device/dtype (1 = real frame, 0 = padding)."""
    if mask is None:
        return torch.ones(x.shape[0], 1, x.shape[-1], device=x.device, dtype=x.dtype)
    if mask.dim() == 2:
        mask = mask[:, None, :]
    return mask.to(device=x.device, dtype=x.dtype)


class DilatedResidualLayer(nn.Module):
    """dilated conv (k) -> ReLU -> 1x1 conv -> dropout -> residual, times the mask.

    The conv itself has ``padding=0``; :meth:`forward` pads explicitly: ``dilation * (k - 1)`` zeros on the
    left when causal, split evenly (extra one on the right for an odd total) when not.
    """

    def __init__(self, channels: int, dilation: int, kernel_size: int = 3, causal: bool = True, dropout: float = 0.5):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.dilation = dilation
        self.kernel_size = kernel_size
        self.causal = causal
        self.receptive = dilation * (kernel_size - 1)  # past frames the conv looks at (causal)
        self.conv_dilated = nn.Conv1d(channels, channels, kernel_size, dilation=dilation, padding=0)
        self.conv_1x1 = nn.Conv1d(channels, channels, 1)
        self.dropout = nn.Dropout(dropout)

    def padding(self) -> tuple[int, int]:
        total = self.receptive
        if self.causal:
            return total, 0
        return total // 2, total - total // 2

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        out = F.relu(self.conv_dilated(F.pad(x, self.padding())))
        out = self.dropout(self.conv_1x1(out))
        return (x + out) * mask


class SingleStage(nn.Module):
    """One MS-TCN stage: in 1x1 conv, ``num_layers`` dilated residual layers (dilation 2^i), out 1x1 conv."""

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        num_layers: int,
        channels: int,
        kernel_size: int = 3,
        causal: bool = True,
        dropout: float = 0.5,
    ):
        super().__init__()
        self.conv_in = nn.Conv1d(in_dim, channels, 1)
        self.layers = nn.ModuleList(
            DilatedResidualLayer(channels, 2**i, kernel_size, causal, dropout) for i in range(num_layers)
        )
        self.conv_out = nn.Conv1d(channels, num_classes, 1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        out = self.conv_in(x)
        for layer in self.layers:
            out = layer(out, mask)
        return self.conv_out(out) * mask


class MSTCN(nn.Module):
    """Multi-stage TCN: features [B, in_dim, T] (+ mask) -> logits of every stage [S, B, num_classes, T].

    The last stage is the prediction; all stages are supervised (:func:`mstcn_loss`). Stage s > 0 sees
    ``softmax(logits_{s-1}) * mask``, as in the original.
    """

    def __init__(self, cfg: MSTCNConfig):
        super().__init__()
        if cfg.num_stages < 1 or cfg.num_layers < 1:
            raise ValueError("MS-TCN needs at least one stage and one layer")
        self.cfg = cfg
        args = (cfg.num_layers, cfg.channels, cfg.kernel_size, cfg.causal, cfg.dropout)
        self.stages = nn.ModuleList(
            [SingleStage(cfg.in_dim, cfg.num_classes, *args)]
            + [SingleStage(cfg.num_classes, cfg.num_classes, *args) for _ in range(cfg.num_stages - 1)]
        )

    @property
    def receptive_field(self) -> int:
        """Frames of history one stage sees: 1 + sum of dilation * (k - 1) over layers."""
        return 1 + sum(layer.receptive for layer in self.stages[0].layers)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        m = _as_mask(mask, x)
        out = self.stages[0](x, m)
        outputs = [out]
        for stage in self.stages[1:]:
            out = stage(F.softmax(out, dim=1) * m, m)
            outputs.append(out)
        return torch.stack(outputs, dim=0)


class OnlineMSTCN(nn.Module):
    """Frame-by-frame inference of a causal :class:`MSTCN` with a rolling causal state.

    Each dilated layer keeps a ring buffer of its last ``dilation * (k - 1)`` inputs (zeros at the start,
    exactly like the offline left padding). :meth:`step` takes one feature vector per stream ([B, in_dim])
    and returns the last stage's logits at that frame ([B, num_classes]); the result equals
    ``model(features)[-1, :, :, t]`` of the offline causal model. Dropout is inactive (call in eval mode).
    Cost per frame is O(layers * k * channels^2), independent of the video length.
    """

    def __init__(self, model: MSTCN):
        super().__init__()
        if not model.cfg.causal:
            raise ValueError("online inference needs a causal MS-TCN (causal=True)")
        self.model = model
        self._buffers: list[list[Tensor | None]] = []
        self.t = 0
        self.reset()

    def reset(self) -> None:
        """Forget the past: the next :meth:`step` is frame 0 of a new video."""
        self._buffers = [[None] * len(stage.layers) for stage in self.model.stages]
        self.t = 0

    @staticmethod
    def _layer_step(layer: DilatedResidualLayer, h: Tensor, buf: Tensor | None, t: int) -> tuple[Tensor, Tensor | None]:
        """One frame through a dilated residual layer. ``h``: [B, C] input at time t; ``buf``: [B, C, L] ring."""
        size = layer.receptive
        w = layer.conv_dilated.weight  # [C_out, C_in, k]
        if size == 0:  # kernel 1: no history
            taps = h[:, :, None]
        else:
            if buf is None:
                buf = h.new_zeros(h.shape[0], h.shape[1], size)
            # tap j (0..k-1) reads time t - (k-1-j)*dilation; time t - m lives at slot (t - m) % size
            idx = [(t - (layer.kernel_size - 1 - j) * layer.dilation) % size for j in range(layer.kernel_size - 1)]
            taps = torch.cat([buf[:, :, idx], h[:, :, None]], dim=2)  # [B, C, k] (a copy: safe to overwrite)
            buf[:, :, t % size] = h  # in place: the oldest entry (time t - size) is no longer needed
        out = F.relu(torch.einsum("bik,oik->bo", taps, w) + layer.conv_dilated.bias)
        out = F.linear(out, layer.conv_1x1.weight[:, :, 0], layer.conv_1x1.bias)
        return h + out, buf

    @torch.no_grad()
    def step(self, feature: Tensor) -> Tensor:
        """Feed the feature vector(s) of the next frame ([in_dim] or [B, in_dim]); get last-stage logits."""
        squeeze = feature.dim() == 1
        x = feature[None] if squeeze else feature
        out = x
        for s, stage in enumerate(self.model.stages):
            inp = x if s == 0 else F.softmax(out, dim=1)
            h = F.linear(inp, stage.conv_in.weight[:, :, 0], stage.conv_in.bias)
            for i, layer in enumerate(stage.layers):
                h, self._buffers[s][i] = self._layer_step(layer, h, self._buffers[s][i], self.t)
            out = F.linear(h, stage.conv_out.weight[:, :, 0], stage.conv_out.bias)
        self.t += 1
        return out[0] if squeeze else out


def smoothing_loss(logits: Tensor, mask: Tensor | None = None, tau: float = 4.0) -> Tensor:
    """Truncated MSE between log-probabilities of neighbouring frames (MS-TCN's T-MSE, tau = 4).

    ``mean(clamp((log_softmax(p_t) - log_softmax(p_{t-1}).detach())^2, 0, tau^2))`` over classes and valid
    frame pairs; logits [B, K, T]. The previous frame is detached as in the original, so the term pulls frame
    t towards t-1 and never the past towards the future (it stays causal). Differs from the original only in
    the denominator: pairs touching padding are excluded from the mean instead of counted as zeros (identical
    for the batch of one unpadded video used here).
    """
    if logits.shape[-1] < 2:
        return logits.sum() * 0.0
    logp = F.log_softmax(logits, dim=1)
    diff2 = (logp[:, :, 1:] - logp[:, :, :-1].detach()) ** 2
    loss = torch.clamp(diff2, min=0.0, max=tau * tau)
    m = _as_mask(mask, logits)
    pair = (m[:, :, 1:] * m[:, :, :-1]).expand_as(loss)
    return (loss * pair).sum() / pair.sum().clamp_min(1.0)


def mstcn_loss(
    stage_logits: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    class_weights: Tensor | None = None,
    smooth_weight: float = 0.15,
    tau: float = 4.0,
) -> dict[str, Tensor]:
    """Sum over stages of cross-entropy + ``smooth_weight`` * truncated-MSE smoothing.

    ``stage_logits`` [S, B, K, T] are raw logits (cross-entropy applies log-softmax itself: no double softmax);
    ``target`` [B, T] phase indices; ``mask`` [B, T] marks real frames (padding and unlabelled frames are
    left out of the cross-entropy). Returns ``{"loss", "ce", "smooth"}`` (ce and smooth summed over stages).
    """
    valid = torch.ones_like(target, dtype=torch.bool) if mask is None else mask.bool()
    ce_total = stage_logits.new_zeros(())
    sm_total = stage_logits.new_zeros(())
    for logits in stage_logits:
        flat = logits.transpose(1, 2)[valid]  # [N, K]
        ce_total = ce_total + F.cross_entropy(flat.float(), target[valid], weight=class_weights)
        sm_total = sm_total + smoothing_loss(logits.float(), valid, tau)
    return {"loss": ce_total + smooth_weight * sm_total, "ce": ce_total, "smooth": sm_total}
