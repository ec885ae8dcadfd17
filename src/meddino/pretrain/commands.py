"""Verb of the pretraining layer: ``meddino pretrain --config RECIPE data.path=PATH [init=CKPT] out=DIR
[resume=auto] ...``. A diverged loss is a :class:`~meddino.errors.UserError` like any other refusal."""

from __future__ import annotations

from meddino.verbs import Verb

VERBS = (
    Verb(
        "pretrain",
        help="continue (or start) DINOv1/v2/v3 self-supervised pretraining on your images",
        schema="meddino.pretrain.config:PretrainConfig",
        run="meddino.pretrain.engine:run_pretrain",
        recipes="pretrain",
        default_recipe="dinov2_vits14",
        run_folder="out",
        rerun="resume",
    ),
)

