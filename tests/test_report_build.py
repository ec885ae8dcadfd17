"""`meddino report`: collecting hand-written run folders, bootstrap against independent recomputation,
rank figure data, paired differences, malformed folders, the self-contained HTML in headless Chromium."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from meddino.report import stats
from meddino.report.build import (
    ReportConfig,
    bootstrap_group,
    make_report,
    run_report,
    split_label,
)
from meddino.report.collect import collect, display_name, parse_iteration, read_eval_run
from meddino.report.predictions import (
    ClassificationRows,
    UnitValues,
    load_classification,
    load_segmentation,
)

N_PATIENTS = 8


# ----------------------------------------------------------------------------------- fixture run folders
def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), colour).save(path)


def make_cls_run(folder: Path, model: str, dataset: str, noise: float, seed: int, protocol: str = "linear",
                 mode: str | None = None) -> Path:
    """Binary classification: 8 patients x 2 images, scores = label + noise, patient level (docs format)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(N_PATIENTS):
        label = p % 2
        for i in range(2):
            s = float(np.clip(0.5 + (label - 0.5) * 0.6 + rng.normal(0, noise), 0.001, 0.999))
            rows.append({"image": f"p{p}_{i}.png", "patient": f"P{p}", "unit": "fold0", "split": "test",
                         "fold": p % 2, "variant": protocol, "protocol": protocol, "model": model,
                         "label": ["neg", "pos"][label], "true_neg": 1 - label, "true_pos": label,
                         "score_neg": f"{1 - s:.6g}", "score_pos": f"{s:.6g}"})
    _write_csv(folder / "predictions" / f"{protocol}.csv", rows)
    auroc_folds = [0.9 - noise, 0.95 - noise]
    metrics = {"auroc": {"mean": float(np.mean(auroc_folds)), "std": float(np.std(auroc_folds, ddof=1)),
                         "values": auroc_folds, "n": 2},
               "accuracy": {"mean": 0.8 - noise, "std": 0.05, "values": [0.75 - noise, 0.85 - noise], "n": 2},
               "n": {"mean": 8.0, "std": 0.0, "values": [8, 8], "n": 2},
               "auroc_per_class": {"neg": 0.9, "pos": 0.9}}
    res = {"task": "classification", "protocol": protocol, "model": model, "backbone": model, "dataset": dataset,
           "level": "patient", "problem": "binary", "classes": ["neg", "pos"], "primary_variant": protocol,
           "metrics": metrics, "predictions": {protocol: f"predictions/{protocol}.csv"}}
    if mode:
        res["mode"] = mode
    (folder / "results.json").write_text(json.dumps(res))
    return folder


