"""Classification and defect-vs-good metrics in plain numpy (no torch), shared by export and evaluation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from qcsight_train.errors import EvaluationError

# ceil(0.99 * 100) is 100 in floating point; this slack keeps "99 of 100" meaning 99.
_COUNT_EPS = 1e-9


def _as_indices(values: np.ndarray, classes: Sequence[str], name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind in "iu":
        if array.size and (array.min() < 0 or array.max() >= len(classes)):
            raise EvaluationError(f"{name}: class index out of range 0..{len(classes) - 1}")
        return array.astype(np.int64)
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(v) for v in array.tolist()} - set(lookup))
    if unknown:
        raise EvaluationError(f"{name}: labels {unknown} are not among the classes {list(classes)}")
    return np.array([lookup[str(v)] for v in array.tolist()], dtype=np.int64)


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else 0.0


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """KxK counts: row = true class, column = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class precision/recall/F1, macro-F1 and the confusion matrix.

    Args:
        y_true: true classes, as indices into classes or as class names.
        y_pred: predicted classes, the same way.
        classes: class names in index order.

    Returns:
        A JSON-ready dict. Balanced accuracy is the mean recall over the classes present in
        y_true (as scikit-learn computes it); macro-F1 averages F1 over every class. A class
        never predicted has precision 0, one absent from y_true recall 0 (and support 0).
    """
    true = _as_indices(y_true, classes, "y_true")
    pred = _as_indices(y_pred, classes, "y_pred")
    if true.shape != pred.shape:
        raise EvaluationError(f"y_true has {true.size} entries but y_pred has {pred.size}")
    if true.size == 0:
        raise EvaluationError("no samples to compute metrics on")
    matrix = confusion_matrix(true, pred, len(classes))
    tp = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    per_class: dict[str, dict[str, float | int]] = {}
    recalls: list[float] = []
    f1s: list[float] = []
    for i, name in enumerate(classes):
        precision = _ratio(tp[i], predicted[i])
        recall = _ratio(tp[i], support[i])
        f1 = _ratio(2 * precision * recall, precision + recall)
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(support[i])}
        f1s.append(f1)
        if support[i]:
            recalls.append(recall)
    return {
        "classes": list(classes),
        "samples": int(true.size),
        "accuracy": float(tp.sum() / true.size),
        "balanced_accuracy": float(np.mean(recalls)),
        "macro_f1": float(np.mean(f1s)),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }


def _binary_inputs(is_defect: np.ndarray, defect_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(is_defect).astype(bool).ravel()
    scores = np.asarray(defect_score, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise EvaluationError(f"is_defect has {labels.size} entries but defect_score has {scores.size}")
    if not np.all(np.isfinite(scores)):
        raise EvaluationError("defect scores contain NaN or infinity")
    return labels, scores


def _cumulative_counts(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True/false positives when calling "defect" at each distinct score, highest threshold first."""
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # The last index of each run of equal scores: ties are decided together.
    last = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_labels.size - 1]
    tps = np.cumsum(sorted_labels)[last].astype(np.float64)
    fps = (last + 1 - tps).astype(np.float64)
    return tps, fps, sorted_scores[last]


def binary_curves(is_defect: np.ndarray, defect_score: np.ndarray) -> dict[str, Any]:
    """Defect-vs-good ROC and precision-recall curves and their areas.

    Args:
        is_defect: truth per image (True for any defect class).
        defect_score: the defect score per image (higher means more likely defect).

    Returns:
        roc_auc (trapezoidal, ties counted half, equal to the Mann-Whitney statistic), pr_auc
        (average precision: sum over thresholds of recall gain x precision, as scikit-learn),
        the curves (roc: fpr/tpr/thresholds starting at (0, 0) with threshold None, i.e. +inf;
        pr: precision/recall/thresholds from the highest threshold down), and the class counts.
        An area that needs both classes is None when one is absent.
    """
    labels, scores = _binary_inputs(is_defect, defect_score)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    result: dict[str, Any] = {"positives": positives, "negatives": negatives, "roc_auc": None, "pr_auc": None,
                              "roc": {"fpr": [], "tpr": [], "thresholds": []},
                              "pr": {"precision": [], "recall": [], "thresholds": []}}
    if labels.size == 0:
        return result
    tps, fps, thresholds = _cumulative_counts(labels, scores)
    if positives and negatives:
        fpr = np.r_[0.0, fps / negatives]
        tpr = np.r_[0.0, tps / positives]
        result["roc_auc"] = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))
        result["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": [None, *thresholds.tolist()]}
    if positives:
        precision = tps / (tps + fps)
        recall = tps / positives
        result["pr_auc"] = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
        result["pr"] = {"precision": precision.tolist(), "recall": recall.tolist(), "thresholds": thresholds.tolist()}
    return result


def threshold_for_recall(is_defect: np.ndarray, defect_score: np.ndarray, target_recall: float) -> tuple[float, float]:
    """The highest threshold whose defect recall reaches target_recall, and the good parts it rejects.

    An image is a defect when its score is >= the threshold (as verdict.Decider decides), so
    the threshold is the k-th highest defect score with k = ceil(target_recall x defects).

    Returns:
        (threshold, false_reject_rate): the fraction of good images scoring at or above the
        threshold; NaN when there are no good images.

    Raises:
        EvaluationError: no defect images, or target_recall outside (0, 1].
    """
    if not 0.0 < target_recall <= 1.0:
        raise EvaluationError(f"target defect recall {target_recall!r} must be in (0, 1]")
    labels, scores = _binary_inputs(is_defect, defect_score)
    defect_scores = np.sort(scores[labels])[::-1]
    if defect_scores.size == 0:
        raise EvaluationError("no defect images: a threshold for a defect recall cannot be chosen")
    needed = max(1, math.ceil(target_recall * defect_scores.size - _COUNT_EPS))
    threshold = float(defect_scores[needed - 1])
    good_scores = scores[~labels]
    false_reject = float(np.mean(good_scores >= threshold)) if good_scores.size else float("nan")
    return threshold, false_reject


