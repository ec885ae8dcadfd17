"""`meddino demo --quick` runs end to end on the bundled data and produces the report."""

from __future__ import annotations

import json
import re

import pytest


@pytest.mark.slow
def test_demo_quick_produces_report(tmp_path, cli):
    res = cli("demo", "--quick", f"out={tmp_path / 'demo'}", timeout=1200)
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
    # the continued checkpoint really moved away from the shipped generic start it was initialised from
    from safetensors.torch import load_file

    from meddino.demo import generic_start

    a = load_file(str(generic_start()))
    b = load_file(str(runs / "pretrain" / "teacher_backbone.safetensors"))
    assert any((a[k] - b[k]).abs().max() > 1e-4 for k in a)


def test_demo_rejects_unknown_option(cli):
    res = cli("demo", "--quick", "speed=fast")
    assert res.returncode == 2 and "only out=DIR" in res.stderr
