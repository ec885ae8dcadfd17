"""SSL objectives of DINOv1/v2/v3 as pure functions and small modules.

Centering (EMA centre, Sinkhorn-Knopp), the DINO / iBOT / KoLeo / Gram losses, iBOT block masking,
projection heads, the EMA teacher update, schedules, parameter groups and gradient clipping. Every
function that computes takes tensors and returns tensors; distributed reductions go through
:mod:`meddino.ssl.dist` and are the identity in a single process.
"""

from meddino.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "sinkhorn_knopp": ".centering",
        "softmax_center": ".centering",
        "update_center": ".centering",
        "all_reduce_max": ".dist",
        "all_reduce_sum": ".dist",
        "is_distributed": ".dist",
        "rank": ".dist",
        "world_size": ".dist",
        "ema_update_": ".ema",
        "DINOHead": ".heads",
        "make_heads": ".heads",
        "dino_loss": ".losses",
        "gram_loss": ".losses",
        "ibot_loss": ".losses",
        "ibot_patch_weights": ".losses",
        "koleo_loss": ".losses",
        "BlockMaskGenerator": ".masking",
        "block_masks": ".masking",
        "cancel_last_layer_gradients": ".optim",
        "clip_gradients": ".optim",
        "layer_id": ".optim",
        "param_groups": ".optim",
        "Schedule": ".schedules",
        "cosine_schedule": ".schedules",
        "linear_warmup_then_constant": ".schedules",
        "scaled_lr": ".schedules",
    },
)
