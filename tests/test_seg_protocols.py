"""``data.protocol`` of ``meddino eval seg``: seed 000's fixed test set + train/val folds, seed 001's few-shot
segmentation, the plateau on the validation loss, and "no validation set keeps the last epoch".

Unit tests build folds and draws on generated data in the real layouts; the end-to-end runs (the real CLI,
tiny models, a few steps) check results.json's structure against the CSV rows and metrics.jsonl."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_seg_data import make_cholec

from meddino.config import load_config
from meddino.data.seg_layouts import SegCase
from meddino.errors import ConfigError, DataError
from meddino.tasks.loop import PlateauScale
from meddino.tasks.seg import train as seg_train
from meddino.tasks.seg.config import SegConfig, SegDataConfig
from meddino.tasks.seg.data import FrameDataset, load_seg_data
from meddino.tasks.seg.eomt import MaskClassificationLoss
from meddino.tasks.seg.fewshot import draw_images
from meddino.tasks.seg.folds import Fold, make_folds, split_val
from meddino.tasks.seg.heads import SegmentationModel


def make_split_manifest(root: Path, patients: int = 6, per_patient: int = 3, test: tuple[str, ...] = ("p0", "p1"),
                        h: int = 24, w: int = 32) -> Path:
    """Manifest layout with a split column: ``per_patient`` images of each patient; ``test`` patients' rows
    are ``test``, the others alternate train / val by patient."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["image,mask,patient,split"]
    for p in range(patients):
        pid = f"p{p}"
        split = "test" if pid in test else ("train" if p % 2 else "val")
        for i in range(per_patient):
            mask = np.zeros((h, w), np.uint8)
            y0, x0 = rng.integers(0, h - 10), rng.integers(0, w - 12)
            mask[y0 : y0 + 8, x0 : x0 + 10] = 1
            img = rng.integers(0, 40, (h, w, 3)).astype(np.uint8)
            img[mask == 1] = (220, 40, 40)
            Image.fromarray(img).save(root / f"{pid}_{i}.png")
            Image.fromarray(mask).save(root / f"{pid}_{i}_mask.png")
            rows.append(f"{pid}_{i}.png,{pid}_{i}_mask.png,{pid},{split}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root / "pairs.csv"


# ------------------------------------------------------------------------------------------ the plateau
def test_plateau_on_a_hand_made_validation_loss_sequence():
    """mode=min (seed 000: the lr halves after `patience` epochs without a strictly lower val loss), by hand
    and against torch's ReduceLROnPlateau(mode=min, threshold=0); a NaN loss is an epoch without improvement."""
    losses = [1.0, 0.8, 0.8, 0.9, 0.85, 0.7, 0.7, 0.7, 0.75, float("nan"), 0.6]
    expected = [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]
    ours = PlateauScale(patience=2, factor=0.5, mode="min")
    assert [ours.step(v) for v in losses] == expected
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=2, threshold=0.0)
    for v, e in zip(losses, expected):
        ref.step(v)
        assert opt.param_groups[0]["lr"] == e
    # watching the same numbers as a Dice (higher is better) halves at other epochs
    assert [PlateauScale(2, 0.5, "max").step(v) for v in losses[:5]] != expected[:5]


class _Log:
    def __init__(self):
        self.rows = []

    def log(self, step, **kv):
        self.rows.append({"step": step, **kv})


def _tiny_cfg(manifest: Path, **train) -> SegConfig:
    return SegConfig(backbone="random:dinov2_tiny", head="linear",
                     data={"manifest": str(manifest), "classes": ["bg", "fg"], "image_size": 32},
                     train={"epochs": 8, "batch_size": 4, "max_steps_per_epoch": 1, "early_stop": 50,
                            "device": "cpu", "augment": False, **train})