def threshold_within_false_reject(is_defect: np.ndarray, defect_score: np.ndarray, max_false_reject: float) -> float:
    """The lowest threshold that calls at most max_false_reject of the good images a defect.

    An image is a defect when its score is >= the threshold, so with k = floor(max_false_reject x
    goods) the threshold sits just above the (k+1)-th highest good score. Ties at that score all
    fall below it, so the rate can come out under the budget, never over.

    Returns:
        The threshold; the lowest score present when the budget allows every good image.

    Raises:
        EvaluationError: no good images, or max_false_reject outside [0, 1].
    """
    if not 0.0 <= max_false_reject <= 1.0:
        raise EvaluationError(f"false-reject budget {max_false_reject!r} must be in [0, 1]")
    labels, scores = _binary_inputs(is_defect, defect_score)
    good = np.sort(scores[~labels])[::-1]
    if good.size == 0:
        raise EvaluationError("no good images: a threshold for a false-reject rate cannot be chosen")
    above = _above_all_but(good, max_false_reject)
    return float(scores.min()) if above is None else above


def review_band(is_defect: np.ndarray, defect_score: np.ndarray, threshold: float, review_fraction: float,
                floor: float) -> float:
    """The uncertain threshold below a defect threshold: the widest band that stays within a review budget.

    Scores in [uncertain, threshold) are sent to an operator. The band reaches down as far as
    keeps at most review_fraction of the good images in it (the budget counts good parts,
    which are most of a line's output), but never below floor.

    Returns:
        The uncertain threshold, floor <= u <= threshold; threshold itself means no band.
    """
    if not 0.0 <= review_fraction <= 1.0:
        raise EvaluationError(f"review fraction {review_fraction!r} must be in [0, 1]")
    floor = min(floor, threshold)
    labels, scores = _binary_inputs(is_defect, defect_score)
    good = scores[~labels]
    above = _above_all_but(np.sort(good[good < threshold])[::-1], review_fraction, of=good.size)
    if above is None:
        return float(floor)
    return float(min(threshold, max(floor, above)))


def _above_all_but(descending: np.ndarray, share: float, of: int | None = None) -> float | None:
    """The lowest score with at most floor(share x of) of `descending` at or above it; None when all may be.

    Strictly above the (k+1)-th highest score, so ties there all fall below it: the count can come
    out under k, never over. `of` is the count the share is of (default: len(descending)).
    """
    allowed = math.floor(share * (descending.size if of is None else of) + _COUNT_EPS)
    if allowed >= descending.size:
        return None
    return float(np.nextafter(descending[allowed], np.inf))


def rates_at_threshold(is_defect: np.ndarray, defect_score: np.ndarray, threshold: float) -> dict[str, Any]:
    """Defect recall and good-part false-reject rate when calling score >= threshold a defect.

    Each rate comes with its 95 % Wilson interval and the count it rests on: a recall measured
    on six defects is a guess, and the interval says how wide.
    """
    labels, scores = _binary_inputs(is_defect, defect_score)
    called = scores >= threshold
    defects, goods = int(labels.sum()), int((~labels).sum())
    caught, rejected = int(called[labels].sum()), int(called[~labels].sum())
    return {"threshold": float(threshold),
            "defect_recall": caught / defects if defects else None,
            "defect_recall_ci95": wilson_interval(caught, defects), "defect_images": defects,
            "false_reject_rate": rejected / goods if goods else None,
            "false_reject_rate_ci95": wilson_interval(rejected, goods), "good_images": goods}


# Below this many validation defects the threshold's recall is reported with a warning: with 50
# defects all caught, the 95 % Wilson interval on recall is [0.929, 1]; with 6 it is [0.61, 1].
MIN_THRESHOLD_DEFECTS = 50
_Z95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = _Z95) -> list[float] | None:
    """The Wilson score interval [low, high] for a proportion (95 % by default); None for no trials.

    Wilson rather than the normal approximation: it stays inside [0, 1] and is honest at 0 or n
    successes, which is exactly where a recall target of 0.99 puts us.
    """
    if trials <= 0:
        return None
    p = successes / trials
    denominator = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return [max(0.0, centre - half), min(1.0, centre + half)]


def threshold_warning(defects: int, recall: float | None, interval: list[float] | None,
                      target: float) -> str | None:
    """A warning when the operating threshold rests on fewer than MIN_THRESHOLD_DEFECTS defects."""
    if defects >= MIN_THRESHOLD_DEFECTS:
        return None
    shown = "n/a" if recall is None or interval is None else f"{recall:.3f} (95 % interval {interval[0]:.3f}-" \
                                                             f"{interval[1]:.3f})"
    return (f"the defect threshold for recall {target} rests on {defects} validation defects (fewer than "
            f"{MIN_THRESHOLD_DEFECTS}): its recall there is {shown}, so the recall on new parts may be much lower. "
            "Add defect images to validation, or choose it from out-of-fold scores (--threshold-source oof)")


def json_safe(value: Any) -> Any:
    """Replace NaN/inf by None and numpy scalars/arrays by Python values, so json.dumps writes strict JSON."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
