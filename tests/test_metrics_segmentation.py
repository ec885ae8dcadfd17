"""Segmentation metrics against MONAI, medpy and hand-computed cases, including where they differ."""

from __future__ import annotations

import math
import warnings

import medpy.metric.binary as mb
import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou
from scipy import ndimage

from meddino.errors import DataError
from meddino.metrics import segmentation as sm

# medpy's per-direction surface distances (module-private, so the pooling difference can be shown exactly)
_medpy_surface_distances = getattr(mb, "__surface_distances")


def _blob(rng: np.random.Generator, shape: tuple[int, ...], sigma: float = 2.0, level: float = 0.05) -> np.ndarray:
    return ndimage.gaussian_filter(rng.standard_normal(shape), sigma) > level


def _onehot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """[spatial] class indices -> MONAI's one-hot [1, C, spatial] float tensor."""
    return torch.from_numpy(np.stack([labels == c for c in range(num_classes)])[None].astype(np.float32))


def _monai(fn, pred: np.ndarray, gt: np.ndarray, **kw) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty masks and deprecated arguments
        out = fn(_onehot(pred.astype(int), 2), _onehot(gt.astype(int), 2), include_background=False, **kw)
        return float(out.item())


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


# --------------------------------------------------------------------------------------- Dice / Jaccard
@pytest.mark.parametrize("shape", [(48, 40), (12, 20, 16)])
def test_dice_jaccard_match_medpy_and_monai(rng, shape):
    for _ in range(4):
        p, g = _blob(rng, shape), _blob(rng, shape)
        d, j = sm.dice(g, p), sm.jaccard(g, p)
        assert d == pytest.approx(mb.dc(p, g), abs=1e-12)
        assert j == pytest.approx(mb.jc(p, g), abs=1e-12)
        assert d == pytest.approx(_monai(compute_dice, p, g), abs=1e-6)
        assert j == pytest.approx(_monai(compute_iou, p, g), abs=1e-6)
        assert j == pytest.approx(d / (2 - d), abs=1e-12)  # identity J = D / (2 - D)


def test_dice_jaccard_empty_policy_vs_references():
    z = np.zeros((8, 8), bool)
    o = z.copy()
    o[2:5, 2:5] = True
    # both empty: meddino NaN (not counted), MONAI NaN; medpy documents 1.0 but its ZeroDivisionError
    # branch is dead with numpy-2 integer counts, so it returns NaN (with a RuntimeWarning) here
    assert math.isnan(sm.dice(z, z)) and math.isnan(sm.jaccard(z, z))
    with np.errstate(invalid="ignore"):
        assert mb.dc(z, z) == 1.0 or math.isnan(mb.dc(z, z))
    assert math.isnan(_monai(compute_dice, z, z))
    # hallucinated structure (gt empty): meddino 0.0 (counted), medpy 0.0, MONAI NaN (dropped)
    assert sm.dice(z, o) == 0.0 and sm.jaccard(z, o) == 0.0
    assert mb.dc(o, z) == 0.0
    assert math.isnan(_monai(compute_dice, o, z))
    # missed structure (pred empty): everyone 0.0
    assert sm.dice(o, z) == 0.0 and _monai(compute_dice, z, o) == 0.0


def test_dice_hand_computed():
    p = np.zeros((4, 4), int)
    g = np.zeros((4, 4), int)
    p[0, :3] = 1  # 3 pixels
    g[0, 1:] = 1  # 3 pixels, overlap 2
    assert sm.dice(g, p) == pytest.approx(2 * 2 / 6)
    assert sm.jaccard(g, p) == pytest.approx(2 / 4)


# ----------------------------------------------------------------------------------------------- HD95
@pytest.mark.parametrize(
    "shape,spacing",
    [((40, 48), None), ((40, 48), (0.5, 2.0)), ((14, 24, 20), (3.0, 0.8, 0.8)), ((14, 24, 20), None)],
)
def test_hd95_equals_monai(rng, shape, spacing):
    for _ in range(4):
        p, g = _blob(rng, shape), _blob(rng, shape)
        kw = {"percentile": 95} if spacing is None else {"percentile": 95, "spacing": list(spacing)}
        assert sm.hd95(g, p, spacing) == pytest.approx(_monai(compute_hausdorff_distance, p, g, **kw), rel=1e-5)


