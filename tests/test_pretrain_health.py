"""Training-health diagnostics (meddino.pretrain.health) against hand computations, the collapse detector,
and their wiring into the engine, metrics.jsonl, the CLI exit code and the report's curves."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from meddino.pretrain.checkpoint import list_checkpoints
from meddino.pretrain.engine import TrainingCollapsed, run_pretrain
from meddino.pretrain.health import (
    CollapseDetector,
    HealthWindow,
    effective_rank,
    kl_divergence,
    mean_entropy,
    prototype_usage,
    teacher_information,
)
from meddino.runlog import read_metrics

from test_pretrain_engine import config, make_images

HEALTH_KEYS = {"teacher_entropy", "teacher_information", "student_entropy", "ln_k", "kl_teacher_student",
               "prototype_usage", "effective_rank"}
IBOT_KEYS = {"ibot_teacher_entropy", "ibot_teacher_information", "ibot_student_entropy", "ibot_kl_teacher_student",
             "ibot_prototype_usage"}


# ---------------------------------------------------------------------------------------------- pure
def test_entropy_uniform_onehot_and_by_hand():
    k = 256
    assert mean_entropy(torch.full((4, k), 1.0 / k)) == pytest.approx(math.log(k), abs=1e-5)
    assert mean_entropy(torch.eye(7)) == pytest.approx(0.0, abs=1e-7)
    p = np.array([[0.5, 0.25, 0.25], [0.9, 0.05, 0.05]])
    want = np.mean(-(p * np.log(p)).sum(1))
    assert mean_entropy(torch.tensor(p)) == pytest.approx(want, rel=1e-6)
    assert mean_entropy(torch.tensor(p).view(2, 1, 3)) == pytest.approx(want, rel=1e-6)  # [T, B, K]


def test_teacher_information_by_hand_and_its_two_zeros():
    k = 64
    assert teacher_information(torch.full((8, k), 1.0 / k)) == pytest.approx(0.0, abs=1e-6)  # uniform collapse
    one = torch.nn.functional.one_hot(torch.full((8,), 5), k).float()
    assert teacher_information(one) == pytest.approx(0.0, abs=1e-6)  # one-prototype collapse
    spread = torch.nn.functional.one_hot(torch.arange(8), k).float()
    assert teacher_information(spread) == pytest.approx(math.log(8), abs=1e-5)  # each image its own prototype
    rng = np.random.default_rng(1)
    p = _softmax(rng.standard_normal((6, 5)))
    mean = p.mean(0)
    by_hand = np.mean([(row * np.log(row / mean)).sum() for row in p])  # mean KL(q_i || mean q)
    assert teacher_information(torch.tensor(p)) == pytest.approx(by_hand, rel=1e-6)
    assert teacher_information(torch.tensor(p).view(2, 3, 5)) == pytest.approx(by_hand, rel=1e-6)  # [T, B, K]
    # DINOv3's plain-Linear start: logits w_k . z_i with w ~ N(0, 0.02^2), distinct unit z: about
    # (0.02 / t)^2 (1 - c) / 2 nats (the docstring's estimate), with the entropy within 1% of ln K
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 64, generator=g) * 0.02
    z = torch.nn.functional.normalize(torch.randn(256, 64, generator=g), dim=-1)  # c ~ 0
    q = torch.softmax(z @ w.T / 0.04, dim=-1)
    assert teacher_information(q) == pytest.approx(0.5 * (0.02 / 0.04) ** 2, rel=0.15)
    assert mean_entropy(q) > 0.98 * math.log(4096)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_kl_by_hand_and_crop_pairing():
    rng = np.random.default_rng(0)
    q = _softmax(rng.standard_normal((6, 5)) * 3)
    s = rng.standard_normal((6, 5))
    tau = 0.1
    ps = _softmax(s / tau)
    want = np.mean((q * (np.log(q) - np.log(ps))).sum(1))
    assert kl_divergence(torch.tensor(q), torch.tensor(s), tau) == pytest.approx(want, rel=1e-5)
    # [T=2, B=3, K] teacher vs [S=4, B=3, K] student: teacher crop i with student crop i (the globals)
    s4 = np.concatenate([s, rng.standard_normal((6, 5))]).reshape(4, 3, 5)
    got = kl_divergence(torch.tensor(q).view(2, 3, 5), torch.tensor(s4), tau)
    assert got == pytest.approx(want, rel=1e-5)
    assert kl_divergence(torch.tensor(q), torch.log(torch.tensor(q)) * tau, tau) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        kl_divergence(torch.tensor(q).view(2, 3, 5), torch.tensor(s).view(3, 2, 5), tau)


def test_prototype_usage_by_hand():
    assert prototype_usage(torch.tensor([3, 3, 1, 7, 1]), 10) == pytest.approx(3 / 10)
    assert prototype_usage(torch.zeros(100, dtype=torch.long), 256) == pytest.approx(1 / 256)
    assert prototype_usage(torch.arange(8), 8) == 1.0


def test_effective_rank_orthonormal_identical_and_bounded():
    q, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    for r in (1, 3, 10):
        assert effective_rank(q[:r] * 5.0) == pytest.approx(r, rel=1e-4)  # row scale is normalised away
    same = torch.randn(1, 16).repeat(20, 1)
    assert effective_rank(same) == pytest.approx(1.0, abs=1e-4)
    x = torch.randn(8, 64)
    assert 1.0 < effective_rank(x) <= 8.0 + 1e-4
    # by hand: p_i = s_i / sum s + eps on the L2-normalised rows
    xn = x.double() / x.double().norm(dim=1, keepdim=True)
    s = np.linalg.svd(xn.numpy(), compute_uv=False)
    p = s / s.sum() + 1e-7
    assert effective_rank(x) == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-4)


def test_health_window_keys_reset_and_values():
    k, b, n_local = 16, 4, 2
    win = HealthWindow(student_temp=0.1)
    q = torch.full((2, b, k), 1.0 / k)
    logits = torch.zeros((2 + n_local) * b, k)
    feats = torch.randn(1, 8).repeat(2 * b, 1)
    nine = torch.nn.functional.one_hot(torch.full((2, b), 9), k).float()
    win.update(nine, logits, feats, keep=False)  # not a log step: only its argmax (9) is kept
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), k).float().view(2, b, k)
    win.update(onehot, logits, feats)
    d = win.compute()
    assert set(d) == HEALTH_KEYS
    assert d["ln_k"] == pytest.approx(math.log(k))
    assert d["teacher_entropy"] == pytest.approx(0.0, abs=1e-6)  # the last step only
    assert d["student_entropy"] == pytest.approx(math.log(k), abs=1e-5)
    assert d["kl_teacher_student"] == pytest.approx(math.log(k), abs=1e-4)  # KL(one-hot || uniform)
    assert d["prototype_usage"] == pytest.approx(5 / k)  # argmax 9 and 0..3 over the whole window
    assert d["effective_rank"] == pytest.approx(1.0, abs=1e-4)
    assert win.compute() == {}  # reset
    win.update(q, logits, feats, keep=False)
    assert win.compute() == {} and win._argmax == []
    pq = torch.full((5, 8), 1.0 / 8)
    win.update(q, logits, feats, patch_probs=pq, patch_logits=torch.zeros(5, 8))
    d = win.compute()
    assert set(d) == HEALTH_KEYS | IBOT_KEYS
    assert d["ibot_teacher_entropy"] == pytest.approx(math.log(8), abs=1e-5)
    assert d["ibot_kl_teacher_student"] == pytest.approx(0.0, abs=1e-5)
    assert d["ibot_prototype_usage"] == pytest.approx(1 / 8)


def test_detector_fires_after_patience_once_and_rearms():
    ln_k = math.log(256)
    det = CollapseDetector(ln_k, entropy_tolerance=0.02, min_rank=1.5, patience=3)
    high = 0.99 * ln_k
    assert [det.update(s, high, 5.0) for s in (1, 2)] == [None, None]
    msg = det.update(3, high, 5.0)
    assert msg is not None and "teacher entropy" in msg and "2% of ln K=5.545" in msg and "3 log steps" in msg
    assert "\n" not in msg and "rank" not in msg
    assert [det.update(s, high, 5.0) for s in (4, 5, 6)] == [None] * 3  # once per episode
    assert det.update(7, 0.9 * ln_k, 5.0) is None  # clears: re-armed
    assert [det.update(s, high, 5.0) for s in (8, 9)] == [None, None]
    assert "teacher entropy" in det.update(10, high, 5.0)
    # the rank signal, independently; exactly at the tolerance counts, a NaN/None does not
    det = CollapseDetector(ln_k, min_rank=1.5, patience=2)
    assert det.update(1, 0.5, 1.2) is None
    msg = det.update(2, 0.5, 1.1)
    assert msg is not None and "effective rank" in msg and "below 1.5 for 2 log steps" in msg
    assert "teacher entropy" not in msg
    assert det.update(3, 0.98 * ln_k, None) is None  # rank not measured: clears
    msg = det.update(4, 0.98 * ln_k, float("nan"))
    assert "teacher entropy" in msg and "effective rank" not in msg
    assert det.update(5, 0.5, 1.0) is None and det.update(6, 0.5, 1.0).count("effective rank") == 1  # re-armed
    off = CollapseDetector(ln_k, min_rank=None, patience=1)
    assert off.update(1, 1.0, 1.0) is None


def test_detector_uniform_rule_needs_targets_that_ignore_the_image():
    """DINOv3's healthy start (entropy ~0.99 ln K, targets still image-dependent) is not uniform collapse."""
    ln_k = math.log(256)
    det = CollapseDetector(ln_k, min_rank=None, patience=2, min_information=0.005)
    high = 0.99 * ln_k
    assert [det.update(s, high, None, 0.05) for s in (1, 2, 3)] == [None] * 3  # healthy v3 start: quiet
    assert det.update(4, high, None, 3e-4) is None
    msg = det.update(5, high, None, 2e-4)  # 2 log steps of image-independent targets
    assert msg is not None and "uniform collapse" in msg and "0.0002 nats about the image" in msg
    assert det.update(6, high, None, 0.05) is None  # the information came back: re-armed
    assert det.update(7, high, None, None) is None and "uniform collapse" in det.update(8, high, None, None)
    entropy_only = CollapseDetector(ln_k, min_rank=None, patience=1, min_information=0)
    assert "uniform collapse" in entropy_only.update(1, high, None, 0.05)


