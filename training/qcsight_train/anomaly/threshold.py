"""The anomaly threshold: at a false-reject rate on held-out good images, or at a defect recall; then 1.0 on the scale.

The raw threshold becomes the runtime's score_scale (qcsight_core.anomaly), so the device
reads normalised scores with the threshold at exactly 1.0; the review band below it is the
classifiers' rule (qcsight_train.metrics.review_band) on the same scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from qcsight_core.errors import ConfigError
from qcsight_train.errors import EvaluationError
from qcsight_train.metrics import rates_at_threshold, review_band, threshold_for_recall

RULES = ("false_reject", "defect_recall")
_COUNT_EPS = 1e-9
# 1e-4 relative: far above float32's rounding (6e-8), far below any difference that matters.
MARGIN = 1e-4


def binomial_upper_bound(events: int, trials: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on a rate seen `events` times in `trials`.

    The p at which seeing at most `events` has probability 1 - confidence: with 0 of 140 good
    images over the threshold, the false-reject rate is below 2.1 % with 95 % confidence.
    """
    if trials < 1 or not 0 <= events <= trials:
        raise EvaluationError(f"binomial bound of {events} events in {trials} trials")
    if events == trials:
        return 1.0
    alpha = 1.0 - confidence

    def cdf(p: float) -> float:
        if p <= 0.0:
            return 1.0
        if p >= 1.0:
            return 0.0
        logs = [math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1)
                + k * math.log(p) + (trials - k) * math.log1p(-p) for k in range(events + 1)]
        top = max(logs)
        return math.exp(top) * sum(math.exp(v - top) for v in logs)

    low, high = events / trials, 1.0
    for _ in range(60):
        middle = (low + high) / 2.0
        if cdf(middle) > alpha:
            low = middle
        else:
            high = middle
    return high


def threshold_at_false_reject(good_scores: np.ndarray, rate: float) -> tuple[float, dict[str, Any]]:
    """The lowest threshold that keeps at most `rate` of the good scores at or above it, and its record.

    With n good scores, floor(rate * n) of them may be over: the threshold sits a relative
    MARGIN above the next one down (an image is flagged when its score >= the threshold), and
    never past half way to the one above it. Just above it (the next float) is not enough: the
    device divides in float32, and that image's normalised score would round up to 1.0.
    """
    if not 0.0 <= rate < 1.0:
        raise ConfigError("false_reject_rate", rate, "a fraction from 0 to below 1")
    scores = np.sort(np.asarray(good_scores, dtype=np.float64))[::-1]
    if scores.size == 0:
        raise EvaluationError("no good images: a threshold at a false-reject rate needs held-out good images")
    allowed = math.floor(rate * scores.size + _COUNT_EPS)
    below = float(scores[allowed])
    threshold = below * (1.0 + MARGIN) if below > 0 else float(np.nextafter(below, np.inf))
    if allowed > 0 and scores[allowed - 1] > below:
        threshold = min(threshold, (below + float(scores[allowed - 1])) / 2.0)
    over = int(np.sum(scores >= threshold))
    return threshold, {
        "rule": f"lowest score keeping at most {rate:g} of the held-out good images at or above it",
        "false_reject_rate_target": rate,
        "good_images": int(scores.size),
        "good_over_threshold": over,
        "false_reject_rate": over / scores.size,
        "false_reject_rate_upper_95": binomial_upper_bound(over, int(scores.size)),
        "good_score_quantiles": {q: float(np.quantile(scores, float(q))) for q in ("0.5", "0.9", "0.99")},
        "good_score_max": float(scores[0]),
    }