def test_hd95_masks_touching_the_border_equal_monai(rng):
    p = np.zeros((20, 20), bool)
    g = np.zeros((20, 20), bool)
    p[0:8, 0:20] = True  # touches three image borders
    g[3:20, 5:12] = True
    p |= _blob(rng, (20, 20), 1.0, 0.6)
    assert sm.hd95(g, p, (1.5, 1.0)) == pytest.approx(
        _monai(compute_hausdorff_distance, p, g, percentile=95, spacing=[1.5, 1.0]), rel=1e-5
    )


@pytest.mark.parametrize("connectivity", [1, 2])
def test_hd95_is_max_of_directed_p95_of_medpy_distances(rng, connectivity):
    spacing = (1.0, 2.5)
    for _ in range(4):
        p, g = _blob(rng, (36, 30)), _blob(rng, (36, 30))
        d_pg = _medpy_surface_distances(p, g, spacing, connectivity)
        d_gp = _medpy_surface_distances(g, p, spacing, connectivity)
        expected = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
        assert sm.hd95(g, p, spacing, connectivity=connectivity) == pytest.approx(expected, abs=1e-9)


def test_hd95_pooling_differs_from_medpy_on_asymmetric_error():
    # gt: a 20x20 square (76 surface pixels); pred: the same square plus a hallucinated 3x3 block far away
    # (8 surface pixels). pred -> gt: 8 of 84 distances are large (9.5 %), so its p95 is large; gt -> pred:
    # all 0. MONAI / meddino take the max of the directed p95s and see the error; medpy pools the 160
    # distances, where the 8 large ones are exactly 5 %, and its p95 is almost 0.
    g = np.zeros((40, 40), bool)
    g[2:22, 2:22] = True
    p = g.copy()
    p[32:35, 32:35] = True
    d_pg = _medpy_surface_distances(p, g)
    d_gp = _medpy_surface_distances(g, p)
    ours = sm.hd95(g, p)
    assert ours == pytest.approx(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))
    assert mb.hd95(p, g) == pytest.approx(np.percentile(np.hstack([d_pg, d_gp]), 95))
    assert ours > 10.0 and mb.hd95(p, g) < 2.0
    assert ours == pytest.approx(_monai(compute_hausdorff_distance, p, g, percentile=95), rel=1e-5)


def test_hd95_connectivity_changes_the_surface():
    # a diagonal staircase: with full connectivity, pixels touching the background only by a corner are
    # surface too, so the two definitions give different values on this shape.
    g = np.zeros((30, 30), bool)
    for i in range(30):
        g[i, : i + 1] = True
    p = np.zeros((30, 30), bool)
    p[8:22, 4:18] = True
    assert sm.hd95(g, p, connectivity=1) != pytest.approx(sm.hd95(g, p, connectivity=2))


@pytest.mark.parametrize("a,k", [(5, 10), (6, 6), (10, 2), (10, 3)])
@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.5, 2.0), (2.0, 1.5)])
def test_hd95_two_squares_offset_by_k(a, k, spacing):
    """Two a x a squares, the second shifted by k columns: every surface pixel has its partner k columns
    away, and the pixels closer than that (overlap, rows close to a corner) stay under the top 5 %, so
    HD95 = k * column spacing (worked through by hand for a=10, k=2: 16 of 36 distances equal 2)."""
    p = np.zeros((32, 40), bool)
    g = np.zeros((32, 40), bool)
    p[10 : 10 + a, 8 : 8 + a] = True
    g[10 : 10 + a, 8 + k : 8 + k + a] = True
    assert sm.hd95(g, p, spacing) == pytest.approx(k * spacing[1], abs=1e-9)
    assert sm.hd95(p, g, spacing) == pytest.approx(k * spacing[1], abs=1e-9)  # symmetric


def test_hd95_parallel_planes_3d_anisotropic():
    # two one-voxel-thick planes k slices apart: every distance is exactly k * slice spacing
    p = np.zeros((12, 10, 10), bool)
    g = np.zeros((12, 10, 10), bool)
    p[2] = True
    g[7] = True
    assert sm.hd95(g, p, (2.5, 0.7, 0.7)) == pytest.approx(5 * 2.5)
    assert sm.hd95(p, p, (2.5, 0.7, 0.7)) == 0.0


