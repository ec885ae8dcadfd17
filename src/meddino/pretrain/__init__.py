"""The SSL engine: ``meddino pretrain`` (student/teacher, schedules, checkpoints, resume, DDP, monitor).

``run_pretrain(cfg)`` runs a validated :class:`PretrainConfig`; see docs/pretrain.md.
"""

from meddino.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "PretrainConfig": ".config",
        "run_pretrain": ".engine",
    },
)
