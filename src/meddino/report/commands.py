"""Verb of the report layer: ``meddino report RUNS_DIR [out=DIR] [bootstrap.samples=N] ...``
(see docs/report.md)."""

from __future__ import annotations

from meddino.verbs import Arg, Verb

VERBS = (
    Verb(
        "report",
        help="tables, bootstrap ranks, curves and PCA panels of every run below a folder, as one HTML page",
        description="Walk RUNS_DIR, read every evaluation (results.json + predictions/), pretraining "
        "(metrics.jsonl), viz and profile run, and write OUT/report.html (self-contained), OUT/tables/*.csv "
        "and OUT/figures/*.png. OUT defaults to RUNS_DIR/report.",
        schema="meddino.report.model:ReportConfig",
        run="meddino.report.commands:run",
        run_folder="out",
        rerun=True,  # a report is refreshed in place as runs are added
        args=(Arg("runs", "runs", metavar="RUNS_DIR", help="folder holding run folders (searched recursively)"),),
        overrides_help="out=DIR bootstrap.samples=1000 bootstrap.seed=0 bootstrap.alpha=0.05 title=TEXT "
        "compare=[MODEL_A, MODEL_B] (opens the summary with one sentence on A against B) p_better=0.95 "
        "rank_metrics.segmentation=[dice,hd95] rank_metrics.phase=[accuracy,macro_f1] "
        "rank_metrics.classification=[auroc] (the metrics pooled into the rank figure)",
    ),
)


def run(cfg) -> int:  # noqa: ANN001 - ReportConfig, imported when the verb runs
    from meddino.report.build import run_report

    print(run_report(cfg))
    return 0
