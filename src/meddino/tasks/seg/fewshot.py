"""``meddino eval seg data.protocol=fewshot``: seed 001's few-shot segmentation (1, 2, 4, 8, 16 training images).

The patients split once into a fixed test set and a training pool (:func:`~.folds.fixed_test`: the manifest's
test rows, or ``data.test_fraction`` of the patients drawn with ``seed``). For every N in ``fewshot.shots``
and every draw d < ``fewshot.draws``, :func:`draw_images` picks N images of the pool with
``numpy.random.default_rng([seed, N, d])``, a head is trained on them alone and tested on the fixed test set;
results.json reports, per N, mean +/- std over the draws of each draw's test metrics (classes per patient, then
patients), laid out as classification's few-shot (docs/classification.md): ``variants`` per N,
``primary_variant``, ``skipped``. Like it, there is no validation set: nothing is selected, every draw trains
``train.epochs`` epochs at a constant lr and keeps its last epoch. No model and no masks are saved (N x draws
of them); the per-image, per-class test rows are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from meddino.data.seg_layouts import SegCase, SegData, scan
from meddino.data.splits import check_no_leak
from meddino.devices import pick_device
from meddino.errors import DataError
from meddino.metrics.segmentation import aggregate_seg
from meddino.runlog import RunDir, write_json
from meddino.tasks.seg.config import SegConfig
from meddino.tasks.seg.data import load_seg_data, num_frames
from meddino.tasks.seg.folds import Fold, fixed_test
from meddino.tasks.seg.train import (
    _cases,
    _summary,
    anneal_end,
    check_model,
    epoch_steps,
    evaluate_fold,
    make_meta,
    over_units,
    results_header,
    train_fold,
    write_rows,
)


def draw_images(cases: Sequence[SegCase], shots: int, rng: np.random.Generator) -> list[SegCase] | None:
    """``shots`` training images from ``cases`` (the pool), spread over as many distinct patients as possible.

    How the draw works: the pool's patients, sorted by id, are put in the order of ``rng.permutation``; then,
    patient by patient in that order, each patient's images (sorted by id) are put in the order of one more
    ``rng.permutation``. Images are then dealt round-robin over the patients in their drawn order: the first
    image of every patient, then the second of every patient that has one, and so on, until ``shots`` are
    taken. So with ``shots`` <= patients the images come from ``shots`` different patients (the first
    ``shots`` of the drawn order, one random image each); with more, every patient gives one before any gives
    a second, and so on. An "image" is a case: a 2-D image, or a whole volume (all its slices train).
    Returns the images in the order drawn, or None when the pool holds fewer than ``shots``.
    """
    if len(cases) < shots:
        return None
    by_patient: dict[str, list[SegCase]] = {}
    for c in sorted(cases, key=lambda c: (c.patient, c.id)):
        by_patient.setdefault(c.patient, []).append(c)
    patients = sorted(by_patient)
    queues = []
    for j in rng.permutation(len(patients)):
        own = by_patient[patients[j]]
        queues.append([own[k] for k in rng.permutation(len(own))])
    picked: list[SegCase] = []
    depth = 0
    while len(picked) < shots:
        for q in queues:
            if depth < len(q):
                picked.append(q[depth])
                if len(picked) == shots:
                    break
        depth += 1
    return picked


def _draw_rng(seed: int, shots: int, draw: int) -> np.random.Generator:
    """The generator of one draw: the same images for the same (seed, N, draw) in every run."""
    return np.random.default_rng([seed, shots, draw])


def run_fewshot_seg(cfg: SegConfig) -> int:
    fc = cfg.fewshot
    device = pick_device(cfg.train.device)
    data = load_seg_data(cfg.data, check=False)
    check_model(cfg)
    pool, test = fixed_test(data, cfg.data, cfg.seed)
    pool_cases, test_cases = _cases(data, pool), _cases(data, test)
    if min(fc.shots) > len(pool_cases):  # refused before anything is written
        raise DataError(f"few-shot: no N in {fc.shots} can be drawn (the training pool has {len(pool_cases)} "
                        f"image(s) beside the {len(test)} test patient(s))")
    scan(data)
    for shots in sorted(set(fc.shots)):  # every draw long enough to finish EoMT's annealing, before any trains
        for d in range(fc.draws):
            picked = draw_images(pool_cases, shots, _draw_rng(cfg.seed, shots, d))
            if picked is not None:
                anneal_end(cfg, epoch_steps(num_frames(picked), cfg.train), f"few-shot N={shots}, draw {d}")
    run = RunDir(cfg.out, cfg)
    amp = cfg.train.amp and device.type == "cuda"
    policy = cfg.metrics.policy
    variants: dict[str, Any] = {}
    predictions: dict[str, str] = {}
    draws: list[dict[str, Any]] = []
    rows_of: dict[str, list[dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    meta: dict[str, Any] | None = None
    unit = 0
    for shots in sorted(set(fc.shots)):
        key = f"n={shots}"
        per_draw: dict[str, dict[str, Any]] = {}
        rows_n: list[dict[str, Any]] = []
        for d in range(fc.draws):
            picked = draw_images(pool_cases, shots, _draw_rng(cfg.seed, shots, d))
            if picked is None:  # depends only on the pool's size: no draw of this N can succeed
                skipped[key] = f"the training pool has {len(pool_cases)} image(s), fewer than {shots}"
                break
            patients = sorted({c.patient for c in picked})
            check_no_leak({"train": [c.patient for c in picked], "test": test},
                          where=f"few-shot draw {d} of N={shots}")
            fold = Fold(unit, patients, [], test)
            model, info, size, mean, std = train_fold(cfg, data, fold, run, device, cfg.seed + 1000 * unit,
                                                      train_cases=picked, at={"shots": shots, "draw": d})
            if meta is None:
                meta = make_meta(cfg, data, model, size, mean, std)
            rows = evaluate_fold(model, data, test_cases, d, size, mean, std, device, cfg.train.batch_size, amp,
                                 None, policy)
            rows_n += rows
            agg = _summary(aggregate_seg(rows, policy=policy))
            per_draw[f"draw{d}"] = agg
            draws.append({"name": f"{key}/draw{d}", "shots": shots, "draw": d,
                          "images": [c.id for c in picked], "patients": patients, **info, "metrics": agg})
            run.log(info["steps"], group={"shots": shots, "draw": d}, **{f"test_{m}": v["mean"] for m, v in agg.items()})
            unit += 1
            del model
        if key in skipped:
            continue
        name = f"predictions/fewshot_n{shots}.csv"
        write_rows(run.path / name, rows_n)
        predictions[key] = name
        rows_of[key] = rows_n
        variants[key] = over_units(per_draw, policy)
    done = [int(k[2:]) for k in variants]
    primary = fc.primary_shots if fc.primary_shots in done else max(done)
    key = f"n={primary}"
    # the report bootstraps per_image_class.csv: the headline N's rows (its draws pooled per patient)
    write_rows(run.path / "predictions" / "per_image_class.csv", rows_of[key])
    results = {
        **results_header(cfg, data, meta, "draws"),
        "metrics": variants[key],
        "primary_variant": key,
        "variants": variants,
        "skipped": skipped,
        "hyperparameters": {"shots": primary, "all_shots": done, "draws": fc.draws, "epochs": cfg.train.epochs},
        "predictions": predictions,
        "test_patients": test,
        "pool_patients": pool,
        "n_patients": len(test),
        "n_images": len(test_cases),
        "draws": draws,
    }
    write_json(run.path / "results.json", results)
    run.close()
    d, h = variants[key]["dice"], variants[key]["hd95"]
    print(f"{results['model']} {cfg.head} few-shot on {results['dataset']}: "
          + ", ".join(f"N={n} Dice {variants[f'n={n}']['dice']['mean']:.4f} +/- {variants[f'n={n}']['dice']['std']:.4f}"
                      for n in done)
          + f"; headline {key}: Dice {d['mean']:.4f}, HD95 {h['mean']:.2f} {results['hd95_unit']} ({fc.draws} draw(s), "
          f"{len(test)} test patients, metric policy {policy}) -> {run.path / 'results.json'}")
    return 0
