"""CLI verbs of the phase task: ``meddino eval phase`` and ``meddino predict phase``."""

from __future__ import annotations

import argparse

from meddino.cli import add_config_command


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    add_config_command(
        groups["eval"],
        "phase",
        help="surgical phase recognition: frame classifier (stage 1) + causal MS-TCN (stage 2)",
        schema="meddino.tasks.phase.config:PhaseEvalConfig",
        run="meddino.tasks.phase.train:run_eval",
        recipe_group="phase",
        default_recipe="autolaparo",
    )
    parser = add_config_command(
        groups["predict"],
        "phase",
        help="online phase recognition of a video, frame by frame, with per-frame latency",
        schema="meddino.tasks.phase.config:PhasePredictConfig",
        run="meddino.tasks.phase.online:run_predict",
        recipe_group="phase",
        positional=[("video", "video")],
    )
    parser.add_argument("--model", required=True, metavar="RUN_DIR", help="run folder of `meddino eval phase`")
    handler = parser.get_default("handler")

    def with_model(args: argparse.Namespace) -> int | None:
        args.overrides = [*args.overrides, f"model={args.model}"]
        return handler(args)

    parser.set_defaults(handler=with_model)
