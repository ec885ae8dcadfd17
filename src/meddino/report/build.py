"""``meddino report``: runs -> tables, bootstrap intervals, rank stability, paired differences, figures, HTML.

What is computed, and how it follows seed 000 (see docs/report.md):

- **Tables**: the mean +/- std every run wrote in its results.json, at the level its protocol defines
  (patients for segmentation, videos for phase, patients / images over folds for classification).
- **Bootstrap** per (task, dataset): the units (patients, or videos for phase) common to all models are
  resampled with replacement ``bootstrap.samples`` times with one fixed seed
  (:func:`meddino.report.stats.bootstrap_indices`), so all models are scored on the SAME resamples (paired).
  Each metric is recomputed per model on every resample from the pooled predictions: segmentation from the
  per-image-class rows aggregated per patient (classes averaged per patient; a resample's value is the mean
  over the drawn patients, a patient drawn twice counting twice), classification from the scores of the drawn
  patients' rows (AUROC etc. via :mod:`meddino.metrics.classification`; per-patient mean scores when the run
  reports patient level), phase from per-video metrics. 95 % percentile intervals.
- **Ranks**: all models are ranked on every resample for every (metric, dataset) of a task, the ranks are
  pooled (:func:`meddino.report.stats.bootstrap_ranks`) and drawn as seed 000's figure. The metrics pooled
  are ``rank_metrics.<task>`` (default the seeds' own: Dice and HD95, accuracy and macro F1, AUROC).
  Segmentation runs scored under different metric policies (``metric_policy`` in results.json) are refused
  together: their numbers are not comparable.
- **Paired differences** for every pair of models: the difference on each shared resample gives an interval
  and P(A better than B).
- **Metric vs pretraining iteration**, **frozen vs trainable** box plots, **training curves**, viz panels and
  the **profiling** table.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from meddino.errors import ConfigError, DataError, UserError
from meddino.report import stats
from meddino.report.collect import EvalRun, collect, higher_is_better, read_run_config
from meddino.report.figures import curve_panels, curves_figure, encoder_boxplot, iteration_figure, rank_figure
from meddino.report.html import render
from meddino.report.model import UNIT_KIND, BootstrapConfig, GroupBootstrap, Report, ReportConfig
from meddino.report.predictions import ClassificationRows, UnitValues, load_predictions
from meddino.runlog import RunDir, atomic_write


# ------------------------------------------------------------------------------------------ pure helpers
def bootstrap_group(task: str, dataset: str, data: dict[str, UnitValues | ClassificationRows],
                    n_samples: int, seed: int) -> GroupBootstrap:
    """Score every model of ``data`` on the shared unit resamples (see the module docstring)."""
    notes = []
    unit_sets = {m: d.units() for m, d in data.items()}
    common = set.intersection(*unit_sets.values())
    if any(s != common for s in unit_sets.values()):
        notes.append(f"models were evaluated on different {UNIT_KIND[task]}s; the bootstrap uses the "
                     f"{len(common)} they share")
    units = sorted(common)
    if len(units) < 2:
        raise DataError(f"{task}/{dataset}: fewer than 2 shared {UNIT_KIND[task]}s to resample")
    for d in data.values():
        d.prepare(units)
    all_units = np.arange(len(units))
    draws = stats.bootstrap_indices(all_units, n_samples, seed)
    point = {m: d.scores(all_units) for m, d in data.items()}
    metrics = sorted(set.intersection(*(set(p) for p in point.values())))
    samples: dict[str, dict[str, np.ndarray]] = {}
    for m, d in data.items():
        rows = [d.scores(idx) for idx in draws]
        samples[m] = {k: np.array([r.get(k, np.nan) for r in rows]) for k in metrics}
    return GroupBootstrap(task, dataset, units, list(data), metrics, point, samples, notes)


# ------------------------------------------------------------------------------------------- the report
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.10g}"
    return "" if v is None else str(v)


def entry_labels(evals: list[EvalRun]) -> dict[int, str]:
    """A label per run that tells its models apart within a task: the model name, plus the protocol and
    the encoder mode when those vary inside the task."""
    out = {}
    for task in {r.task for r in evals}:
        runs = [r for r in evals if r.task == task]
        vary_protocol = len({r.protocol for r in runs}) > 1
        vary_encoder = len({r.encoder for r in runs}) > 1
        for r in runs:
            extra = [x for x, on in ((r.protocol, vary_protocol), (r.encoder or "?", vary_encoder)) if on]
            out[id(r)] = r.name + (f" [{', '.join(extra)}]" if extra else "")
    return out


def split_label(label: str) -> tuple[str, str]:
    """An entry label ("name [protocol, encoder]") -> (model name, the bracket's text or "")."""
    name, sep, rest = label.partition(" [")
    return (name, rest.rstrip("]")) if sep else (label, "")


def compare_sentence(paired: list[dict[str, Any]], a: str, b: str, p_better: float = 0.95) -> str | None:
    """One sentence on model ``a`` against model ``b`` over every paired-bootstrap row that compares the
    two within one protocol: how many comparisons ``a`` wins with P(a better) >= ``p_better``, how many
    ``b`` wins that clearly, and each comparison's difference and P. None when no row pairs them."""
    parts, wins, losses = [], 0, 0
    for r in paired:
        (na, pa), (nb, pb) = split_label(r["model_a"]), split_label(r["model_b"])
        if pa != pb or {na, nb} != {a, b}:
            continue
        sign = 1.0 if na == a else -1.0  # rows store the better point first; turn them into a - b
        diff = sign * r["diff"]
        p_a = r["frac_a_better"] if na == a else 1.0 - r["frac_a_better"] - r["frac_tie"]
        wins += p_a >= p_better
        losses += (1.0 - p_a - r["frac_tie"]) >= p_better
        where = (f"{r['task']} {r['metric']}" + ("" if higher_is_better(r["metric"]) else " (lower is better)")
                 + (f" [{pa}]" if pa else ""))
        parts.append(f"{where} {diff:+.3f} (P={p_a:.2f})")
    if not parts:
        return None
    verdict = (f"{a} beats {b} with P(better) >= {p_better:g} in {wins} of {len(parts)} comparisons"
               + (f" and loses as clearly in {losses}" if losses else ""))
    return f"{verdict}: " + "; ".join(parts) + "."


def _headline(rep: Report) -> None:
    if rep.cfg.compare is None:
        return
    a, b = rep.cfg.compare
    rows = [r for name, rs in sorted(rep.tables.items()) if name.endswith("_paired") for r in rs]
    rep.headline = compare_sentence(rows, a, b, rep.cfg.p_better)
    if rep.headline is None:
        rep.notes.append(f"compare: no paired comparison of '{a}' and '{b}' (model names: "
                         f"{', '.join(sorted({split_label(l)[0] for (_t, _d, l) in rep.entries}))})")


def _select_entries(rep: Report) -> None:
    """One run per (task, dataset, label): the newest, with a warning for the older duplicates."""
    rep.labels = entry_labels(rep.col.evals)
    for r in sorted(rep.col.evals, key=lambda r: r.mtime):
        key = (r.task, r.dataset, rep.labels[id(r)])
        if key in rep.entries:
            rep.col.warn(rep.entries[key].path, f"older duplicate of {key[2]} on {key[1]} ({r.path} is used)")
        rep.entries[key] = r


def check_metric_policies(runs: list[EvalRun]) -> str | None:
    """The one metric policy of the segmentation runs (None without any); refuses (one line naming two runs
    and their policies) runs scored under different ones: the tables, bootstrap and ranks would compare
    numbers of different definitions."""
    seg = sorted((r for r in runs if r.task == "segmentation"), key=lambda r: str(r.path))
    for r in seg[1:]:
        if r.metric_policy != seg[0].metric_policy:
            raise DataError(f"cannot rank segmentation runs scored under different metric policies: {seg[0].path} "
                            f"(metric_policy {seg[0].metric_policy}) and {r.path} (metric_policy "
                            f"{r.metric_policy}); rerun one with metrics.policy=... or report them separately")
    return seg[0].metric_policy if seg else None


def check_rank_metrics(cfg: ReportConfig, runs: list[EvalRun]) -> None:
    """``rank_metrics.<task>`` may list only metrics the task's runs report: a typo is a ConfigError naming
    the key and the metrics there are (checked before any bootstrap, so also with ``bootstrap.samples=0``)."""
    for task in sorted({r.task for r in runs}):
        have = sorted(set().union(*(r.metrics for r in runs if r.task == task)))
        unknown = [k for k in getattr(cfg.rank_metrics, task) if k not in have]
        if unknown:
            raise ConfigError(f"rank_metrics.{task}: {', '.join(map(repr, unknown))} is not a metric of the "
                              f"{task} runs (they have: {', '.join(have)})")


def _rank_keys(rep: Report, task: str, groups: list[GroupBootstrap]) -> list[tuple[str, GroupBootstrap]]:
    """(metric, group) pairs ranked for ``task``: ``rank_metrics.<task>`` in its order, each on every group
    whose bootstrap has it."""
    return [(k, g) for k in getattr(rep.cfg.rank_metrics, task) for g in groups if k in g.metrics]


def _summary_tables(rep: Report) -> None:
    for (task, dataset, label), r in sorted(rep.entries.items()):
        for metric, v in r.metrics.items():
            rep.tables.setdefault(f"{task}", []).append({
                "task": task, "dataset": dataset, "model": label, "protocol": r.protocol,
                "encoder": r.encoder or "", "level": r.level, "metric": metric, "mean": v["mean"],
                "std": v["std"], "n": v.get("n") if v.get("n") is not None else len(v.get("values", [])) or "",
                "iteration": "" if r.iteration is None else r.iteration, "run": str(r.path)})


def _bootstrap(rep: Report) -> None:
    b = rep.cfg.bootstrap
    if b.samples == 0:
        rep.notes.append("bootstrap disabled (bootstrap.samples=0)")
        return
    # models are paired and ranked only within one protocol / encoder mode (kNN runs never against linear ones)
    by_group: dict[tuple[str, str, str], dict[str, EvalRun]] = {}
    for (task, dataset, label), r in rep.entries.items():
        by_group.setdefault((task, dataset, split_label(label)[1]), {})[label] = r
    for (task, dataset, setting), runs in sorted(by_group.items()):
        where = f"{task}/{dataset}" + (f" [{setting}]" if setting else "")
        data = {}
        for label, r in sorted(runs.items()):
            try:
                d = load_predictions(r)
                units = sorted(d.units())
                d.prepare(units)
                d.scores(np.arange(len(units)))  # fails here, for this model only, on unusable scores
                data[label] = d
            except (ValueError, KeyError, IndexError, TypeError, csv.Error, UserError, OSError) as exc:
                rep.col.warn(r.path, f"predictions not usable, left out of the bootstrap: {exc}")
        if not data:
            continue
        try:
            g = bootstrap_group(task, dataset, data, b.samples, b.seed)
        except UserError as exc:
            rep.notes.append(f"no bootstrap for {where}: {exc}")
            continue
        g.setting = setting
        rep.groups.append(g)
        rep.notes += [f"{where}: {n}" for n in g.notes]
        point_ranks = {k: stats.rank_models({m: g.point[m][k] for m in g.models}, higher_is_better(k))
                       for k in g.metrics}
        for m in g.models:
            for k in g.metrics:
                lo, hi, n_nan = stats.percentile_interval(g.samples[m][k], b.alpha)
                rep.tables.setdefault(f"{task}_bootstrap", []).append({
                    "task": task, "dataset": dataset, "setting": setting, "model": m, "metric": k, "point": g.point[m][k],
                    "lower": lo, "upper": hi, "rank": point_ranks[k][m], "units": len(g.units),
                    "unit": UNIT_KIND[task], "samples": b.samples, "seed": b.seed, "n_nan": n_nan})
        for ma, mb in itertools.combinations(g.models, 2):
            for k in g.metrics:
                hib = higher_is_better(k)
                pa, pb = g.point[ma][k], g.point[mb][k]
                a, bb = (ma, mb) if (pa >= pb) == hib or math.isnan(pb) else (mb, ma)  # A = the better point
                res = stats.paired_from_samples(g.samples[a][k], g.samples[bb][k], g.point[a][k],
                                                g.point[bb][k], hib, b.alpha)
                rep.tables.setdefault(f"{task}_paired", []).append({
                    "task": task, "dataset": dataset, "setting": setting, "metric": k, "model_a": a, "model_b": bb, **res})


def rank_key(task: str, setting: str) -> str:
    """The key of one ranking in ``Report.ranks``: the task, plus the protocol / encoder setting if any."""
    return task + (f" [{setting}]" if setting else "")


def _ranks(rep: Report) -> None:
    """One ranking per (task, setting), pooled over its datasets and ``rank_metrics.<task>``."""
    for task, setting in sorted({(g.task, g.setting) for g in rep.groups}):
        key = rank_key(task, setting)
        groups = [g for g in rep.groups if g.task == task and g.setting == setting]
        common = set.intersection(*(set(g.models) for g in groups))
        if len(common) < 2:  # rank within the largest dataset rather than nothing
            groups = [max(groups, key=lambda g: len(g.models))]
            common = set(groups[0].models)
            if len(common) < 2:
                continue
            rep.notes.append(f"{key}: models differ between datasets; ranks use {groups[0].dataset} only")
        sample_scores, hib = {}, {}
        for k, g in _rank_keys(rep, task, groups):
            sample_scores[(k, g.dataset)] = {m: g.samples[m][k] for m in sorted(common)}
            hib[(k, g.dataset)] = higher_is_better(k)
        if not sample_scores:
            rep.notes.append(f"{key}: no ranks (none of rank_metrics.{task} was bootstrapped)")
            continue
        ranks = stats.bootstrap_ranks(sample_scores, hib, alpha=rep.cfg.bootstrap.alpha)
        rep.ranks[key] = ranks
        rep.rank_keys[key] = [f"{k} / {d}" for k, d in sample_scores]
        for m, r in ranks.items():
            rep.tables.setdefault(f"{task}_ranks", []).append({
                "task": task, "setting": setting, "model": m, "mean_rank": r["mean"], "median_rank": r["median"],
                "lower": r["lower"], "upper": r["upper"], "n": r["n"],
                "freq": " ".join(f"{k:g}:{v:.3f}" for k, v in sorted(r["freq"].items()))})
        _figure(rep, f"ranks_{key}", rank_figure, ranks,
                f"{key}: {len(sample_scores)} metric x dataset, {rep.cfg.bootstrap.samples} resamples")


def same_checkpoint(a: str | None, b: str | None) -> bool:
    """Whether two backbone specs name the same file (paths compared resolved; specs like
    ``random:dinov2_tiny`` only by their text)."""
    if not a or not b:
        return False
    if a == b:
        return True
    try:
        pa, pb = Path(a).expanduser(), Path(b).expanduser()
        return pa.resolve() == pb.resolve() or (pa.is_file() and pb.is_file() and pa.samefile(pb))
    except OSError:
        return False


def pretrain_start(rep: Report, pretrain_run: str) -> str | None:
    """The ``init=`` checkpoint a pretraining run started from: from the collected run, else from the
    folder's config.yaml (the run may live outside the report's folder); None for a random init."""
    folder = Path(pretrain_run).expanduser()
    config = next((p.config for p in rep.col.pretrain if same_checkpoint(str(p.path), str(folder))), None)
    if config is None:
        config = read_run_config(folder)
    init = config.get("init") if config is not None else None
    return init if isinstance(init, str) and init else None


def _iterations(rep: Report) -> None:
    """Same protocol run on several checkpoints of one pretraining run -> metric against iteration, with
    the run of the same protocol on the checkpoint it started from (``init=``) as iteration 0."""
    series_by_task: dict[str, list[dict[str, Any]]] = {}
    groups: dict[tuple, list[EvalRun]] = {}
    for r in rep.col.evals:
        if r.iteration is not None:
            groups.setdefault((r.task, r.dataset, r.protocol, r.encoder, r.pretrain_run or ""), []).append(r)
    for (task, dataset, protocol, encoder, pre), runs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        by_iter = {r.iteration: r for r in sorted(runs, key=lambda r: r.mtime)}
        start = pretrain_start(rep, pre) if pre and 0 not in by_iter else None
        if start is not None:
            at_start = [r for r in sorted(rep.col.evals, key=lambda r: r.mtime)
                        if (r.task, r.dataset, r.protocol, r.encoder) == (task, dataset, protocol, encoder)
                        and same_checkpoint(r.checkpoint, start)]
            if at_start:
                by_iter[0] = at_start[-1]
        if len(by_iter) < 2:
            continue
        label = f"{dataset} / {protocol}" + (f" ({encoder})" if encoder else "") + (f" / {Path(pre).name}" if pre else "")
        for metric in sorted(set.intersection(*(set(r.metrics) for r in by_iter.values()))):
            pts = [(it, by_iter[it].metrics[metric]["mean"], by_iter[it].metrics[metric]["std"])
                   for it in sorted(by_iter)]
            series_by_task.setdefault(task, []).append({"metric": metric, "label": label, "points": pts})
            for it, mean, std in pts:
                rep.tables.setdefault("iterations", []).append({
                    "task": task, "dataset": dataset, "protocol": protocol, "encoder": encoder or "",
                    "pretrain_run": pre, "iteration": it, "metric": metric, "mean": mean, "std": std})
    for task, series in sorted(series_by_task.items()):
        _figure(rep, f"iterations_{task}", iteration_figure, series, f"{task}: metric vs pretraining iteration")


PRIMARY = {"segmentation": "dice", "classification": "auroc", "phase": "macro_f1"}


def _encoders(rep: Report) -> None:
    """Frozen vs trainable encoder box plots per (task, dataset) where both kinds were run."""
    by: dict[tuple[str, str], list[EvalRun]] = {}
    for (task, dataset, _label), r in rep.entries.items():
        if r.encoder is not None:
            by.setdefault((task, dataset), []).append(r)
    for (task, dataset), runs in sorted(by.items()):
        frozen = [r for r in runs if r.encoder == "frozen"]
        if not frozen or len(frozen) == len(runs):
            continue
        metric = PRIMARY.get(task, "")
        if any(metric not in r.metrics for r in runs):
            shared = sorted(set.intersection(*(set(r.metrics) for r in runs)))
            if not shared:
                continue
            metric = shared[0]
        boxes = {}
        for r in sorted(runs, key=lambda r: (r.name, r.encoder != "frozen", r.encoder or "")):
            values = r.metrics[metric].get("values") or [r.metrics[metric]["mean"]]
            values = [v for v in values if v is not None and math.isfinite(v)]
            if values:
                boxes[f"{r.name} [{r.encoder}]"] = values
        if len({k.rsplit("[", 1)[-1] for k in boxes}) < 2:
            continue
        _figure(rep, f"encoder_{task}_{dataset}", encoder_boxplot, boxes, metric,
                f"{task} / {dataset}: frozen vs trainable encoder ({metric}, per {_unit_of(runs[0])})")


def _figure(rep: Report, name: str, fn: Any, *args: Any) -> None:
    """Draw one figure; a plotting failure on odd data loses that figure (noted on the page), not the report."""
    try:
        png = fn(*args)
    except Exception as exc:  # noqa: BLE001 - the report must survive any one figure
        rep.notes.append(f"figure {name} not drawn: {type(exc).__name__}: {exc}")
        return
    if png is not None:
        rep.figures[name] = png


def _unit_of(r: EvalRun) -> str:
    """What a run's metric ``values`` are per: segmentation's ``std_over`` (patients, or seed000's folds,
    few-shot's draws), videos for phase, folds for classification."""
    over = r.results.get("std_over") if r.task == "segmentation" else None
    if isinstance(over, str) and over.endswith("s"):
        return over[:-1]
    return {"segmentation": "patient", "phase": "video"}.get(r.task, "fold")


def _curves(rep: Report) -> None:
    for i, run in enumerate(sorted(rep.col.pretrain, key=lambda r: str(r.path))):
        if not curve_panels(run.rows):
            rep.col.warn(run.path, "metrics.jsonl has nothing to plot")
            continue
        _figure(rep, f"curves_{i:02d}_{_safe(run.path.name)}", curves_figure, run.rows, str(run.path.name))


def _profile(rep: Report) -> None:
    for p in rep.col.profiles:
        machine = p.data.get("machine", {}) if isinstance(p.data.get("machine"), dict) else {}
        for row in p.data["rows"]:
            if isinstance(row, dict):
                rep.tables.setdefault("profile", []).append({
                    **{k: v for k, v in row.items() if not isinstance(v, (dict, list))},
                    "device": machine.get("device_name", ""), "run": str(p.path)})


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with atomic_write(path, "w") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(v) for k, v in r.items()})


