"""The report's figures as PNG bytes (matplotlib, Agg canvas, no pyplot global state).

Each function takes plain data (dicts, lists) and returns the encoded PNG, so the HTML page can inline it
and the same bytes are written to ``figures/`` for papers.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from meddino.viz.labels import wrap_label

_DPI = 110


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # why: matplotlib only when a figure is drawn
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def rank_figure(ranks: Mapping[str, Mapping[str, Any]], title: str) -> bytes:
    """Seed 000's ranking-stability figure.

    ``ranks`` is :func:`meddino.report.stats.bootstrap_ranks` output (models already ordered by mean rank,
    best first). Per model: one blob per observed rank with area proportional to how often the model got
    that rank over the pooled bootstrap samples (metrics x datasets x resamples), a black cross at the
    median rank and a black line over the 2.5-97.5 % percentile interval of the ranks.
    """
    models = list(ranks)
    n = len(models)
    fig = _figure(max(4.2, 0.9 * n + 1.6), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for x, m in enumerate(models):
        r = ranks[m]
        freq = r["freq"]
        ys = np.array([float(k) for k in freq])
        fs = np.array([float(v) for v in freq.values()])
        ax.scatter(np.full(ys.shape, x), ys, s=900 * fs, color="C0", alpha=0.45, linewidths=0, zorder=1)
        ax.vlines(x, r["lower"], r["upper"], colors="black", linewidth=1.6, zorder=2)
        ax.scatter([x], [r["median"]], marker="x", color="black", s=60, linewidths=2, zorder=3)
    ax.set_xticks(range(n))
    ax.set_xticklabels([wrap_label(m) for m in models], rotation=30 if n > 3 else 0, ha="right" if n > 3 else "center",
                       fontsize=8)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_ylim(n + 0.6, 0.4)  # rank 1 on top
    ax.set_yticks(range(1, n + 1))
    ax.set_ylabel("rank (1 = best)")
    ax.set_title(title, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def iteration_figure(series: Sequence[Mapping[str, Any]], title: str) -> bytes:
    """Metric against pretraining iteration: one panel per metric, one line per (dataset, protocol).

    ``series`` items: ``{"metric", "label", "points": [(iteration, mean, std), ...]}`` (sorted by iteration).
    """
    metrics = sorted({s["metric"] for s in series})
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = _figure(4.0 * cols, 3.0 * rows)
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        for s in (s for s in series if s["metric"] == metric):
            pts = np.asarray(s["points"], dtype=np.float64)
            ax.errorbar(pts[:, 0], pts[:, 1], yerr=np.nan_to_num(pts[:, 2]), marker="o", capsize=3,
                        label=wrap_label(s["label"], 36))
        ax.set_xlabel("pretraining iteration")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def encoder_boxplot(groups: Mapping[str, Mapping[str, Sequence[float]]], metric: str, title: str) -> bytes:
    """Frozen vs trainable encoder: per box label (``model [mode]``) the per-unit values (folds, patients or
    videos as written by the task) of ``metric``; boxes of the same mode share a colour."""
    labels = [k for k in groups]
    fig = _figure(max(4.0, 1.1 * len(labels) + 1.5), 3.6)
    ax = fig.add_subplot(1, 1, 1)
    data = [np.asarray([v for v in groups[k] if v is not None and not math.isnan(v)]) for k in labels]
    box = ax.boxplot(data, patch_artist=True, widths=0.6)
    modes = sorted({k.rsplit("[", 1)[-1].rstrip("]") for k in labels})
    colours = {m: f"C{i}" for i, m in enumerate(modes)}
    for patch, k in zip(box["boxes"], labels):
        patch.set_facecolor(colours[k.rsplit("[", 1)[-1].rstrip("]")])
        patch.set_alpha(0.6)
    jitter = np.random.default_rng(0)  # fixed: the same data always gives the same picture
    for i, d in enumerate(data, start=1):  # the individual units on top of the boxes
        ax.scatter(i + jitter.uniform(-0.12, 0.12, d.size), d, s=10, color="black", zorder=3)
    ax.set_xticks(range(1, len(labels) + 1))
    ax.set_xticklabels([wrap_label(k, 32) for k in labels], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def curve_panels(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[str]]]:
    """Which keys of a metrics.jsonl go in which panel: losses, the training-health diagnostics of
    :mod:`meddino.pretrain.health` (entropies, KL, prototype usage, effective rank), kNN monitor,
    lr / wd / momentum, throughput."""
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in keys and k not in ("step", "time", "epoch") and isinstance(v, (int, float)) \
                    and not isinstance(v, bool):
                keys.append(k)
    losses = [k for k in keys if k == "loss" or "loss" in k or k in ("dino", "ibot", "koleo", "gram")]
    knn = [k for k in keys if k.startswith("knn_top") or k.startswith("knn_acc") or k.startswith("val_")]
    sched = [k for k in keys if k in ("lr", "backbone_lr", "wd", "momentum", "teacher_temp")]
    speed = [k for k in keys if k in ("images_per_s",)]
    health = [  # ln_k is drawn as a reference line in the entropy panel, not as a curve
        (_ENTROPY_PANEL, [k for k in keys if k.endswith("teacher_entropy") or k.endswith("student_entropy")]),
        (_INFORMATION_PANEL, [k for k in keys if k.endswith("teacher_information")]),
        ("KL(teacher || student)", [k for k in keys if k.endswith("kl_teacher_student")]),
        ("prototype usage", [k for k in keys if k.endswith("prototype_usage")]),
        ("effective rank (teacher CLS)", [k for k in keys if k == "effective_rank"]),
    ]
    panels = [("losses", losses), *health, ("kNN monitor", knn), ("schedules", sched), ("throughput", speed)]
    return [(t, ks) for t, ks in panels if ks]


_ENTROPY_PANEL = "entropy vs ln K"
_INFORMATION_PANEL = "teacher information about the image (nats)"
_HEALTH_PANELS = ("losses", _ENTROPY_PANEL, _INFORMATION_PANEL, "KL(teacher || student)", "prototype usage", "effective rank (teacher CLS)")


def curves_figure(rows: Sequence[Mapping[str, Any]], title: str) -> bytes | None:
    """Training curves of one run against step; None when it logged nothing plottable.

    The health panels (entropies with the ln K line, KL, prototype usage, effective rank) sit beside the
    losses; steps with a ``collapse_warning`` are marked by a red dotted line in the losses and health
    panels and named in the title."""
    panels = curve_panels(rows)
    if not panels:
        return None
    warned = sorted({int(r["step"]) for r in rows if r.get("collapse_warning") and
                     isinstance(r.get("step"), (int, float))})
    ln_k = [r["ln_k"] for r in rows if isinstance(r.get("ln_k"), (int, float)) and not isinstance(r["ln_k"], bool)]
    cols = min(4, len(panels))
    n_rows = math.ceil(len(panels) / cols)
    fig = _figure(3.6 * cols, 2.9 * n_rows)
    for i, (name, keys) in enumerate(panels):
        ax = fig.add_subplot(n_rows, cols, i + 1)
        if name == _ENTROPY_PANEL and ln_k:
            ax.axhline(ln_k[-1], color="gray", linestyle="--", linewidth=1, label=f"ln K = {ln_k[-1]:.3f}")
        if name in _HEALTH_PANELS:
            for j, s in enumerate(warned):
                ax.axvline(s, color="red", linestyle=":", linewidth=1.2, label="collapse warning" if j == 0 else None)
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and
                   not isinstance(r.get(k), bool) and isinstance(r.get("step"), (int, float))]
            if not pts:
                continue
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=k, linewidth=1.2)
        if name == "schedules" and len(keys) > 1:
            ax.set_yscale("symlog", linthresh=1e-6)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if warned:
        title = f"{title} (collapse warning at step {', '.join(map(str, warned[:5]))})"
    fig.suptitle(title, fontsize=10)
    return _png(fig)
