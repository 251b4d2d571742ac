"""Anomaly metrics and thresholds (numpy only): PRO against a hand-computed case, ROC AUC, the threshold rules."""

from __future__ import annotations

import numpy as np
import pytest

from qcsight_train.anomaly.metrics import image_figures, pro_auc, pro_curve, roc_auc
from qcsight_train.anomaly.threshold import (
    AnomalyThreshold,
    binomial_upper_bound,
    choose_threshold,
    threshold_at_false_reject,
)
from qcsight_train.errors import EvaluationError
from qcsight_train.metrics import binary_curves


def _hand_case() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two images, two defect regions (2 pixels and 1 pixel), 7 defect-free pixels."""
    masks = [np.array([[1, 1, 0], [0, 0, 0]], bool), np.array([[0, 1], [0, 0]], bool)]
    heats = [np.array([[0.9, 0.3, 0.8], [0.1, 0.2, 0.0]]), np.array([[0.5, 0.7], [0.4, 0.6]])]
    return masks, heats


def test_pro_matches_the_hand_computed_case() -> None:
    # Descending: 0.9 (region 1, PRO +1/4), 0.8 (normal, FPR +1/7), 0.7 (region 2, PRO +1/2), 0.6 (normal),
    # 0.5 (normal: FPR 3/7 > 0.3). Area to FPR 0.3: 0.25 * 1/7 + 0.75 * 1/7 + 0.75 * (0.3 - 2/7).
    masks, heats = _hand_case()
    fpr, pro = pro_curve(masks, heats)
    np.testing.assert_allclose(fpr[:6], [0, 0, 1 / 7, 1 / 7, 2 / 7, 3 / 7])
    np.testing.assert_allclose(pro[:6], [0, 0.25, 0.25, 0.75, 0.75, 0.75])
    expected = (0.25 / 7 + 0.75 / 7 + 0.75 * (0.3 - 2 / 7)) / 0.3
    assert pro_auc(masks, heats) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.5119048, abs=1e-7)


def test_pro_is_one_for_a_perfect_map_and_counts_ties_together() -> None:
    masks, _ = _hand_case()
    assert pro_auc(masks, [m.astype(float) for m in masks]) == pytest.approx(1.0)
    # Every pixel tied: the curve jumps from (0, 0) to (1, 1) at once; the area to 0.3 is the diagonal's.
    flat = [np.zeros(m.shape) for m in masks]
    assert pro_auc(masks, flat) == pytest.approx(0.15)
    # One region per connected component (8-connectivity): a diagonal pair is one region.
    diagonal = [np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]], bool)]
    _, pro = pro_curve(diagonal, [np.array([[1.0, 0, 0], [0, 0.5, 0], [0, 0, 0]])])
    assert pro[1] == pytest.approx(0.5)  # half of the one region


def test_pro_refuses_masks_without_regions_or_mismatched_shapes() -> None:
    with pytest.raises(EvaluationError, match="region"):
        pro_auc([np.zeros((2, 2), bool)], [np.zeros((2, 2))])
    with pytest.raises(EvaluationError, match="shape"):
        pro_auc([np.ones((2, 2), bool)], [np.zeros((3, 2))])


def test_roc_auc_equals_the_mann_whitney_statistic_with_ties() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(500) < 0.3
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounding makes many ties
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert roc_auc(labels, scores) == pytest.approx(wins / (pos.size * neg.size), abs=1e-12)
    assert roc_auc(labels, scores) == pytest.approx(binary_curves(labels, scores)["roc_auc"], abs=1e-12)
    assert roc_auc(np.zeros(3, bool), np.arange(3.0)) is None


def test_threshold_at_a_false_reject_rate_counts_images_and_bounds_the_rate() -> None:
    good = np.arange(1.0, 101.0)  # 100 good images scoring 1..100
    threshold, record = threshold_at_false_reject(good, 0.01)
    assert threshold == pytest.approx(99.0 * 1.0001)  # only the image at 100 is over
    # On the device's float32 scale the image just below still reads below 1.0.
    assert np.float32(99.0) / np.float32(threshold) < np.float32(1.0)
    assert record["good_over_threshold"] == 1 and record["false_reject_rate"] == 0.01
    assert threshold_at_false_reject(good[:50], 0.01)[0] > 50.0  # 0.5 of an image: none may be over
    # Clopper-Pearson: with 0 of n over, the bound is 1 - 0.05 ** (1 / n).
    assert binomial_upper_bound(0, 140) == pytest.approx(1 - 0.05 ** (1 / 140), abs=1e-9)
    assert binomial_upper_bound(3, 100) == pytest.approx(0.0757, abs=5e-4)


def test_choose_threshold_by_recall_falls_back_without_defects_and_sizes_the_band() -> None:
    scores = np.r_[np.linspace(1.0, 2.0, 20), np.linspace(1.8, 4.0, 10)]
    is_defect = np.r_[np.zeros(20, bool), np.ones(10, bool)]
    by_recall = choose_threshold(scores, is_defect, rule="defect_recall", false_reject_rate=0.01, target_recall=0.9,
                                 review_fraction=0.1, uncertain_floor=0.5)
    assert by_recall.raw == pytest.approx(np.linspace(1.8, 4.0, 10)[1])  # 9 of 10 defects at or above
    assert by_recall.record["at_threshold"]["defect_recall"] == pytest.approx(0.9)
    # The band holds at most 10 % of the 20 good images: 2 of them.
    normal = scores[:20] / by_recall.raw
    assert 0 < np.sum((normal >= by_recall.uncertain) & (normal < 1.0)) <= 2
    fallback = choose_threshold(scores[:20], is_defect[:20], rule="defect_recall", false_reject_rate=0.05,
                                target_recall=0.9, review_fraction=0.0, uncertain_floor=0.5)
    assert "fallback" in fallback.record and fallback.record["good_over_threshold"] == 1
    # No review budget: the band holds no good image (the classifiers' rule).
    normal = scores[:20] / fallback.raw
    assert not np.any((normal >= fallback.uncertain) & (normal < 1.0))


def test_the_recall_rule_rises_to_the_false_reject_budget_and_says_what_it_gave_up() -> None:
    # 20 good images scoring 1..20, 10 defects scoring 25..34 and one scored like the lowest good part.
    good = np.arange(1.0, 21.0)
    scores = np.r_[good, np.arange(25.0, 35.0), 0.5]
    is_defect = np.r_[np.zeros(20, bool), np.ones(11, bool)]

    def pick(scores: np.ndarray, is_defect: np.ndarray, budget: float = 1.0) -> AnomalyThreshold:
        return choose_threshold(scores, is_defect, rule="defect_recall", false_reject_rate=0.01, target_recall=1.0,
                                review_fraction=0.0, uncertain_floor=0.5, max_false_reject=budget)

    unbounded = pick(scores, is_defect)
    assert unbounded.raw == 0.5 and unbounded.record["false_reject_rate"] == 1.0
    assert "false_reject_warning" not in unbounded.record
    bounded = pick(scores, is_defect, 0.2)
    # At most 4 of 20 good images may be flagged: the threshold sits just above the 5th highest (16).
    assert 16.0 < bounded.raw <= 17.0
    assert int(np.sum(good >= bounded.raw)) == 4 and bounded.record["false_reject_rate"] == 0.2
    assert bounded.record["recall_target_threshold"] == {"raw_threshold": 0.5, "false_reject_rate": 1.0}
    assert bounded.record["at_threshold"]["defect_recall"] == pytest.approx(10 / 11)
    warning = bounded.record["false_reject_warning"]
    assert "--max-false-reject" in warning and "catches 10 of 11" in warning and "100%" in warning
    # Within the budget nothing moves; a budget of 1 keeps the recall target.
    assert pick(scores, is_defect, 1.0).raw == 0.5
    easy = pick(scores[:30], is_defect[:30], 0.2)
    assert easy.raw == 25.0 and "false_reject_warning" not in easy.record


def test_image_figures_at_the_threshold() -> None:
    figures = image_figures(np.array([0, 0, 0, 1, 1], bool), np.array([0.2, 1.0, 0.5, 1.5, 0.9]))
    assert figures["defect_recall"] == 0.5 and figures["precision"] == 0.5 and figures["f1"] == 0.5
    assert figures["false_reject_rate"] == pytest.approx(1 / 3)
