"""``meddino profile --backbone CKPT [--recipe NAME] [head=...] [img_size=224] [batch_size=1] [warmup=5]
[repeats=50] [out=DIR] [recipe.KEY=VALUE ...]`` (see docs/profile.md)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    p = sub.add_parser(
        "profile",
        help="params, latency (median/p95) and FPS of a backbone with each task head; pretraining images/s "
        "and max batch",
        description="Inference: parameters, batch latency (median and p95 over repeated calls after warm-up) "
        "and FPS of the backbone alone and with each task head, on the current device. Pretraining "
        "(--recipe): images/s of the recipe's training step and, on CUDA, the largest batch that fits. "
        "Prints a table and writes OUT/profile.json, which `meddino report` picks up.",
    )
    p.add_argument("--backbone", help="backbone spec: checkpoint path, random:<arch> or timm:<name>")
    p.add_argument("--recipe", help="pretraining recipe name or YAML to profile (recipe.KEY=VALUE overrides it)")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                   help="head=all|backbone|linear_seg|unet|eomt|phase[,..] img_size=224 batch_size=1 warmup=5 "
                   "repeats=50 out=DIR device=auto precision=auto pretrain.steps=5 pretrain.max_batch=true "
                   "recipe.model.arch=... (recipe overrides)")
    p.set_defaults(handler=_profile)


def _profile(args: argparse.Namespace) -> int:
    from meddino.config import load_config
    from meddino.profile.run import ProfileConfig, run_profile

    own = [o for o in args.overrides if not o.startswith("recipe.")]
    recipe = [o.removeprefix("recipe.") for o in args.overrides if o.startswith("recipe.")]
    cfg = load_config(ProfileConfig, None, own)
    cfg.backbone = args.backbone
    cfg.recipe = args.recipe
    cfg.recipe_overrides = recipe
    path = run_profile(cfg)
    print(f"wrote {path}")
    return 0
