"""Phase metrics against hand-computed cases and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from meddino.metrics.phase import (
    edit_score,
    f1_at_k,
    frame_accuracy,
    levenshtein,
    macro_f1,
    pooled_f1_at_k,
    segment_counts,
    segments,
    summarize,
    video_metrics,
)

# ground truth: A A A A B B B B C C  (segments A[0,4) B[4,8) C[8,10))
TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
# prediction: A A B B B B A B C C (segments A[0,2) B[2,6) A[6,7) B[7,8) C[8,10))
PRED = np.array([0, 0, 1, 1, 1, 1, 0, 1, 2, 2])


def test_segments() -> None:
    assert segments(TRUE) == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
    assert segments(PRED) == [(0, 0, 2), (1, 2, 6), (0, 6, 7), (1, 7, 8), (2, 8, 10)]
    assert segments([]) == []


def test_levenshtein_hand() -> None:
    assert levenshtein([0, 1, 2], [0, 1, 0, 1, 2]) == 2
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein([], [1, 2]) == 2


def test_edit_score_hand() -> None:
    # segment labels A B C vs A B A B C: 2 insertions, max length 5 -> (1 - 2/5) * 100 = 60
    assert edit_score(TRUE, PRED) == pytest.approx(60.0)
    assert edit_score(TRUE, TRUE) == pytest.approx(100.0)
    # over-segmentation inside one phase is penalised even when frame accuracy is high
    assert edit_score([0, 0, 0, 0, 0], [0, 0, 1, 0, 0]) == pytest.approx((1 - 2 / 3) * 100)
    assert edit_score([], []) == 100.0


def test_f1_at_k_hand() -> None:
    # IoUs of predicted segments with the best same-label gt segment:
    #  A[0,2) vs A[0,4): 2/4 = 0.5         -> TP at 10, 25, 50
    #  B[2,6) vs B[4,8): 2/6 = 0.333       -> TP at 10, 25; FP at 50
    #  A[6,7) vs A[0,4): 0                 -> FP (best gt A already matched as well)
    #  B[7,8) vs B[4,8): 1/4 = 0.25        -> gt B already matched at 10/25 -> FP; at 50: 0.25 < 0.5 -> FP
    #  C[8,10) vs C[8,10): 1               -> TP
    # k=10: tp 3, fp 2, fn 0 -> P 3/5, R 1 -> F1 = 2*0.6/1.6 = 75
    # k=25: same = 75
    # k=50: tp 2, fp 3, fn 1 -> P 2/5, R 2/3 -> F1 = 2*(0.4*0.6667)/(1.0667) = 50
    assert segment_counts(TRUE, PRED, 0.10) == (3, 2, 0)
    assert segment_counts(TRUE, PRED, 0.25) == (3, 2, 0)
    assert segment_counts(TRUE, PRED, 0.50) == (2, 3, 1)
    assert f1_at_k(TRUE, PRED, 0.10) == pytest.approx(75.0)
    assert f1_at_k(TRUE, PRED, 0.25) == pytest.approx(75.0)
    assert f1_at_k(TRUE, PRED, 0.50) == pytest.approx(50.0)
    assert f1_at_k(TRUE, TRUE, 0.5) == pytest.approx(100.0)
    # a completely wrong label everywhere: no TP -> 0
    assert f1_at_k(TRUE, np.full(10, 5), 0.1) == 0.0


def test_pooled_f1_sums_counts() -> None:
    other_true = np.array([3, 3, 3, 3])
    other_pred = np.array([3, 3, 3, 3])
    pooled = pooled_f1_at_k([(TRUE, PRED), (other_true, other_pred)])
    # k=50: tp 2+1, fp 3+0, fn 1+0 -> P 0.5, R 0.75 -> F1 = 60
    assert pooled["f1@50"] == pytest.approx(60.0)
    assert pooled["f1@10"] == pytest.approx(2 * (4 / 6) * 1 / (4 / 6 + 1) * 100)


@pytest.mark.parametrize("seed", range(5))
def test_accuracy_and_macro_f1_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 5, size=60)
    pred = np.where(rng.random(60) < 0.6, true, rng.integers(0, 7, size=60))  # includes phases absent from gt
    assert frame_accuracy(true, pred) == pytest.approx(accuracy_score(true, pred))
    assert macro_f1(true, pred) == pytest.approx(f1_score(true, pred, average="macro", zero_division=0))


def test_macro_f1_hand() -> None:
    # F1 = 2tp / (2tp + fp + fn). phase 0: tp 2 fp 1 fn 2 -> 4/7; phase 1: tp 3 fp 2 fn 1 -> 6/9;
    # phase 2: tp 2 fp 0 fn 0 -> 1
    assert macro_f1(TRUE, PRED) == pytest.approx((4 / 7 + 6 / 9 + 1.0) / 3)
    assert frame_accuracy(TRUE, PRED) == pytest.approx(0.7)


def test_video_metrics_and_summary() -> None:
    m = video_metrics(TRUE, PRED)
    assert set(m) == {"accuracy", "macro_f1", "edit", "f1@10", "f1@25", "f1@50"}
    per_video = {"a": m, "b": video_metrics(TRUE, TRUE)}
    s = summarize(per_video)
    assert s["accuracy"]["mean"] == pytest.approx((0.7 + 1.0) / 2)
    assert s["accuracy"]["std"] == pytest.approx(np.std([0.7, 1.0], ddof=1))
    assert s["edit"]["n"] == 2
    assert summarize({"a": m})["edit"]["std"] == 0.0


def test_length_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        frame_accuracy([0, 1], [0, 1, 2])