@pytest.mark.parametrize("monitor", ["val_loss", "dice"])
def test_train_fold_plateau_follows_the_monitored_quantity(tmp_path, monkeypatch, monitor):
    """train_fold's lr follows `train.plateau_monitor`: a hand-made validation sequence whose Dice rises every
    epoch while its loss stalls halves the lr under val_loss (at the epochs the hand replay says), never
    under dice; the best epoch is still chosen on Dice."""
    manifest = make_split_manifest(tmp_path / "m")
    cfg = _tiny_cfg(manifest, plateau_monitor=monitor, plateau_patience=1)
    data = load_seg_data(cfg.data)
    losses = [1.0, 0.9, 0.95, 0.95, 0.8, 0.85, 0.9, 0.9]
    seq = iter(zip(np.linspace(0.1, 0.8, 8), losses))
    monkeypatch.setattr(seg_train, "validate", lambda *a, **k: tuple(map(float, next(seq))))
    log = _Log()
    fold = Fold(0, ["p1", "p3"], ["p5"], ["p0"])
    _model, info, *_ = seg_train.train_fold(cfg, data, fold, log, torch.device("cpu"), 0)
    lrs = [r["lr_head"] / cfg.train.lr for r in log.rows]
    assert [r["val_loss"] for r in log.rows] == losses
    # lr of epoch e = the scale after epochs < e: stalls at 2, 3 (> patience 1 -> halve before epoch 4), 5, 6
    want = [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.25] if monitor == "val_loss" else [1] * 8
    assert lrs == pytest.approx(want)
    assert info["best_epoch"] == 7 and info["val_loss_at_best"] == 0.9


# ------------------------------------------------------------------------------------------ validation loss
def _val_loader(tmp_path: Path, head: str):
    manifest = make_split_manifest(tmp_path / "m", patients=2, per_patient=3, test=())
    data = load_seg_data(SegDataConfig(manifest=str(manifest), classes=["bg", "fg"]))
    ds = FrameDataset(data, data.cases, (32, 32), (0.5,) * 3, (0.25,) * 3)
    return data, torch.utils.data.DataLoader(ds, batch_size=len(ds))


