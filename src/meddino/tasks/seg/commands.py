"""Verbs of the segmentation task: ``meddino eval seg`` and ``meddino predict seg``."""

from __future__ import annotations

from meddino.verbs import Arg, Verb

VERBS = (
    Verb(
        "seg",
        group="eval",
        help="segmentation: linear / U-Net decoders or EoMT on a backbone, patient-level CV, Dice/Jaccard/HD95",
        schema="meddino.tasks.seg.config:SegConfig",
        run="meddino.tasks.seg.train:run_eval_seg",
        recipes="seg",
        run_folder="out",
    ),
    Verb(
        "seg",
        group="predict",
        help="segment images, a folder or a volume with a model trained by `meddino eval seg`",
        description="Write masks (PNG for images, NIfTI/NRRD/MHA for volumes with the input's geometry) and "
        "colour overlays. Options as key=value: model=RUN_DIR out=DIR fold=K device=cpu batch_size=8 "
        "overlay_alpha=0.5.",
        schema="meddino.tasks.seg.config:SegPredictConfig",
        run="meddino.tasks.seg.predict:run_predict_seg",
        source="predict seg",
        run_folder="out",
        args=(
            Arg("input", "input", help="image file, folder of images/volumes, or a volume"),
            Arg("--model", "model", deprecated="model=RUN_DIR", help="deprecated: use model=RUN_DIR"),
        ),
        overrides_help="model=RUN_DIR (run folder of `meddino eval seg`, or its model/ folder), out=DIR, fold=K, "
        "device=..., window=...",
    ),
)