def make_report(cfg: ReportConfig) -> Report:
    """Collect the runs under ``cfg.runs`` and compute every table and figure (no files written)."""
    root = Path(cfg.runs).expanduser()
    if not cfg.runs or not root.is_dir():
        raise DataError(f"runs folder not found: {root}")
    out = Path(cfg.out).expanduser() if cfg.out else root / "report"
    col = collect(root, exclude=out)
    if len(col) == 0:
        extra = f" ({len(col.warnings)} unreadable folder(s), first: {col.warnings[0]})" if col.warnings else ""
        raise DataError(f"no runs found under {root} (no results.json, viz.json, profile.json or "
                        f"metrics.jsonl){extra}")
    rep = Report(cfg, col)
    _select_entries(rep)
    policy = check_metric_policies(list(rep.entries.values()))
    if policy is not None:
        rep.notes.append(f"segmentation metrics computed under metric policy {policy} (docs/metrics.md)")
    check_rank_metrics(cfg, list(rep.entries.values()))
    _summary_tables(rep)
    _bootstrap(rep)
    _ranks(rep)
    _headline(rep)
    _iterations(rep)
    _encoders(rep)
    _curves(rep)
    _profile(rep)
    return rep


def run_report(cfg: ReportConfig) -> Path:
    """Build the report and write ``report.html``, ``tables/*.csv`` and ``figures/*.png``; returns the
    HTML path."""
    rep = make_report(cfg)
    root = Path(cfg.runs).expanduser()
    out = Path(cfg.out).expanduser() if cfg.out else root / "report"
    run = RunDir(out, cfg)  # config.yaml, and the trackers of cfg.log (figures, tables and the page)
    for name, rows in rep.tables.items():
        write_csv(out / "tables" / f"{name}.csv", rows)
        run.artifact(out / "tables" / f"{name}.csv")
    for name, png in rep.figures.items():
        with atomic_write(out / "figures" / f"{_safe(name)}.png", "wb") as fh:  # "ranks_task [knn]"
            fh.write(png)
        if run.tracks_images:
            from PIL import Image  # why: only to hand a figure to a tracker

            with Image.open(io.BytesIO(png)) as img:
                run.image(f"report/{_safe(name)}", np.asarray(img.convert("RGB")), 0)
    page = render(rep)
    path = out / "report.html"
    with atomic_write(path, "w") as fh:
        fh.write(page)
    run.artifact(path)
    run.close()
    for w in rep.col.warnings:
        print(f"meddino report: warning: {w}", file=sys.stderr)
    if rep.headline:
        print(rep.headline, file=sys.stderr)
    return path


__all__ = [
    "BootstrapConfig",
    "GroupBootstrap",
    "Report",
    "ReportConfig",
    "bootstrap_group",
    "check_metric_policies",
    "check_rank_metrics",
    "compare_sentence",
    "entry_labels",
    "make_report",
    "run_report",
]
