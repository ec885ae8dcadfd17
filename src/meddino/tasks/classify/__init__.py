"""Image-level classification: labelled manifests -> frozen (kNN, linear grid, few-shot) and trainable
(full / LoRA / BitFit fine-tuning) protocols with uniform predictions and results files.

Light on purpose: the CLI imports this package to register its verbs; the heavy modules load when a verb runs.
"""