def make_seg_run(folder: Path, model: str, dataset: str, quality: float, seed: int, frozen: bool = True,
                 backbone: str | None = None, dice_mean: float | None = None) -> Path:
    """Segmentation: 8 patients x 2 images x 2 classes of per_image_class rows (docs format)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(N_PATIENTS):
        for i in range(2):
            for c in ("liver", "tool"):
                present = not (c == "tool" and p == 0)  # patient 0 has no tool anywhere -> NaN rows
                d = float(np.clip(quality + rng.normal(0, 0.05), 0, 1)) if present else math.nan
                rows.append({"image": f"p{p}_{i}.png", "patient": f"P{p}", "fold": p % 2, "class": c,
                             "dice": repr(d), "jaccard": repr(d / (2 - d) if present else math.nan),
                             "hd95": repr((1 - d) * 20 if present else math.nan),
                             "gt_present": int(present), "pred_present": int(present)})
    _write_csv(folder / "predictions" / "per_image_class.csv", rows)
    per_patient = [quality + 0.01 * k for k in range(N_PATIENTS)]
    mean = dice_mean if dice_mean is not None else float(np.mean(per_patient))
    metrics = {m: {"mean": mean if m == "dice" else 0.5, "std": 0.02, "n": N_PATIENTS,
                   "values": {f"P{k}": v for k, v in enumerate(per_patient)}, "per_class": {"liver": 0.5}}
               for m in ("dice", "jaccard", "hd95")}
    res = {"task": "segmentation", "protocol": "linear", "model": model, "dataset": dataset, "level": "patient",
           "metrics": metrics, "hd95_unit": "pixel", "frozen_backbone": frozen}
    if backbone:
        res["backbone"] = backbone
    (folder / "results.json").write_text(json.dumps(res))
    return folder


def make_runs(root: Path) -> Path:
    for ds_i, ds in enumerate(("dsA", "dsB")):
        make_cls_run(root / f"cls_good_{ds}", "good", ds, noise=0.05, seed=ds_i)
        make_cls_run(root / f"cls_bad_{ds}", "bad", ds, noise=0.6, seed=10 + ds_i)
        make_seg_run(root / "seg" / f"good_{ds}", "good", ds, quality=0.8, seed=20 + ds_i)
        make_seg_run(root / "seg" / f"bad_{ds}", "bad", ds, quality=0.5, seed=30 + ds_i)
    # malformed folders: broken JSON, unknown task, no metrics
    (root / "broken").mkdir()
    (root / "broken" / "results.json").write_text("{not json")
    (root / "alien").mkdir()
    (root / "alien" / "results.json").write_text(json.dumps({"task": "weather", "metrics": {}}))
    (root / "empty_metrics").mkdir()
    (root / "empty_metrics" / "results.json").write_text(json.dumps({"task": "segmentation", "metrics": {}}))
    # a pretraining run
    pre = root / "pretrain"
    pre.mkdir()
    (pre / "config.yaml").write_text("method: dinov2\n")
    with open(pre / "metrics.jsonl", "w") as fh:
        for step in range(1, 6):
            fh.write(json.dumps({"step": step * 10, "time": 0.0, "loss": 5.0 / step, "dino": 4.0 / step,
                                 "ibot": 1.0 / step, "lr": 1e-4 * step, "wd": 0.04}) + "\n")
            fh.write(json.dumps({"step": step * 10, "time": 0.0, "knn_top1": 0.2 + 0.1 * step}) + "\n")
        fh.write('{"step": 60, "loss": ')  # a half-written last line of a killed run
    # a viz run
    viz = root / "viz"
    _png(viz / "pca.png", (200, 10, 10))
    _png(viz / "attention.png", (10, 200, 10))
    (viz / "viz.json").write_text(json.dumps({"task": "viz", "panels": {"pca": "pca.png",
                                                                          "attention": "attention.png"},
                                              "backbones": ["a", "b"]}))
    # a profile run
    prof = root / "profile"
    prof.mkdir()
    (prof / "profile.json").write_text(json.dumps({
        "task": "profile", "machine": {"device_name": "cpu", "torch": "x"},
        "rows": [{"model": "random:dinov2_tiny", "head": "backbone", "params_m": 0.2, "latency_ms_median": 1.5,
                  "latency_ms_p95": 2.0, "fps": 666.0}]}))
    return root


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------------------------- the tests
def test_report_cli_tables_figures_and_warnings(tmp_path, cli):
    runs = make_runs(tmp_path / "runs")
    out = tmp_path / "out"
    res = cli("report", runs, f"out={out}", "bootstrap.samples=60", "bootstrap.seed=1")
    assert res.returncode == 0, res.stderr
    html_path = out / "report.html"
    assert res.stdout.strip().splitlines()[-1] == str(html_path)
    # each malformed folder is one warning line; the report is still built
    warn = [line for line in res.stderr.splitlines() if "warning" in line]
    for name in ("broken", "alien", "empty_metrics"):
        assert sum(f"{os.sep}{name}:" in line and "skipped" in line for line in warn) == 1, res.stderr
    assert "Traceback" not in res.stderr

    cls = _read(out / "tables" / "classification.csv")
    assert {(r["model"], r["dataset"]) for r in cls} == {(m, d) for m in ("good", "bad") for d in ("dsA", "dsB")}
    assert {r["metric"] for r in cls} == {"auroc", "accuracy"}  # counts and per-class dicts are not metrics
    good = next(r for r in cls if r["model"] == "good" and r["dataset"] == "dsA" and r["metric"] == "auroc")
    assert float(good["mean"]) == pytest.approx(np.mean([0.85, 0.9]))
    assert float(good["std"]) == pytest.approx(np.std([0.85, 0.9], ddof=1))
    seg = _read(out / "tables" / "segmentation.csv")
    assert len(seg) == 2 * 2 * 3 and {r["level"] for r in seg} == {"patient"}
    for task in ("classification", "segmentation"):
        ranks = _read(out / "tables" / f"{task}_ranks.csv")
        assert [r["model"] for r in ranks] == ["good", "bad"]  # ordered by mean rank
        assert (out / "figures" / f"ranks_{task}.png").read_bytes().startswith(b"\x89PNG")
        paired = _read(out / "tables" / f"{task}_paired.csv")
        assert paired and all(r["model_a"] == "good" for r in paired if float(r["diff"]) != 0)
        assert all(float(r["lower"]) <= float(r["upper"]) for r in paired)
    assert any(p.name.startswith("curves_") for p in (out / "figures").iterdir())

    page = html_path.read_text()
    for sid in ("summary", "tables", "ranking", "paired", "curves", "pca", "profiling"):
        assert f'id="{sid}"' in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert page.count("data:image/png;base64,") >= 2 + 1 + 2  # 2 rank figures, curves, 2 viz panels
    assert "random:dinov2_tiny" in page  # profiling table


def test_bad_input_exit_code_2_one_line(tmp_path, cli, capsys):
    from meddino.cli import main

    missing = cli("report", tmp_path / "nope")  # the real CLI once; the other cases in-process
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert missing.stderr.startswith("meddino: error: runs folder not found")
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_broken" / "x").mkdir(parents=True)
    (tmp_path / "only_broken" / "x" / "results.json").write_text("[]")
    cases = [(["report", str(tmp_path / "empty")], "no runs found"),
             (["report", str(tmp_path / "only_broken")], "results.json is not a JSON object"),
             (["report", str(tmp_path / "empty"), "bootstrap.sample=3"], "bootstrap.sample"),
             (["report", str(tmp_path / "empty"), "bootstrap.samples=-1"], "bootstrap.samples")]
    for argv, text in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("meddino: error:") and text in lines[0], err


def test_segmentation_per_patient_values_by_hand(tmp_path):
    run = read_eval_run(make_seg_run(tmp_path / "s", "m", "d", quality=0.7, seed=5))
    uv = load_segmentation(run)
    rows = _read(tmp_path / "s" / "predictions" / "per_image_class.csv")
    for patient in ("P0", "P3"):
        per_class = {}
        for c in ("liver", "tool"):
            vals = [float(r["dice"]) for r in rows if r["patient"] == patient and r["class"] == c]
            vals = [v for v in vals if not math.isnan(v)]
            if vals:
                per_class[c] = sum(vals) / len(vals)
        expected = sum(per_class.values()) / len(per_class)
        assert uv.values["dice"][patient] == pytest.approx(expected)
    assert len(uv.values["dice"]) == N_PATIENTS


def test_bootstrap_group_recomputes_metrics_independently(tmp_path):
    """Per resample: segmentation = mean of the drawn patients' values (a patient drawn twice counts twice);
    classification AUROC = scikit-learn on the drawn patients' (patient-mean) scores."""
    from sklearn.metrics import roc_auc_score

    a = UnitValues({"dice": {f"P{i}": 0.1 * i for i in range(6)}})
    b = UnitValues({"dice": {f"P{i}": 0.5 for i in range(6)}})
    g = bootstrap_group("segmentation", "d", {"a": a, "b": b}, n_samples=40, seed=7)
    units = sorted(f"P{i}" for i in range(6))
    draws = stats.bootstrap_indices(np.arange(6), 40, 7)
    for s, idx in enumerate(draws):
        manual = sum(0.1 * int(units[i][1:]) for i in idx) / len(idx)
        assert g.samples["a"]["dice"][s] == pytest.approx(manual)
        assert g.samples["b"]["dice"][s] == pytest.approx(0.5)
    assert g.point["a"]["dice"] == pytest.approx(np.mean([0.1 * i for i in range(6)]))

    run_a = read_eval_run(make_cls_run(tmp_path / "a", "a", "d", 0.3, seed=1))
    run_b = read_eval_run(make_cls_run(tmp_path / "b", "b", "d", 0.05, seed=2))
    data = {"a": load_classification(run_a), "b": load_classification(run_b)}
    assert isinstance(data["a"], ClassificationRows) and len(data["a"].y) == N_PATIENTS  # patient level
    g = bootstrap_group("classification", "d", data, n_samples=30, seed=3)
    rows = _read(tmp_path / "a" / "predictions" / "linear.csv")
    patient_score = {}
    for r in rows:
        patient_score.setdefault(r["patient"], []).append(float(r["score_pos"]))
    label = {r["patient"]: int(r["true_pos"]) for r in rows}
    units = sorted(label)
    for s, idx in enumerate(stats.bootstrap_indices(np.arange(len(units)), 30, 3)):
        y = [label[units[i]] for i in idx]
        sc = [np.mean(patient_score[units[i]]) for i in idx]
        expected = roc_auc_score(y, sc) if len(set(y)) == 2 else math.nan
        got = g.samples["a"]["auroc"][s]
        assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)


