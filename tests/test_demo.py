"""`meddino demo --quick` runs end to end on the bundled data and produces the report."""

from __future__ import annotations

import json
import re

import pytest


@pytest.mark.slow
def test_demo_quick_produces_report(tmp_path, cli):
    res = cli("demo", "--quick", f"out={tmp_path / 'demo'}", "log.backends=[tensorboard]", timeout=1200)
    assert res.returncode == 0, res.stderr[-2000:]
    report = tmp_path / "demo" / "report" / "report.html"
    assert report.is_file() and f"open {report}" in res.stdout
    html = report.read_text()
    for section in ("Ranking stability", "Training curves", "PCA", "metric vs iteration: classification"):
        assert section in html
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) >= 4
    runs = tmp_path / "demo" / "runs"
    assert "continued DINOv2 beats generic (natural photos) with P(better) &gt;= 0.95 in" in html
    for run in ("knn_m0", "knn_m1", "knn_m2", "knn_it20", "linear_m0", "linear_m1", "linear_m2", "seg_m0",
                "seg_m1", "seg_m2"):
        results = json.loads((runs / run / "results.json").read_text())
        assert results["metrics"], run
    assert (runs / "pretrain" / "teacher_backbone.safetensors").is_file()
    # the whole demo's ETA in each step's header, and the steps' measured seconds
    headers = [line for line in res.stdout.splitlines() if re.match(r"\[[2-6]/6\] ", line)]
    assert len(headers) == 5 and all(re.search(r"\(\d+:\d\d so far, about \d+:\d\d left\)$", h) for h in headers[:4])
    steps = json.loads((tmp_path / "demo" / "demo_steps.json").read_text())
    assert steps["plan"] == "quick" and len(steps["step_seconds"]) == 6 and sum(steps["shares"]) == pytest.approx(1, abs=1e-3)
    # the generic start is iteration 0 of the continued run's kNN-vs-iteration series
    iters = (tmp_path / "demo" / "report" / "tables" / "iterations.csv").read_text().splitlines()
    assert any(",0," in row and "knn" in row for row in iters[1:]), iters[:4]
    # the continued checkpoint really moved away from the shipped generic start it was initialised from
    from safetensors.torch import load_file

    from meddino.demo import generic_start

    a = load_file(str(generic_start()))
    b = load_file(str(runs / "pretrain" / "teacher_backbone.safetensors"))
    assert any((a[k] - b[k]).abs().max() > 1e-4 for k in a)
    # log.backends reached every step with a log block: each run folder has its TensorBoard run, named
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    tracked = sorted(p.parent.parent.name for p in (tmp_path / "demo").glob("**/tensorboard/events.*"))
    assert tracked == sorted(["pca", "pretrain", "report", "knn_it20", *(f"{v}_m{i}" for v in ("knn", "linear", "seg") for i in range(3))])
    acc = EventAccumulator(str(runs / "knn_m0" / "tensorboard"))
    acc.Reload()
    hp = HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    assert hp.session_start_info.hparams["log.run_name"].string_value == "knn random init"
    assert "demo" in hp.session_start_info.hparams["log.tags"].string_value


def test_demo_rejects_unknown_option(cli):
    res = cli("demo", "--quick", "speed=fast")
    assert res.returncode == 2 and "only out=DIR" in res.stderr


def test_demo_eta_scales_the_measured_shares_by_the_time_taken():
    from meddino.demo import demo_eta

    shares = (0.1, 0.5, 0.4)
    # at half of step 2: 0.1 + 0.25 = 0.35 of the demo done in 35 s -> 0.65 left at the same pace = 65 s
    assert demo_eta(35.0, shares, 2, 0.5) == pytest.approx(65.0)
    assert demo_eta(10.0, shares, 2, 0.0) == pytest.approx(90.0)  # step 1 done in 10 s
    assert demo_eta(50.0, (1, 5, 4), 2, 0.5) == pytest.approx(demo_eta(50.0, shares, 2, 0.5))  # only ratios count
    assert demo_eta(99.0, shares, 3, 1.0) == pytest.approx(0.0)
    assert demo_eta(1.0, shares, 1, 0.1) is None  # 1 % done: too little to scale by


def test_progress_lines_carry_the_enclosing_eta(capsys, monkeypatch):
    from meddino.runlog import Progress, outer_progress

    monkeypatch.delenv("MEDDINO_QUIET", raising=False)  # the suite silences progress lines
    seen = []
    with outer_progress(lambda f: seen.append(f) or f"demo 2/6 eta {f:.2f}"):
        with Progress(10, "pretrain", unit="img", interval=0.0) as bar:
            bar.advance(5)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("demo 2/6 eta 0.50 | pretrain: 5/10") and seen[-1] == 0.5
    with Progress(10, "pretrain", unit="img", interval=0.0) as bar:  # outside: no prefix
        bar.advance(1)
    assert capsys.readouterr().err.startswith("pretrain: 1/10")