def _within_budget(scores: np.ndarray, is_defect: np.ndarray, recall_raw: float, target_recall: float,
                   budget: float, record: dict[str, Any]) -> float:
    """Raise a recall threshold past the false-reject budget to the budget's threshold; record why."""
    good = scores[~is_defect]
    recall_rate = float(np.mean(good >= recall_raw))
    raw, frr_record = threshold_at_false_reject(good, budget)
    caught, defects = int(np.sum(scores[is_defect] >= raw)), int(is_defect.sum())
    warning = (f"the anomaly threshold for defect recall {target_recall} ({recall_raw:.4g}) would flag "
               f"{recall_rate:.0%} of the {good.size} validation good images, over the budget of {budget:.0%} "
               f"(--max-false-reject): it is {raw:.4g} instead, which catches {caught} of {defects} validation "
               f"defects and flags {frr_record['false_reject_rate']:.0%} of good ones. --max-false-reject 1 "
               "keeps the recall target whatever it flags")
    record.update(frr_record, rule=f"lowest score flagging at most {budget:g} of the validation good images: "
                                   f"the one for defect recall {target_recall} flagged {recall_rate:.3f}",
                  max_false_reject=budget, false_reject_warning=warning,
                  recall_target_threshold={"raw_threshold": recall_raw, "false_reject_rate": recall_rate})
    return raw


@dataclass(frozen=True)
class AnomalyThreshold:
    """A chosen threshold on the raw scores and the band below it.

    Attributes:
        raw: the raw score at the threshold: the runtime's score_scale (1.0 after normalisation).
        uncertain: the normalised uncertain threshold (<= 1.0; 1.0 means no band).
        record: how it was chosen, with the numbers it came from (written into the manifest).
    """

    raw: float
    uncertain: float
    record: dict[str, Any]


def choose_threshold(scores: np.ndarray, is_defect: np.ndarray, *, rule: str, false_reject_rate: float,
                     target_recall: float, review_fraction: float, uncertain_floor: float,
                     max_false_reject: float = 1.0) -> AnomalyThreshold:
    """The threshold by rule over validation raw scores (falling back to false_reject without defects).

    Under defect_recall, a threshold that rejects more than max_false_reject of the validation good
    images rises to the lowest one within that budget (the classifiers' --max-false-reject rule); the
    record then keeps the recall target's threshold and a warning naming what the budget gave up.

    Raises:
        EvaluationError: no good image to measure the false-reject rate on.
    """
    if rule not in RULES:
        raise ConfigError("threshold_rule", rule, f"one of {', '.join(RULES)}")
    scores = np.asarray(scores, dtype=np.float64)
    is_defect = np.asarray(is_defect, dtype=bool)
    good = scores[~is_defect]
    record: dict[str, Any] = {"source": "validation raw image scores", "rule_requested": rule}
    if rule == "defect_recall" and is_defect.any():
        raw, frr = threshold_for_recall(is_defect, scores, target_recall)
        over = int(np.sum(good >= raw))
        record.update(rule="lowest score keeping defect recall >= target on validation",
                      target_defect_recall=target_recall, false_reject_rate=None if np.isnan(frr) else frr,
                      good_images=int(good.size), good_over_threshold=over,
                      false_reject_rate_upper_95=binomial_upper_bound(over, int(good.size)) if good.size else None)
        if good.size and max_false_reject < 1.0 and over / good.size > max_false_reject:
            raw = _within_budget(scores, is_defect, raw, target_recall, max_false_reject, record)
    else:
        if rule == "defect_recall":
            record["fallback"] = "validation holds no defect image: threshold at the false-reject rate instead"
        raw, frr_record = threshold_at_false_reject(good, false_reject_rate)
        record.update(frr_record)
    if raw <= 0.0:
        raise EvaluationError(f"raw threshold {raw!r}: validation scores are not positive distances")
    if is_defect.any():
        record["at_threshold"] = rates_at_threshold(is_defect, scores, raw)
        record["defect_images"] = int(is_defect.sum())
    normalised = scores / raw
    band = review_band(is_defect, normalised, 1.0, review_fraction, uncertain_floor)
    record.update(raw_threshold=raw, normalised_threshold=1.0, uncertain_threshold=band,
                  review_fraction=review_fraction, uncertain_floor=uncertain_floor)
    return AnomalyThreshold(raw, band, record)