def test_paired_from_samples_matches_stats_paired_difference_ci():
    """Reusing shared per-model samples gives exactly stats.paired_difference_ci's recomputation."""
    rng = np.random.default_rng(0)
    y = rng.normal(size=12)
    pa, pb = y + rng.normal(0, 0.3, 12), y + rng.normal(0, 0.6, 12)
    groups = np.repeat(np.arange(6), 2)

    def neg_mse(t, p):
        return -float(np.mean((np.asarray(t) - np.asarray(p)) ** 2))

    ref = stats.paired_difference_ci(neg_mse, pa, pb, y, groups=groups, n_samples=200, seed=4)
    draws = stats.bootstrap_indices(groups, 200, 4)
    sa = np.array([neg_mse(y[i], pa[i]) for i in draws])
    sb = np.array([neg_mse(y[i], pb[i]) for i in draws])
    got = stats.paired_from_samples(sa, sb, neg_mse(y, pa), neg_mse(y, pb))
    for k in ("diff", "lower", "upper", "frac_a_better", "frac_tie"):
        assert got[k] == pytest.approx(ref[k])
    lo, hi, n_nan = stats.percentile_interval(np.array([np.nan, 1.0, 2.0, 3.0]), 0.5)
    assert (lo, hi, n_nan) == (pytest.approx(1.5), pytest.approx(2.5), 1)


