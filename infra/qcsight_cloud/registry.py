"""The local model registry: a folder of model versions with approval state and an append-only history.

The local stand-in for a SageMaker model package group. Layout::

    <root>/history.jsonl          one JSON event per line, appended, never rewritten
    <root>/versions/<N>/bundle/   the model bundle as trained
    <root>/versions/<N>/evaluation.json             the candidate's metrics.json on the held-out set
    <root>/versions/<N>/production_evaluation.json  production's on the same set (absent for a first model)
    <root>/versions/<N>/gate.json                   the gate's decision

Versions are 1, 2, ... (the component version is 1.N.0: ``component_version``). A version enters
``PendingManualApproval`` and moves once to ``Approved`` or ``Rejected`` (SageMaker's ModelApprovalStatus
values); deployment events (``canary``, ``promoted``, ``rolled_back``) follow an approval. The state of everything is
derived from the history, so a crash leaves at worst a version folder without its ``registered``
event (never listed) and a restart sees exactly what was recorded.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcsight_cloud import timestamps
from qcsight_cloud.errors import CloudError

PENDING, APPROVED, REJECTED = "PendingManualApproval", "Approved", "Rejected"
APPROVAL_STATES = (PENDING, APPROVED, REJECTED)
# Deployment events after approval, in the order a rollout records them.
CANARY, PROMOTED, ROLLED_BACK = "canary", "promoted", "rolled_back"
HISTORY = "history.jsonl"
# The model component's major version is the bundle contract the agent reads: com.qcsight.EdgeAgent depends on
# com.qcsight.Model ">=1.0.0 <2.0.0" (greengrass/recipes), so registry version N ships as component 1.N.0.
MODEL_CONTRACT_MAJOR = 1


def component_version(version: str | int) -> str:
    """The com.qcsight.Model component version of registry (or model package) version N: 1.N.0."""
    return f"{MODEL_CONTRACT_MAJOR}.{int(version)}.0"


class RegistryError(CloudError):
    """The registry cannot be read or the change asked for is not allowed."""


@dataclass(frozen=True)
class ModelVersion:
    """One registered version and what the history says about it."""

    version: str
    path: Path
    status: str  # an APPROVAL_STATES value
    registered: str
    scope: str  # the line it was trained for
    run_id: str | None
    gate_passed: bool
    deployment: str | None = None  # the latest deployment event: canary, promoted, rolled_back
    events: tuple[Mapping[str, Any], ...] = ()
    metrics: Mapping[str, Any] = field(default_factory=dict)

    @property
    def bundle(self) -> Path:
        return self.path / "bundle"

    @property
    def evaluation(self) -> Path:
        return self.path / "evaluation.json"

    @property
    def component_version(self) -> str:
        return component_version(self.version)


class Registry:
    """A folder of model versions; safe for several processes (an exclusive lock around each change)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "versions").mkdir(parents=True, exist_ok=True)
        (root / HISTORY).touch(exist_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def history(self) -> list[dict[str, Any]]:
        """Every event, oldest first (a torn last line from a crash mid-append is ignored)."""
        events = []
        for line in (self.root / HISTORY).read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def _append(self, event: dict[str, Any]) -> dict[str, Any]:
        event = {"time": timestamps.iso(timestamps.now()), **event}
        with open(self.root / HISTORY, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return event

    def versions(self) -> list[ModelVersion]:
        """Every registered version, oldest first."""
        by_version: dict[str, list[dict[str, Any]]] = {}
        for event in self.history():
            by_version.setdefault(str(event.get("version")), []).append(event)
        found = []
        for version, events in by_version.items():
            first = events[0]
            if first.get("event") != "registered":
                continue
            status, deployment = PENDING, None
            for event in events[1:]:
                if event.get("event") in (APPROVED, REJECTED):
                    status = str(event["event"])
                elif event.get("event") in (CANARY, PROMOTED, ROLLED_BACK):
                    deployment = str(event["event"])
            found.append(ModelVersion(version, self.root / "versions" / version, status, str(first["time"]),
                                      str(first.get("scope", "")), first.get("run_id"), bool(first.get("gate_passed")),
                                      deployment, tuple(events), dict(first.get("metrics") or {})))
        return sorted(found, key=lambda v: int(v.version))

    def get(self, version: str) -> ModelVersion:
        """Raises RegistryError naming the versions there are."""
        for found in self.versions():
            if found.version == str(version):
                return found
        known = [v.version for v in self.versions()]
        raise RegistryError(f"no model version {version!r} in {self.root}; versions: {known or 'none'}")

    def production(self, scope: str | None = None) -> ModelVersion | None:
        """The version most recently promoted to the fleet (of a line, when scope is given)."""
        promoted = [(e["time"], e["version"]) for e in self.history() if e.get("event") == PROMOTED
                    and (scope is None or e.get("scope") == scope)]
        return self.get(max(promoted)[1]) if promoted else None

    def register(self, bundle: Path, evaluation: Path, gate: Mapping[str, Any], *, scope: str,
                 run_id: str | None = None, production_evaluation: Path | None = None,
                 version: str | None = None) -> ModelVersion:
        """Copy a bundle and its reports into a new version (the next number, or ``version`` if still free),
        PendingManualApproval."""
        with self._locked():
            numbers = [int(p.name) for p in (self.root / "versions").iterdir() if p.name.isdigit()]
            if version is None:
                version = str(max(numbers, default=0) + 1)
            if not version.isdigit() or int(version) in numbers or int(version) < 1:
                raise RegistryError(f"model version {version!r}: must be a new positive integer (taken: "
                                    f"{sorted(numbers)})")
            version = str(int(version))
            final = self.root / "versions" / version
            staging = self.root / "versions" / f".{version}.part"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            shutil.copytree(bundle, staging / "bundle")
            shutil.copyfile(evaluation, staging / "evaluation.json")
            if production_evaluation is not None:
                shutil.copyfile(production_evaluation, staging / "production_evaluation.json")
            (staging / "gate.json").write_text(json.dumps(dict(gate), indent=2) + "\n", encoding="utf-8")
            staging.rename(final)
            candidate = gate.get("candidate") or {}
            metrics = {k: candidate.get(k) for k in ("macro_f1", "defect_recall", "false_reject_rate", "images")}
            self._append({"event": "registered", "version": version, "scope": scope, "run_id": run_id,
                          "gate_passed": bool(gate.get("passed")), "status": PENDING, "metrics": metrics})
        return self.get(version)

    def decide(self, version: str, status: str, by: str, reason: str = "") -> ModelVersion:
        """Approve or reject a pending version (once; a rejected version never ships)."""
        if status not in (APPROVED, REJECTED):
            raise RegistryError(f"status {status!r}: must be {APPROVED} or {REJECTED}")
        with self._locked():
            current = self.get(version)
            if current.status != PENDING:
                raise RegistryError(f"model version {version} is already {current.status}; a decision is final")
            if status == APPROVED and not current.gate_passed:
                raise RegistryError(f"model version {version} failed the gate ({current.path / 'gate.json'}); "
                                    "it cannot be approved")
            self._append({"event": status, "version": str(version), "scope": current.scope, "by": by,
                          "reason": reason})
        return self.get(version)

    def record(self, version: str, event: str, **detail: Any) -> None:
        """Record a deployment event (canary, promoted, rolled_back) of an approved version."""
        if event not in (CANARY, PROMOTED, ROLLED_BACK):
            raise RegistryError(f"event {event!r}: must be one of {CANARY}, {PROMOTED}, {ROLLED_BACK}")
        with self._locked():
            current = self.get(version)
            if current.status != APPROVED:
                raise RegistryError(f"model version {version} is {current.status}, not {APPROVED}: it is not deployed")
            self._append({"event": event, "version": str(version), "scope": current.scope, **detail})

    def adopt(self, bundle: Path, evaluation: Path, *, scope: str, by: str) -> ModelVersion:
        """Register the model a line already runs as its production version (approved and promoted at once),
        so the next candidate has something to be compared with and rolled back to."""
        from qcsight_cloud.gate import read_report

        summary = read_report(evaluation)
        gate = {"passed": True, "reasons": [f"adopted by {by}: the model the fleet already runs"],
                "candidate": {"macro_f1": summary.macro_f1, "defect_recall": summary.defect_recall,
                              "false_reject_rate": summary.false_reject_rate, "images": summary.images},
                "production": None}
        from qcsight_core.bundle import read_manifest
        from qcsight_core.errors import QcsightError

        try:
            named = read_manifest(bundle).version
        except (OSError, QcsightError):
            named = ""
        model = self.register(bundle, evaluation, gate, scope=scope, version=named if named.isdigit() else None)
        self.decide(model.version, APPROVED, by, "adopted as production")
        self.record(model.version, PROMOTED, reason="adopted: already deployed to the fleet")
        return self.get(model.version)
