"""SSL objectives of DINOv1/v2/v3 as pure functions and small modules.

Centering (EMA centre, Sinkhorn-Knopp), the DINO / iBOT / KoLeo / Gram losses, iBOT block masking,
projection heads, the EMA teacher update, schedules, parameter groups and gradient clipping. Every
function that computes takes tensors and returns tensors; distributed reductions go through
:mod:`meddino.ssl.dist` and are the identity in a single process.
"""

from meddino.ssl.centering import sinkhorn_knopp, softmax_center, update_center
from meddino.ssl.dist import all_reduce_max, all_reduce_sum, is_distributed, rank, world_size
from meddino.ssl.ema import ema_update_
from meddino.ssl.heads import DINOHead, make_heads
from meddino.ssl.losses import dino_loss, gram_loss, ibot_loss, ibot_patch_weights, koleo_loss
from meddino.ssl.masking import BlockMaskGenerator, block_masks
from meddino.ssl.optim import cancel_last_layer_gradients, clip_gradients, layer_id, param_groups
from meddino.ssl.schedules import Schedule, cosine_schedule, linear_warmup_then_constant, scaled_lr

__all__ = [
    "BlockMaskGenerator",
    "DINOHead",
    "Schedule",
    "all_reduce_max",
    "all_reduce_sum",
    "block_masks",
    "cancel_last_layer_gradients",
    "clip_gradients",
    "cosine_schedule",
    "dino_loss",
    "ema_update_",
    "gram_loss",
    "ibot_loss",
    "ibot_patch_weights",
    "is_distributed",
    "koleo_loss",
    "layer_id",
    "linear_warmup_then_constant",
    "make_heads",
    "param_groups",
    "rank",
    "scaled_lr",
    "sinkhorn_knopp",
    "softmax_center",
    "update_center",
    "world_size",
]