def test_rank_figure_data_ordered_by_mean_rank(tmp_path):
    """Three models on two datasets; the ranks table is ordered by mean rank, and the mean ranks equal a
    plain-loop recomputation over the same resamples."""
    root = tmp_path / "runs"
    for ds_i, ds in enumerate(("d1", "d2")):
        for q, m in ((0.55, "mid"), (0.85, "top"), (0.3, "low")):
            make_seg_run(root / f"{m}_{ds}", m, ds, quality=q, seed=100 + 7 * ds_i + int(q * 10))
    rep = make_report(ReportConfig(runs=str(root), bootstrap={"samples": 25, "seed": 2}))
    ranks = rep.ranks["segmentation"]
    assert list(ranks) == ["top", "mid", "low"]
    means = [r["mean"] for r in ranks.values()]
    assert means == sorted(means)
    # the seed's metrics only (Dice, HD95), not Jaccard as well
    assert rep.rank_keys["segmentation"] == ["dice / d1", "dice / d2", "hd95 / d1", "hd95 / d2"]
    assert all("jaccard" in g.metrics for g in rep.groups)
    # independent recomputation: per (metric, dataset, sample) order the models by hand
    pooled = {m: [] for m in ranks}
    for g in rep.groups:
        for metric in ("dice", "hd95"):
            sign = -1 if metric == "hd95" else 1
            for s in range(25):
                vals = {m: sign * g.samples[m][metric][s] for m in g.models}
                for m in g.models:
                    better = sum(v > vals[m] for v in vals.values())
                    ties = sum(v == vals[m] for v in vals.values()) - 1
                    pooled[m].append(1 + better + ties / 2)
    for m, r in ranks.items():
        assert r["mean"] == pytest.approx(np.mean(pooled[m]))
        assert r["median"] == pytest.approx(np.median(pooled[m]))
        assert sum(r["freq"].values()) == pytest.approx(1.0)
    assert rep.figures["ranks_segmentation"].startswith(b"\x89PNG")


def test_iteration_series_and_encoder_boxplots(tmp_path):
    root = tmp_path / "runs"
    for it, dice in ((200, 0.6), (400, 0.7), (100, 0.5)):
        make_seg_run(root / f"it{it}", f"ckpt{it}", "d", quality=dice, seed=it,
                     backbone=f"/x/pre1/checkpoints/teacher_backbone_{it:08d}.safetensors", dice_mean=dice)
    make_seg_run(root / "ft", "ckpt400", "d", quality=0.75, seed=1, frozen=False,
                 backbone="/x/pre1/checkpoints/teacher_backbone_00000400.safetensors")
    make_cls_run(root / "cls_lora", "m", "c", 0.1, seed=3, protocol="finetune", mode="lora")
    make_cls_run(root / "cls_knn", "m", "c", 0.2, seed=4, protocol="knn")
    rep = make_report(ReportConfig(runs=str(root), bootstrap={"samples": 0}))
    rows = [r for r in rep.tables["iterations"] if r["metric"] == "dice" and r["encoder"] == "frozen"]
    assert [(r["iteration"], r["mean"]) for r in rows] == [(100, 0.5), (200, 0.6), (400, 0.7)]
    assert rep.figures["iterations_segmentation"].startswith(b"\x89PNG")
    assert "encoder_segmentation_d" in rep.figures and "encoder_classification_c" in rep.figures
    labels = {lbl for (_t, _d, lbl) in rep.entries}
    assert "m [finetune, lora]" in labels and "m [knn, frozen]" in labels


