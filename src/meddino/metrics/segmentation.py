"""Segmentation metrics: Dice, Jaccard, HD95 per class, and the per-patient aggregation of seed 000.

Libraries disagree on HD95 and on empty masks (see docs/metrics.md), and seed 000's released code differs
from both, so meddino pins each definition under a named **metric policy** (:data:`METRIC_POLICIES`):

- ``monai`` (the default): per-image Dice averaged over a patient's images; HD95 = the max of the two
  directed p95s (MONAI); a missed or hallucinated structure scores the image diagonal (counted, never
  dropped); sample std (``ddof=1``) over patients.
- ``seed000`` (seed 000's ``inference_metrics.py``): Dice from the TP/FP/FN pixels pooled over a patient's
  images, per class; HD95 = p95 of both directions' distances pooled (``medpy.metric.binary.hd95``); a
  frame where the class is absent from the prediction or the ground truth has no HD95 (skipped); population
  std (``numpy.nanstd``, ``ddof=0``) over patients.

The rest of this docstring is the ``monai`` policy; the policy's switches are named where they act.

Masks are numpy arrays of class indices (``[H, W]`` frames or ``[D, H, W]`` volumes) or binary masks for
the single-mask functions; any non-zero value of a binary mask is foreground. Every function takes the
ground truth first, then the prediction: ``(y_true, y_pred)``, as the rest of :mod:`meddino.metrics`.
:func:`foreground_dice` is the batched torch version of the per-image foreground Dice that ``eval seg``
uses to choose its best epoch on the validation patients (on the device, during training).

- **Dice** ``2 |P & G| / (|P| + |G|)``, **Jaccard** ``|P & G| / |P | G|``. Prediction and ground truth
  both empty: NaN, meaning "not counted" (the class is absent and correctly not predicted; averaging it in
  as 1.0 would inflate scores of images where a class is rare). Exactly one empty: 0.0, counted.
  Equal to ``medpy.metric.binary.dc / jc`` and MONAI ``compute_dice / compute_iou`` whenever the ground
  truth is non-empty; medpy returns 1.0 for both-empty and MONAI (``ignore_empty=True``) NaN for any empty
  ground truth, so a hallucinated structure is 0.0 here and NaN (dropped) in MONAI.
- **HD95** (symmetric 95th-percentile Hausdorff distance), MONAI's convention:
  ``max(p95(d(pred surface -> gt surface)), p95(d(gt surface -> pred surface)))``, percentiles with linear
  interpolation (``numpy.percentile`` / ``torch.quantile`` default).

  * surface = ``mask XOR binary_erosion(mask, structure)`` with ``structure`` =
    ``generate_binary_structure(ndim, connectivity)`` and voxels outside the image counted as background,
    so a mask touching the border has a surface there. Default ``connectivity=1`` (cross / 6-neighbour
    erosion): this is the erosion MONAI's ``get_mask_edges`` and medpy's ``hd95`` use by default, so the
    value equals ``monai.metrics.compute_hausdorff_distance(percentile=95)`` exactly. ``connectivity=ndim``
    (full 3x3 / 3x3x3 erosion) marks more voxels as surface (also those touching the background only by a
    corner) and gives slightly different values; it is available but not the default.
  * distances: exact Euclidean, ``scipy.ndimage.distance_transform_edt(~surface, sampling=spacing)``. The
    unit is the unit of ``spacing``: pixels for 2-D frames (``spacing=None``), millimetres for volumes
    (pass the voxel spacing in mm, in array axis order).
  * both masks empty: NaN (not counted). Exactly one empty: the image diagonal
    ``sqrt(sum((shape_i * spacing_i) ** 2))`` in the same unit, larger than any distance inside the image,
    so a missed or hallucinated structure is counted as the worst possible value, never dropped (MONAI
    returns NaN or inf there, medpy raises).
  * medpy's ``hd95`` pools both directions before taking one percentile; it can be smaller than this value
    when the two directions differ (tests show the case).
- **Per class** (:func:`per_class_seg_metrics`): class ``c`` is ``mask == c``; pixels whose ground truth is
  ``ignore_index`` are removed from both masks before any metric; background (class 0) is left out unless
  ``include_background``.
- **Aggregation** (:func:`aggregate_seg`, seed 000's protocol): per group (patient by default) each
  class's value is averaged over the group's images (``seed000``: Dice and Jaccard from the group's summed
  TP/FP/FN of that class instead), then the classes are averaged (NaN = class absent in prediction and
  ground truth, skipped), then mean and std (the policy's ``ddof``) over groups.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
from scipy import ndimage

from meddino.errors import DataError

if TYPE_CHECKING:  # foreground_dice's tensors; torch itself is imported only when it runs
    import torch

__all__ = [
    "DEFAULT_METRIC_POLICY",
    "METRIC_POLICIES",
    "SEG_METRICS",
    "MetricPolicy",
    "MetricPolicyName",
    "aggregate_seg",
    "dice",
    "foreground_dice",
    "hd95",
    "image_diagonal",
    "jaccard",
    "metric_policy",
    "per_class_seg_metrics",
]

SEG_METRICS: tuple[str, ...] = ("dice", "jaccard", "hd95")

#: the names a config may give (``metrics.policy`` of ``meddino eval seg``)
MetricPolicyName = Literal["monai", "seed000"]


@dataclass(frozen=True)
class MetricPolicy:
    """One named set of definitions (see the module docstring and docs/metrics.md)."""

    name: str
    overlap: Literal["image", "pooled"]  # Dice/Jaccard per (patient, class): mean of per-image values | pooled TP/FP/FN
    hd95_directions: Literal["max", "pooled"]  # max of the two directed p95s (MONAI) | p95 of both pooled (medpy)
    hd95_one_empty: Literal["diagonal", "skip"]  # class absent from exactly one mask: image diagonal | NaN (skipped)
    std_ddof: int  # of the std over patients: 1 = sample std, 0 = numpy.nanstd (seed 000)


METRIC_POLICIES: dict[str, MetricPolicy] = {
    "monai": MetricPolicy("monai", overlap="image", hd95_directions="max", hd95_one_empty="diagonal", std_ddof=1),
    "seed000": MetricPolicy("seed000", overlap="pooled", hd95_directions="pooled", hd95_one_empty="skip",
                            std_ddof=0),
}
assert set(METRIC_POLICIES) == set(get_args(MetricPolicyName))
DEFAULT_METRIC_POLICY = "monai"


def metric_policy(policy: str | MetricPolicy) -> MetricPolicy:
    """The :class:`MetricPolicy` of a name (a policy passes through); DataError for an unknown name."""
    if isinstance(policy, MetricPolicy):
        return policy
    try:
        return METRIC_POLICIES[policy]
    except (KeyError, TypeError):
        raise DataError(f"unknown metric policy {policy!r} (known: {', '.join(METRIC_POLICIES)})") from None


Spacing = float | Sequence[float] | np.ndarray | None


def _binary_pair(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, ground truth) as boolean masks of the same shape."""
    p, g = np.asarray(y_pred), np.asarray(y_true)
    if p.shape != g.shape:
        raise DataError(f"prediction and ground truth differ in shape: {tuple(p.shape)} vs {tuple(g.shape)}")
    return p.astype(bool, copy=False), g.astype(bool, copy=False)