# ---------------------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("health_images") / "imgs", n=16)


COLLAPSE = ["optim.teacher_temp_start=100", "optim.teacher_temp=100", "train.log_every=1", "health.patience=2"]


def test_healthy_run_logs_diagnostics_without_warning(images, tmp_path):
    out = tmp_path / "run"
    run_pretrain(config("dinov1_tiny", images, out, "train.iterations=8", "train.log_every=2",
                        "train.checkpoint_every=8", "health.patience=2"))
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert len(rows) == 4
    for r in rows:
        assert HEALTH_KEYS <= r.keys() and not (IBOT_KEYS & r.keys())
        assert r["ln_k"] == pytest.approx(math.log(256))
        assert r["teacher_entropy"] < 0.95 * r["ln_k"]
        assert 0 < r["prototype_usage"] <= 1 and r["effective_rank"] > 1.5 and r["kl_teacher_student"] >= 0
    assert not any("collapse_warning" in r for r in read_metrics(out))


def test_ibot_diagnostics_logged(images, tmp_path):
    out = tmp_path / "run"
    run_pretrain(config("dinov2_tiny", images, out, "train.iterations=4", "train.log_every=2",
                        "train.checkpoint_every=4", "method.ibot.mask_probability=1.0"))
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert len(rows) == 2 and all((HEALTH_KEYS | IBOT_KEYS) <= r.keys() for r in rows)


