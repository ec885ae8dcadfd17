"""Verb of the pretraining layer: ``meddino pretrain --config RECIPE data.path=PATH [init=CKPT] out=DIR
[resume=auto] ...``. A diverged loss is a :class:`~meddino.errors.UserError` like any other refusal."""

from __future__ import annotations

from meddino.verbs import Verb

VERBS = (
    Verb(
        "pretrain",
        help="continue (or start) DINOv1/v2/v3 self-supervised pretraining on your images",
        schema="meddino.pretrain.config:PretrainConfig",
        run="meddino.pretrain.commands:run",
        recipes="pretrain",
        default_recipe="dinov2_vits14",
    ),
)


def run(cfg) -> int:  # noqa: ANN001 - PretrainConfig, imported when the verb runs
    """Run the engine; a diverged loss is reported in one line with exit code 2 (not a traceback)."""
    import sys

    from meddino.pretrain.engine import TrainingDiverged, run_pretrain

    try:
        return run_pretrain(cfg)
    except TrainingDiverged as exc:
        print(f"meddino: error: {exc}", file=sys.stderr)
        return 2
