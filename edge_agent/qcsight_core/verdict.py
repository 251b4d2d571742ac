"""Class probabilities to a verdict (good / defect / uncertain) by the bundle's decision policy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qcsight_core.bundle import DecisionPolicy, Manifest

GOOD, DEFECT, UNCERTAIN = "good", "defect", "uncertain"
STATUSES = (GOOD, DEFECT, UNCERTAIN)


@dataclass(frozen=True)
class Verdict:
    """What the model decided about one image.

    Attributes:
        status: good, defect or uncertain.
        label: the class named: the top defect class for defect/uncertain, the top good class otherwise.
            A model without a good class (every class a defect type) always names its top class as a
            defect (uncertain only below that class's class_threshold).
        score: the defect score, the summed probability of all defect classes (1 without a good class).
        confidence: the probability of label.
        probabilities: every class's probability, in manifest order.
    """

    status: str
    label: str
    score: float
    confidence: float
    probabilities: tuple[float, ...]

    def scores(self, classes: Sequence[str]) -> dict[str, float]:
        return {name: round(p, 6) for name, p in zip(classes, self.probabilities, strict=True)}


class Decider:
    """Applies one manifest's decision policy; index lookups are done once."""

    def __init__(self, manifest: Manifest) -> None:
        self.classes = manifest.classes
        self.policy: DecisionPolicy = manifest.decision
        self._defect_idx = np.array([manifest.classes.index(c) for c in manifest.defect_classes], dtype=np.int64)
        self._good_idx = np.array([manifest.classes.index(c) for c in manifest.good_classes], dtype=np.int64)

    def defect_scores(self, probs: np.ndarray) -> np.ndarray:
        """The defect score of each row of an NxC probability matrix."""
        scores: np.ndarray = np.asarray(probs, dtype=np.float64)[:, self._defect_idx].sum(axis=1)
        return scores

    def decide(self, probs: np.ndarray) -> Verdict:
        return self.decide_batch(np.asarray(probs)[None])[0]

    def decide_batch(self, probs: np.ndarray) -> list[Verdict]:
        probs = np.asarray(probs, dtype=np.float64)
        scores = self.defect_scores(probs)
        top_defect = self._defect_idx[probs[:, self._defect_idx].argmax(axis=1)]
        # Without a good class (a defect-type model) every image is a defect; -1 marks "no good class".
        top_good = (self._good_idx[probs[:, self._good_idx].argmax(axis=1)] if self._good_idx.size
                    else np.full(len(probs), -1))
        has_band = self.policy.uncertain_threshold < self.policy.defect_threshold
        verdicts = []
        for row, score, d_idx, g_idx in zip(probs, scores, top_defect, top_good, strict=True):
            d_name = self.classes[int(d_idx)]
            if g_idx < 0 or score >= self.policy.defect_threshold:
                named = row[d_idx] >= self.policy.class_thresholds.get(d_name, 0.0)
                status, idx = (DEFECT if named else UNCERTAIN), int(d_idx)
            elif has_band and score >= self.policy.uncertain_threshold:
                status, idx = UNCERTAIN, int(d_idx)
            else:
                status, idx = GOOD, int(g_idx)
            verdicts.append(
                Verdict(status, self.classes[idx], float(score), float(row[idx]), tuple(float(p) for p in row))
            )
        return verdicts


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    probs: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return probs