@pytest.mark.parametrize("head", ["linear", "unet", "eomt"])
def test_validation_loss_is_the_heads_training_loss_on_the_val_images(tmp_path, head):
    """validate() returns the loss of every head on the validation images: pixel cross-entropy over the
    non-ignored pixels for linear / U-Net, EoMT's mask-classification loss of the final (plain-pass)
    prediction; the same value twice (its random points are seeded) and training's RNG untouched."""
    from meddino.models import build_backbone

    torch.manual_seed(0)
    data, loader = _val_loader(tmp_path, head)
    model = SegmentationModel(build_backbone("dinov2_tiny"), head, 2, eomt={"num_queries": 4})
    crit = MaskClassificationLoss(2, num_points=256) if head == "eomt" else None  # 32x32 > 256: sampled points
    state = torch.get_rng_state()
    dice, loss = seg_train.validate(model, loader, 2, 255, torch.device("cpu"), False, crit, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert math.isfinite(loss) and loss > 0 and 0 <= dice <= 1
    assert seg_train.validate(model, loader, 2, 255, torch.device("cpu"), False, crit, seed=3) == (dice, loss)
    torch.manual_seed(3)  # as validate() does, before the loader's iterator draws its base seed
    x, y = next(iter(loader))
    with torch.no_grad():
        out = model(x)
        if head == "eomt":
            assert out["aux"] == []  # no deep-supervision terms in the validation loss
            ref = float(crit(out, y)["loss"])
        else:
            ref = float(F.cross_entropy(out, y, ignore_index=255))
    assert loss == pytest.approx(ref, rel=1e-5)


# ------------------------------------------------------------------------------------------ no validation
def test_no_validation_set_keeps_the_last_epoch(tmp_path, monkeypatch):
    """data.val_fraction=0 leaves no validation patients: the fold keeps its LAST epoch's weights (it used to
    keep epoch 0's, its val Dice being 0.0 every epoch), runs every epoch and logs no val numbers."""
    assert split_val(["a", "b", "c"], 0.0, 0) == (["a", "b", "c"], [])
    manifest = make_split_manifest(tmp_path / "m")
    cfg = _tiny_cfg(manifest, epochs=3, early_stop=1)
    data = load_seg_data(cfg.data)
    states = []
    real = seg_train._train_epoch

    def spy(loop, *a):
        out = real(loop, *a)
        states.append({k: v.clone() for k, v in loop.model.state_dict().items()})
        return out

    monkeypatch.setattr(seg_train, "_train_epoch", spy)
    log = _Log()
    model, info, *_ = seg_train.train_fold(cfg, data, Fold(0, ["p1", "p2", "p3"], [], ["p0"]), log,
                                           torch.device("cpu"), 0)
    assert len(states) == 3 and info["epochs_run"] == 3 and info["best_epoch"] == 2
    assert info["best_val_dice"] is None and info["kept"].startswith("last epoch")
    final = model.state_dict()
    assert all(torch.equal(final[k], states[-1][k]) for k in final)
    assert not all(torch.equal(final[k], states[0][k]) for k in final)
    assert all("val_dice" not in r for r in log.rows)


# ------------------------------------------------------------------------------------------ seed 000 folds
def test_seed000_folds_fixed_test_and_disjoint_patient_level_val(tmp_path):
    """A drawn test set of ceil(test_fraction x patients) patients, the same in every fold; data.folds folds
    of the rest whose val sets are disjoint and cover the pool, train = pool - val."""
    root = make_cholec(tmp_path / "c", videos=7, frames=1)
    cfg = SegDataConfig(layout="cholecseg8k", root=str(root), protocol="seed000", test_fraction=0.3, folds=4)
    data = load_seg_data(cfg, check=False)
    folds = make_folds(data, cfg, seed=0)
    everyone = set(data.patients)
    test = set(folds[0].test)
    assert len(folds) == 4 and len(test) == math.ceil(0.3 * 7)
    pool = everyone - test
    vals = [set(f.val) for f in folds]
    for f in folds:
        assert set(f.test) == test
        assert set(f.train) | set(f.val) == pool and not set(f.train) & set(f.val)
    assert set().union(*vals) == pool and sum(map(len, vals)) == len(pool)
    assert make_folds(data, cfg, seed=0)[0].test == folds[0].test  # seeded
    assert [f.index for f in make_folds(data, cfg.model_copy(update={"run_folds": [1, 3]}), 0)] == [1, 3]


def test_seed000_with_a_split_column_and_its_refusals(tmp_path):
    """With data.split_column the test rows are the fixed test set and train + val rows the pool; a patient in
    test and train is refused (check_no_leak's one line), as are data.fold_column and too few patients."""
    manifest = make_split_manifest(tmp_path / "m")
    cfg = SegDataConfig(manifest=str(manifest), classes=["bg", "fg"], split_column="split", protocol="seed000",
                        folds=2)
    folds = make_folds(load_seg_data(cfg, check=False), cfg, seed=0)
    assert all(f.test == ["p0", "p1"] for f in folds)
    assert all(sorted(f.train + f.val) == ["p2", "p3", "p4", "p5"] for f in folds)
    with pytest.raises(DataError, match="lower data.folds or data.test_fraction"):
        big = cfg.model_copy(update={"folds": 5})
        make_folds(load_seg_data(big, check=False), big, seed=0)
    text = manifest.read_text().replace("p2_0_mask.png,p2,val", "p2_0_mask.png,p2,test")
    manifest.write_text(text)
    with pytest.raises(DataError) as exc:
        make_folds(load_seg_data(cfg, check=False), cfg, seed=0)
    assert str(exc.value).startswith("patient p2 is in both val and test (data.split_column 'split' in ")
    no_test = make_split_manifest(tmp_path / "n", test=())
    cfg = cfg.model_copy(update={"manifest": str(no_test)})
    with pytest.raises(DataError, match="needs test rows"):
        make_folds(load_seg_data(cfg, check=False), cfg, seed=0)
    with pytest.raises(ValueError, match="data.fold_column gives the folds of data.protocol=cv"):
        SegDataConfig(manifest=str(manifest), fold_column="fold", protocol="seed000")


def test_seed000_recipe_uses_the_protocol():
    cfg = load_config(SegConfig, "cholecseg8k_eomt", group="seg")
    assert cfg.data.protocol == "seed000" and cfg.data.folds == 5
    assert (cfg.train.plateau_monitor, cfg.train.plateau_patience, cfg.train.plateau_factor) == ("val_loss", 10, 0.5)


# ------------------------------------------------------------------------------------------ few-shot draws
def _pool(counts: dict[str, int]) -> list[SegCase]:
    return [SegCase(f"{p}/{i}.png", p, Path(f"{p}/{i}.png"), Path(f"{p}/{i}_m.png"))
            for p, n in counts.items() for i in range(n)]


def test_fewshot_draw_spreads_over_distinct_patients():
    """N <= patients: N images of N different patients; N > patients: round-robin, each patient gives one
    before any gives two (a patient with fewer images drops out); too few images: None; seeded."""
    pool = _pool({"a": 5, "b": 1, "c": 3, "d": 2})
    for n in (1, 2, 4):
        got = draw_images(pool, n, np.random.default_rng([0, n, 0]))
        assert len(got) == n and len({c.patient for c in got}) == n
    got = draw_images(pool, 8, np.random.default_rng(1))
    counts = {p: sum(c.patient == p for c in got) for p in "abcd"}
    assert len(got) == len({c.id for c in got}) == 8
    # 4 firsts, then seconds of a, c, d (b has no second), then one third (of a or c, whichever came first)
    assert counts["b"] == 1 and counts["d"] == 2 and sorted([counts["a"], counts["c"]]) == [2, 3]
    assert draw_images(pool, 12, np.random.default_rng(0)) is None
    assert draw_images(pool, 11, np.random.default_rng(0)) is not None
    a = draw_images(pool, 3, np.random.default_rng([5, 3, 1]))
    assert a == draw_images(pool, 3, np.random.default_rng([5, 3, 1]))


# ------------------------------------------------------------------------------------------ end to end
def _rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(path)))


