"""Approval → canary → fleet: ship an approved model to a line's canary devices, soak, then promote or roll back.

``soak_decision`` is pure and table-tested: the canary's metrics windows under the new model against
the rest of the line's windows over the same time → ``wait``, ``promote`` or ``rollback`` with the
reasons. ``Rollout`` is its I/O: it publishes the model component through a ``Deployer``, deploys it to
the canary devices, records each step in the registry's history (so a restarted process resumes a
soak where it was), reads windows from the store, and records the final decision in the store
(scope ``rollout:<line>``, action ``promote`` or ``rollback``; ``qcsight cloud decisions`` shows it).

Deployers: ``NucleusDeployer`` here (a ``qcsight gg run-local`` nucleus per device, driven through
the ``qcsight gg`` command line, as an operator would), and in AWS ``lambda_deploy`` (Greengrass
CreateComponentVersion and CreateDeployment on the canary thing group, then the fleet's).
"""

from __future__ import annotations

import json
import logging
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

from qcsight_cloud import timestamps
from qcsight_cloud.errors import CloudError
from qcsight_cloud.rates import compare_rates
from qcsight_cloud.records import Check, Decision, Run, Window
from qcsight_cloud.registry import APPROVED, CANARY, PROMOTED, ROLLED_BACK, ModelVersion, Registry
from qcsight_cloud.store import Store

log = logging.getLogger(__name__)

WAIT, PROMOTE, ROLLBACK = "wait", "promote", "rollback"
ROLLOUT_SCOPE = "rollout:"


class DeployError(CloudError):
    """A model component could not be built, published or deployed."""


# ---------------------------------------------------------------- the pure decision


@dataclass(frozen=True)
class SoakSettings:
    """When a canary has soaked long enough, and what counts as a regression.

    Attributes:
        soak_s: the canary runs the new model at least this long before promotion.
        min_windows: ... and reports at least this many metrics windows under it,
        min_frames: ... holding at least this many frames.
        max_wait_s: no such evidence this long after the canary deployment: roll back (a silent canary
            proves nothing).
        rate_alpha: the canary's defect rate above the fleet's at this significance is a regression
            (one-sided; rates.compare_rates' score or Fisher test). 0 turns the check off: a change meant to
            move the defect rate (a model for a new defect) is judged on errors and latency alone; a tiny
            alpha is no substitute, since a p-value of a lopsided count underflows to 0.
        max_latency_ratio: the canary's worst p95 latency above this multiple of the fleet's is one.
        max_errors: frame errors the canary may report during the soak.
    """

    soak_s: float = 600.0
    min_windows: int = 3
    min_frames: int = 200
    max_wait_s: float = 3600.0
    rate_alpha: float = 0.01
    max_latency_ratio: float = 1.5
    max_errors: int = 0

    def __post_init__(self) -> None:
        for name in ("soak_s", "max_wait_s", "max_latency_ratio"):
            if getattr(self, name) <= 0:
                raise CloudError(f"soak setting {name}={getattr(self, name)!r}: must be above 0")
        if not 0 <= self.rate_alpha < 1:
            raise CloudError(f"soak setting rate_alpha={self.rate_alpha!r}: must be in [0, 1) (0: no rate check)")


@dataclass(frozen=True)
class GroupStats:
    """Metrics windows of a group of devices over the soak, summed."""

    windows: int = 0
    frames: int = 0
    defect: int = 0
    errors: int = 0
    latency_p95_ms: float | None = None  # the worst window's

    @classmethod
    def of(cls, windows: Sequence[Window]) -> GroupStats:
        return cls(len(windows), sum(w.frames for w in windows), sum(w.defect for w in windows),
                   sum(w.errors for w in windows), max((w.latency_p95 for w in windows), default=None))

    @property
    def defect_rate(self) -> float | None:
        return self.defect / self.frames if self.frames else None


@dataclass(frozen=True)
class SoakDecision:
    action: str  # WAIT, PROMOTE or ROLLBACK
    reasons: tuple[str, ...]
    checks: tuple[Check, ...] = field(default_factory=tuple)


