"""Verbs of the phase task: ``meddino eval phase`` and ``meddino predict phase``."""

from __future__ import annotations

from meddino.verbs import Arg, Verb

VERBS = (
    Verb(
        "phase",
        group="eval",
        help="surgical phase recognition: frame classifier (stage 1) + causal MS-TCN (stage 2)",
        schema="meddino.tasks.phase.config:PhaseEvalConfig",
        run="meddino.tasks.phase.train:run_eval",
        recipes="phase",
        default_recipe="autolaparo",
        run_folder="out",
        rerun=True,  # a rerun reuses the stage-1 model and the cached features of its folder
    ),
    Verb(
        "phase",
        group="predict",
        help="online phase recognition of a video, frame by frame, with per-frame latency",
        schema="meddino.tasks.phase.config:PhasePredictConfig",
        run="meddino.tasks.phase.online:run_predict",
        recipes="phase",
        args=(
            Arg("video", "video", help="a video file or a folder of frames"),
            Arg("--model", "model", deprecated="model=RUN_DIR", metavar="RUN_DIR",
                help="deprecated: use model=RUN_DIR"),
        ),
        overrides_help="model=RUN_DIR (run folder of `meddino eval phase`), out=CSV, fps=..., device=...",
    ),
)