@pytest.mark.parametrize(("results", "spec", "expected"), [
    ({}, "runs/p/checkpoints/teacher_backbone_00000200.safetensors", 200),
    ({}, "teacher_backbone_000200.safetensors", 200),
    ({}, "runs/p/checkpoint_0001000.pt", 1000),
    ({}, "vits_iter5000.pth", 5000),
    ({"pretrain_iteration": 42}, "teacher_backbone_000200.safetensors", 42),
    ({}, "random:dinov2_tiny", None),
    ({}, "dinov2_vits14_reg4_pretrain.pth", None),
])
def test_parse_iteration(results, spec, expected):
    assert parse_iteration(results, spec) == expected


def test_display_name():
    assert display_name("/r/pre1/checkpoints/teacher_backbone_00000200.safetensors") == "pre1/teacher_backbone_00000200"
    assert display_name("random:dinov2_tiny") == "random:dinov2_tiny"


def test_collect_skips_but_keeps_going(tmp_path):
    root = make_runs(tmp_path / "runs")
    (root / "viz_bad").mkdir()
    (root / "viz_bad" / "viz.json").write_text(json.dumps({"task": "viz", "panels": {"pca": "missing.png"}}))
    (root / "seg_unfinished").mkdir()  # an evaluation that logged steps but never wrote results.json
    (root / "seg_unfinished" / "config.yaml").write_text("head: linear\n")
    (root / "seg_unfinished" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    col = collect(root)
    assert len(col.evals) == 8 and len(col.pretrain) == 1 and len(col.viz) == 1 and len(col.profiles) == 1
    assert len(col.pretrain[0].rows) == 10  # the half-written last line is ignored
    assert sorted(Path(w.split(":")[0]).name for w in col.warnings) == ["alien", "broken", "empty_metrics",
                                                                        "seg_unfinished", "viz_bad"]


# ------------------------------------------------------------------------------------- headless Chromium
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.browser
def test_report_renders_in_headless_chromium(tmp_path):
    """Chromium loads report.html offline; the rendered DOM has the tables and every <img> is an inline PNG
    that PIL decodes. Fails when Chromium is missing (CI installs it) unless MEDDINO_ALLOW_NO_BROWSER=1."""
    from PIL import Image

    browser = _chromium()
    if browser is None:
        if os.environ.get("MEDDINO_ALLOW_NO_BROWSER") == "1":
            pytest.skip("chromium not installed and MEDDINO_ALLOW_NO_BROWSER=1")
        pytest.fail("chromium not found on PATH: install it (apt-get install chromium) or set "
                    "MEDDINO_ALLOW_NO_BROWSER=1 to skip this test locally")
    runs = make_runs(tmp_path / "runs")
    page = run_report(ReportConfig(runs=str(runs), out=str(tmp_path / "out"), bootstrap={"samples": 30}))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}"]
    res = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120)
    dom = res.stdout
    assert res.returncode == 0 and "<body" in dom, res.stderr[-2000:]
    assert dom.count("<table") >= 6 and "<td" in dom
    assert 'class="results"' in dom and "good" in dom and "dsB" in dom
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', dom)
    assert len(srcs) == dom.count("<img") >= 5
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.size[0] > 10 and im.size[1] > 10
    shot = tmp_path / "shot.png"
    res = subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    with Image.open(shot) as im:
        arr = np.asarray(im.convert("L"))
    assert arr.std() > 5  # the page painted something, not a blank screen


