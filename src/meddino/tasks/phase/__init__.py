"""Surgical phase recognition: frame classifier + causal MS-TCN (seed 000's protocol), online inference."""

from meddino.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "PhaseEvalConfig": ".config",
        "PhasePredictConfig": ".config",
        "run_eval": ".train",
        "run_predict": ".online",
        "MSTCN": ".mstcn",
        "OnlineMSTCN": ".mstcn",
        "PhasePredictor": ".online",
    },
)
