"""``meddino data extract-frames VIDEO_OR_DIR out=DIR fps=N``: frames from videos at N fps.

Registered into the shared ``data`` group of the CLI. Nothing heavy is imported here: the schema
(:class:`meddino.data.video.ExtractFramesConfig`) and the runner are imported only when the verb runs, so
``meddino --help`` stays fast.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    from meddino.cli import add_config_command

    add_config_command(
        groups["data"],
        "extract-frames",
        help="write frames of a video (or of every video in a folder) at N fps, plus a frames.csv manifest",
        schema="meddino.data.video:ExtractFramesConfig",
        run="meddino.data.video:run_extract_frames",
        recipe_group="data",
        positional=[("video", "video")],
    )
