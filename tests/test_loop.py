"""The training-loop kit (:mod:`meddino.tasks.loop`): hand-computed selection, patience and ties, exact restore,
and a non-finite loss ending the fine-tuning verbs with :class:`TrainingDiverged` (one line, exit code 2)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from meddino.errors import TrainingDiverged, UserError
from meddino.tasks.loop import BestSnapshot, EarlyStopping, check_finite


def _fill(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def _run(values, mode="max", start=None, patience=None):
    """Feed validation values epoch by epoch; (best epoch, best value, epochs run, improved flags)."""
    best, stop = BestSnapshot(mode, start=start), EarlyStopping(patience)
    model = nn.Linear(2, 1)
    flags = []
    for epoch, v in enumerate(values):
        flags.append(best.update(v, epoch, model))
        if stop.step(flags[-1]):
            break
    return best.epoch, best.value, epoch + 1, flags


# ------------------------------------------------------------------------------------------ selection
def test_mode_max_keeps_strictly_better_and_earlier_on_ties():
    assert _run([0.5, 0.7, 0.7, 0.6]) == (1, 0.7, 4, [True, True, False, False])
    assert _run([0.5, 0.7, 0.7, 0.9]) == (3, 0.9, 4, [True, True, False, True])


def test_mode_min():
    assert _run([1.0, 0.5, 0.9, 0.5, 0.8], mode="min") == (1, 0.5, 5, [True, True, False, False, False])
    assert _run([3.0, 2.0, 1.0], mode="min") == (2, 1.0, 3, [True, True, True])


def test_start_value():
    # start=None (phase): the first value is taken whatever it is, even NaN, and NaN is never beaten
    best, _, _, flags = _run([float("nan"), 0.9])
    assert best == 0 and flags == [True, False]
    # start=-inf (seg): NaN is not better than -inf, the first finite value is
    best, value, _, flags = _run([float("nan"), 0.2, 0.1], start=-math.inf)
    assert (best, value, flags) == (1, 0.2, [False, True, False])
    # start=inf, mode min (finetune): a value equal to the start is a tie, not an improvement
    snap = BestSnapshot("min", start=math.inf)
    assert not snap.update(math.inf, 0, nn.Linear(1, 1)) and snap.epoch is None and snap.state is None
    assert snap.value == math.inf


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        BestSnapshot("best")


# ------------------------------------------------------------------------------------------ patience
def test_early_stopping_counts_consecutive_epochs_without_improvement():
    stop = EarlyStopping(2)
    assert [stop.step(i) for i in (True, False, False)] == [False, False, True]
    stop = EarlyStopping(2)
    assert [stop.step(i) for i in (False, True, False, False)] == [False, False, False, True]
    stop = EarlyStopping(1)
    assert [stop.step(i) for i in (True, False)] == [False, True]


def test_early_stopping_none_never_stops():
    stop = EarlyStopping(None)
    assert not any(stop.step(False) for _ in range(100)) and stop.stale == 100
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(0)


def test_patience_with_snapshot_hand_computed():
    # seg-like: max, early stop after 2 stale epochs; a tie is stale
    assert _run([0.1, 0.3, 0.3, 0.2, 0.4], start=-math.inf, patience=2) == (1, 0.3, 4, [True, True, False, False])
    # finetune-like: min val loss, patience 3; epoch 4 improves and resets the count
    assert _run([1.0, 0.5, 0.6, 0.7, 0.4, 0.5, 0.5, 0.5, 0.1], mode="min", start=math.inf, patience=3)[:3] == (
        4, 0.4, 8)


# ------------------------------------------------------------------------------------------ snapshot
@pytest.mark.parametrize("cpu", [True, False])
def test_snapshot_restores_exactly_the_best_state(cpu):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    snap = BestSnapshot("max", cpu=cpu)
    model.train()
    model(torch.randn(8, 3))  # running statistics (buffers) move away from their defaults
    assert snap.update(0.5, 0, model)
    best = {k: v.clone() for k, v in model.state_dict().items()}
    for epoch, (value, fill) in enumerate([(0.4, 1.0), (0.5, 2.0), (0.1, 3.0)], start=1):
        _fill(model, fill)  # training moves on in place
        model(torch.randn(8, 3))
        assert not snap.update(value, epoch, model)
    # a real copy: the in-place changes of the live weights did not reach it
    assert snap.epoch == 0 and snap.value == 0.5
    assert not torch.equal(model.state_dict()["0.weight"], best["0.weight"])
    assert snap.restore(model)
    final = model.state_dict()
    assert final.keys() == best.keys()
    for k, v in final.items():
        assert torch.equal(v, best[k]), k
    live = dict(model.named_parameters())["0.weight"]
    assert snap.state["0.weight"].data_ptr() != live.data_ptr()
    assert all(v.device.type == "cpu" for v in snap.state.values())


def test_restore_without_snapshot_leaves_the_model():
    model = nn.Linear(2, 2)
    _fill(model, 0.25)
    snap = BestSnapshot("max", start=-math.inf)
    snap.update(float("nan"), 0, model)
    assert not snap.restore(model)
    assert torch.equal(model.weight, torch.full((2, 2), 0.25))


# ------------------------------------------------------------------------------------------ finite loss
def test_check_finite_returns_the_value():
    assert check_finite(torch.tensor(1.5), "eval seg", epoch=0, step=1) == 1.5
    assert check_finite(0.25, "x") == 0.25


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_raises_one_line(bad):
    with pytest.raises(TrainingDiverged) as info:
        check_finite(torch.tensor(bad), "eval seg", fold=0, epoch=3, step=17)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"eval seg: loss is {bad} at fold 0, epoch 3, step 17;")
    assert isinstance(info.value, UserError)


def test_training_diverged_is_one_class():
    from meddino.pretrain.engine import TrainingDiverged as FromEngine

    assert FromEngine is TrainingDiverged and issubclass(TrainingDiverged, UserError)


# ------------------------------------------------------------------------------- through the real CLI
def _one_line_diverged(r, where: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert lines[0].startswith(f"meddino: error: {where}: loss is "), lines[0]
    assert "training diverged" in lines[0] and " epoch " in lines[0] and " step " in lines[0]
    return lines[0]


@pytest.mark.slow
def test_finetune_diverges_in_one_line(cli, tmp_path):
    from test_classify_cli import make_dataset

    manifest = make_dataset(tmp_path / "data")
    r = cli("eval", "finetune", "--config", "finetune_tiny", f"data.manifest={manifest}", "backbone=random:dinov2_tiny",
            f"out={tmp_path / 'run'}", "finetune.mode=bitfit", "finetune.lrs=[1e30]")
    line = _one_line_diverged(r, "eval finetune")
    assert "lr 1e+30" in line and "epoch 0" in line


@pytest.mark.slow
def test_seg_diverges_in_one_line(cli, tmp_path):
    """Segmentation used to raise a bare RuntimeError here (a traceback, exit code 1)."""
    from test_seg_data import make_manifest

    csv = make_manifest(tmp_path / "m", n=8)
    r = cli("eval", "seg", "-c", "seg_tiny", f"data.manifest={csv}", "data.classes=[bg,a,b]", f"out={tmp_path / 'o'}",
            "freeze_backbone=false", "train.lr=1e30", "train.backbone_lr=1e30")
    line = _one_line_diverged(r, "eval seg")
    assert "fold 0" in line


def test_phase_stage2_nan_loss_raises(monkeypatch):
    """The MS-TCN stage used not to look at its loss; now a NaN ends it with TrainingDiverged."""
    from meddino.tasks.phase import stage2
    from meddino.tasks.phase.config import Stage2

    def nan_loss(out, *a, **k):
        return {"loss": out.sum() * float("nan")}

    monkeypatch.setattr(stage2, "mstcn_loss", nan_loss)
    videos = [(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])) for _ in range(2)]

    class Run:
        def log(self, *a, **k):
            pass

    cfg = Stage2(epochs=2, num_stages=1, num_layers=2, channels=4)
    with pytest.raises(TrainingDiverged, match=r"^eval phase stage 2: loss is nan at epoch 1, step 0;"):
        stage2.train_stage2(videos, videos, cfg, 3, torch.device("cpu"), 0, Run())