def test_phase_runs_per_video_metrics(tmp_path):
    """Phase results.json as the phase task writes it (no model/dataset keys: backbone and layout are used);
    per-video accuracy recomputed by hand from predictions/test.csv, frames out of order on disk."""
    from meddino.report.predictions import load_phase

    root = tmp_path / "runs"
    truth = {"v1": [0, 0, 1, 1, 2, 2], "v2": [0, 1, 1, 2, 2, 2], "v3": [0, 0, 0, 1, 2, 2]}
    for name, flip in (("a", {1, 4}), ("b", {0, 2, 3, 5})):
        rows = []
        for v, labels in truth.items():
            for t in reversed(range(len(labels))):
                pred = (labels[t] + 1) % 3 if t in flip else labels[t]
                rows.append({"video": v, "frame": t, "time_s": f"{t:.3f}", "true": labels[t], "pred": pred,
                             "true_phase": "x", "pred_phase": "y", "prob_0": 0.1, "prob_1": 0.1, "prob_2": 0.8})
        _write_csv(root / name / "predictions" / "test.csv", rows)
        (root / name / "results.json").write_text(json.dumps({
            "task": "phase", "protocol": "seed 000 two-stage: frame classifier + causal MS-TCN",
            "layout": "autolaparo", "backbone": f"random:{name}", "stage1": {"enabled": False},
            "metrics": {"accuracy": {"mean": 0.5, "std": 0.1, "n": 3}, "macro_f1": {"mean": 0.4, "std": 0.1, "n": 3}}}))
    run = read_eval_run(root / "a")
    assert (run.model, run.dataset, run.protocol, run.level, run.encoder) == \
        ("random:a", "autolaparo", "mstcn", "video", "frozen")
    uv = load_phase(run)
    for v, labels in truth.items():
        assert uv.values["accuracy"][v] == pytest.approx(1 - 2 / len(labels))
    rep = make_report(ReportConfig(runs=str(root), bootstrap={"samples": 20}))
    assert list(rep.ranks["phase"]) == ["random:a", "random:b"]
    assert rep.rank_keys["phase"] == ["accuracy / autolaparo", "macro_f1 / autolaparo"]  # not edit nor F1@k
    assert {r["unit"] for r in rep.tables["phase_bootstrap"]} == {"video"}


def test_unusable_predictions_keep_the_table_row(tmp_path):
    root = tmp_path / "runs"
    make_seg_run(root / "a", "a", "d", 0.8, seed=1)
    make_seg_run(root / "b", "b", "d", 0.6, seed=2)
    make_seg_run(root / "c", "c", "d", 0.4, seed=3)
    (root / "c" / "predictions" / "per_image_class.csv").write_text("image,score\nx,1\n")  # wrong columns
    rep = make_report(ReportConfig(runs=str(root), bootstrap={"samples": 10}))
    assert {r["model"] for r in rep.tables["segmentation"]} == {"a", "b", "c"}
    assert {r["model"] for r in rep.tables["segmentation_bootstrap"]} == {"a", "b"}
    assert any("c: predictions not usable" in w and "lacks column" in w for w in rep.col.warnings)


def test_compare_sentence_counts_clear_wins_within_a_protocol():
    """Hand-made paired rows: the better point is stored first, so a row where B leads is turned around."""
    from meddino.report.build import compare_sentence

    rows = [
        {"task": "classification", "metric": "auroc", "model_a": "cont [knn]", "model_b": "gen [knn]",
         "diff": 0.05, "frac_a_better": 0.97, "frac_tie": 0.0},
        {"task": "classification", "metric": "auroc", "model_a": "gen [linear]", "model_b": "cont [linear]",
         "diff": 0.02, "frac_a_better": 0.60, "frac_tie": 0.10},  # gen leads: cont - gen = -0.02, P = 0.30
        {"task": "classification", "metric": "auroc", "model_a": "cont [knn]", "model_b": "gen [linear]",
         "diff": 0.30, "frac_a_better": 1.0, "frac_tie": 0.0},  # across protocols: ignored
        {"task": "segmentation", "metric": "dice", "model_a": "gen", "model_b": "cont",
         "diff": 0.10, "frac_a_better": 0.99, "frac_tie": 0.0},  # gen clearly better: a loss for cont
    ]
    s = compare_sentence(rows, "cont", "gen", 0.95)
    assert s.startswith("cont beats gen with P(better) >= 0.95 in 1 of 3 comparisons and loses as clearly in 1:")
    assert "classification auroc [knn] +0.050 (P=0.97)" in s
    assert "classification auroc [linear] -0.020 (P=0.30)" in s
    assert "segmentation dice -0.100 (P=0.01)" in s
    assert compare_sentence(rows, "cont", "random", 0.95) is None


