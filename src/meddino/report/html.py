"""The report as ONE self-contained HTML page: inline CSS, images as base64 PNG data URIs, no JavaScript,
no external URL, so it can be mailed, archived or opened offline and renders the same in any browser.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meddino import __version__
from meddino.report.model import UNIT_KIND, Report

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1200px;color:#222;
padding:0 1em;line-height:1.4}
h1{border-bottom:2px solid #444;padding-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:.88em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}tr:nth-child(even) td{background:#fafafa}
td.best{font-weight:bold}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
img{max-width:100%;height:auto;border:1px solid #ddd}.note{color:#7a4b00;font-size:.9em}
nav a{margin-right:1em}code{background:#f4f4f4;padding:0 .2em}
"""


_BEST = '<td class="best">'


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(v: Any, digits: int = 4) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.{digits}f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "", bold: set[tuple[int, int]] | None = None) -> str:
    """A plain HTML table; cells are escaped, ``bold`` marks (row, column) cells."""
    bold = bold or set()
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cells = "".join((_BEST if (i, j) in bold else "<td>") + f"{_e(c)}</td>" for j, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def figure(png: bytes, caption: str, alt: str) -> str:
    return (f'<figure><img src="{png_data_uri(png)}" alt="{_e(alt)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _summary(rep: Report) -> str:
    col = rep.col
    items = [f"{len(col.evals)} evaluation run(s)", f"{len(col.pretrain)} pretraining run(s)",
             f"{len(col.viz)} visualisation run(s)", f"{len(col.profiles)} profile run(s)"]
    lines = [f"<p><b>{_e(rep.headline)}</b></p>"] if rep.headline else []
    lines.append(f"<p>Runs under <code>{_e(rep.cfg.runs)}</code>: {_e(', '.join(items))}.</p>")
    tasks = sorted({r.task for r in col.evals})
    for task in tasks:
        datasets = sorted({d for (t, d, _l) in rep.entries if t == task})
        models = sorted({lbl for (t, _d, lbl) in rep.entries if t == task})
        lines.append(f"<p><b>{_e(task)}</b>: {len(models)} model(s) on {len(datasets)} dataset(s) "
                     f"({_e(', '.join(datasets))}).")
        for key, ranks in rep.ranks.items():  # one ranking per protocol / encoder setting of the task
            if key != task and not key.startswith(f"{task} ["):
                continue
            best = next(iter(ranks))
            r = ranks[best]
            within = f" ({key[len(task) + 2:-1]})" if key != task else ""
            lines.append(f" Best mean bootstrap rank{_e(within)}: <b>{_e(best)}</b> (mean {r['mean']:.2f}, "
                         f"95 % interval {r['lower']:g}-{r['upper']:g}).")
        lines.append("</p>")
    b = rep.cfg.bootstrap
    lines.append(f"<p>Bootstrap: {b.samples} resamples of patients (videos for phase) with replacement, "
                 f"seed {b.seed}, {100 * (1 - b.alpha):g} % percentile intervals.</p>")
    if col.warnings or rep.notes:
        lines.append('<ul class="note">' + "".join(f"<li>{_e(w)}</li>" for w in rep.notes + col.warnings)
                     + "</ul>")
    return "\n".join(lines)


def _tables(rep: Report) -> str:
    """Per (task, dataset): models x metrics, mean +/- std, best mean in bold."""
    out = []
    for task in sorted({t for (t, _d, _l) in rep.entries}):
        for dataset in sorted({d for (t, d, _l) in rep.entries if t == task}):
            runs = {lbl: r for (t, d, lbl), r in rep.entries.items() if t == task and d == dataset}
            metrics = []
            for r in runs.values():
                metrics += [m for m in r.metrics if m not in metrics]
            levels = sorted({r.level for r in runs.values()})
            rows, bold = [], set()
            labels = sorted(runs)
            for j, m in enumerate(metrics, start=1):
                vals = [(i, runs[lbl].metrics[m]["mean"]) for i, lbl in enumerate(labels) if m in runs[lbl].metrics]
                vals = [(i, v) for i, v in vals if not math.isnan(v)]
                if vals:
                    pick = min if m.lower() in ("hd95",) else max
                    best = pick(v for _i, v in vals)
                    bold |= {(i, j) for i, v in vals if v == best}
            for lbl in labels:
                r = runs[lbl]
                cells = [lbl]
                for m in metrics:
                    v = r.metrics.get(m)
                    cells.append("" if v is None else f"{_num(v['mean'])} \u00b1 {_num(v['std'])}")
                rows.append(cells)
            out.append(f"<h3>{_e(task)} / {_e(dataset)} <small>(level: {_e(', '.join(levels))})</small></h3>")
            out.append(table(["model", *metrics], rows, "results", bold))
    return "\n".join(out) or "<p>No evaluation runs.</p>"


def _bootstrap(rep: Report) -> str:
    out = []
    rows_all = [r for name, rows in rep.tables.items() if name.endswith("_bootstrap") for r in rows]
    for g in rep.groups:
        rows = [r for r in rows_all if r["task"] == g.task and r["dataset"] == g.dataset
                and r.get("setting", "") == g.setting]
        cells = [[r["model"], r["metric"], _num(r["point"]), f"[{_num(r['lower'])}, {_num(r['upper'])}]",
                  _num(r["rank"], 1)] for r in rows]
        setting = f" [{g.setting}]" if g.setting else ""
        out.append(f"<h3>{_e(g.task)} / {_e(g.dataset)}{_e(setting)}: 95 % intervals over {len(g.units)} "
                   f"{_e(UNIT_KIND[g.task])}s</h3>")
        out.append(table(["model", "metric", "pooled", "interval", "rank"], cells, "bootstrap"))
    return "\n".join(out)


def _ranking(rep: Report) -> str:
    out = []
    for task, ranks in rep.ranks.items():  # task = the ranking's key: "task" or "task [setting]"
        png = rep.figures.get(f"ranks_{task}")
        if png:
            out.append(figure(png, f"{task}: blob size = frequency of each rank over the pooled bootstrap samples "
                                   f"({', '.join(rep.rank_keys[task])}); black cross = median rank, black line = "
                                   "2.5-97.5 % interval; models ordered by mean rank.", f"rank stability {task}"))
        out.append(table(["model", "mean rank", "median", "2.5 %", "97.5 %"],
                         [[m, _num(r["mean"], 2), _num(r["median"], 1), _num(r["lower"], 1), _num(r["upper"], 1)]
                          for m, r in ranks.items()], "ranks"))
    return "\n".join(out) or "<p>Not enough models with per-sample predictions to rank.</p>"


def _paired(rep: Report) -> str:
    out = []
    for name, rows in sorted(rep.tables.items()):
        if not name.endswith("_paired"):
            continue
        cells = [[r["dataset"], r["metric"], r["model_a"], r["model_b"], _num(r["diff"]),
                  f"[{_num(r['lower'])}, {_num(r['upper'])}]", _num(r["frac_a_better"], 3), _num(r["frac_tie"], 3)]
                 for r in rows]
        out.append(f"<h3>{_e(name[: -len('_paired')])}</h3>")
        out.append(table(["dataset", "metric", "A", "B", "A - B", "95 % interval", "P(A better)", "P(tie)"], cells, "paired"))
    return "\n".join(out) or "<p>Needs at least two models with predictions on one dataset.</p>"


def _figures(rep: Report, prefix: str, caption: str) -> str:
    return "\n".join(figure(png, f"{caption}: {name[len(prefix):].lstrip('_')}", name)
                     for name, png in sorted(rep.figures.items()) if name.startswith(prefix))


def _viz(rep: Report) -> str:
    out = []
    for v in sorted(rep.col.viz, key=lambda v: str(v.path)):
        for kind, path in v.panels.items():
            try:
                png = path.read_bytes()
            except OSError:
                continue
            backbones = ", ".join(map(str, v.info.get("backbones", [])))
            out.append(figure(png, f"{v.path.name}: {kind} ({backbones})", f"{kind} {v.path.name}"))
    return "\n".join(out) or "<p>No <code>meddino viz pca</code> runs.</p>"


def _profile(rep: Report) -> str:
    rows = rep.tables.get("profile", [])
    if not rows:
        return "<p>No <code>meddino profile</code> runs.</p>"
    keys = ["model", "head", "device", "img_size", "batch_size", "params_m", "latency_ms_median",
            "latency_ms_p95", "fps", "images_per_s", "max_batch", "note"]
    keys = [k for k in keys if any(k in r for r in rows)]
    return table(keys, [[_num(r.get(k, ""), 2) if isinstance(r.get(k), float) else r.get(k, "") for k in keys]
                        for r in rows], "profile")


def render(rep: Report) -> str:
    sections = [
        ("summary", "Summary", _summary(rep)),
        ("tables", "Results (mean \u00b1 std as reported by each run)", _tables(rep)),
        ("ranking", "Ranking stability", _ranking(rep)),
        ("bootstrap", "Bootstrap intervals", _bootstrap(rep) or "<p>No per-sample predictions.</p>"),
        ("paired", "Paired differences", _paired(rep)),
        ("iterations", "Metric vs pretraining iteration",
         _figures(rep, "iterations", "metric vs iteration") or "<p>No protocol was run on several checkpoints "
                                                             "of one pretraining run.</p>"),
        ("encoder", "Frozen vs trainable encoder",
         _figures(rep, "encoder", "frozen vs trainable") or "<p>No dataset with both frozen and trainable runs.</p>"),
        ("curves", "Training curves", _figures(rep, "curves", "training curves") or "<p>No pretraining runs.</p>"),
        ("pca", "PCA and attention maps", _viz(rep)),
        ("profiling", "Profiling", _profile(rep)),
    ]
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title, _ in sections)
    body = "\n".join(f'<section id="{sid}"><h2>{_e(title)}</h2>\n{content}</section>' for sid, title, content in sections)
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(rep.cfg.title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{_e(rep.cfg.title)}</h1><p><small>meddino {_e(__version__)}, {when}, runs folder "
            f"<code>{_e(Path(rep.cfg.runs))}</code></small></p><nav>{nav}</nav>\n{body}\n</body></html>\n")
