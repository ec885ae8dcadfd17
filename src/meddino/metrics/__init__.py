"""Metrics with one documented definition each (see docs/metrics.md): pure numpy functions, no I/O."""

from meddino.metrics.classification import (
    accuracy,
    aggregate_by_patient,
    auroc,
    auroc_per_class,
    balanced_accuracy,
    classification_metrics,
    macro_f1,
    predict_labels,
    summarize_folds,
)
from meddino.metrics.segmentation import (
    aggregate_seg,
    dice,
    hd95,
    image_diagonal,
    jaccard,
    per_class_seg_metrics,
)

__all__ = [
    "accuracy",
    "aggregate_by_patient",
    "aggregate_seg",
    "auroc",
    "auroc_per_class",
    "balanced_accuracy",
    "classification_metrics",
    "dice",
    "hd95",
    "image_diagonal",
    "jaccard",
    "macro_f1",
    "per_class_seg_metrics",
    "predict_labels",
    "summarize_folds",
]
