"""Profiling: parameters, batch-1 latency (median / p95) and FPS of a backbone with each task head, and
pretraining throughput and the largest batch that fits (``meddino profile``, see docs/profile.md).
"""

from meddino.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "ProfileConfig": ".run",
        "run_profile": ".run",
        "latency_stats": ".timing",
        "time_calls": ".timing",
    },
)
