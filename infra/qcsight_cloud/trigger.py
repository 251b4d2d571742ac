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
from qcsight_cloud.records import RUN_ACTIVE, Decision, Run, Window
from qcsight_cloud.store import Store

log = logging.getLogger(__name__)


def device_evidence(thing: str, windows: Sequence[Window], settings: PolicySettings) -> DeviceEvidence:
    """A device's evidence from its windows (oldest first): the current model's latest windows, and as
    baseline the first ``rate_baseline_windows`` windows of that model not among them."""
    if not windows:
        return DeviceEvidence(thing, (), 0, 0)
    version = windows[-1].model_version
    start = len(windows)
    while start > 0 and windows[start - 1].model_version == version:
        start -= 1
    current = windows[start:]
    recent = current[-settings.windows_needed:]
    rate_recent = current[-settings.rate_recent_windows:]
    baseline = current[: max(0, len(current) - len(rate_recent))][: settings.rate_baseline_windows]
    return DeviceEvidence(
        thing,
        tuple(WindowStats(w.frames, w.defect, w.confidence_psi, w.brightness_psi) for w in recent),
        sum(w.frames for w in baseline), sum(w.defect for w in baseline),
    )


def model_since(windows: Sequence[Window], runs: Sequence[Run], now: datetime, settings: PolicySettings) -> datetime:
    """When the line's current model arrived: the latest finished successful run, else the first window of the
    newest model version seen in the lookback, else the start of the lookback."""
    finished = [timestamps.parse(r.finished) for r in runs if r.status == "succeeded" and r.finished]
    if finished:
        return max(finished)
    if windows:
        newest = max(windows, key=lambda w: w.end).model_version
        first = min(w.end for w in windows if w.model_version == newest)
        return timestamps.parse(first)
    return now - timedelta(days=settings.lookback_days)


def gather(store: Store, scope: str, settings: PolicySettings, now: datetime) -> Evidence:
    """One line's evidence: its devices' windows in the lookback, reviews since its model, its runs."""
    windows = store.windows(line=scope, since=now - timedelta(days=settings.lookback_days), until=now,
                            limit=10_000_000)
    by_thing: dict[str, list[Window]] = {}
    for window in windows:
        by_thing.setdefault(window.origin.thing, []).append(window)
    devices = tuple(device_evidence(thing, sorted(ws, key=lambda w: w.end), settings)
                    for thing, ws in sorted(by_thing.items()))
    all_runs = store.runs(scope)
    week_ago = now - timedelta(days=7)
    runs = tuple(r for r in all_runs if r.status in RUN_ACTIVE or timestamps.parse(r.requested) >= week_ago)
    stats = store.review_stats(model_since(windows, all_runs, now, settings), line=scope)
    return Evidence(scope, timestamps.iso(now), devices, stats.reviewed(scope), stats.false_alarms(scope), runs)


def evaluate(store: Store, fleet: Fleet, settings: PolicySettings, *, now: datetime | None = None,
             scopes: Sequence[str] | None = None, request_runs: bool = True) -> list[Decision]:
    """Decide for every line (or ``scopes``), record each decision, and request a run for each that fires."""
    now = now or timestamps.now()
    decisions = []
    for scope in scopes or sorted(fleet.lines):
        decision = decide(settings, gather(store, scope, settings, now), uuid.uuid4().hex)
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