def test_hd95_empty_policy_vs_monai():
    shape = (8, 10)
    z = np.zeros(shape, bool)
    o = z.copy()
    o[2:4, 3:6] = True
    assert math.isnan(sm.hd95(z, z))
    diag = math.sqrt((8 * 2.0) ** 2 + (10 * 1.0) ** 2)
    assert sm.image_diagonal(shape, (2.0, 1.0)) == pytest.approx(diag)
    assert sm.hd95(z, o, (2.0, 1.0)) == pytest.approx(diag)  # hallucinated
    assert sm.hd95(o, z, (2.0, 1.0)) == pytest.approx(diag)  # missed
    # MONAI: NaN for both empty and also NaN for one empty with a percentile (the miss would vanish)
    assert math.isnan(_monai(compute_hausdorff_distance, z, z, percentile=95))
    assert not math.isfinite(_monai(compute_hausdorff_distance, o, z, percentile=95))
    assert not math.isfinite(_monai(compute_hausdorff_distance, z, o, percentile=95))
    with pytest.raises(RuntimeError):
        mb.hd95(o, z)


def test_hd95_input_errors():
    with pytest.raises(DataError, match="shape"):
        sm.hd95(np.ones((4, 5)), np.ones((4, 4)))
    with pytest.raises(DataError, match="spacing"):
        sm.hd95(np.ones((4, 4)), np.ones((4, 4)), (1.0, 1.0, 1.0))
    with pytest.raises(DataError, match="spacing"):
        sm.hd95(np.ones((4, 4)), np.ones((4, 4)), (1.0, 0.0))


# ------------------------------------------------------------------------------------------ per class
def _label_map(rng: np.random.Generator, shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal((num_classes, *shape)), (0, *[2.0] * len(shape)))
    return field.argmax(axis=0)


