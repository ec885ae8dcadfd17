"""`meddino profile`: latency statistics against numpy, the max-batch search, the CLI on a tiny backbone, the
pretraining throughput on CPU, bad input, and the report picking up profile.json."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from meddino.profile.run import ProfileConfig, largest_batch, parse_heads, run_profile
from meddino.profile.timing import count_params, latency_stats, time_calls


def test_latency_stats_by_hand():
    s = latency_stats([4.0, 1.0, 100.0, 2.0, 3.0], batch_size=2)
    assert s["latency_ms_median"] == 3.0
    assert s["latency_ms_p95"] == pytest.approx(4 + 0.8 * (100 - 4))  # position 0.95 * 4 = 3.8, linear
    assert s["latency_ms_mean"] == pytest.approx(22.0) and s["latency_ms_min"] == 1.0
    assert s["fps"] == pytest.approx(2 * 1000 / 3.0) and s["repeats"] == 5


def test_time_calls_counts_warmup_and_measures():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.004)

    ms = time_calls(fn, warmup=3, repeats=4, device=torch.device("cpu"))
    assert len(calls) == 7 and len(ms) == 4
    assert all(m >= 4.0 for m in ms)


@pytest.mark.parametrize(("limit_true", "limit", "expected"), [
    (37, 4096, (37, 38)), (1, 4096, (1, 2)), (64, 4096, (64, 65)), (0, 4096, (0, 1)), (10_000, 100, (100, None)),
])
def test_largest_batch_doubling_then_bisection(limit_true, limit, expected):
    asked = []

    def fits(b):
        asked.append(b)
        return b <= limit_true

    assert largest_batch(fits, limit) == expected
    assert len(asked) <= 2 * int(np.ceil(np.log2(max(limit, 2)))) + 2  # logarithmic number of probes
    if expected[0] > 1:  # doubling phase first: 1, 2, 4, ...
        assert asked[:3] == [1, 2, 4]


def test_parse_heads():
    assert parse_heads("all") == ["linear_seg", "unet", "eomt", "phase"]
    assert parse_heads("backbone") == []
    assert parse_heads("unet, phase") == ["unet", "phase"]
    with pytest.raises(Exception, match="head: unknown"):
        parse_heads("fpn")


def test_profile_cli_tiny_backbone(tmp_path, cli):
    from meddino.models import build_backbone

    out = tmp_path / "prof"
    res = cli("profile", "backbone=random:dinov2_tiny", "img_size=32", "repeats=3", "warmup=1", f"out={out}")
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and "linear_seg" in res.stdout  # the rich table
    data = json.loads((out / "profile.json").read_text())
    assert data["task"] == "profile"
    for key in ("platform", "cpu_count", "torch", "device_name", "device"):
        assert data["machine"][key]
    assert data["machine"]["torch"] == torch.__version__
    rows = {r["head"]: r for r in data["rows"]}
    assert set(rows) == {"backbone", "linear_seg", "unet", "eomt", "phase"}
    n_ref = sum(p.numel() for p in build_backbone("dinov2_tiny").parameters())
    assert rows["backbone"]["params_m"] == pytest.approx(n_ref / 1e6)
    for head, r in rows.items():
        assert r["repeats"] == 3 and r["img_size"] == 32 and r["batch_size"] == 1
        assert 0 < r["latency_ms_median"] <= r["latency_ms_p95"]
        assert r["fps"] == pytest.approx(1000.0 / r["latency_ms_median"])
        if head != "backbone":
            assert r["params_m"] > rows["backbone"]["params_m"] and r["head_params_m"] > 0
    # linear head = backbone + one 1x1 conv (D * C + C parameters)
    assert rows["linear_seg"]["head_params_m"] * 1e6 == pytest.approx(64 * 8 + 8)


def test_profile_skips_unavailable_head_with_note(tmp_path):
    cfg = ProfileConfig(backbone="random:dinov2_tiny", img_size=32, repeats=1, warmup=0, head="backbone,eomt",
                        num_queries=4, out=str(tmp_path))
    import meddino.profile.run as run

    original = run.build_head

    def no_eomt(name, backbone, c):
        if name == "eomt":
            raise ImportError("EoMT not installed")
        return original(name, backbone, c)

    run.build_head = no_eomt
    try:
        path = run_profile(cfg)
    finally:
        run.build_head = original
    rows = json.loads(path.read_text())["rows"]
    assert [r["head"] for r in rows] == ["backbone", "eomt"]
    assert rows[1]["note"].startswith("skipped: EoMT not installed") and "latency_ms_median" not in rows[1]


def test_profile_pretrain_recipe_on_cpu(tmp_path):
    cfg = ProfileConfig(recipe="dinov2_tiny", out=str(tmp_path), device="cpu",
                        pretrain={"batch_size": 2, "steps": 1, "warmup": 0})
    rows = json.loads(run_profile(cfg).read_text())["rows"]
    assert len(rows) == 1
    r = rows[0]
    assert r["head"] == "pretraining step" and r["arch"] == "dinov2_tiny" and r["batch_size"] == 2
    assert r["images_per_s"] > 0 and r["images_per_s"] == pytest.approx(2 / r["s_per_step"])
    assert r["max_batch"] == "n/a" and "CPU" in r["note"]


def test_profile_bad_input_exit_2(tmp_path, capsys):
    from meddino.cli import main

    cases = [([], "backbone=CKPT"),
             (["backbone=random:dinov2_tiny", "head=fpn"], "head: unknown"),
             (["backbone=random:dinov2_tiny", "img_size=36"], "patch size"),
             ([f"backbone={tmp_path / 'missing.safetensors'}"], "not found"),
             (["backbone=random:dinov2_tiny", "repeats=0"], "repeats")]
    for argv, text in cases:
        assert main(["profile", *argv, f"out={tmp_path}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("meddino: error:") and text in err[0], err


def test_report_picks_up_profile(tmp_path):
    from meddino.report.build import ReportConfig, make_report

    cfg = ProfileConfig(backbone="random:dinov2_tiny", img_size=32, repeats=2, warmup=0, head="linear_seg",
                        out=str(tmp_path / "runs" / "prof"))
    run_profile(cfg)
    rep = make_report(ReportConfig(runs=str(tmp_path / "runs")))
    rows = rep.tables["profile"]
    assert [r["head"] for r in rows] == ["backbone", "linear_seg"]
    assert rows[0]["device"].startswith("CPU") and rows[0]["latency_ms_median"] > 0


def test_count_params_counts_shared_once():
    lin = torch.nn.Linear(3, 4)
    m = torch.nn.ModuleDict({"a": lin, "b": lin})
    assert count_params(m) == 3 * 4 + 4