@pytest.mark.slow
def test_seed000_protocol_end_to_end(cli, tmp_path):
    """The seed 000 recipe (EoMT, shrunk): 4 folds of the 4 patients beside a 2-patient fixed test set; every
    fold tests the same patients; results.json's mean +/- std is numpy's over the folds (ddof 0 under the
    seed000 policy); each fold's numbers match its CSV rows; the lr follows the logged val loss; the report
    reads the run and bootstraps the test patients."""
    from meddino.metrics.segmentation import aggregate_seg
    from meddino.report.build import make_report
    from meddino.report.model import ReportConfig

    root = make_cholec(tmp_path / "cholec", videos=6, frames=1)
    out = tmp_path / "runs" / "s0"
    r = cli("eval", "seg", "-c", "cholecseg8k_eomt", f"data.root={root}", f"out={out}", "backbone=random:dinov2_tiny",
            "data.image_size=32", "data.test_fraction=0.3", "data.folds=4", "train.epochs=4",
            "eomt.anneal_epochs=2", "train.max_steps_per_epoch=1", "train.batch_size=4", "train.num_workers=0", "train.device=cpu",
            "train.plateau_patience=1", "eomt.num_queries=4", "eomt.num_points=256", "eomt.head_warmup_steps=0",
            "eomt.backbone_warmup_steps=1", "save_predictions=false")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "4 fold(s) on the same 2 test patients" in r.stdout
    res = json.loads((out / "results.json").read_text())
    assert res["data_protocol"] == "seed000" and res["std_over"] == "folds" and res["metric_policy"] == "seed000"
    folds = res["folds"]
    test = res["test_patients"]
    assert len(folds) == 4 and len(test) == 2 and all(f["test"] == test for f in folds)
    pool = {f"video{v:02d}" for v in range(1, 7)} - set(test)
    for f in folds:
        assert not set(f["train"]) & set(f["val"]) and set(f["train"]) | set(f["val"]) == pool
    assert sorted(p for f in folds for p in f["val"]) == sorted(pool)
    rows = _rows(out / "predictions" / "per_image_class.csv")
    for m in ("dice", "jaccard", "hd95"):
        per_fold = [f["metrics"][m]["mean"] for f in folds]
        per_fold = [v for v in per_fold if v is not None and math.isfinite(v)]  # seed000 HD95 may skip all
        assert res["metrics"][m]["n"] == len(per_fold) and (m == "hd95" or len(per_fold) == 4)
        if per_fold:
            assert res["metrics"][m]["mean"] == pytest.approx(np.mean(per_fold))
            assert res["metrics"][m]["std"] == pytest.approx(np.std(per_fold))
    for f in folds:
        mine = [row for row in rows if int(row["fold"]) == f["fold"]]
        assert {row["patient"] for row in mine} == set(test)
        agg = aggregate_seg([{**row, "dice": float(row["dice"])} for row in mine], metrics=("dice",), policy="seed000")
        assert f["metrics"]["dice"]["mean"] == pytest.approx(agg["dice"]["mean"])
    # the plateau watched the logged val loss (patience 1): replay it by hand
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for k in range(4):
        epochs = [e for e in log if e.get("fold") == k and "epoch" in e]
        assert len(epochs) == 4 and all(math.isfinite(e["val_loss"]) for e in epochs)
        scale, best, bad = 1.0, math.inf, 0
        for e in epochs:
            assert e["lr_head"] == pytest.approx(1e-4 * scale)
            if e["val_loss"] < best:
                best, bad = e["val_loss"], 0
            else:
                bad += 1
                if bad > 1:
                    scale, bad = scale * 0.5, 0
    rep = make_report(ReportConfig(runs=str(tmp_path / "runs"), bootstrap={"samples": 20}))
    (entry,) = rep.entries.values()
    assert entry.protocol == "eomt-seed000" and entry.metrics["dice"]["n"] == 4
    assert sorted(rep.groups[0].units) == sorted(test)