@pytest.mark.parametrize("include_background", [False, True])
def test_per_class_matches_monai_batch(rng, include_background):
    c = 4
    shape = (10, 24, 20)
    spacing = (2.0, 0.75, 0.75)
    gt = _label_map(rng, shape, c)
    pred = _label_map(rng, shape, c)
    gt[gt == 3] = 0  # class 3 absent from the ground truth: a hallucination, counted
    rows = sm.per_class_seg_metrics(gt, pred, c, spacing=spacing, include_background=include_background)
    classes = list(range(0 if include_background else 1, c))
    assert [r["class"] for r in rows] == classes
    yp, yt = _onehot(pred, c), _onehot(gt, c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_d = compute_dice(yp, yt, include_background=include_background)[0].numpy()
        ref_h = compute_hausdorff_distance(
            yp, yt, include_background=include_background, percentile=95, spacing=list(spacing)
        )[0].numpy()
    for r, d, h in zip(rows, ref_d, ref_h):
        if r["gt_present"]:
            assert r["dice"] == pytest.approx(float(d), abs=1e-6)
            assert r["hd95"] == pytest.approx(float(h), rel=1e-5)
        else:  # MONAI drops it (NaN / inf), meddino counts it: Dice 0, HD95 = diagonal
            assert r["pred_present"] and r["dice"] == 0.0
            assert r["hd95"] == pytest.approx(sm.image_diagonal(shape, spacing))
            assert not np.isfinite(d) or not np.isfinite(h)


def test_per_class_ignore_index_removes_pixels(rng):
    gt = _label_map(rng, (32, 32), 3)
    pred = _label_map(rng, (32, 32), 3)
    gt[:6] = 255
    rows = sm.per_class_seg_metrics(gt, pred, 3, ignore_index=255)
    for r in rows:
        c = r["class"]
        pc, gc = pred[6:] == c, gt[6:] == c
        assert r["dice"] == pytest.approx(mb.dc(pc, gc))
        assert r["jaccard"] == pytest.approx(mb.jc(pc, gc))
    # the ignored rows matter for HD95 only through the shape (same distances on the remaining region)
    full = sm.per_class_seg_metrics(np.where(gt == 255, 0, gt), np.where(gt == 255, 0, pred), 3)
    for r, f in zip(rows, full):
        assert r["hd95"] == pytest.approx(f["hd95"])


def test_per_class_label_errors():
    gt = np.zeros((4, 4), int)
    pred = np.zeros((4, 4), int)
    gt[0, 0] = 5
    with pytest.raises(DataError, match="ground truth: label 5 out of range"):
        sm.per_class_seg_metrics(gt, pred, 3)
    with pytest.raises(DataError, match="prediction: label 7"):
        sm.per_class_seg_metrics(np.zeros((4, 4), int), np.full((4, 4), 7), 3)
    with pytest.raises(DataError, match="shape"):
        sm.per_class_seg_metrics(gt, np.zeros((4, 5), int), 3)


# ------------------------------------------------------------------------------------------ aggregation
def test_aggregate_seg_hand_computed():
    nan = float("nan")
    rows = [
        # patient A, two images; class 1 in both, class 2 only in image a2
        {"image": "a1", "patient": "A", "class": 1, "dice": 0.8, "jaccard": 0.6, "hd95": 2.0},
        {"image": "a1", "patient": "A", "class": 2, "dice": nan, "jaccard": nan, "hd95": nan},
        {"image": "a2", "patient": "A", "class": 1, "dice": 0.6, "jaccard": 0.4, "hd95": 4.0},
        {"image": "a2", "patient": "A", "class": 2, "dice": 0.2, "jaccard": 0.1, "hd95": 10.0},
        # patient B, one image
        {"image": "b1", "patient": "B", "class": 1, "dice": 1.0, "jaccard": 1.0, "hd95": 0.0},
        {"image": "b1", "patient": "B", "class": 2, "dice": 0.0, "jaccard": 0.0, "hd95": 50.0},
        # patient C: nothing to count anywhere
        {"image": "c1", "patient": "C", "class": 1, "dice": nan, "jaccard": nan, "hd95": nan},
    ]
    out = sm.aggregate_seg(rows)
    # A: class 1 mean(0.8, 0.6) = 0.7, class 2 = 0.2 -> 0.45 ; B: (1 + 0) / 2 = 0.5 ; C: NaN, not counted
    d = out["dice"]
    assert d["values"]["A"] == pytest.approx(0.45) and d["values"]["B"] == pytest.approx(0.5)
    assert math.isnan(d["values"]["C"]) and d["n"] == 2
    assert d["mean"] == pytest.approx(0.475)
    assert d["std"] == pytest.approx(np.std([0.45, 0.5], ddof=1))
    assert d["per_class"][1] == pytest.approx((0.7 + 1.0) / 2)
    h = out["hd95"]
    assert h["values"]["A"] == pytest.approx((3.0 + 10.0) / 2) and h["values"]["B"] == pytest.approx(25.0)
    # per image instead of per patient
    per_image = sm.aggregate_seg(rows, by=("image",))["dice"]
    assert per_image["values"]["a1"] == pytest.approx(0.8) and per_image["values"]["a2"] == pytest.approx(0.4)
    assert per_image["n"] == 3  # c1 has nothing to count
    with pytest.raises(DataError, match="row 0 lacks key"):
        sm.aggregate_seg([{"image": "x", "class": 1, "dice": 1.0, "jaccard": 1.0, "hd95": 0.0}])


def test_rows_from_per_class_feed_aggregate(rng):
    rows = []
    for patient in ("p1", "p2"):
        for image in range(2):
            gt = _label_map(rng, (24, 24), 3)
            pred = _label_map(rng, (24, 24), 3)
            for r in sm.per_class_seg_metrics(gt, pred, 3):
                rows.append({**r, "image": f"{patient}-{image}", "patient": patient})
    out = sm.aggregate_seg(rows)
    manual = []
    for patient in ("p1", "p2"):
        per_class = [
            np.nanmean([r["dice"] for r in rows if r["patient"] == patient and r["class"] == c]) for c in (1, 2)
        ]
        manual.append(np.mean(per_class))
    assert out["dice"]["mean"] == pytest.approx(np.mean(manual))


# -------------------------------------------------------------------------------------- metric policies
def _frame(gt_rects, pred_rects, shape=(12, 12)):
    """12 x 12 class-index frames painted with half-open rectangles ``(class, (r0, r1, c0, c1))``."""
    g, p = np.zeros(shape, int), np.zeros(shape, int)
    for c, (r0, r1, c0, c1) in gt_rects:
        g[r0:r1, c0:c1] = c
    for c, (r0, r1, c0, c1) in pred_rects:
        p[r0:r1, c0:c1] = c
    return g, p


#: docs/metrics.md's worked example: patients A and B, two frames each, classes 1 and 2
POLICY_EXAMPLE = {
    # A1: class 1 predicted one column to the right; class 2 (a 2x2 corner) missed
    ("A", "A1"): _frame([(1, (2, 10, 2, 10)), (2, (10, 12, 0, 2))], [(1, (2, 10, 3, 11))]),
    # A2: class 1 absent from the ground truth but hallucinated (2x2); class 2 exact
    ("A", "A2"): _frame([(2, (4, 8, 4, 8))], [(1, (0, 2, 10, 12)), (2, (4, 8, 4, 8))]),
    # B1: class 1 exact plus a hallucinated 1x2 blob far away; class 2 absent from both
    ("B", "B1"): _frame([(1, (0, 6, 0, 6))], [(1, (0, 6, 0, 6)), (1, (10, 11, 10, 12))]),
    # B2: class 1 one column short; class 2 (one pixel) missed
    ("B", "B2"): _frame([(1, (3, 9, 3, 9)), (2, (0, 1, 0, 1))], [(1, (3, 9, 3, 8))]),
}
DIAGONAL_12 = math.sqrt(12**2 + 12**2)


def _policy_rows(policy):
    rows = []
    for (patient, image), (g, p) in POLICY_EXAMPLE.items():
        for r in sm.per_class_seg_metrics(g, p, 3, policy=policy):
            rows.append({**r, "patient": patient, "image": image})
    return rows


def _reference_by_patient(per_frame):
    """{(patient, image, class): value or None} -> per patient: mean over classes of the per-class frame
    mean, None values skipped (plain loops, no meddino)."""
    out = {}
    for patient in ("A", "B"):
        per_class = []
        for c in (1, 2):
            vals = [v for (pt, _i, cc), v in per_frame.items() if pt == patient and cc == c and v is not None]
            if vals:
                per_class.append(sum(vals) / len(vals))
        out[patient] = sum(per_class) / len(per_class)
    return out


def test_policy_seed000_pools_pixels_and_equals_medpy_hd95():
    """seed000 against independent references: Dice from TP/FP/FN counted by hand from the rectangles,
    pooled per patient and class; HD95 = medpy's hd95 on every frame where both masks have the class."""
    out = sm.aggregate_seg(_policy_rows("seed000"), policy="seed000")
    # pixel counts by hand: A class 1 = A1 (8x7 overlap, one column FP, one column FN) + A2 (4 px FP)
    pooled = {("A", 1): (56, 8 + 4, 8), ("A", 2): (0 + 16, 0, 4 + 0),
              ("B", 1): (36 + 30, 2 + 0, 0 + 6), ("B", 2): (0, 0, 1)}
    dice_ref = {pt: np.mean([2 * tp / (2 * tp + fp + fn) for (q, _c), (tp, fp, fn) in pooled.items() if q == pt])
                for pt in ("A", "B")}
    assert out["dice"]["values"]["A"] == pytest.approx(dice_ref["A"], abs=1e-12)
    assert out["dice"]["values"]["B"] == pytest.approx(dice_ref["B"], abs=1e-12)
    assert out["dice"]["mean"] == pytest.approx((dice_ref["A"] + dice_ref["B"]) / 2)
    assert out["dice"]["std"] == pytest.approx(np.std(list(dice_ref.values())))  # numpy.nanstd: ddof 0
    jac_ref = {pt: np.mean([tp / (tp + fp + fn) for (q, _c), (tp, fp, fn) in pooled.items() if q == pt])
               for pt in ("A", "B")}
    assert out["jaccard"]["values"] == pytest.approx(jac_ref)
    # HD95: medpy where both masks have the class; frames missing it in either are skipped
    per_frame = {}
    for (pt, image), (g, p) in POLICY_EXAMPLE.items():
        for c in (1, 2):
            both = (g == c).any() and (p == c).any()
            per_frame[(pt, image, c)] = float(mb.hd95(p == c, g == c)) if both else None
    hd_ref = _reference_by_patient(per_frame)
    assert out["hd95"]["values"] == pytest.approx(hd_ref)
    for r in _policy_rows("seed000"):
        ref = per_frame[(r["patient"], r["image"], r["class"])]
        assert (math.isnan(r["hd95"]) and ref is None) or r["hd95"] == pytest.approx(ref)


def test_policy_monai_averages_images_and_equals_monai_hd95():
    """monai against independent references: per-image medpy Dice (both empty: not counted) averaged per
    patient and class; HD95 = MONAI's where both masks have the class, the image diagonal where one lacks it."""
    per_frame_dice, per_frame_hd = {}, {}
    for (pt, image), (g, p) in POLICY_EXAMPLE.items():
        for c in (1, 2):
            gc, pc = g == c, p == c
            key = (pt, image, c)
            per_frame_dice[key] = float(mb.dc(pc, gc)) if gc.any() or pc.any() else None
            if gc.any() and pc.any():
                per_frame_hd[key] = _monai(compute_hausdorff_distance, pc, gc, percentile=95)
            else:
                per_frame_hd[key] = DIAGONAL_12 if gc.any() or pc.any() else None
    out = sm.aggregate_seg(_policy_rows("monai"), policy="monai")
    dice_ref, hd_ref = _reference_by_patient(per_frame_dice), _reference_by_patient(per_frame_hd)
    assert out["dice"]["values"] == pytest.approx(dice_ref)
    assert out["hd95"]["values"] == pytest.approx(hd_ref, rel=1e-5)
    assert out["dice"]["std"] == pytest.approx(np.std(list(dice_ref.values()), ddof=1))
    # the two policies disagree on this example, which is why a run records its policy
    seed = sm.aggregate_seg(_policy_rows("seed000"), policy="seed000")
    assert abs(seed["dice"]["mean"] - out["dice"]["mean"]) > 0.1
    assert abs(seed["hd95"]["mean"] - out["hd95"]["mean"]) > 5


def test_docs_metrics_table_gives_the_numbers_of_the_worked_example():
    """docs/metrics.md's worked-example rows are the numbers these definitions give (the doc cannot drift)."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    for r, s in zip(_policy_rows("monai"), _policy_rows("seed000")):
        line = (f"| {r['image']} | {r['class']} | {r['tp']} | {r['fp']} | {r['fn']} | {_cell(r['dice'])} | "
                f"{_cell(r['hd95'])} | {_cell(s['hd95'])} |")
        assert line in doc, line
    for policy in sm.METRIC_POLICIES:
        rows = _policy_rows(policy)
        out = sm.aggregate_seg(rows, policy=policy)
        for m, label in (("dice", "Dice"), ("jaccard", "Jaccard"), ("hd95", "HD95 (px)")):
            v = out[m]
            line = (f"| {policy} | {label} | {_cell(v['values']['A'])} | {_cell(v['values']['B'])} | "
                    f"{v['mean']:.4f} ± {v['std']:.4f} |")
            assert line in doc, line


def _cell(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.4f}"


@pytest.mark.parametrize("shape,spacing", [((36, 30), None), ((10, 14, 12), (2.5, 0.8, 0.8))])
def test_hd95_seed000_equals_medpy_hd95(rng, shape, spacing):
    for _ in range(4):
        p, g = _blob(rng, shape), _blob(rng, shape)
        assert sm.hd95(g, p, spacing, policy="seed000") == pytest.approx(mb.hd95(p, g, voxelspacing=spacing),
                                                                          abs=1e-9)
    z = np.zeros(shape, bool)
    assert math.isnan(sm.hd95(z, p, spacing, policy="seed000")) and math.isnan(sm.hd95(g, z, policy="seed000"))


def test_policy_errors_name_the_cause():
    rows = [{"image": "x", "patient": "P", "class": 1, "dice": 1.0, "jaccard": 1.0, "hd95": 0.0}]
    sm.aggregate_seg(rows)  # monai needs no counts
    with pytest.raises(DataError, match="metric policy seed000 pools pixel counts per patient, and row 0 lacks tp"):
        sm.aggregate_seg(rows, policy="seed000")
    assert sm.aggregate_seg(rows, metrics=("hd95",), policy="seed000")["hd95"]["mean"] == 0.0
    with pytest.raises(DataError, match="unknown metric policy 'medpy'"):
        sm.hd95(np.ones((3, 3)), np.ones((3, 3)), policy="medpy")
