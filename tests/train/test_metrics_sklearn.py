"""metrics.py against scikit-learn on seeded random cases: ties, absent classes, one-class inputs, tiny sets.

scikit-learn is the reference these metrics promise to agree with (balanced accuracy over the
classes present, average precision as the sum of recall gain x precision, ROC AUC with ties
counted half); each case is drawn from one seed, so a failure names a reproducible case.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pytest

from qcsight_train.metrics import binary_curves, classification_metrics, rates_at_threshold, threshold_for_recall

sklearn_metrics = pytest.importorskip("sklearn.metrics")

CASES = 60


def _classification_cases() -> Iterator[tuple[int, np.ndarray, np.ndarray, int]]:
    for seed in range(CASES):
        rng = np.random.default_rng(seed)
        k = int(rng.integers(2, 6))
        n = int(rng.integers(1, 80))
        # Some classes may never occur in the truth, or never be predicted.
        present = rng.choice(k, size=int(rng.integers(1, k + 1)), replace=False)
        y_true = rng.choice(present, size=n)
        noisy = rng.random(n) < rng.uniform(0.0, 0.8)
        y_pred = np.where(noisy, rng.integers(0, k, size=n), y_true)
        yield seed, y_true, y_pred, k


def _binary_cases() -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    for seed in range(CASES):
        rng = np.random.default_rng(1000 + seed)
        n = int(rng.integers(2, 120))
        labels = rng.random(n) < rng.uniform(0.05, 0.95)
        scores = np.clip(rng.normal(labels * rng.uniform(0.0, 2.0), 1.0), -4, 4)
        if seed % 3 == 0:
            scores = np.round(scores, 1)  # many ties
        if seed % 5 == 0:
            scores = (scores - scores.min()) / (np.ptp(scores) or 1.0)  # probabilities, as the models give
        yield seed, labels, scores


def test_classification_metrics_agree_with_scikit_learn() -> None:
    for seed, y_true, y_pred, k in _classification_cases():
        ours = classification_metrics(y_true, y_pred, [f"c{i}" for i in range(k)])
        labels = list(range(k))
        with warnings.catch_warnings():
            # scikit-learn warns when y_pred holds a class y_true lacks; the value is what is compared.
            warnings.simplefilter("ignore", UserWarning)
            balanced = sklearn_metrics.balanced_accuracy_score(y_true, y_pred)
        precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
            y_true, y_pred, labels=labels, zero_division=0)
        assert ours["confusion_matrix"] == sklearn_metrics.confusion_matrix(y_true, y_pred, labels=labels).tolist()
        assert ours["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y_true, y_pred)), seed
        assert ours["balanced_accuracy"] == pytest.approx(balanced), seed
        assert ours["macro_f1"] == pytest.approx(float(np.mean(f1))), seed
        per_class = [ours["per_class"][f"c{i}"] for i in labels]
        assert [c["precision"] for c in per_class] == pytest.approx(precision.tolist()), seed
        assert [c["recall"] for c in per_class] == pytest.approx(recall.tolist()), seed
        assert [c["f1"] for c in per_class] == pytest.approx(f1.tolist()), seed
        assert [c["support"] for c in per_class] == support.tolist(), seed


def test_roc_and_average_precision_agree_with_scikit_learn() -> None:
    for seed, labels, scores in _binary_cases():
        ours = binary_curves(labels, scores)
        if labels.all() or not labels.any():
            assert ours["roc_auc"] is None
            continue
        assert ours["roc_auc"] == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores)), seed
        assert ours["pr_auc"] == pytest.approx(sklearn_metrics.average_precision_score(labels, scores)), seed
        fpr, tpr, thresholds = sklearn_metrics.roc_curve(labels, scores, drop_intermediate=False)
        assert ours["roc"]["fpr"] == pytest.approx(fpr.tolist()), seed
        assert ours["roc"]["tpr"] == pytest.approx(tpr.tolist()), seed
        assert ours["roc"]["thresholds"][1:] == pytest.approx(thresholds[1:].tolist()), seed
        # scikit-learn's PR curve runs from low to high thresholds, stops at the first full recall
        # and appends (precision 1, recall 0); ours runs from the highest threshold down.
        precision, recall, pr_thresholds = sklearn_metrics.precision_recall_curve(labels, scores)
        kept = len(pr_thresholds)
        assert ours["pr"]["thresholds"][:kept] == pytest.approx(pr_thresholds[::-1].tolist()), seed
        assert ours["pr"]["precision"][:kept] == pytest.approx(precision[:-1][::-1].tolist()), seed
        assert ours["pr"]["recall"][:kept] == pytest.approx(recall[:-1][::-1].tolist()), seed


def test_operating_threshold_agrees_with_the_roc_curve() -> None:
    """The highest threshold reaching the target recall is the first ROC point with tpr >= target."""
    for seed, labels, scores in _binary_cases():
        if not labels.any() or labels.all():
            continue
        target = float(np.random.default_rng(seed).choice([0.5, 0.8, 0.9, 0.95, 0.99, 1.0]))
        threshold, false_reject = threshold_for_recall(labels, scores, target)
        fpr, tpr, thresholds = sklearn_metrics.roc_curve(labels, scores, drop_intermediate=False)
        first = int(np.argmax(tpr >= target - 1e-12))
        assert threshold == pytest.approx(thresholds[first]), seed
        assert false_reject == pytest.approx(fpr[first]), seed
        rates = rates_at_threshold(labels, scores, threshold)
        called = scores >= threshold
        assert rates["defect_recall"] == pytest.approx(sklearn_metrics.recall_score(labels, called)), seed
        assert rates["false_reject_rate"] == pytest.approx(1 - sklearn_metrics.recall_score(~labels, ~called)), seed
