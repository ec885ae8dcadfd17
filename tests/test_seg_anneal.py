"""EoMT's mask annealing in the training loop (``train_fold``): the probabilities follow completed optimiser
steps, no epoch from before the annealing ends is kept or counts towards early stopping, a run too short to
finish it is refused up front, and ``eomt.mask_annealing=false`` keeps the masks on in every step."""

from __future__ import annotations

import pytest
import torch
from test_seg_data import make_cholec

from meddino.errors import ConfigError
from meddino.tasks.seg import train as seg_train
from meddino.tasks.seg.config import SegConfig
from meddino.tasks.seg.data import load_seg_data
from meddino.tasks.seg.eomt import EoMT, anneal_windows, mask_annealing_probs
from meddino.tasks.seg.folds import make_folds


class _Run:
    def __init__(self):
        self.rows = []

    def log(self, step, **kw):
        self.rows.append({"step": step, **kw})


def _cfg(root, epochs, eomt, early_stop=1, max_steps=1):
    return SegConfig.model_validate({
        "backbone": "random:dinov2_tiny", "head": "eomt", "freeze_backbone": False,
        "data": {"layout": "cholecseg8k", "root": str(root), "image_size": 32, "folds": 3, "val_fraction": 0.5},
        "train": {"epochs": epochs, "batch_size": 1, "early_stop": early_stop, "plateau_patience": 10,
                  "max_steps_per_epoch": max_steps, "augment": False, "device": "cpu", "lr": 1e-3},
        "eomt": {"num_queries": 4, "num_points": 1024, "head_warmup_steps": 0, "backbone_warmup_steps": 1, **eomt},
    })


@pytest.fixture
def cholec(tmp_path):
    return make_cholec(tmp_path / "cholec", videos=3, frames=2)


def _spy_forward(monkeypatch):
    """Records the ``attn_probs`` of every EoMT forward pass (None: an inference pass) and, per pass, whether
    each masked block's attention mask was built with every query keeping its mask."""
    calls = []
    forward, attn_mask = EoMT.forward, EoMT._attn_mask

    def spy_forward(self, backbone, x, frozen=False, attn_probs=None, deep_supervision=False):
        calls.append({"probs": None if attn_probs is None else list(attn_probs), "all_kept": []})
        return forward(self, backbone, x, frozen=frozen, attn_probs=attn_probs, deep_supervision=deep_supervision)

    def spy_mask(self, mask_logits, grid, num_tokens, prefix, keep):
        calls[-1]["all_kept"].append(bool(keep.all()))
        return attn_mask(self, mask_logits, grid, num_tokens, prefix, keep)

    monkeypatch.setattr(EoMT, "forward", spy_forward)
    monkeypatch.setattr(EoMT, "_attn_mask", spy_mask)
    return calls


def _train(cfg, monkeypatch, val_values=None):
    data = load_seg_data(cfg.data)
    fold = make_folds(data, cfg.data, cfg.seed)[0]
    if val_values is not None:  # the validation Dice of each epoch, scripted (validate returns Dice, loss)
        values = iter(val_values)
        monkeypatch.setattr(seg_train, "validate", lambda *a, **k: (next(values), float("nan")))
    run = _Run()
    model, info, *_ = seg_train.train_fold(cfg, data, fold, run, torch.device("cpu"), 0)
    return model, info, run.rows


