"""Metrics against values worked out by hand (numpy only, no torch)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qcsight_train.errors import EvaluationError
from qcsight_train.metrics import (
    binary_curves,
    classification_metrics,
    json_safe,
    rates_at_threshold,
    review_band,
    threshold_for_recall,
    threshold_within_false_reject,
)

CLASSES = ("good", "scratch", "spot")
# 4 good, 3 scratch, 3 spot; confusion matrix (rows true, columns predicted):
#            good scratch spot
#   good       3     1     0
#   scratch    1     2     0
#   spot       0     1     2
Y_TRUE = ["good"] * 4 + ["scratch"] * 3 + ["spot"] * 3
Y_PRED = ["good", "good", "good", "scratch", "scratch", "scratch", "good", "spot", "spot", "scratch"]


def test_classification_metrics_on_a_hand_checked_confusion_matrix() -> None:
    m = classification_metrics(np.array(Y_TRUE), np.array(Y_PRED), CLASSES)

    assert m["confusion_matrix"] == [[3, 1, 0], [1, 2, 0], [0, 1, 2]]
    assert m["accuracy"] == pytest.approx(7 / 10)
    # precision = diagonal / column sum; recall = diagonal / row sum
    good, scratch, spot = (m["per_class"][c] for c in CLASSES)
    assert (good["precision"], good["recall"], good["f1"]) == pytest.approx((3 / 4, 3 / 4, 3 / 4))
    assert (scratch["precision"], scratch["recall"]) == pytest.approx((2 / 4, 2 / 3))
    assert scratch["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))  # 4/7
    assert (spot["precision"], spot["recall"], spot["f1"]) == pytest.approx((1.0, 2 / 3, 0.8))
    assert [good["support"], scratch["support"], spot["support"]] == [4, 3, 3]
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    assert m["macro_f1"] == pytest.approx((3 / 4 + 4 / 7 + 4 / 5) / 3)
    json.dumps(m, allow_nan=False)


def test_classification_metrics_accepts_indices_and_handles_absent_classes() -> None:
    # "spot" never occurs and is never predicted: precision/recall 0, excluded from balanced accuracy.
    m = classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), CLASSES)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["per_class"]["spot"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["scratch"]["precision"] == pytest.approx(2 / 3)


def test_classification_metrics_rejects_unknown_labels_by_name() -> None:
    with pytest.raises(EvaluationError, match="dent"):
        classification_metrics(np.array(["good", "dent"]), np.array(["good", "good"]), CLASSES)


# Defects score 0.9, 0.8, 0.4; good parts 0.7, 0.4, 0.3, 0.1.
IS_DEFECT = np.array([1, 1, 1, 0, 0, 0, 0], dtype=bool)
SCORES = np.array([0.9, 0.8, 0.4, 0.7, 0.4, 0.3, 0.1])


def test_roc_auc_equals_the_pairwise_count_with_ties_as_half() -> None:
    # 12 (defect, good) pairs: 0.9 and 0.8 beat all 4 good (8); 0.4 beats 0.3 and 0.1 (2) and ties 0.4 (0.5).
    curves = binary_curves(IS_DEFECT, SCORES)
    assert curves["roc_auc"] == pytest.approx(10.5 / 12)
    assert curves["positives"] == 3 and curves["negatives"] == 4
    assert curves["roc"]["fpr"][0] == 0.0 and curves["roc"]["tpr"][-1] == 1.0 and curves["roc"]["fpr"][-1] == 1.0
    assert curves["roc"]["thresholds"][0] is None


def test_pr_auc_is_average_precision() -> None:
    # Thresholds 0.9 (P=1, R=1/3), 0.8 (P=1, R=2/3), 0.7 (P=2/3, R=2/3), 0.4 (P=3/5, R=1), then R stays 1.
    curves = binary_curves(IS_DEFECT, SCORES)
    assert curves["pr_auc"] == pytest.approx(1 / 3 * 1 + 1 / 3 * 1 + 1 / 3 * 3 / 5)
    assert curves["pr"]["recall"][:4] == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1.0])
    assert curves["pr"]["precision"][:4] == pytest.approx([1.0, 1.0, 2 / 3, 3 / 5])


def test_roc_auc_extremes_and_degenerate_cases() -> None:
    labels = np.array([0, 0, 1, 1], dtype=bool)
    assert binary_curves(labels, np.array([0.1, 0.2, 0.8, 0.9]))["roc_auc"] == pytest.approx(1.0)
    assert binary_curves(labels, np.array([0.9, 0.8, 0.2, 0.1]))["roc_auc"] == pytest.approx(0.0)
    assert binary_curves(labels, np.full(4, 0.5))["roc_auc"] == pytest.approx(0.5)
    no_defects = binary_curves(np.zeros(3, dtype=bool), np.array([0.1, 0.2, 0.3]))
    assert no_defects["roc_auc"] is None and no_defects["pr_auc"] is None
    only_defects = binary_curves(np.ones(2, dtype=bool), np.array([0.1, 0.2]))
    assert only_defects["roc_auc"] is None and only_defects["pr_auc"] == pytest.approx(1.0)


def test_threshold_for_recall_on_hand_cases() -> None:
    # All three defects need the threshold down at 0.4, which also rejects the good 0.7 and 0.4.
    assert threshold_for_recall(IS_DEFECT, SCORES, 1.0) == pytest.approx((0.4, 2 / 4))
    # Two of three (0.6 -> ceil(1.8) = 2; exactly 2/3 -> 2): threshold 0.8 rejects no good part.
    assert threshold_for_recall(IS_DEFECT, SCORES, 0.6) == pytest.approx((0.8, 0.0))
    assert threshold_for_recall(IS_DEFECT, SCORES, 2 / 3) == pytest.approx((0.8, 0.0))
    assert threshold_for_recall(IS_DEFECT, SCORES, 0.01) == pytest.approx((0.9, 0.0))


def test_threshold_for_recall_99_of_100_is_not_rounded_up_to_100() -> None:
    # 0.99 * 100 is 99.00000000000001 in floating point; the 99th highest score must be chosen.
    scores = np.arange(1, 101) / 100.0
    threshold, frr = threshold_for_recall(np.ones(100, dtype=bool), scores, 0.99)
    assert threshold == pytest.approx(0.02)
    assert np.isnan(frr)  # no good parts to reject
    rates = rates_at_threshold(np.ones(100, dtype=bool), scores, threshold)
    assert rates["defect_recall"] == pytest.approx(0.99) and rates["false_reject_rate"] is None


def test_review_band_stays_within_the_good_part_budget() -> None:
    # 20 good parts scoring 0.00 .. 0.19 below a 0.5 threshold, plus one defect at 0.3.
    good = np.arange(20) / 100.0
    scores = np.concatenate([good, [0.3]])
    is_defect = np.array([False] * 20 + [True])
    # 10 % of 20 good = 2 may be sent to review: the band starts just above the third-highest, 0.17.
    band = review_band(is_defect, scores, 0.5, 0.10, floor=0.0)
    assert 0.17 < band <= 0.18
    assert int(((good >= band) & (good < 0.5)).sum()) == 2
    # The defect at 0.3 is inside the band: an operator sees it.
    assert band <= 0.3 < 0.5
    # The floor wins when the budget would reach lower; a zero budget leaves no good part in the band.
    assert review_band(is_defect, scores, 0.5, 0.10, floor=0.25) == 0.25
    zero = review_band(is_defect, scores, 0.5, 0.0, floor=0.0)
    assert 0.19 < zero < 0.2 and not (good >= zero).any()
    # A budget larger than the good parts below the threshold: the floor.
    assert review_band(is_defect, scores, 0.5, 1.0, floor=0.1) == 0.1
    # Ties never overflow the budget: five good parts at 0.2, budget 2 of them.
    tied = np.array([0.2] * 5 + [0.1] * 15 + [0.9])
    flags = np.array([False] * 20 + [True])
    band = review_band(flags, tied, 0.5, 0.10, floor=0.0)
    assert int(((tied[:20] >= band) & (tied[:20] < 0.5)).sum()) <= 2
    with pytest.raises(EvaluationError, match="review fraction"):
        review_band(is_defect, scores, 0.5, 1.5, floor=0.0)


def test_threshold_within_false_reject_keeps_the_good_parts_rejected_within_the_budget() -> None:
    # 20 good parts scoring 0.00 .. 0.19 and one defect scored like a good part (0.05): the threshold for
    # recall 1.0 sits at 0.05 and rejects 15 of 20 good parts.
    good = np.arange(20) / 100.0
    scores = np.concatenate([good, [0.05, 0.9]])
    is_defect = np.array([False] * 20 + [True, True])
    assert threshold_for_recall(is_defect, scores, 1.0) == pytest.approx((0.05, 15 / 20))
    # A budget of 10 % (2 of 20): just above the third-highest good score, 0.17.
    threshold = threshold_within_false_reject(is_defect, scores, 0.10)
    assert 0.17 < threshold <= 0.18
    rates = rates_at_threshold(is_defect, scores, threshold)
    assert rates["false_reject_rate"] == pytest.approx(2 / 20) and rates["defect_recall"] == pytest.approx(1 / 2)
    # Nothing rejected at a zero budget; at 1 the lowest score present (everything is a defect).
    zero = threshold_within_false_reject(is_defect, scores, 0.0)
    assert 0.19 < zero < 0.2 and rates_at_threshold(is_defect, scores, zero)["false_reject_rate"] == 0.0
    assert threshold_within_false_reject(is_defect, scores, 1.0) == 0.0
    # Ties never overflow the budget: five good parts at 0.2, budget 2 of 20.
    tied = np.array([0.2] * 5 + [0.1] * 15 + [0.9])
    flags = np.array([False] * 20 + [True])
    within = threshold_within_false_reject(flags, tied, 0.10)
    assert rates_at_threshold(flags, tied, within)["false_reject_rate"] <= 0.10
    with pytest.raises(EvaluationError, match="no good images"):
        threshold_within_false_reject(np.ones(3, dtype=bool), np.array([0.1, 0.2, 0.3]), 0.2)
    with pytest.raises(EvaluationError, match="false-reject budget"):
        threshold_within_false_reject(is_defect, scores, -0.1)


def test_threshold_for_recall_refuses_degenerate_input() -> None:
    with pytest.raises(EvaluationError, match="no defect images"):
        threshold_for_recall(np.zeros(3, dtype=bool), np.array([0.1, 0.2, 0.3]), 0.99)
    with pytest.raises(EvaluationError, match="recall"):
        threshold_for_recall(IS_DEFECT, SCORES, 1.5)


def test_json_safe_writes_strict_json() -> None:
    data = json_safe({"a": float("nan"), "b": np.float32(0.5), "c": np.arange(2), "d": (float("inf"),)})
    assert json.loads(json.dumps(data, allow_nan=False)) == {"a": None, "b": 0.5, "c": [0, 1], "d": [None]}
