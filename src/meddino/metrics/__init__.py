"""Metrics with one documented definition each (see docs/metrics.md): pure functions, no I/O.

One argument order for every metric: the ground truth first, then the prediction (or scores),
``f(y_true, y_pred)`` as in scikit-learn -- ``macro_f1(y_true, y_pred)``, ``video_metrics(y_true, y_pred)``,
``auroc(y_true, y_score, task)``, ``dice(y_true, y_pred)``, ``per_class_seg_metrics(y_true, y_pred,
num_classes)``, ``foreground_dice(y_true, y_pred, num_classes, ignore_index)``. Several metrics are symmetric
in the two, but segmental F1@k (true and false positives), the ignored pixels and label checks of the
segmentation metrics are not, so the order matters.
"""

from meddino.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "accuracy": ".classification",
        "aggregate_by_patient": ".classification",
        "auroc": ".classification",
        "auroc_per_class": ".classification",
        "balanced_accuracy": ".classification",
        "classification_metrics": ".classification",
        "macro_f1": ".classification",
        "predict_labels": ".classification",
        "summarize_folds": ".classification",
        "aggregate_seg": ".segmentation",
        "dice": ".segmentation",
        "hd95": ".segmentation",
        "image_diagonal": ".segmentation",
        "jaccard": ".segmentation",
        "METRIC_POLICIES": ".segmentation",
        "metric_policy": ".segmentation",
        "per_class_seg_metrics": ".segmentation",
    },
)
