"""Verb of the profile layer: ``meddino profile --backbone CKPT [--recipe NAME] [head=...] [img_size=224]
[batch_size=1] [warmup=5] [repeats=50] [out=DIR] [recipe.KEY=VALUE ...]`` (see docs/profile.md)."""

from __future__ import annotations

from meddino.verbs import Arg, Verb

VERBS = (
    Verb(
        "profile",
        help="params, latency (median/p95) and FPS of a backbone with each task head; pretraining images/s "
        "and max batch",
        description="Inference: parameters, batch latency (median and p95 over repeated calls after warm-up) "
        "and FPS of the backbone alone and with each task head, on the current device. Pretraining "
        "(--recipe): images/s of the recipe's training step and, on CUDA, the largest batch that fits. "
        "Prints a table and writes OUT/profile.json, which `meddino report` picks up.",
        schema="meddino.profile.run:ProfileConfig",
        run="meddino.profile.commands:run",
        run_folder="out",
        config_key="recipe",  # --config names the pretraining recipe profiled (recipe.KEY=VALUE overrides it)
        args=(
            Arg("--backbone", "backbone", deprecated="backbone=SPEC",
                help="deprecated: use backbone=SPEC (a checkpoint path, random:<arch> or timm:<name>)"),
            Arg("--recipe", "recipe", deprecated="--config RECIPE", help="deprecated: use --config RECIPE"),
        ),
        prefixed=(("recipe.", "recipe_overrides"),),
        overrides_help="backbone=SPEC head=all|backbone|linear_seg|unet|eomt|phase[,..] img_size=224 batch_size=1 warmup=5 "
        "repeats=50 out=DIR device=auto precision=auto pretrain.steps=5 pretrain.max_batch=true "
        "recipe.model.arch=... (recipe overrides)",
    ),
)


def run(cfg) -> int:  # noqa: ANN001 - ProfileConfig, imported when the verb runs
    from meddino.profile.run import run_profile

    print(f"wrote {run_profile(cfg)}")
    return 0
