"""Image-level classification: labelled manifests -> frozen (kNN, linear grid, few-shot) and trainable
(full / LoRA / BitFit fine-tuning) protocols with uniform predictions and results files.
"""

from meddino.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "ClassifyConfig": ".config",
        "run_embed": ".common",
        "run_knn": ".frozen",
        "run_linear": ".frozen",
        "run_fewshot": ".frozen",
        "run_finetune": ".finetune",
    },
)
