"""Surgical phase recognition metrics (pure numpy): frame accuracy, macro F1, Edit score, F1@k.

Every function takes the annotation first, then the prediction: ``(y_true, y_pred)``, as the rest of
:mod:`meddino.metrics` and scikit-learn.

Definitions (all per video; :func:`summarize` then gives mean +/- std over videos, the protocol of seed 000):

- **accuracy**: fraction of frames whose predicted phase equals the annotation (0-1).
- **macro F1**: F1 per phase over the video's frames, averaged over the phases that occur in the annotation
  OR the prediction of that video (a phase absent from both is skipped; a phase predicted but absent from the
  annotation counts as F1 = 0). This is scikit-learn's ``f1_score(average="macro")`` with its default labels,
  and the "per phase, then averaged, per video, then averaged" of seed 000 / TeCNO (0-1).
- **Edit score**: segmental edit score of MS-TCN: ``(1 - Levenshtein(segments_pred, segments_true) /
  max(#segments_pred, #segments_true)) * 100``, where a video's segments are its runs of equal labels and the
  Levenshtein distance is over the sequences of segment labels (insert/delete/substitute cost 1). 0-100.
- **F1@k** (k = 10, 25, 50 % IoU): MS-TCN's segmental F1. Each predicted segment, in temporal order, is
  compared with the ground-truth segment of the same label having the largest IoU (first one on ties); it is
  a true positive when that IoU >= k/100 and that ground-truth segment is not matched yet, a false positive
  otherwise (as in MS-TCN's evaluation: a duplicate detection of an already matched segment is an FP, not
  re-routed to another segment); unmatched ground-truth segments are false negatives.
  F1 = 2PR / (P + R) * 100 (0 when P + R = 0). MS-TCN pools tp/fp/fn over the whole test set; we report the
  per-video mean +/- std (seed 000's convention) and the pooled value (``pooled_f1_at_k``).

Scales: accuracy and macro F1 in 0-1, Edit and F1@k in 0-100, as they are reported in the literature.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

OVERLAPS = (0.10, 0.25, 0.50)


def _arr(x: Sequence[int] | np.ndarray) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"expected a 1-D sequence of phase labels, got shape {a.shape}")
    return a.astype(np.int64)


Labels = Sequence[int] | np.ndarray


def _check(true: np.ndarray, pred: np.ndarray) -> None:
    if pred.shape != true.shape:
        raise ValueError(f"prediction has {pred.shape[0]} frames, annotation {true.shape[0]}")


def frame_accuracy(y_true: Labels, y_pred: Labels) -> float:
    """Fraction of frames predicted correctly (NaN for an empty video)."""
    t, p = _arr(y_true), _arr(y_pred)
    _check(t, p)
    return float(np.mean(p == t)) if t.size else float("nan")


def per_phase_f1(y_true: Labels, y_pred: Labels) -> dict[int, float]:
    """``{phase: F1}`` for every phase present in the annotation or the prediction."""
    t, p = _arr(y_true), _arr(y_pred)
    _check(t, p)
    out = {}
    for c in np.union1d(np.unique(p), np.unique(t)):
        tp = int(np.sum((p == c) & (t == c)))
        fp = int(np.sum((p == c) & (t != c)))
        fn = int(np.sum((p != c) & (t == c)))
        denom = 2 * tp + fp + fn
        out[int(c)] = 2 * tp / denom if denom else 0.0
    return out


def macro_f1(y_true: Labels, y_pred: Labels) -> float:
    """Mean of :func:`per_phase_f1` over the phases present in annotation or prediction (NaN if none)."""
    scores = per_phase_f1(y_true, y_pred)
    return float(np.mean(list(scores.values()))) if scores else float("nan")


def segments(labels: Labels) -> list[tuple[int, int, int]]:
    """Runs of equal labels as ``(label, start, end)`` with ``end`` exclusive."""
    a = _arr(labels)
    if a.size == 0:
        return []
    change = np.flatnonzero(np.diff(a)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [a.size]])
    return [(int(a[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def levenshtein(a: Sequence[int], b: Sequence[int]) -> int:
    """Edit distance between two label sequences (unit costs), dynamic programming in O(len(a) * len(b))."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def edit_score(y_true: Labels, y_pred: Labels) -> float:
    """Segmental Edit score in 0-100 (100 when both are empty)."""
    sp = [s[0] for s in segments(y_pred)]
    st = [s[0] for s in segments(y_true)]
    n = max(len(sp), len(st))
    if n == 0:
        return 100.0
    return (1.0 - levenshtein(sp, st) / n) * 100.0


def segment_counts(y_true: Labels, y_pred: Labels, overlap: float) -> tuple[int, int, int]:
    """(tp, fp, fn) of the segment matching at IoU threshold ``overlap`` (0-1), see the module docstring."""
    t, p = _arr(y_true), _arr(y_pred)
    _check(t, p)
    seg_p, seg_t = segments(p), segments(t)
    used = [False] * len(seg_t)
    tp = fp = 0
    for label, ps, pe in seg_p:
        best, best_iou = -1, -1.0
        for j, (tl, ts, te) in enumerate(seg_t):
            if tl != label:
                continue
            inter = max(0, min(pe, te) - max(ps, ts))
            union = max(pe, te) - min(ps, ts)
            iou = inter / union
            if iou > best_iou:
                best, best_iou = j, iou
        if best >= 0 and best_iou >= overlap and not used[best]:
            tp += 1
            used[best] = True
        else:
            fp += 1
    fn = len(seg_t) - sum(used)
    return tp, fp, fn


def f1_from_counts(tp: int, fp: int, fn: int) -> float:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall) * 100.0


def f1_at_k(y_true: Labels, y_pred: Labels, overlap: float) -> float:
    """Segmental F1 at IoU threshold ``overlap`` (0-1; e.g. 0.1 for F1@10), in 0-100."""
    return f1_from_counts(*segment_counts(y_true, y_pred, overlap))


def video_metrics(y_true: Labels, y_pred: Labels) -> dict[str, float]:
    """All metrics of one video: accuracy, macro_f1, edit, f1@10, f1@25, f1@50."""
    out = {
        "accuracy": frame_accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred),
        "edit": edit_score(y_true, y_pred),
    }
    for k in OVERLAPS:
        out[f"f1@{round(k * 100)}"] = f1_at_k(y_true, y_pred, k)
    return out


def pooled_f1_at_k(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]], overlaps: Sequence[float] = OVERLAPS
) -> dict[str, float]:
    """MS-TCN's dataset-level F1@k: tp/fp/fn summed over all (y_true, y_pred) videos, then one F1 per k."""
    pairs = list(pairs)
    out = {}
    for k in overlaps:
        tp = fp = fn = 0
        for y_true, y_pred in pairs:
            a, b, c = segment_counts(y_true, y_pred, k)
            tp, fp, fn = tp + a, fp + b, fn + c
        out[f"f1@{round(k * 100)}"] = f1_from_counts(tp, fp, fn)
    return out


def summarize(per_video: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """``{video: {metric: value}}`` -> ``{metric: {"mean", "std", "n"}}`` over videos.

    ``std`` is the sample standard deviation (ddof = 1; 0 for a single video); NaN values are left out.
    """
    names: list[str] = []
    for row in per_video.values():
        names.extend(k for k in row if k not in names)
    out = {}
    for name in names:
        vals = np.array([row[name] for row in per_video.values() if name in row], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        n = int(vals.size)
        out[name] = {
            "mean": float(vals.mean()) if n else float("nan"),
            "std": float(vals.std(ddof=1)) if n > 1 else 0.0,
            "n": n,
        }
    return out