# ---------------------------------------------------------------------------- metric policies, rank metrics
def _policy_seg_run(folder: Path, model: str, policy: str, seed: int) -> Path:
    """A segmentation run whose rows are meddino's own per_class_seg_metrics on random label maps."""
    from meddino.metrics.segmentation import per_class_seg_metrics

    rng = np.random.default_rng(seed)
    rows = []
    for p in range(4):
        for i in range(3):
            g, pr = rng.integers(0, 3, (10, 10)), rng.integers(0, 3, (10, 10))
            pr[pr == 2] = 0 if i == 0 else 2  # class 2 never predicted on a patient's first frame
            for r in per_class_seg_metrics(g, pr, 3, policy=policy):
                rows.append({"image": f"p{p}_{i}", "patient": f"P{p}", "fold": 0, **r})
    _write_csv(folder / "predictions" / "per_image_class.csv", rows)
    metrics = {m: {"mean": 0.5, "std": 0.1, "n": 4} for m in ("dice", "jaccard", "hd95")}
    (folder / "results.json").write_text(json.dumps({
        "task": "segmentation", "protocol": "linear", "model": model, "dataset": "d", "level": "patient",
        "metric_policy": policy, "metrics": metrics}))
    return folder


def test_seed000_runs_are_rebootstrapped_from_pooled_pixels(tmp_path):
    """A seed000 run's per-patient Dice in the bootstrap = the CSV's tp/fp/fn pooled by hand per patient and
    class (not the mean of the per-image Dice column)."""
    run = read_eval_run(_policy_seg_run(tmp_path / "s", "m", "seed000", seed=3))
    assert run.metric_policy == "seed000"
    uv = load_segmentation(run)
    rows = _read(tmp_path / "s" / "predictions" / "per_image_class.csv")
    for patient in ("P0", "P1", "P2", "P3"):
        per_class, per_image_mean = [], []
        for c in ("1", "2"):
            sel = [r for r in rows if r["patient"] == patient and r["class"] == c]
            tp, fp, fn = (sum(int(r[k]) for r in sel) for k in ("tp", "fp", "fn"))
            per_class.append(2 * tp / (2 * tp + fp + fn))
            per_image_mean.append(np.nanmean([float(r["dice"]) for r in sel]))
        assert uv.values["dice"][patient] == pytest.approx(np.mean(per_class))
        assert uv.values["dice"][patient] != pytest.approx(np.mean(per_image_mean))
    # an old csv without the counts cannot be pooled: left out of the bootstrap with the reason
    (tmp_path / "s" / "predictions" / "per_image_class.csv").write_text(
        "image,patient,class,dice,jaccard,hd95\nx,P0,1,0.5,0.3,2.0\n")
    with pytest.raises(ValueError, match="lacks the tp, fp, fn columns that metric policy seed000 pools"):
        load_segmentation(run)


