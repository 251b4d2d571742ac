"""The retraining trigger: gather each line's evidence from the store, decide, record the decision, request a run.

The policy itself (qcsight_cloud.policy) is pure; this module is its I/O. A later pipeline takes
the runs requested here (status ``requested``) and moves them on.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

from qcsight_cloud import timestamps
from qcsight_cloud.fleet import Fleet
from qcsight_cloud.policy import FIRE, DeviceEvidence, Evidence, PolicySettings, WindowStats, decide
from qcsight_cloud.records import RUN_ACTIVE, Decision, DeviceStatus, Run, Window
from qcsight_cloud.store import Store

log = logging.getLogger(__name__)


def device_evidence(thing: str, first: Sequence[Window], latest: Sequence[Window],
                    settings: PolicySettings) -> DeviceEvidence:
    """A device's evidence under its current model (the newest window's version).

    Args:
        first: the device's earliest windows since the current model arrived, oldest first.
        latest: its latest windows, oldest first.
    """
    if not latest:
        return DeviceEvidence(thing, (), 0, 0)
    version = latest[-1].model_version
    start = len(latest)
    while start > 0 and latest[start - 1].model_version == version:
        start -= 1
    current = latest[start:]
    rate_recent = {w.origin.message_id for w in current[-settings.rate_recent_windows:]}
    baseline = [w for w in first if w.model_version == version and w.origin.message_id not in rate_recent]
    baseline = baseline[: settings.rate_baseline_windows]
    return DeviceEvidence(
        thing,
        tuple(WindowStats(w.frames, w.defect, w.confidence_psi, w.brightness_psi) for w in current),
        sum(w.frames for w in baseline), sum(w.defect for w in baseline),
    )


def model_since(runs: Sequence[Run], now: datetime, settings: PolicySettings) -> datetime:
    """When the line's current model arrived: the end of its latest successful run, else the start of the
    lookback (``lookback_days``) when no run finished within it."""
    start = now - timedelta(days=settings.lookback_days)
    finished = [timestamps.parse(r.finished) for r in runs if r.status == "succeeded" and r.finished]
    return max([start, *finished])


def line_things(fleet: Fleet, devices: Sequence[DeviceStatus], scope: str) -> list[str]:
    """The line's things: its fleet members, and devices whose messages were recorded on it."""
    return sorted(set(fleet.lines.get(scope, ())) | {d.thing for d in devices if d.line == scope})


def gather(store: Store, scope: str, things: Sequence[str], settings: PolicySettings, now: datetime) -> Evidence:
    """One line's evidence: two bounded reads per device (its first and its latest windows under the current
    model, never the whole lookback), reviews since the model, the line's runs."""
    all_runs = store.runs(scope)
    since = model_since(all_runs, now, settings)
    devices = []
    for thing in things:
        latest = store.windows(thing=thing, since=since, until=now, limit=settings.windows_needed,
                               newest_first=True)[::-1]
        if not latest:
            continue
        first = store.windows(thing=thing, since=since, until=now,
                              limit=settings.rate_baseline_windows + settings.rate_recent_windows)
        devices.append(device_evidence(thing, first, latest, settings))
    week_ago = now - timedelta(days=7)
    runs = tuple(r for r in all_runs if r.status in RUN_ACTIVE or timestamps.parse(r.requested) >= week_ago)
    stats = store.review_stats(since, line=scope)
    return Evidence(scope, timestamps.iso(now), tuple(devices), stats.reviewed(scope), stats.false_alarms(scope), runs)


def evaluate(store: Store, fleet: Fleet, settings: PolicySettings, *, now: datetime | None = None,
             scopes: Sequence[str] | None = None, request_runs: bool = True) -> list[Decision]:
    """Decide for every line (or ``scopes``), record each decision, and request a run for each that fires."""
    now = now or timestamps.now()
    devices = store.devices()
    decisions = []
    for scope in scopes or sorted(fleet.lines):
        evidence = gather(store, scope, line_things(fleet, devices, scope), settings, now)
        decision = decide(settings, evidence, uuid.uuid4().hex)
        store.record_decision(decision)
        log.info("policy %s: %s (fired: %s; held back by: %s)", scope, decision.action,
                 ", ".join(decision.triggers) or "none", ", ".join(decision.blocked_by) or "none")
        if decision.action == FIRE and request_runs:
            run = Run(uuid.uuid4().hex, scope, decision.time, "requested", decision.decision_id,
                      detail={"triggers": list(decision.triggers)})
            store.put_run(run)
            log.info("policy %s: retraining run %s requested", scope, run.run_id)
        decisions.append(decision)
    return decisions
