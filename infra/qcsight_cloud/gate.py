"""The model gate: a candidate ships only if it is not worse than the production model on the same held-out set.

Pure: two evaluation reports in (the ``metrics.json`` that ``qcsight evaluate`` writes, one for the
candidate and one for the production model, both scored on the same fixed held-out set), one
decision out with a reason per check. The SageMaker pipeline's ConditionStep and the local pipeline
read the same decision (``passed``).

What "not worse" means, each check with its margin (``GateMargins``):

* ``macro_f1``: the candidate's macro-F1 of the top-1 class (``classification.macro_f1``) is not
  below production's minus ``macro_f1`` (default 0.01);
* ``defect_recall``: the share of defective parts the candidate rejects at its own operating point,
  the threshold written in its bundle that the device applies (``at_bundle_threshold.defect_recall``),
  is not below production's minus ``defect_recall`` (default 0: missing more defects is never
  traded for anything);
* ``class_recall``: no class's recall (``classification.per_class[c].recall``) is down by more than
  ``class_recall`` (default 0.05); a class production knew that the candidate lacks fails.

A first model (no production report) passes with that reason; the candidate's own report must
still be readable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qcsight_cloud.errors import CloudError


class GateError(CloudError):
    """An evaluation report the gate cannot read."""


@dataclass(frozen=True)
class GateMargins:
    """How much worse than production a candidate may be on each check (absolute, in [0, 1])."""

    macro_f1: float = 0.01
    defect_recall: float = 0.0
    class_recall: float = 0.05

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0):
                raise GateError(f"gate margin {name}={value!r}: must be a number in [0, 1]")


@dataclass(frozen=True)
class ReportSummary:
    """What the gate reads from one evaluation report."""

    model: str  # "<name> <version>" of the bundle evaluated
    images: int
    macro_f1: float
    defect_recall: float | None  # None: the held-out set has no defect
    threshold: float | None
    false_reject_rate: float | None
    class_recall: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: tuple[str, ...]
    candidate: ReportSummary
    production: ReportSummary | None

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": list(self.reasons), "candidate": asdict(self.candidate),
                "production": asdict(self.production) if self.production is not None else None}


def _number(report: Mapping[str, Any], path: str, where: str, optional: bool = False) -> float | None:
    value: Any = report
    for key in path.split("."):
        if not isinstance(value, Mapping) or key not in value:
            raise GateError(f"{where}: no {path!r} (is this the metrics.json of `qcsight evaluate` on a classifier?)")
        value = value[key]
    if value is None and optional:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise GateError(f"{where}: {path} is {value!r}, not a finite number")
    return float(value)


def summarise(report: Mapping[str, Any], where: str = "report") -> ReportSummary:
    """The gate's view of a ``qcsight evaluate`` metrics.json.

    Raises:
        GateError: a field the gate needs is missing or not a number (naming it).
    """
    classification = report.get("classification")
    if not isinstance(classification, Mapping) or not isinstance(classification.get("per_class"), Mapping):
        raise GateError(f"{where}: no 'classification.per_class' (is this the metrics.json of `qcsight evaluate` "
                        "on a classifier? anomaly reports are gated on their own terms)")
    recalls: dict[str, float] = {}
    for name, row in classification["per_class"].items():
        recall = _number({"r": row}, "r.recall", f"{where}: classification.per_class.{name}", optional=True)
        if recall is not None and isinstance(row, Mapping) and row.get("support", 1):
            recalls[str(name)] = recall
    bundle = report.get("bundle") if isinstance(report.get("bundle"), Mapping) else {}
    assert isinstance(bundle, Mapping)
    images = _number(report, "images", where)
    macro = _number(report, "classification.macro_f1", where)
    assert images is not None and macro is not None
    return ReportSummary(
        model=f"{bundle.get('name', '?')} {bundle.get('version', '?')}",
        images=int(images), macro_f1=macro,
        defect_recall=_number(report, "at_bundle_threshold.defect_recall", where, optional=True),
        threshold=_number(report, "at_bundle_threshold.threshold", where, optional=True),
        false_reject_rate=_number(report, "at_bundle_threshold.false_reject_rate", where, optional=True),
        class_recall=recalls)


def decide(candidate: ReportSummary, production: ReportSummary | None, margins: GateMargins) -> GateDecision:
    """Pass only if the candidate is not worse than production by more than the margins (see the module)."""
    if production is None:
        return GateDecision(True, (f"first model: no production model to compare with; {candidate.model} passes "
                                   f"(macro-F1 {candidate.macro_f1:.4f} on {candidate.images} images)",),
                            candidate, None)
    failed: list[str] = []
    ok: list[str] = []

    def check(good: bool, text: str) -> None:
        (ok if good else failed).append(("ok: " if good else "FAIL: ") + text)

    floor = production.macro_f1 - margins.macro_f1
    check(candidate.macro_f1 >= floor - 1e-12,
          f"macro-F1 {candidate.macro_f1:.4f} vs production {production.macro_f1:.4f} (floor {floor:.4f}, "
          f"margin {margins.macro_f1:g})")
    if production.defect_recall is None:
        ok.append("ok: production's report has no defect recall (no defect in its held-out set); not compared")
    elif candidate.defect_recall is None:
        failed.append("FAIL: the candidate's report has no defect recall at its operating point, production's has "
                      f"{production.defect_recall:.4f} (were they scored on the same held-out set?)")
    else:
        floor = production.defect_recall - margins.defect_recall
        check(candidate.defect_recall >= floor - 1e-12,
              f"defect recall at the operating point {candidate.defect_recall:.4f} vs production "
              f"{production.defect_recall:.4f} (floor {floor:.4f}, margin {margins.defect_recall:g})")
    worse = []
    for name, before in sorted(production.class_recall.items()):
        after = candidate.class_recall.get(name)
        if after is None:
            worse.append(f"FAIL: class {name!r} (production recall {before:.4f}) is missing from the candidate")
        elif before - after > margins.class_recall + 1e-12:
            worse.append(f"FAIL: recall of class {name!r} down {before - after:.4f} ({before:.4f} -> {after:.4f}), "
                         f"more than the margin {margins.class_recall:g}")
    failed.extend(worse)
    if not worse:
        ok.append(f"ok: no class's recall down by more than {margins.class_recall:g} "
                  f"({len(production.class_recall)} classes compared)")
    return GateDecision(not failed, tuple(failed + ok), candidate, production)


def read_report(path: Path) -> ReportSummary:
    """Summarise a metrics.json file (or a folder holding one).

    Raises:
        GateError: unreadable, not JSON, or missing what the gate needs.
    """
    if path.is_dir():
        path = path / "metrics.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GateError(f"{path}: cannot read the evaluation report ({exc})") from None
    if not isinstance(data, dict):
        raise GateError(f"{path}: not a JSON object")
    return summarise(data, str(path))


def gate_files(candidate: Path, production: Path | None, margins: GateMargins, out: Path | None) -> GateDecision:
    """Read both reports, decide, and write the decision JSON (atomically) when out is given."""
    decision = decide(read_report(candidate), read_report(production) if production is not None else None, margins)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".part")
        tmp.write_text(json.dumps(decision.to_dict(), indent=2) + "\n", encoding="utf-8")
        tmp.replace(out)
    return decision