def soak_decision(settings: SoakSettings, canary: GroupStats, fleet: GroupStats, elapsed_s: float) -> SoakDecision:
    """Judge a canary: roll back on a regression as soon as it shows, promote once it soaked clean, else wait.

    ``canary``: the canary devices' windows under the new model since its deployment; ``fleet``: the
    line's other devices' windows over the same time (the previous model).
    """
    checks: list[Check] = []
    bad: list[str] = []
    if canary.errors > settings.max_errors:
        bad.append(f"canary reported {canary.errors} frame errors (at most {settings.max_errors} allowed)")
    checks.append(Check("errors", canary.errors > settings.max_errors, f"{canary.errors} frame errors",
                        {"errors": canary.errors}))
    if canary.frames and fleet.frames:
        test = compare_rates(fleet.defect, fleet.frames, canary.defect, canary.frames)
        higher = (canary.defect / canary.frames) > (fleet.defect / fleet.frames)
        regressed = settings.rate_alpha > 0 and higher and test.p_value / 2 < settings.rate_alpha
        text = (f"defect rate {canary.defect}/{canary.frames} on the canary vs {fleet.defect}/{fleet.frames} on "
                f"the fleet: one-sided p = {test.p_value / 2 if higher else 1 - test.p_value / 2:.3g} "
                f"({test.method} test), "
                + (f"alpha {settings.rate_alpha:g}" if settings.rate_alpha else "not checked"))
        if regressed:
            bad.append("canary defect rate significantly above the fleet's: " + text)
        checks.append(Check("defect_rate", regressed, text, {"canary_defect": canary.defect,
                                                             "canary_frames": canary.frames,
                                                             "fleet_defect": fleet.defect,
                                                             "fleet_frames": fleet.frames}))
    if canary.latency_p95_ms is not None and fleet.latency_p95_ms:
        ratio = canary.latency_p95_ms / fleet.latency_p95_ms
        slow = ratio > settings.max_latency_ratio
        text = (f"p95 latency {canary.latency_p95_ms:.1f} ms on the canary vs {fleet.latency_p95_ms:.1f} ms on the "
                f"fleet (x{ratio:.2f}, at most x{settings.max_latency_ratio:g})")
        if slow:
            bad.append("canary slower than the fleet: " + text)
        checks.append(Check("latency", slow, text, {"ratio": round(ratio, 4)}))
    if bad:
        return SoakDecision(ROLLBACK, tuple(bad), tuple(checks))
    enough = canary.windows >= settings.min_windows and canary.frames >= settings.min_frames
    evidence = (f"{canary.windows} canary windows ({canary.frames} frames) under the new model over "
                f"{elapsed_s:.0f} s; promotion needs {settings.min_windows} windows, {settings.min_frames} frames "
                f"and {settings.soak_s:g} s")
    checks.append(Check("soak", enough and elapsed_s >= settings.soak_s, evidence,
                        {"windows": canary.windows, "frames": canary.frames, "elapsed_s": round(elapsed_s, 1)}))
    if not enough and elapsed_s >= settings.max_wait_s:
        return SoakDecision(ROLLBACK, (f"no evidence from the canary after {elapsed_s:.0f} s (limit "
                                       f"{settings.max_wait_s:g} s): " + evidence,), tuple(checks))
    if not enough or elapsed_s < settings.soak_s:
        return SoakDecision(WAIT, (evidence,), tuple(checks))
    if not fleet.frames:
        return SoakDecision(PROMOTE, (evidence, "no fleet windows over the soak to compare with; the canary's own "
                                                "checks passed"), tuple(checks))
    return SoakDecision(PROMOTE, (evidence, *(c.summary for c in checks if c.name != "soak")), tuple(checks))


# ---------------------------------------------------------------- deployment


class Deployer(Protocol):
    """What a rollout needs from the device side."""

    def publish(self, model: ModelVersion) -> str:
        """Build and publish the model component for a registered version; returns its component version."""
        ...

    def deploy(self, things: Sequence[str], component_version: str) -> None:
        """Deploy a model component version to these devices and wait until they run it.

        Raises:
            DeployError: a device refused or rolled back the deployment.
        """
        ...