def _spacing(spacing: Spacing, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim)
    sp = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.size == 1:
        sp = np.repeat(sp, ndim)
    if sp.size != ndim:
        raise DataError(f"spacing: expected {ndim} values for a {ndim}-D mask, got {sp.size}")
    if not (np.isfinite(sp).all() and (sp > 0).all()):
        raise DataError(f"spacing: values must be positive and finite, got {sp.tolist()}")
    return sp


def dice(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Dice of two binary masks; NaN when both are empty, 0.0 when exactly one is."""
    p, g = _binary_pair(y_true, y_pred)
    denom = int(p.sum()) + int(g.sum())
    if denom == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(p, g).sum()) / denom


def jaccard(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Jaccard (IoU) of two binary masks; NaN when both are empty, 0.0 when exactly one is."""
    p, g = _binary_pair(y_true, y_pred)
    union = int(np.logical_or(p, g).sum())
    if union == 0:
        return float("nan")
    return int(np.logical_and(p, g).sum()) / union


def image_diagonal(shape: Sequence[int], spacing: Spacing = None) -> float:
    """``sqrt(sum((shape_i * spacing_i)^2))``: the HD95 penalty when exactly one mask is empty."""
    sp = _spacing(spacing, len(shape))
    return float(np.sqrt(np.sum((np.asarray(shape, dtype=np.float64) * sp) ** 2)))


def _surface(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def hd95(y_true: np.ndarray, y_pred: np.ndarray, spacing: Spacing = None, *, connectivity: int = 1,
         policy: str | MetricPolicy = DEFAULT_METRIC_POLICY) -> float:
    """Symmetric HD95 in the unit of ``spacing``; see the module docstring.

    ``monai``: ``max(p95(pred->gt), p95(gt->pred))`` (``monai.metrics.compute_hausdorff_distance``), exactly
    one mask empty -> :func:`image_diagonal`. ``seed000``: ``p95`` of both directions' distances pooled
    (``medpy.metric.binary.hd95``), exactly one empty -> NaN (the frame is skipped). Both empty -> NaN.
    """
    pol = metric_policy(policy)
    p, g = _binary_pair(y_true, y_pred)
    if p.ndim == 0:
        raise DataError("hd95: masks must have at least one dimension")
    if not 1 <= connectivity <= p.ndim:
        raise DataError(f"hd95: connectivity must be in [1, {p.ndim}], got {connectivity}")
    sp = _spacing(spacing, p.ndim)
    p_any, g_any = bool(p.any()), bool(g.any())
    if not p_any and not g_any:
        return float("nan")
    if p_any != g_any:
        return image_diagonal(p.shape, sp) if pol.hd95_one_empty == "diagonal" else float("nan")
    # Crop to the union's bounding box plus one voxel: erosion and distances between surface voxels are
    # unchanged (the margin is background, outside-the-image is background anyway), and the distance
    # transforms get much cheaper on large volumes with small structures.
    nz = np.nonzero(p | g)
    box = tuple(slice(max(int(ix.min()) - 1, 0), int(ix.max()) + 2) for ix in nz)
    p, g = p[box], g[box]
    structure = ndimage.generate_binary_structure(p.ndim, connectivity)
    sp_edge, g_edge = _surface(p, structure), _surface(g, structure)
    d_pred_to_gt = ndimage.distance_transform_edt(~g_edge, sampling=sp)[sp_edge]
    d_gt_to_pred = ndimage.distance_transform_edt(~sp_edge, sampling=sp)[g_edge]
    if pol.hd95_directions == "pooled":
        return float(np.percentile(np.concatenate([d_pred_to_gt, d_gt_to_pred]), 95))
    return float(max(np.percentile(d_pred_to_gt, 95), np.percentile(d_gt_to_pred, 95)))


def per_class_seg_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    num_classes: int,
    ignore_index: int | None = None,
    spacing: Spacing = None,
    include_background: bool = False,
    policy: str | MetricPolicy = DEFAULT_METRIC_POLICY,
) -> list[dict[str, object]]:
    """Dice, Jaccard and HD95 (under ``policy``) of every class of one image / volume of class indices.

    Returns one dict per class: ``{"class", "dice", "jaccard", "hd95", "tp", "fp", "fn", "gt_present",
    "pred_present"}``; ``tp``/``fp``/``fn`` are the class's pixel counts, which :func:`aggregate_seg` pools
    per patient under ``seed000``. Pixels with ground truth ``ignore_index`` are excluded from both masks
    (and that class, if it is a class index, is not reported). Labels outside ``[0, num_classes)`` other
    than ``ignore_index`` are an error.
    """
    pol = metric_policy(policy)
    p, g = np.asarray(y_pred), np.asarray(y_true)
    if p.shape != g.shape:
        raise DataError(f"prediction and ground truth differ in shape: {tuple(p.shape)} vs {tuple(g.shape)}")
    if num_classes < 1:
        raise DataError(f"num_classes must be >= 1, got {num_classes}")
    for name, arr, allowed_extra in (("ground truth", g, ignore_index), ("prediction", p, None)):
        if arr.size == 0:
            continue
        bad = (arr < 0) | (arr >= num_classes)
        if allowed_extra is not None:
            bad &= arr != allowed_extra
        if bad.any():
            raise DataError(f"{name}: label {arr[bad].ravel()[0].item()!r} out of range [0, {num_classes})")
    valid = np.ones(g.shape, dtype=bool) if ignore_index is None else g != ignore_index
    rows: list[dict[str, object]] = []
    for c in range(0 if include_background else 1, num_classes):
        if ignore_index is not None and c == ignore_index:
            continue
        pc = (p == c) & valid
        gc = (g == c) & valid
        tp = int(np.logical_and(pc, gc).sum())
        rows.append(
            {
                "class": c,
                "dice": dice(gc, pc),
                "jaccard": jaccard(gc, pc),
                "hd95": hd95(gc, pc, spacing, policy=pol),
                "tp": tp,
                "fp": int(pc.sum()) - tp,
                "fn": int(gc.sum()) - tp,
                "gt_present": bool(gc.any()),
                "pred_present": bool(pc.any()),
            }
        )
    return rows


def foreground_dice(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Per image of a batch of class-index masks ``[B, ...]`` (torch tensors): the mean over the foreground
    classes of Dice (NaN for a class absent in both; pixels whose ground truth is ``ignore_index`` left
    out); ``[B]``, NaN for an image with no class to count."""
    import torch  # not at module level: the rest of this module is numpy-only and the report imports it

    valid = y_true != ignore_index
    values = []
    for c in range(1, num_classes):
        p = (y_pred == c) & valid
        g = (y_true == c) & valid
        inter = (p & g).flatten(1).sum(1).float()
        denom = (p.flatten(1).sum(1) + g.flatten(1).sum(1)).float()
        values.append(torch.where(denom > 0, 2 * inter / denom.clamp_min(1), torch.full_like(denom, float("nan"))))
    if not values:
        return torch.full((y_pred.shape[0],), float("nan"))
    return torch.nanmean(torch.stack(values, 1), dim=1)


def _nanmean(values: Iterable[float]) -> float:
    arr = np.asarray(list(values), dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def _sorted_keys(d: Mapping[object, object]) -> list[object]:
    try:
        return sorted(d)  # type: ignore[type-var]
    except TypeError:  # mixed key types: keep first-seen order
        return list(d)


def _pooled_overlap(metric: str, tp: int, fp: int, fn: int) -> float:
    """Dice ``2TP / (2TP + FP + FN)`` or Jaccard ``TP / (TP + FP + FN)`` of pooled counts; NaN when all are 0."""
    if metric == "dice":
        denom = 2 * tp + fp + fn
        return 2.0 * tp / denom if denom else float("nan")
    denom = tp + fp + fn
    return tp / denom if denom else float("nan")


def aggregate_seg(
    rows: Sequence[Mapping[str, object]],
    by: Sequence[str] = ("patient",),
    metrics: Sequence[str] = SEG_METRICS,
    policy: str | MetricPolicy = DEFAULT_METRIC_POLICY,
) -> dict[str, dict[str, object]]:
    """Seed 000's protocol: classes averaged per group (patient), then groups averaged.

    ``rows`` are dicts with keys ``image``, ``class``, the ``by`` keys and the metric values (rows of
    :func:`per_class_seg_metrics` with ``image``/``patient`` added). Per group and class the value is the
    mean over the group's images (NaN rows skipped) -- under ``seed000`` Dice and Jaccard are instead computed
    once from the group's summed ``tp``/``fp``/``fn`` of that class (rows must carry them), as seed 000's
    released code does; the group's value is the mean over its classes with a defined value; a group with
    none is NaN and left out. Returns, per metric, ``mean``, ``std`` (the policy's ``ddof``; 0.0 for a single
    group), ``n`` (groups counted), ``values`` (group -> value; the group is the ``by`` value, or a tuple of
    them when ``by`` has several keys) and ``per_class`` (class -> mean over groups of that class's per-group
    value).
    """
    pol = metric_policy(policy)
    if not rows:
        raise DataError("aggregate_seg: no rows")
    by = tuple(by)
    pooled = [m for m in metrics if pol.overlap == "pooled" and m in ("dice", "jaccard")]
    counts_needed = ("tp", "fp", "fn") if pooled else ()
    # group -> class -> metric -> list of values (pooled metrics: [tp, fp, fn] summed)
    table: dict[Hashable, dict[object, dict[str, list[float]]]] = {}
    for i, row in enumerate(rows):
        missing = [k for k in (*by, "class", *metrics) if k not in row]
        if missing:
            raise DataError(f"aggregate_seg: row {i} lacks key(s) {', '.join(missing)}")
        missing = [k for k in counts_needed if k not in row]
        if missing:
            raise DataError(f"aggregate_seg: metric policy {pol.name} pools pixel counts per patient, and row "
                            f"{i} lacks {', '.join(missing)}")
        key = row[by[0]] if len(by) == 1 else tuple(row[k] for k in by)
        per_metric = table.setdefault(key, {}).setdefault(
            row["class"], {m: [0, 0, 0] if m in pooled else [] for m in metrics})
        for m in metrics:
            if m in pooled:
                for j, k in enumerate(counts_needed):
                    per_metric[m][j] += int(float(row[k]))  # type: ignore[arg-type]
            else:
                per_metric[m].append(float(row[m]))  # type: ignore[arg-type]

    out: dict[str, dict[str, object]] = {}
    for m in metrics:
        values: dict[Hashable, float] = {}
        class_values: dict[object, list[float]] = {}
        for key, classes in table.items():
            per_class = {c: _pooled_overlap(m, *v[m]) if m in pooled else _nanmean(v[m]) for c, v in classes.items()}
            for c, v in per_class.items():
                class_values.setdefault(c, []).append(v)
            values[key] = _nanmean(per_class.values())
        finite = np.asarray([v for v in values.values() if not np.isnan(v)])
        out[m] = {
            "mean": float(finite.mean()) if finite.size else float("nan"),
            "std": float(finite.std(ddof=pol.std_ddof)) if finite.size > 1 else 0.0,
            "n": int(finite.size),
            "values": values,
            "per_class": {c: _nanmean(class_values[c]) for c in _sorted_keys(class_values)},
        }
    return out
