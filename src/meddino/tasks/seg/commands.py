"""``meddino eval seg`` and ``meddino predict seg``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    from meddino.cli import add_config_command

    add_config_command(
        groups["eval"],
        "seg",
        help="segmentation: linear / U-Net decoders or EoMT on a backbone, patient-level CV, Dice/Jaccard/HD95",
        schema="meddino.tasks.seg.config:SegConfig",
        run="meddino.tasks.seg.train:run_eval_seg",
        recipe_group="seg",
    )
    p = groups["predict"].add_parser(
        "seg",
        help="segment images, a folder or a volume with a model trained by `meddino eval seg`",
        description="Write masks (PNG for images, NIfTI/NRRD/MHA for volumes with the input's geometry) and "
        "colour overlays. Options as key=value: out=DIR fold=K device=cpu batch_size=8 overlay_alpha=0.5.",
    )
    p.add_argument("--model", required=True, help="run folder of `meddino eval seg` (or its model/ folder)")
    p.add_argument("input", help="image file, folder of images/volumes, or a volume")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="out=DIR, fold=K, device=..., window=...")
    p.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    from meddino.config import parse_overrides, validate
    from meddino.tasks.seg.config import SegPredictConfig
    from meddino.tasks.seg.predict import run_predict_seg

    data = parse_overrides(list(args.overrides))
    data["model"], data["input"] = args.model, args.input  # paths stay strings (no YAML parsing)
    return run_predict_seg(validate(SegPredictConfig, data, "predict seg"))
