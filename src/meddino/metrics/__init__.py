"""Metrics with one documented definition each (see docs/metrics.md): pure functions, no I/O.

One argument order for every metric: the ground truth first, then the prediction (or scores),
``f(y_true, y_pred)`` as in scikit-learn -- ``macro_f1(y_true, y_pred)``, ``video_metrics(y_true, y_pred)``,
``auroc(y_true, y_score, task)``, ``dice(y_true, y_pred)``, ``per_class_seg_metrics(y_true, y_pred,
num_classes)``, ``foreground_dice(y_true, y_pred, num_classes, ignore_index)``. Several metrics are symmetric
in the two, but segmental F1@k (true and false positives), the ignored pixels and label checks of the
segmentation metrics are not, so the order matters.
"""

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
