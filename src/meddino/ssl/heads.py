"""DINO / iBOT projection heads (DINOv1, v2 weight-normalised; DINOv3 plain Linear) and their factory.

Layout, as in the originals: MLP (Linear, [BatchNorm], GELU, ..., Linear) -> bottleneck -> L2-normalise ->
last layer to the K prototypes. MLP Linears get trunc-normal(std 0.02) weights and zero biases (torch's
default absolute bounds [-2, 2], so effectively a plain normal, exactly as the originals' call).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from meddino.errors import ConfigError

__all__ = ["DINOHead", "make_heads"]


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class DINOHead(nn.Module):
    """Projection head: MLP -> bottleneck -> L2 normalise -> prototypes.

    ``weight_norm_last_layer=True`` (v1/v2): the last layer is ``weight_norm(Linear(bottleneck, out,
    bias=False))`` (parametrizations API, g of shape [out, 1] initialised to 1); ``norm_last_layer=True``
    freezes g at 1 (``requires_grad=False``), v1's default, so each prototype is a unit vector. DINOv2
    has no such freezing: its g starts at 1 and is trained (with weight decay), so v2 heads are built
    with ``norm_last_layer=False`` (:func:`make_heads`' version default).
    ``weight_norm_last_layer=False`` (v3): a plain ``Linear`` without bias, trunc-normal(0.02) init.
    DINOv1 checkpoints store the old ``last_layer.weight_g`` / ``weight_v`` keys; torch's parametrization
    converts them on ``load_state_dict``. The parameters of the last layer are those whose name contains
    ``last_layer``
    (:meth:`last_layer_parameters`); the freeze-last-layer rule and the param groups rely on that name.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        weight_norm_last_layer: bool = True,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        nlayers = max(int(nlayers), 1)
        layers: list[nn.Module] = []
        if nlayers == 1:
            layers.append(nn.Linear(in_dim, bottleneck_dim))
        else:
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            for d_in, d_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(d_in, d_out))
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_linear)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.weight_norm_last_layer = weight_norm_last_layer
        if weight_norm_last_layer:
            # v1/v2 keep torch's default Linear init for the direction v and set the magnitude g to 1.
            last = weight_norm(last, name="weight", dim=0)
            g = last.parametrizations.weight.original0
            with torch.no_grad():
                g.fill_(1.0)
            g.requires_grad_(not norm_last_layer)
        else:
            _init_linear(last)
        self.last_layer = last
        self.in_dim, self.out_dim, self.bottleneck_dim = in_dim, out_dim, bottleneck_dim

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters of the prototype layer (frozen for the first epoch(s) by the recipes)."""
        return list(self.last_layer.parameters())

    def forward_bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """MLP + L2 normalisation (eps 1e-6 in fp16, else 1e-12, as DINOv2)."""
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return F.normalize(x, dim=-1, p=2, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.forward_bottleneck(x))


def make_heads(
    version: str | int,
    in_dim: int,
    out_dim: int = 65536,
    hidden_dim: int = 2048,
    bottleneck_dim: int = 256,
    nlayers: int = 3,
    use_bn: bool = False,
    norm_last_layer: bool | None = None,
    ibot_separate: bool | None = None,
    ibot_out_dim: int | None = None,
    ibot_hidden_dim: int | None = None,
    ibot_bottleneck_dim: int | None = None,
) -> tuple[DINOHead, DINOHead | None]:
    """(dino_head, ibot_head) for a recipe version.

    v1: no iBOT head (None). v2: the iBOT head IS the DINO head (same module) unless ``ibot_separate``
    is true (the LVD recipe). v3: always a separate iBOT head, plain-Linear last layers; asking for a
    shared head with v3 is a ConfigError, as the original asserts. ``ibot_*`` sizes default to the DINO
    ones and are only allowed with a separate head. ``norm_last_layer`` (frozen weight-norm g) defaults to
    the version's official behaviour: True for v1 (DINOv1's default), False for v2 (DINOv2 trains g);
    it has no effect on v3's plain-Linear last layer.
    """
    v = str(version).lower().removeprefix("v")
    if v not in {"1", "2", "3"}:
        raise ConfigError(f"version must be v1, v2 or v3, got {version!r}")
    weight_normed = v in {"1", "2"}
    if norm_last_layer is None:
        norm_last_layer = v == "1"
    ibot_sizes_given = any(s is not None for s in (ibot_out_dim, ibot_hidden_dim, ibot_bottleneck_dim))
    separate = (v == "3") if ibot_separate is None else bool(ibot_separate)
    if v == "1" and (ibot_separate or ibot_sizes_given):
        raise ConfigError("ibot head settings given for a v1 recipe (DINOv1 has no iBOT head)")
    if v == "3" and not separate:
        raise ConfigError("ibot.separate_head: DINOv3 always uses a separate iBOT head")
    if v == "2" and not separate and ibot_sizes_given:
        raise ConfigError("ibot head sizes given but the iBOT head is shared with the DINO head")
    dino = DINOHead(
        in_dim, out_dim, hidden_dim, bottleneck_dim, nlayers, use_bn,
        weight_norm_last_layer=weight_normed, norm_last_layer=norm_last_layer,
    )
    if v == "1":
        return dino, None
    if not separate:
        return dino, dino
    ibot = DINOHead(
        in_dim,
        ibot_out_dim or out_dim,
        ibot_hidden_dim or hidden_dim,
        ibot_bottleneck_dim or bottleneck_dim,
        nlayers,
        use_bn,
        weight_norm_last_layer=weight_normed,
        norm_last_layer=norm_last_layer,
    )
    return dino, ibot
