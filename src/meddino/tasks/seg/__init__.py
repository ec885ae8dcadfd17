"""Segmentation evaluation (``meddino eval seg`` / ``meddino predict seg``).

Linear and U-Net decoders on a frozen or trainable encoder (seed 001), EoMT (seed 000), MONAI's U-Net and
timm CNN encoders as baselines, all through the same data layouts (:mod:`meddino.data.seg_layouts`, read by
:mod:`.data`; folds and seed 000's fixed test set in :mod:`.folds`; seed 001's few-shot draws in
:mod:`.fewshot`), head registry (:mod:`.heads`), training loop (:mod:`.train`) and metrics
(:mod:`meddino.metrics.segmentation`).
"""

from meddino.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "SegConfig": ".config",
        "SegPredictConfig": ".config",
        "SEG_HEADS": ".heads",
        "SegmentationModel": ".heads",
        "run_eval_seg": ".train",
        "run_fewshot_seg": ".fewshot",
        "run_predict_seg": ".predict",
    },
)
