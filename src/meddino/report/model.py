"""The report's plain data: its config, the per-group bootstrap result and the :class:`Report` being built.

Its own module so that :mod:`meddino.report.build` (which fills a :class:`Report`) and
:mod:`meddino.report.html` (which renders one) both import it, and neither imports the other back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import Field

from meddino.config import Schema
from meddino.report.collect import Collection, EvalRun
from meddino.tracking import LogConfig

UNIT_KIND = {"segmentation": "patient", "phase": "video", "classification": "patient"}


class BootstrapConfig(Schema):
    samples: int = Field(1000, ge=0, description="bootstrap resamples (0 = no bootstrap)")
    seed: int = 0
    alpha: float = Field(0.05, gt=0, lt=1, description="1 - coverage of the intervals")


class RankMetricsConfig(Schema):
    """The metrics pooled into each task's rank distribution. By default the seeds' own (seed 000: Dice and
    HD95, accuracy and macro F1; seeds 001/002: AUROC): Jaccard is a monotone function of Dice per image,
    so ranking on Dice, Jaccard and HD95 counts overlap twice and boundary error once."""

    segmentation: list[str] = Field(default_factory=lambda: ["dice", "hd95"], min_length=1)
    phase: list[str] = Field(default_factory=lambda: ["accuracy", "macro_f1"], min_length=1)
    classification: list[str] = Field(default_factory=lambda: ["auroc"], min_length=1)


class ReportConfig(Schema):
    runs: str = ""
    out: str | None = None  # default RUNS/report
    title: str = "meddino report"
    bootstrap: BootstrapConfig = BootstrapConfig()
    rank_metrics: RankMetricsConfig = RankMetricsConfig()
    # two model names (A, B): the summary opens with one sentence on A against B (e.g. continued vs its start)
    compare: tuple[str, str] | None = None
    p_better: float = Field(0.95, gt=0.5, lt=1)  # P(A better) that counts as a clear gain in that sentence
    log: LogConfig = LogConfig()


@dataclass
class GroupBootstrap:
    """All models of one (task, dataset, setting) scored on the same resamples; the setting is the protocol
    and encoder mode of the entry labels ("linear", "knn, frozen"; "" when a task has one), so that models
    are compared and ranked only with models evaluated the same way."""

    task: str
    dataset: str
    units: list[str]
    models: list[str]
    metrics: list[str]
    point: dict[str, dict[str, float]]  # model -> metric -> value on all units
    samples: dict[str, dict[str, np.ndarray]]  # model -> metric -> [n_samples]
    notes: list[str] = field(default_factory=list)
    setting: str = ""


@dataclass
class Report:
    cfg: ReportConfig
    col: Collection
    labels: dict[int, str] = field(default_factory=dict)  # id(run) -> entry label
    entries: dict[tuple[str, str, str], EvalRun] = field(default_factory=dict)  # (task, dataset, label)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # csv name -> rows
    groups: list[GroupBootstrap] = field(default_factory=list)
    ranks: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # task -> bootstrap_ranks
    rank_keys: dict[str, list[str]] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)  # name -> PNG
    notes: list[str] = field(default_factory=list)
    headline: str | None = None  # the compare= sentence


__all__ = ["UNIT_KIND", "BootstrapConfig", "GroupBootstrap", "RankMetricsConfig", "Report", "ReportConfig"]