@pytest.mark.slow
def test_fewshot_segmentation_end_to_end(cli, tmp_path):
    """Few-shot on a manifest whose split column gives the test set: every N trains `draws` times on N images
    of distinct pool patients (never a test patient), all draws test the same patients, the per-N mean +/- std
    is numpy's over the draws (ddof 1 under monai), N=16 > 12 pool images is skipped, no validation."""
    manifest = make_split_manifest(tmp_path / "m")
    out = tmp_path / "fs"
    r = cli("eval", "seg", "-c", "seg_tiny", f"data.manifest={manifest}", "data.classes=[bg,fg]",
            "data.split_column=split", "data.protocol=fewshot", "fewshot.shots=[1,2,4,8,16]", "fewshot.draws=2",
            "train.epochs=2", "train.max_steps_per_epoch=1", f"out={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["data_protocol"] == "fewshot" and res["std_over"] == "draws"
    assert res["test_patients"] == ["p0", "p1"] and res["pool_patients"] == ["p2", "p3", "p4", "p5"]
    assert list(res["skipped"]) == ["n=16"] and res["primary_variant"] == "n=8"
    assert res["hyperparameters"]["all_shots"] == [1, 2, 4, 8]
    assert json.dumps(res["metrics"]) == json.dumps(res["variants"]["n=8"])
    draws = res["draws"]
    assert len(draws) == 4 * 2
    for d in draws:
        n = d["shots"]
        owners = [img.split("_")[0] for img in d["images"]]
        assert len(d["images"]) == len(set(d["images"])) == n
        assert set(owners) <= set(res["pool_patients"]) and sorted(set(owners)) == d["patients"]
        assert len(set(owners)) == min(n, 4)  # distinct patients where possible; 8 of 4 patients: 2 each
        assert max(map(owners.count, set(owners))) - min(map(owners.count, set(owners))) <= 1
        assert d["kept"].startswith("last epoch") and d["epochs_run"] == 2
        rows = [row for row in _rows(out / res["predictions"][f"n={n}"]) if int(row["fold"]) == d["draw"]]
        assert {row["patient"] for row in rows} == {"p0", "p1"}
    for key, variant in res["variants"].items():
        vals = [d["metrics"]["dice"]["mean"] for d in draws if f"n={d['shots']}" == key]
        assert variant["dice"]["mean"] == pytest.approx(np.mean(vals))
        assert variant["dice"]["std"] == pytest.approx(np.std(vals, ddof=1))
    assert _rows(out / "predictions" / "per_image_class.csv") == _rows(out / "predictions" / "fewshot_n8.csv")
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("val_dice" not in e for e in log) and {(e["shots"], e["draw"]) for e in log} == {
        (n, d) for n in (1, 2, 4, 8) for d in (0, 1)}
    assert not (out / "model").exists()


def test_fewshot_with_no_drawable_n_is_one_line_and_writes_nothing(cli, tmp_path):
    manifest = make_split_manifest(tmp_path / "m")
    r = cli("eval", "seg", "-c", "seg_tiny", f"data.manifest={manifest}", "data.classes=[bg,fg]",
            "data.split_column=split", "data.protocol=fewshot", "fewshot.shots=[13,20]", f"out={tmp_path / 'o'}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "few-shot: no N in [13, 20] can be drawn (the training pool has 12 image(s)" in r.stderr
    assert not (tmp_path / "o").exists()


def test_fewshot_eomt_too_short_to_finish_annealing_is_refused_before_any_draw_trains(cli, tmp_path):
    manifest = make_split_manifest(tmp_path / "m")
    r = cli("eval", "seg", "-c", "seg_tiny", f"data.manifest={manifest}", "data.classes=[bg,fg]", "head=eomt",
            "eomt.num_queries=4", "data.split_column=split", "data.protocol=fewshot", "fewshot.shots=[8,1]",
            "train.epochs=2", "train.batch_size=2", "eomt.anneal_steps=3", f"out={tmp_path / 'o'}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    # N=1: 1 step per epoch, 2 in the run; N=8 (4 steps per epoch) would have trained first
    assert "few-shot N=1, draw 0: EoMT mask annealing needs 3 optimiser steps" in r.stderr
    assert not (tmp_path / "o").exists()


def test_fewshot_config_refusals():
    with pytest.raises(ValueError, match="fewshot.shots"):
        SegConfig(data={"manifest": "m.csv"}, fewshot={"shots": [0, 2]})
    with pytest.raises(ValueError, match="data.run_folds selects folds"):
        SegConfig(data={"manifest": "m.csv", "protocol": "fewshot", "run_folds": [0]})
    with pytest.raises(ConfigError, match="has draws, not folds"):
        make_folds(None, SegDataConfig(manifest="m.csv", protocol="fewshot"), 0)
