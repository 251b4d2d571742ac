"""Anomaly metrics: ROC AUC over millions of pixels, PRO (per-region overlap), and image figures at the threshold.

PRO follows the MVTec AD evaluation (Bergmann et al. 2021, "The MVTec Anomaly Detection
Dataset", section 5.2): every connected region of a ground-truth mask (8-connectivity) is one
region; at a threshold, a region's overlap is the share of its pixels at or above it, and PRO
is the mean overlap over all regions of all images; the false-positive rate is the share of
defect-free pixels (over all images) at or above it. The PRO curve is integrated over FPR from
0 to max_fpr (0.3) and divided by max_fpr, so a perfect map scores 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from qcsight_train.errors import EvaluationError

MAX_FPR = 0.3


def _descending_steps(scores: np.ndarray, *weights: np.ndarray) -> list[np.ndarray]:
    """Cumulative sums of each weight when thresholding at each distinct score, highest first (ties together)."""
    order = np.argsort(-scores, kind="mergesort")
    ranked = scores[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), ranked.size - 1]
    return [np.cumsum(w[order], dtype=np.float64)[last] for w in weights]


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve (trapezoids, ties counted half); None unless both classes occur."""
    truth = np.asarray(labels, dtype=bool).ravel()
    values = np.asarray(scores, dtype=np.float64).ravel()
    if truth.shape != values.shape:
        raise EvaluationError(f"{truth.size} labels but {values.size} scores")
    positives, negatives = int(truth.sum()), int(truth.size - truth.sum())
    if not positives or not negatives:
        return None
    tps, fps = _descending_steps(values, truth.astype(np.float64), (~truth).astype(np.float64))
    tpr = np.r_[0.0, tps / positives]
    fpr = np.r_[0.0, fps / negatives]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def _integrate_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under y(x) from x[0] up to x_max, interpolating y at x_max."""
    inside = x <= x_max
    xs, ys = x[inside], y[inside]
    if xs[-1] < x_max and inside.sum() < x.size:
        nxt = int(np.argmax(~inside))
        y_at = ys[-1] + (y[nxt] - ys[-1]) * (x_max - xs[-1]) / (x[nxt] - xs[-1])
        xs, ys = np.r_[xs, x_max], np.r_[ys, y_at]
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))


def pro_curve(masks: Sequence[np.ndarray], heats: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct score, from (0, 0) up; masks are boolean, heats the same shapes."""
    if len(masks) != len(heats) or not masks:
        raise EvaluationError(f"{len(masks)} masks for {len(heats)} score maps")
    region_sizes: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for mask, heat in zip(masks, heats, strict=True):
        if mask.shape != heat.shape:
            raise EvaluationError(f"mask of shape {mask.shape} for a score map of shape {heat.shape}")
        count, label = cv2.connectedComponents(np.asarray(mask, dtype=np.uint8), connectivity=8)
        offset = sum(len(s) for s in region_sizes)
        sizes = np.bincount(label.ravel(), minlength=count)[1:]
        labels.append(np.where(label > 0, label + offset, 0).ravel())
        region_sizes.append(sizes)
    sizes = np.concatenate(region_sizes)
    regions = sizes.size
    region_of = np.concatenate(labels)
    normal = region_of == 0
    if not regions:
        raise EvaluationError("PRO needs at least one defect region in the masks")
    if not normal.any():
        raise EvaluationError("PRO needs defect-free pixels to measure the false-positive rate on")
    scores = np.concatenate([np.asarray(h, dtype=np.float64).ravel() for h in heats])
    fpr_step = normal / normal.sum()
    pro_step = np.zeros(region_of.size)
    inside = ~normal
    pro_step[inside] = 1.0 / (regions * sizes[region_of[inside] - 1])
    fpr, pro = _descending_steps(scores, fpr_step, pro_step)
    return np.r_[0.0, np.minimum(fpr, 1.0)], np.r_[0.0, np.minimum(pro, 1.0)]


def pro_auc(masks: Sequence[np.ndarray], heats: Sequence[np.ndarray], max_fpr: float = MAX_FPR) -> float:
    """The normalised area under the PRO curve up to max_fpr (see the module docstring)."""
    fpr, pro = pro_curve(masks, heats)
    return _integrate_to(fpr, pro, max_fpr) / max_fpr


def image_figures(is_defect: np.ndarray, scores: np.ndarray, threshold: float = 1.0) -> dict[str, Any]:
    """Image-level figures when score >= threshold flags an image: recall, precision, F1, false-reject rate."""
    truth = np.asarray(is_defect, dtype=bool)
    flagged = np.asarray(scores, dtype=np.float64) >= threshold
    tp = int(np.sum(flagged & truth))
    fp = int(np.sum(flagged & ~truth))
    fn = int(np.sum(~flagged & truth))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if truth.any() else None
    f1 = (2 * tp / (2 * tp + fp + fn)) if (2 * tp + fp + fn) and truth.any() else None
    good = int((~truth).sum())
    return {"threshold": threshold, "defect_recall": recall, "precision": precision, "f1": f1,
            "false_reject_rate": fp / good if good else None, "flagged": int(flagged.sum()),
            "defect_images": int(truth.sum()), "good_images": good}
