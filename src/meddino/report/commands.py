"""``meddino report RUNS_DIR [out=DIR] [bootstrap.samples=N] [bootstrap.seed=S]`` (see docs/report.md)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, groups: dict) -> None:
    p = sub.add_parser(
        "report",
        help="tables, bootstrap ranks, curves and PCA panels of every run below a folder, as one HTML page",
        description="Walk RUNS_DIR, read every evaluation (results.json + predictions/), pretraining "
        "(metrics.jsonl), viz and profile run, and write OUT/report.html (self-contained), OUT/tables/*.csv "
        "and OUT/figures/*.png. OUT defaults to RUNS_DIR/report.",
    )
    p.add_argument("runs", metavar="RUNS_DIR", help="folder holding run folders (searched recursively)")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                   help="out=DIR bootstrap.samples=1000 bootstrap.seed=0 bootstrap.alpha=0.05 title=TEXT "
                   "compare=[MODEL_A, MODEL_B] (opens the summary with one sentence on A against B) p_better=0.95")
    p.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    from meddino.config import load_config
    from meddino.report.build import ReportConfig, run_report

    cfg = load_config(ReportConfig, None, list(args.overrides))
    cfg.runs = str(args.runs)
    path = run_report(cfg)
    print(path)
    return 0
