"""Class probabilities to a verdict (good / defect / uncertain) by the bundle's decision policy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from qcsight_core import anomaly
from qcsight_core.bundle import DecisionPolicy, Manifest

if TYPE_CHECKING:
    from qcsight_core.runner import RunOutputs  # the runner imports softmax from here

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
        box: anomaly bundles, when the score map was localised: the hottest region.
        anomaly_map: anomaly bundles: the normalised patch score map (for overlays).
        score_names: what probabilities holds when it is not one value per class (anomaly: "anomaly").

    An anomaly bundle's verdict has score = confidence = the normalised anomaly score (1.0 is
    the threshold), so the metrics' confidence quantiles and the drift reference (training
    stores the score's histogram on good parts as reference "confidence") describe that score.
    """

    status: str
    label: str
    score: float
    confidence: float
    probabilities: tuple[float, ...]
    box: anomaly.Box | None = None
    anomaly_map: np.ndarray | None = field(default=None, compare=False, repr=False)
    score_names: tuple[str, ...] = ()

    def scores(self, classes: Sequence[str]) -> dict[str, float]:
        names = self.score_names or classes
        return {name: round(p, 6) for name, p in zip(names, self.probabilities, strict=True)}


class Decider:
    """Applies one manifest's decision policy; index lookups are done once."""

    def __init__(self, manifest: Manifest) -> None:
        self.classes = manifest.classes
        self.policy: DecisionPolicy = manifest.decision
        self.anomaly = manifest.task == "anomaly"
        self.spec = manifest.input
        self._defect_idx = np.array([manifest.classes.index(c) for c in manifest.defect_classes], dtype=np.int64)
        self._good_idx = np.array([manifest.classes.index(c) for c in manifest.good_classes], dtype=np.int64)

    def defect_scores(self, probs: np.ndarray) -> np.ndarray:
        """The defect score of each row of an NxC probability matrix (anomaly: of the Nx1 scores)."""
        if self.anomaly:
            return np.asarray(probs, dtype=np.float64)[:, 0]
        scores: np.ndarray = np.asarray(probs, dtype=np.float64)[:, self._defect_idx].sum(axis=1)
        return scores

    def decide_outputs(self, outputs: RunOutputs,
                       image_shapes: Sequence[Sequence[int]] | None = None) -> list[Verdict]:
        """Verdicts for a runner's outputs; an anomaly bundle's carry their map, and their box when
        image_shapes (the shape of each judged image, before preprocessing) are given."""
        verdicts = self.decide_batch(outputs.scores)
        if outputs.maps is None:
            return verdicts
        shapes = list(image_shapes) if image_shapes is not None else [None] * len(verdicts)
        return [replace(v, anomaly_map=m, box=None if shape is None else anomaly.image_box(m, self.spec, shape))
                for v, m, shape in zip(verdicts, outputs.maps, shapes, strict=True)]

    def decide(self, probs: np.ndarray) -> Verdict:
        return self.decide_batch(np.asarray(probs)[None])[0]

    def decide_batch(self, probs: np.ndarray) -> list[Verdict]:
        if self.anomaly:
            return self._decide_anomaly(probs)
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


    def _decide_anomaly(self, scores: np.ndarray) -> list[Verdict]:
        """Normalised anomaly scores against the policy's thresholds (1.0 and the review band below it)."""
        good, flagged = self.classes[self._good_idx[0]], self.classes[self._defect_idx[0]]
        has_band = self.policy.uncertain_threshold < self.policy.defect_threshold
        verdicts = []
        for score in self.defect_scores(scores):
            if score >= self.policy.defect_threshold:
                status, label = DEFECT, flagged
            elif has_band and score >= self.policy.uncertain_threshold:
                status, label = UNCERTAIN, flagged
            else:
                status, label = GOOD, good
            value = float(score)
            verdicts.append(Verdict(status, label, value, value, (value,), score_names=(anomaly.SCORE_NAME,)))
        return verdicts


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    probs: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return probs
