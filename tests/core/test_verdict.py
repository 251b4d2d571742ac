"""Probabilities to verdicts by the manifest's decision policy."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from qcsight_core.bundle import DecisionPolicy
from qcsight_core.verdict import DEFECT, GOOD, UNCERTAIN, Decider, softmax
from tests.helpers.models import make_tiny_bundle


def _decider(tmp_path: Path, policy: DecisionPolicy) -> Decider:
    manifest = make_tiny_bundle(tmp_path / "b").manifest  # classes good, scratch, spot
    return Decider(replace(manifest, decision=policy))


def test_threshold_on_summed_defect_probability(tmp_path: Path) -> None:
    decider = _decider(tmp_path, DecisionPolicy(defect_threshold=0.5, uncertain_threshold=0.5))
    # good 0.45 beats each defect alone, but scratch+spot = 0.55 >= 0.5: a defect, named scratch.
    verdict = decider.decide(np.array([0.45, 0.30, 0.25]))
    assert (verdict.status, verdict.label) == (DEFECT, "scratch")
    assert abs(verdict.score - 0.55) < 1e-9 and abs(verdict.confidence - 0.30) < 1e-9
    verdict = decider.decide(np.array([0.6, 0.3, 0.1]))
    assert (verdict.status, verdict.label, verdict.confidence) == (GOOD, "good", 0.6)


def test_uncertain_band_and_class_thresholds(tmp_path: Path) -> None:
    policy = DecisionPolicy(defect_threshold=0.6, uncertain_threshold=0.3, class_thresholds={"spot": 0.5})
    decider = _decider(tmp_path, policy)
    statuses = [v.status for v in decider.decide_batch(np.array([
        [0.8, 0.1, 0.1],   # score 0.2: good
        [0.6, 0.1, 0.3],   # score 0.4: in the band
        [0.1, 0.6, 0.3],   # score 0.9, scratch has no class threshold: defect
        [0.3, 0.3, 0.4],   # score 0.7, top defect spot 0.4 < 0.5: uncertain
    ]))]
    assert statuses == [GOOD, UNCERTAIN, DEFECT, UNCERTAIN]


def test_scores_by_class_and_softmax() -> None:
    probs = softmax(np.array([[0.0, 0.0], [1000.0, 0.0]]))
    np.testing.assert_allclose(probs, [[0.5, 0.5], [1.0, 0.0]])


def test_a_model_without_a_good_class_always_names_a_defect(tmp_path: Path) -> None:
    """Defect-type sets (sorting defects already found): every verdict is a defect named by its top class."""
    types = ("crack", "pit", "scale")
    bundle = make_tiny_bundle(tmp_path / "b", classes=types, defect_classes=types,
                              decision=DecisionPolicy(defect_threshold=0.0, uncertain_threshold=0.0))
    manifest = bundle.manifest
    assert manifest.defect_types_only and manifest.good_classes == ()
    verdicts = Decider(manifest).decide_batch(np.array([[0.2, 0.5, 0.3], [0.9, 0.05, 0.05], [0.34, 0.33, 0.33]]))
    assert [(v.status, v.label) for v in verdicts] == [(DEFECT, "pit"), (DEFECT, "crack"), (DEFECT, "crack")]
    assert abs(verdicts[0].confidence - 0.5) < 1e-9 and abs(verdicts[0].score - 1.0) < 1e-9
    # A class threshold still sends a doubtful sort to an operator.
    doubtful = Decider(replace(manifest, decision=DecisionPolicy(0.0, 0.0, class_thresholds={"crack": 0.5})))
    assert doubtful.decide(np.array([0.4, 0.3, 0.3])).status == UNCERTAIN
