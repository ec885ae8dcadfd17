"""The SSL engine: ``meddino pretrain`` (student/teacher, schedules, checkpoints, resume, DDP, monitor).

``run_pretrain(cfg)`` runs a validated :class:`PretrainConfig`; see docs/pretrain.md.
"""

from meddino.pretrain.config import PretrainConfig

__all__ = ["PretrainConfig", "run_pretrain"]


def run_pretrain(cfg: PretrainConfig) -> int:
    from meddino.pretrain.engine import run_pretrain as _run

    return _run(cfg)