def test_early_stopping_cannot_keep_an_epoch_from_before_annealing_ends(cholec, monkeypatch):
    """The validation Dice is best at epoch 0 and falls every epoch after. One step per epoch, annealing over
    3 steps, early_stop 1: the loop used to keep epoch 0 and stop after epoch 1, with masks still on. Now
    epochs 0 and 1 (ending at steps 1, 2) are neither kept nor counted; epoch 2 (step 3, annealing over) is
    the first that may be kept, epoch 3 does not improve, and the patience of 1 stops the run there."""
    cfg = _cfg(cholec, epochs=8, eomt={"anneal_steps": 3})
    calls = _spy_forward(monkeypatch)
    model, info, rows = _train(cfg, monkeypatch, val_values=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    assert info["anneal_end_step"] == 3
    assert info["best_epoch"] == 2 and info["best_val_dice"] == pytest.approx(0.7)
    assert info["epochs_run"] == 4 and info["steps"] == 4
    # the kept epoch trained its last step with every mask already off
    kept = [r for r in rows if r.get("epoch") == 2][0]
    assert [v for k, v in kept.items() if k.startswith("mask_prob_")] == [0.0, 0.0, 0.0]
    # each training step used the probabilities of its completed-step count (the validation is scripted)
    windows = anneal_windows(model.head.num_blocks, 3)
    assert [c["probs"] for c in calls] == [mask_annealing_probs(k, windows) for k in range(4)]


def test_without_annealing_the_first_epoch_may_be_kept(cholec, monkeypatch):
    """The control: eomt.mask_annealing=false holds nothing off, so the same scripted Dice keeps epoch 0."""
    cfg = _cfg(cholec, epochs=8, eomt={"mask_annealing": False})
    _, info, _ = _train(cfg, monkeypatch, val_values=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    assert info["best_epoch"] == 0 and info["epochs_run"] == 2 and "anneal_end_step" not in info


def test_mask_annealing_false_keeps_every_mask_on_in_training_and_validation(cholec, monkeypatch):
    cfg = _cfg(cholec, epochs=3, eomt={"mask_annealing": False}, early_stop=5, max_steps=2)
    calls = _spy_forward(monkeypatch)
    model, info, rows = _train(cfg, monkeypatch)
    l2 = model.head.num_blocks
    train_calls = [c for c in calls if c["probs"] is not None]
    assert len(train_calls) == info["steps"] == 6
    for c in train_calls:  # every step, every masked block: all masks applied
        assert c["probs"] == [1.0] * l2 and c["all_kept"] == [True] * l2
    val_calls = [c for c in calls if c["probs"] is None]
    assert val_calls and all(c["all_kept"] == [True] * l2 for c in val_calls)  # inference masks too
    assert all(r["mask_prob_0"] == 1.0 for r in rows)


def test_default_annealing_is_five_sixths_of_the_run(cholec):
    cfg = _cfg(cholec, epochs=6, eomt={}, max_steps=2)
    assert seg_train.anneal_end(cfg, 2, "fold 0") == 10  # round(5/6 * 12)
    by_epochs = cfg.model_copy(update={"eomt": cfg.eomt.model_copy(update={"anneal_epochs": 2.5})})
    assert seg_train.anneal_end(by_epochs, 4, "fold 0") == 10  # 2.5 epochs x 4 steps
    assert seg_train.anneal_end(cfg.model_copy(update={"head": "linear"}), 2, "fold 0") is None


def test_a_run_too_short_to_finish_annealing_is_refused_before_training(cholec):
    cfg = _cfg(cholec, epochs=2, eomt={"anneal_steps": 5}, max_steps=2)
    data = load_seg_data(cfg.data)
    folds = make_folds(data, cfg.data, cfg.seed)
    with pytest.raises(ConfigError) as exc:
        seg_train.check_annealing(cfg, data, folds)
    assert str(exc.value).startswith("fold 0: EoMT mask annealing needs 5 optimiser steps (eomt.anneal_steps=5), "
                                     "the run has 4 (train.epochs=2 x 2 per epoch)")
    ok = _cfg(cholec, epochs=2, eomt={"anneal_steps": 4}, max_steps=2)
    seg_train.check_annealing(ok, data, folds)  # exactly long enough
    with pytest.raises(ValueError, match="eomt.anneal_epochs=3 is longer than the run"):
        _cfg(cholec, epochs=2, eomt={"anneal_epochs": 3})
    with pytest.raises(ValueError, match="exclude each other"):
        _cfg(cholec, epochs=2, eomt={"anneal_epochs": 1, "anneal_steps": 1})


def test_a_model_without_annealing_predicts_masked_after_save_and_load(tmp_path):
    """model.json keeps mask_annealing (and says which inference it implies), so `predict seg` rebuilds
    the masked inference pass, not the plain ViT."""
    from meddino.models import build_backbone
    from meddino.tasks.seg.heads import SEG_HEADS, SegmentationModel
    from meddino.tasks.seg.predict import load_seg_model, model_meta, save_fold_model

    torch.manual_seed(0)
    bb = build_backbone("dinov2_tiny")
    with torch.no_grad():  # LayerScale 1 so the mask path changes the output visibly
        for name, p in bb.named_parameters():
            if "gamma" in name:
                p.fill_(1.0)
    model = SegmentationModel(bb, "eomt", 3, freeze_backbone=False,
                              eomt={"num_queries": 4, "mask_annealing": False}).eval()
    record = SEG_HEADS["eomt"].record(model.head, model.options)
    assert record["inference"] == "masked" and record["mask_annealing"] is False
    meta = model_meta(model, ["bg", "a", "b"], (32, 32), (0.5,) * 3, (0.2,) * 3, 255, "x", eomt=record)
    save_fold_model(tmp_path / "model", model, meta, 0, {"best_val_dice": 0.5})
    loaded, _ = load_seg_model(tmp_path)
    assert loaded.head.masked_inference
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.class_scores(x), loaded.class_scores(x), atol=1e-6)
    plain = model(x, attn_probs=[0.0] * model.head.num_blocks)
    assert not torch.allclose(loaded(x)["pred_masks"], plain["pred_masks"], atol=1e-4)