def test_runs_of_different_metric_policies_are_not_ranked_together(tmp_path, capsys):
    from meddino.cli import main

    root = tmp_path / "runs"
    _policy_seg_run(root / "eomt_seed", "a", "seed000", seed=1)
    make_seg_run(root / "linear_old", "b", "d", 0.6, seed=2)  # written before policies: monai
    _policy_seg_run(root / "linear_new", "c", "monai", seed=3)
    assert main(["report", str(root), "bootstrap.samples=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("meddino: error: "), err
    assert "cannot rank segmentation runs scored under different metric policies:" in err[0]
    assert f"{root / 'eomt_seed'} (metric_policy seed000) and {root / 'linear_new'} (metric_policy monai)" in err[0]
    assert not (root / "report").exists()
    # one policy throughout is fine
    shutil.rmtree(root / "eomt_seed")
    assert main(["report", str(root), "bootstrap.samples=5"]) == 0
    capsys.readouterr()
    assert "segmentation metrics computed under metric policy monai" in (root / "report" / "report.html").read_text()


def test_rank_metrics_are_configurable_and_a_typo_is_one_line(tmp_path, capsys):
    from meddino.cli import main

    root = tmp_path / "runs"
    for q, m in ((0.8, "top"), (0.4, "low")):
        make_seg_run(root / m, m, "d", quality=q, seed=int(q * 10))
        make_cls_run(root / f"cls_{m}", m, "d", noise=1 - q, seed=int(q * 10))
    rep = make_report(ReportConfig(runs=str(root), bootstrap={"samples": 10}))
    assert rep.rank_keys == {"segmentation": ["dice / d", "hd95 / d"], "classification": ["auroc / d"]}
    rep = make_report(ReportConfig(runs=str(root), bootstrap={"samples": 10},
                                   rank_metrics={"segmentation": ["jaccard"], "classification": ["auroc", "accuracy"]}))
    assert rep.rank_keys == {"segmentation": ["jaccard / d"], "classification": ["auroc / d", "accuracy / d"]}
    assert main(["report", str(root), "rank_metrics.segmentation=[dice,hd59]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rank_metrics.segmentation: 'hd59' is not a metric of the segmentation runs" in err[0]
    assert "(they have: dice, hd95, jaccard)" in err[0]
    assert main(["report", str(root), "rank_metrics.phase=[]"]) == 2
    assert "rank_metrics.phase" in capsys.readouterr().err


def test_models_are_paired_and_ranked_only_within_their_protocol(tmp_path, cli):
    """kNN and linear runs of two models: each protocol has its own bootstrap group, ranking and summary
    line; no paired row or rank mixes a kNN run with a linear one."""
    root = tmp_path / "runs"
    for protocol, (cont, start) in (("knn", (0.02, 0.4)), ("linear", (0.1, 0.6))):  # cont beats start each time
        make_cls_run(root / f"start_{protocol}", "start", "d", start, seed=1, protocol=protocol)
        make_cls_run(root / f"cont_{protocol}", "cont", "d", cont, seed=2, protocol=protocol)
    rep = make_report(ReportConfig(runs=str(root), bootstrap={"samples": 40, "seed": 0}))
    assert sorted((g.dataset, g.setting, tuple(g.models)) for g in rep.groups) == [
        ("d", "knn", ("cont [knn]", "start [knn]")), ("d", "linear", ("cont [linear]", "start [linear]"))]
    assert set(rep.ranks) == {"classification [knn]", "classification [linear]"}
    assert list(rep.ranks["classification [linear]"]) == ["cont [linear]", "start [linear]"]
    paired = rep.tables["classification_paired"]
    assert paired and all(split_label(r["model_a"])[1] == split_label(r["model_b"])[1] == r["setting"]
                          for r in paired)
    assert {r["setting"] for r in rep.tables["classification_ranks"]} == {"knn", "linear"}

    out = tmp_path / "report"
    res = cli("report", str(root), f"out={out}", "bootstrap.samples=40")
    assert res.returncode == 0, res.stderr
    page = (out / "report.html").read_text()
    assert "Best mean bootstrap rank (knn): <b>cont [knn]</b>" in page
    assert "Best mean bootstrap rank (linear): <b>cont [linear]</b>" in page
    assert (out / "figures" / "ranks_classification__knn_.png").read_bytes().startswith(b"\x89PNG")


def test_the_start_checkpoint_is_iteration_0_of_the_metric_vs_iteration_series(tmp_path, cli):
    """The same protocol run on the checkpoint the pretraining run started from (its config's init=) is
    the series' iteration 0, whether that pretraining run is under the report's folder or not."""
    root = tmp_path / "runs"
    start = tmp_path / "starts" / "generic.safetensors"
    start.parent.mkdir()
    start.write_bytes(b"")
    pre = root / "pretrain"
    pre.mkdir(parents=True)
    (pre / "config.yaml").write_text(f"method: {{version: v2}}\ninit: {start}\n")
    (pre / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 5.0}) + "\n")
    for it, dice in ((100, 0.6), (200, 0.7)):
        make_seg_run(root / f"it{it}", f"ckpt{it}", "d", quality=dice, seed=it, dice_mean=dice,
                     backbone=str(pre / "checkpoints" / f"teacher_backbone_{it:08d}.safetensors"))
    make_seg_run(root / "generic", "generic", "d", quality=0.4, seed=3, dice_mean=0.4, backbone=str(start))
    rep = make_report(ReportConfig(runs=str(root), bootstrap={"samples": 0}))
    rows = [r for r in rep.tables["iterations"] if r["metric"] == "dice"]
    assert [(r["iteration"], r["mean"]) for r in rows] == [(0, 0.4), (100, 0.6), (200, 0.7)]

    out = tmp_path / "report"
    assert cli("report", str(root), f"out={out}", "bootstrap.samples=0").returncode == 0
    table = _read(out / "tables" / "iterations.csv")
    assert [r["iteration"] for r in table if r["metric"] == "dice"] == ["0", "100", "200"]
    # a pretraining run from a random init has no iteration 0
    (pre / "config.yaml").write_text("method: {version: v2}\ninit: null\n")
    rep = make_report(ReportConfig(runs=str(root), bootstrap={"samples": 0}))
    assert [r["iteration"] for r in rep.tables["iterations"] if r["metric"] == "dice"] == [100, 200]
