"""Verbs of the data layer: ``meddino data extract-frames VIDEO_OR_DIR out=DIR fps=N`` and
``meddino data index PATH [out=INDEX]``.

Declarations only (:mod:`meddino.verbs`); the schema (:class:`meddino.data.video.ExtractFramesConfig`) and
the runner are imported when the verb runs.
"""

from __future__ import annotations

from meddino.verbs import Arg, Verb

VERBS = (
    Verb(
        "extract-frames",
        group="data",
        help="write frames of a video (or of every video in a folder) at N fps, plus a frames.csv manifest",
        schema="meddino.data.video:ExtractFramesConfig",
        run="meddino.data.video:run_extract_frames",
        recipes="data",
        run_folder="out",
        args=(Arg("video", "video", help="a video file, or a folder searched recursively for videos"),),
    ),
    Verb(
        "index",
        group="data",
        help="build the pretraining sample index of a folder or manifest once (PATH.mdidx); "
             "meddino pretrain memory-maps it",
        schema="meddino.data.index:IndexConfig",
        run="meddino.data.index:run_index",
        args=(Arg("path", "path", help="a folder (searched recursively), a CSV manifest (column image) or one file"),),
    ),
)
