"""Reporting: run collection (:mod:`.collect`), bootstrap intervals and rank stability (:mod:`.stats`),
figures, and one self-contained HTML page (:mod:`.build`, ``meddino report``, see docs/report.md).
"""

from meddino.lazy import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "ReportConfig": ".model",
        "run_report": ".build",
        "collect": ".collect",
        "bootstrap_ci": ".stats",
        "bootstrap_ranks": ".stats",
        "paired_difference_ci": ".stats",
    },
)