@dataclass(frozen=True)
class NucleusDeployer:
    """Devices on local nuclei (``qcsight gg run-local``), driven through the ``qcsight gg`` command line.

    Attributes:
        layout: the component layout the nuclei install from (the model component is built into it).
        roots: each thing's nucleus root.
        command: how to run qcsight (a list, e.g. [sys.executable, "-m", "qcsight_core.cli"]).
        timeout_s: per device deployment.
    """

    layout: Path
    roots: Mapping[str, Path]
    command: Sequence[str] = ("qcsight",)
    timeout_s: float = 300.0

    def _run(self, args: Sequence[str], what: str) -> str:
        try:
            done = subprocess.run([*self.command, *args], capture_output=True, text=True,
                                  timeout=self.timeout_s + 60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DeployError(f"{what}: {exc}") from None
        if done.returncode != 0:
            raise DeployError(f"{what} failed (exit {done.returncode}): {(done.stdout + done.stderr).strip()[-800:]}")
        return done.stdout

    def publish(self, model: ModelVersion) -> str:
        self._run(["gg", "build", "--bundle", str(model.bundle), "--out", str(self.layout), "--no-agent",
                   "--model-version", model.component_version], f"building the model component {model.version}")
        return model.component_version

    def deploy(self, things: Sequence[str], component_version: str) -> None:
        for thing in things:
            root = self.roots.get(thing)
            if root is None:
                raise DeployError(f"no local nucleus root for {thing!r}; known: {sorted(self.roots)}")
            out = self._run(["gg", "run-local", "deploy", "--root", str(root), "--layout", str(self.layout),
                             "--model-version", component_version, "--timeout", str(self.timeout_s)],
                            f"deploying com.qcsight.Model {component_version} to {thing}")
            try:
                status = json.loads(out)["status"]
            except (ValueError, KeyError, TypeError):
                status = "?"
            log.info("deployed com.qcsight.Model %s to %s: %s", component_version, thing, status)


# ---------------------------------------------------------------- the rollout


@dataclass(frozen=True)
class RolloutSettings:
    """canary: each line's canary things (the rest of the line is its fleet)."""

    canary: Mapping[str, tuple[str, ...]]
    soak: SoakSettings = SoakSettings()


class Rollout:
    """Moves approved versions through canary → promoted / rolled back; every step is recorded."""

    def __init__(self, registry: Registry, store: Store, deployer: Deployer, settings: RolloutSettings,
                 line_things: Mapping[str, Sequence[str]]) -> None:
        self.registry = registry
        self.store = store
        self.deployer = deployer
        self.settings = settings
        self.line_things = line_things

    def _groups(self, scope: str) -> tuple[list[str], list[str]]:
        things = list(self.line_things.get(scope, ()))
        canary = [t for t in self.settings.canary.get(scope, ()) if t in things] or things[:1]
        if not canary:
            raise DeployError(f"line {scope!r} has no devices to deploy to")
        return canary, [t for t in things if t not in canary]

    def pending(self) -> list[ModelVersion]:
        """Approved versions not yet on a canary, and versions on a canary (being soaked)."""
        return [v for v in self.registry.versions() if v.status == APPROVED and v.deployment in (None, CANARY)]

    def step(self, now: datetime | None = None) -> list[tuple[ModelVersion, SoakDecision]]:
        """Advance every approved version one step; returns what was decided for each."""
        now = now or timestamps.now()
        done = []
        for model in self.pending():
            if model.deployment is None:
                self.start(model, now)
                continue
            decision = self.judge(model, now)
            if decision.action != WAIT:
                self.finish(model, decision, now)
            done.append((model, decision))
        return done

    def start(self, model: ModelVersion, now: datetime) -> None:
        canary, _ = self._groups(model.scope)
        previous = self.registry.production(model.scope)
        component = self.deployer.publish(model)
        log.info("rollout %s: model %s (component %s) to the canary %s", model.scope, model.version, component,
                 ", ".join(canary))
        try:
            self.deployer.deploy(canary, component)
        except DeployError as exc:
            self.registry.record(model.version, CANARY, at=timestamps.iso(now), canary=canary, component=component,
                                 previous=previous.version if previous else None)
            self.finish(model, SoakDecision(ROLLBACK, (f"the canary deployment failed: {exc}",)), now)
            return
        self.registry.record(model.version, CANARY, at=timestamps.iso(timestamps.now()), canary=canary,
                             component=component, previous=previous.version if previous else None)

    def _canary_event(self, model: ModelVersion) -> dict[str, object]:
        events = [dict(e) for e in model.events if e.get("event") == CANARY]
        return events[-1]

    def judge(self, model: ModelVersion, now: datetime) -> SoakDecision:
        event = self._canary_event(model)
        since = timestamps.parse(str(event["at"]))
        canary, fleet = self._groups(model.scope)
        bundle_version = _bundle_version(model)
        canary_windows = [w for thing in canary for w in self.store.windows(thing=thing, since=since, until=now)
                          if w.model_version == bundle_version]
        # The fleet's windows over the same time: the previous model on the same line (and the same drift).
        start = min((timestamps.parse(w.start) for w in canary_windows), default=since)
        fleet_windows = [w for thing in fleet for w in self.store.windows(thing=thing, since=start, until=now)
                         if w.model_version != bundle_version]
        elapsed = max(0.0, (now - since).total_seconds())
        return soak_decision(self.settings.soak, GroupStats.of(canary_windows), GroupStats.of(fleet_windows),
                             elapsed)

    def finish(self, model: ModelVersion, decision: SoakDecision, now: datetime) -> None:
        canary, fleet = self._groups(model.scope)
        current = self.registry.get(model.version)
        event = self._canary_event(current) if current.deployment == CANARY else {}
        reason = "; ".join(decision.reasons)
        if decision.action == PROMOTE:
            if fleet:
                self.deployer.deploy(fleet, model.component_version)
            self.registry.record(model.version, PROMOTED, reason=reason, things=canary + fleet)
            self._close_run(model, "succeeded", now)
            log.info("rollout %s: model %s PROMOTED to %s (%s)", model.scope, model.version,
                     ", ".join(canary + fleet), reason)
        else:
            previous = event.get("previous") if event else None
            if previous is not None:
                try:
                    self.deployer.deploy(canary, self.registry.get(str(previous)).component_version)
                except DeployError as exc:
                    reason += f"; redeploying version {previous} to the canary failed too: {exc}"
            self.registry.record(model.version, ROLLED_BACK, reason=reason, restored=previous, things=canary)
            self._close_run(model, "failed", now)
            log.warning("rollout %s: model %s ROLLED BACK on %s (%s)", model.scope, model.version,
                        ", ".join(canary), reason)
        self.store.record_decision(Decision(uuid.uuid4().hex, ROLLOUT_SCOPE + model.scope, timestamps.iso(now),
                                            decision.action, (f"model {model.version}",), (), decision.checks or (
                                                Check("deployment", True, reason),)))

    def _close_run(self, model: ModelVersion, status: str, now: datetime) -> None:
        if not model.run_id:
            return
        for run in self.store.runs(model.scope, since=now - timedelta(days=30)):
            if run.run_id == model.run_id:
                self.store.put_run(Run(run.run_id, run.scope, run.requested, status, run.decision_id,
                                       timestamps.iso(now), model.version, {**run.detail, "rollout": status}))


def _bundle_version(model: ModelVersion) -> str:
    """The version the bundle's manifest carries: what the devices report in their windows."""
    from qcsight_core.bundle import read_manifest
    from qcsight_core.errors import QcsightError

    try:
        return read_manifest(model.bundle).version
    except (OSError, QcsightError) as exc:
        raise DeployError(f"{model.bundle}: cannot read the bundle's version ({exc})") from None
