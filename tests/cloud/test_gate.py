"""The gate's table: a candidate passes only when it is not worse than production; the CLI writes what the
pipeline reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qcsight_cloud.cli import main
from qcsight_cloud.gate import GateError, GateMargins, decide, read_report, summarise


def report(macro_f1: float = 0.90, defect_recall: float | None = 0.95, recalls: dict[str, float] | None = None,
           version: str = "1") -> dict[str, Any]:
    """A metrics.json as `qcsight evaluate` writes it (the fields the gate reads, and some it does not)."""
    recalls = recalls if recalls is not None else {"good": 0.9, "scratch": 0.9, "spot": 0.9}
    return {
        "bundle": {"name": "qcsight-model", "version": version, "precision": "fp32"},
        "images": 120,
        "classification": {"classes": list(recalls), "accuracy": 0.9, "macro_f1": macro_f1,
                           "per_class": {name: {"precision": 0.9, "recall": r, "f1": 0.9, "support": 20}
                                         for name, r in recalls.items()}},
        "at_bundle_threshold": {"threshold": 0.44, "defect_recall": defect_recall, "false_reject_rate": 0.1},
        "operating_point": {"target_defect_recall": 0.99, "threshold": 0.3, "defect_recall": 1.0},
    }


CASES = [
    # (name, candidate, production, passed, a reason that must be there)
    ("equal", report(), report(), True, "ok: macro-F1 0.9000 vs production 0.9000"),
    ("better", report(0.95, 0.99, {"good": 1, "scratch": 1, "spot": 1}), report(), True, "ok: no class's recall"),
    ("macro-F1 within the margin", report(0.891), report(0.90), True, "ok: macro-F1 0.8910"),
    ("macro-F1 below the margin", report(0.889), report(0.90), False, "FAIL: macro-F1 0.8890 vs production 0.9000"),
    ("defect recall down at all", report(defect_recall=0.94), report(), False,
     "FAIL: defect recall at the operating point 0.9400 vs production 0.9500"),
    ("one class down past the margin", report(recalls={"good": 0.9, "scratch": 0.84, "spot": 0.95}), report(),
     False, "FAIL: recall of class 'scratch' down 0.0600"),
    ("one class down within the margin", report(recalls={"good": 0.9, "scratch": 0.86, "spot": 0.9}), report(),
     True, "ok: no class's recall down by more than 0.05"),
    ("a class lost", report(recalls={"good": 0.9, "scratch": 0.9}), report(), False,
     "FAIL: class 'spot' (production recall 0.9000) is missing"),
    ("candidate has no defect recall", report(defect_recall=None), report(), False,
     "FAIL: the candidate's report has no defect recall"),
    ("production has no defect recall", report(), report(defect_recall=None), True,
     "ok: production's report has no defect recall"),
]


@pytest.mark.parametrize("name, candidate, production, passed, reason", CASES, ids=[c[0] for c in CASES])
def test_gate_table(name: str, candidate: dict[str, Any], production: dict[str, Any], passed: bool,
                    reason: str) -> None:
    decision = decide(summarise(candidate), summarise(production), GateMargins())
    assert decision.passed is passed, decision.reasons
    assert any(r.startswith(reason) for r in decision.reasons), decision.reasons
    # every failure is listed before the checks that passed
    fails = [r.startswith("FAIL") for r in decision.reasons]
    assert fails == sorted(fails, reverse=True)


def test_a_first_model_passes_with_the_reason() -> None:
    decision = decide(summarise(report(0.2)), None, GateMargins())
    assert decision.passed and decision.reasons[0].startswith("first model: no production model")


def test_margins_and_reports_are_checked() -> None:
    with pytest.raises(GateError, match=r"macro_f1=1.5"):
        GateMargins(macro_f1=1.5)
    broken = report()
    del broken["classification"]["macro_f1"]
    with pytest.raises(GateError, match=r"no 'classification.macro_f1'"):
        summarise(broken, "cand.json")
    broken = report()
    broken["classification"]["per_class"]["good"]["recall"] = "high"
    with pytest.raises(GateError, match=r"per_class.good: r.recall is 'high'"):
        summarise(broken)
    with pytest.raises(GateError, match=r"no 'classification.per_class'.*anomaly"):
        summarise({"images": 3, "anomaly": {}})


def test_cli_writes_the_decision_and_exits_0_either_way(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cand, prod = tmp_path / "cand" / "metrics.json", tmp_path / "prod.json"
    cand.parent.mkdir()
    cand.write_text(json.dumps(report(0.80)))
    prod.write_text(json.dumps(report(0.90)))
    out = tmp_path / "decision.json"
    assert main(["gate", "--candidate", str(cand.parent), "--production", str(prod), "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["passed"] is False
    assert written["candidate"]["macro_f1"] == 0.80 and written["production"]["macro_f1"] == 0.90
    assert "FAILED" in capsys.readouterr().out
    assert main(["gate", "--candidate", str(cand), "--production", str(prod), "--macro-f1-margin", "0.2",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["passed"] is True
    assert main(["gate", "--candidate", str(cand), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["production"] is None
    assert read_report(cand).model == "qcsight-model 1"
    # an unreadable report is an error (exit 1 from `qcsight`), not a silent pass
    with pytest.raises(GateError, match=r"missing.json: cannot read the evaluation report"):
        main(["gate", "--candidate", str(tmp_path / "missing.json"), "--out", str(out)])