def test_collapsing_run_warns_once(images, tmp_path, capsys):
    out = tmp_path / "run"
    run_pretrain(config("dinov1_tiny", images, out, "train.iterations=5", "train.checkpoint_every=5", *COLLAPSE))
    rows = read_metrics(out)
    warned = [r for r in rows if "collapse_warning" in r]
    assert [r["step"] for r in warned] == [2]
    assert "teacher entropy" in warned[0]["collapse_warning"]
    assert all(r["teacher_entropy"] == pytest.approx(r["ln_k"], abs=1e-3) for r in rows if "loss" in r)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("meddino: warning")]
    assert len(lines) == 1 and "teacher entropy" in lines[0]
    assert (out / "teacher_backbone.safetensors").is_file()  # a warning does not stop the run


@pytest.mark.slow
def test_stop_on_collapse_exits_2_keeping_last_good_checkpoint(images, tmp_path, cli):
    out = tmp_path / "run"
    res = cli("pretrain", "--config", "dinov1_tiny", f"data.path={images}", f"out={out}", "train.iterations=10",
              "train.checkpoint_every=1", "train.stop_on_collapse=true", *COLLAPSE)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert lines[0].startswith("meddino: error: training collapsed") and "teacher entropy" in lines[0]
    assert [it for it, _ in list_checkpoints(out / "checkpoints")] == [1]  # none of the collapsed state
    assert lines[0].rstrip().endswith("checkpoint_00000001.pt")
    rows = read_metrics(out)
    assert rows[-1]["step"] == 2 and "collapse_warning" in rows[-1]


def test_stop_on_collapse_raises_user_error_in_process(images, tmp_path):
    with pytest.raises(TrainingCollapsed, match="none written yet"):
        run_pretrain(config("dinov1_tiny", images, tmp_path / "run", "train.iterations=6",
                            "train.checkpoint_every=6", "train.stop_on_collapse=true", *COLLAPSE))


def test_health_disabled(images, tmp_path):
    out = tmp_path / "run"
    run_pretrain(config("dinov1_tiny", images, out, "train.iterations=2", "train.log_every=1",
                        "train.checkpoint_every=2", "health.enabled=false"))
    assert not any(HEALTH_KEYS & r.keys() for r in read_metrics(out))


# ---------------------------------------------------------------------------------------------- report
def test_report_curves_have_health_panels_and_warning():
    from meddino.report.figures import curve_panels, curves_figure

    rows = [{"step": s, "loss": 5.0, "dino": 5.0, "teacher_entropy": 5.5, "student_entropy": 5.0, "ln_k": 5.545,
             "kl_teacher_student": 0.1, "prototype_usage": 0.01, "effective_rank": 1.1, "lr": 1e-4,
             "teacher_information": 2e-4} for s in (1, 2, 3)]
    rows[-1]["collapse_warning"] = "step 3: teacher entropy ..."
    names = [name for name, _ in curve_panels(rows)]
    assert names[:6] == ["losses", "entropy vs ln K", "teacher information about the image (nats)",
                         "KL(teacher || student)", "prototype usage", "effective rank (teacher CLS)"]
    assert all("ln_k" not in keys for _, keys in curve_panels(rows))
    png = curves_figure(rows, "run")
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
