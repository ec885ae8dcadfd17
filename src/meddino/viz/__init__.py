"""Feature visualisation: PCA maps of patch features and CLS attention maps (``meddino viz pca``)."""

from meddino.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "VizConfig": ".run",
        "run_pca": ".run",
        "fit_pca": ".pca",
        "pca_rgb": ".pca",
        "cls_attention_maps": ".pca",
        "wrap_label": ".labels",
    },
)
