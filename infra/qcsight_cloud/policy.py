"""The retraining policy: pure code from evidence about one line to a decision (fire or hold) and why.

Triggers (any one fires):

- ``drift``: at least ``drift_min_devices`` devices whose latest ``drift_windows`` windows each
  saw at least ``drift_min_frames`` frames and a confidence or brightness PSI above ``drift_psi``
  (PSI above 0.25 is the usual "real shift" mark);
- ``defect_rate``: the line's defect rate over its devices' recent windows differs from the
  baseline (the first windows of the current model) at significance ``rate_alpha``, two-sided
  (:func:`qcsight_cloud.rates.compare_rates`), with at least ``rate_min_frames`` frames each side;
- ``false_alarms``: operators called at least ``false_alarm_min_reviews`` reviewed alerts and the
  false-alarm rate is above ``false_alarm_bound`` at significance ``false_alarm_alpha``;
- ``new_reviews``: ``new_reviews_to_fire`` alerts reviewed since the current model.

Guardrails (any one holds a fired decision back): a run already requested or running
(``one_run``), the last run requested less than ``cooldown_hours`` ago (``cooldown``),
``weekly_cap`` runs requested in the last 7 days (``weekly_cap``), fewer than ``min_new_reviews``
newly reviewed images to train on (``new_labels``).

Every check is recorded with its numbers, whether or not it mattered, so an engineer can read
why the policy held or fired.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

from qcsight_cloud import timestamps
from qcsight_cloud.rates import compare_rates, exceeds_bound
from qcsight_cloud.records import RUN_ACTIVE, Check, Decision, Run
from qcsight_core.errors import ConfigError

FIRE, HOLD = "fire", "hold"
TRIGGERS = ("drift", "defect_rate", "false_alarms", "new_reviews")
GUARDRAILS = ("one_run", "cooldown", "weekly_cap", "new_labels")
_WEEK = timedelta(days=7)
_LISTED = 10  # things named in a summary; the numbers carry the count


@dataclass(frozen=True)
class PolicySettings:
    """What the policy fires on and what holds it back; see the module docstring for each field's role."""

    drift_psi: float = 0.25
    drift_windows: int = 5
    drift_min_frames: int = 200
    drift_min_devices: int = 1
    rate_alpha: float = 0.001
    rate_recent_windows: int = 15
    rate_baseline_windows: int = 60
    rate_min_frames: int = 1000
    false_alarm_bound: float = 0.3
    false_alarm_alpha: float = 0.01
    false_alarm_min_reviews: int = 30
    new_reviews_to_fire: int = 500
    min_new_reviews: int = 0
    cooldown_hours: float = 24.0
    weekly_cap: int = 2
    lookback_days: float = 7.0

    def __post_init__(self) -> None:
        _number("drift_psi", self.drift_psi, 0.0, 10.0, low_open=True)
        _integer("drift_windows", self.drift_windows, 1, 10_000)
        _integer("drift_min_frames", self.drift_min_frames, 1, 10**9)
        _integer("drift_min_devices", self.drift_min_devices, 1, 10**6)
        _number("rate_alpha", self.rate_alpha, 0.0, 0.5, low_open=True)
        _integer("rate_recent_windows", self.rate_recent_windows, 1, 10_000)
        _integer("rate_baseline_windows", self.rate_baseline_windows, 1, 100_000)
        _integer("rate_min_frames", self.rate_min_frames, 1, 10**9)
        _number("false_alarm_bound", self.false_alarm_bound, 0.0, 1.0, low_open=True, high_open=True)
        _number("false_alarm_alpha", self.false_alarm_alpha, 0.0, 0.5, low_open=True)
        _integer("false_alarm_min_reviews", self.false_alarm_min_reviews, 1, 10**9)
        _integer("new_reviews_to_fire", self.new_reviews_to_fire, 1, 10**9)
        _integer("min_new_reviews", self.min_new_reviews, 0, 10**9)
        _number("cooldown_hours", self.cooldown_hours, 0.0, 24 * 365)
        _integer("weekly_cap", self.weekly_cap, 1, 1000)
        _number("lookback_days", self.lookback_days, 0.0, 366, low_open=True)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PolicySettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"policy.{unknown[0]}", data[unknown[0]],
                              f"not a setting; known: {', '.join(sorted(known))}")
        return cls(**dict(data))

    @property
    def windows_needed(self) -> int:
        """Latest windows per device the evidence must carry (drift and the recent rate)."""
        return max(self.drift_windows, self.rate_recent_windows)


def _number(name: str, value: object, low: float, high: float, *, low_open: bool = False,
            high_open: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and \
        (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not ok:
        allowed = f"a number {'above' if low_open else 'from'} {low:g} {'and below' if high_open else 'to'} {high:g}"
        raise ConfigError(f"policy.{name}", value, allowed)


def _integer(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"policy.{name}", value, f"an integer from {low} to {high}")


# ---------------------------------------------------------------- evidence


@dataclass(frozen=True)
class WindowStats:
    """What the policy reads of one metrics window."""

    frames: int
    defects: int
    confidence_psi: float | None
    brightness_psi: float | None

    @property
    def psi(self) -> float | None:
        values = [v for v in (self.confidence_psi, self.brightness_psi) if v is not None]
        return max(values) if values else None


@dataclass(frozen=True)
class DeviceEvidence:
    """One device under its current model: latest windows (oldest first) and its baseline counts."""

    thing: str
    recent: tuple[WindowStats, ...]
    baseline_frames: int
    baseline_defects: int


@dataclass(frozen=True)
class Evidence:
    """Everything the policy needs about one scope (a line) at one time."""

    scope: str
    time: str
    devices: tuple[DeviceEvidence, ...]
    reviewed: int  # alerts reviewed since the current model
    false_alarms: int  # of which operators called false alarms
    runs: tuple[Run, ...]  # the scope's runs: active ones and those requested in the last 7 days


# ---------------------------------------------------------------- the decision


def _drift(settings: PolicySettings, evidence: Evidence) -> Check:
    k, n, threshold = settings.drift_windows, settings.drift_min_frames, settings.drift_psi
    held: list[tuple[str, float]] = []
    for device in evidence.devices:
        latest = device.recent[-k:]
        if len(latest) < k:
            continue
        psis = [w.psi for w in latest]
        if all(w.frames >= n for w in latest) and all(p is not None and p > threshold for p in psis):
            held.append((device.thing, min(p for p in psis if p is not None)))
    held.sort(key=lambda item: -item[1])
    fired = len(held) >= settings.drift_min_devices
    names = ", ".join(f"{t} (PSI >= {p:.3f})" for t, p in held[:_LISTED]) + (" ..." if len(held) > _LISTED else "")
    summary = (f"{len(held)} device(s) held PSI > {threshold:g} over their last {k} windows of >= {n} frames"
               f"{': ' + names if held else ''}; {settings.drift_min_devices} needed")
    return Check("drift", fired, summary, {
        "devices_drifting": len(held), "devices": len(evidence.devices), "psi_threshold": threshold, "windows": k,
        "min_frames": n, "min_devices": settings.drift_min_devices,
        "weakest_held_psi": held[-1][1] if held else None, "strongest_held_psi": held[0][1] if held else None,
    })


def _defect_rate(settings: PolicySettings, evidence: Evidence) -> Check:
    m = settings.rate_recent_windows
    recent = [w for d in evidence.devices for w in d.recent[-m:]]
    n2, x2 = sum(w.frames for w in recent), sum(w.defects for w in recent)
    n1 = sum(d.baseline_frames for d in evidence.devices)
    x1 = sum(d.baseline_defects for d in evidence.devices)
    numbers: dict[str, float | int | str | None] = {
        "baseline_frames": n1, "baseline_defects": x1, "recent_frames": n2, "recent_defects": x2,
        "baseline_rate": x1 / n1 if n1 else None, "recent_rate": x2 / n2 if n2 else None,
        "alpha": settings.rate_alpha, "min_frames": settings.rate_min_frames, "p_value": None, "method": None,
    }
    if min(n1, n2) < settings.rate_min_frames:
        return Check("defect_rate", False, f"not enough frames to compare rates (baseline {n1}, recent {n2}; "
                                           f"{settings.rate_min_frames} needed each)", numbers)
    test = compare_rates(x1, n1, x2, n2)
    numbers.update(p_value=test.p_value, method=test.method, z=test.statistic)
    fired = test.p_value < settings.rate_alpha
    summary = (f"defect rate {x2 / n2:.4f} over the last {m} windows vs baseline {x1 / n1:.4f}: "
               f"p = {test.p_value:.3g} ({test.method} test), {'below' if fired else 'not below'} "
               f"alpha {settings.rate_alpha:g}")
    return Check("defect_rate", fired, summary, numbers)


def _false_alarms(settings: PolicySettings, evidence: Evidence) -> Check:
    n, x, bound = evidence.reviewed, evidence.false_alarms, settings.false_alarm_bound
    numbers: dict[str, float | int | str | None] = {
        "reviewed": n, "false_alarms": x, "rate": x / n if n else None, "bound": bound,
        "alpha": settings.false_alarm_alpha, "min_reviews": settings.false_alarm_min_reviews, "p_value": None,
    }
    if n < settings.false_alarm_min_reviews:
        return Check("false_alarms", False, f"{n} reviewed alerts since the current model; "
                                            f"{settings.false_alarm_min_reviews} needed to judge the false-alarm rate",
                     numbers)
    test = exceeds_bound(x, n, bound)
    numbers["p_value"] = test.p_value
    fired = test.p_value < settings.false_alarm_alpha
    summary = (f"false-alarm rate {x}/{n} = {x / n:.3f} vs bound {bound:g}: p = {test.p_value:.3g}, "
               f"{'above' if fired else 'not shown above'} the bound at alpha {settings.false_alarm_alpha:g}")
    return Check("false_alarms", fired, summary, numbers)


def _new_reviews(settings: PolicySettings, evidence: Evidence) -> Check:
    n, needed = evidence.reviewed, settings.new_reviews_to_fire
    return Check("new_reviews", n >= needed, f"{n} alerts reviewed since the current model; {needed} fire a retrain",
                 {"reviewed": n, "needed": needed})


def _guardrails(settings: PolicySettings, evidence: Evidence) -> list[Check]:
    """Each guardrail's Check; ``fired`` means it holds a fired decision back."""
    now = timestamps.parse(evidence.time)
    active = [r for r in evidence.runs if r.status in RUN_ACTIVE]
    requested = sorted((timestamps.parse(r.requested) for r in evidence.runs), reverse=True)
    last = requested[0] if requested else None
    hours_since = (now - last).total_seconds() / 3600 if last else None
    this_week = [t for t in requested if now - t < _WEEK]
    cooling = hours_since is not None and hours_since < settings.cooldown_hours
    return [
        Check("one_run", bool(active), f"{len(active)} run(s) requested or running"
              + (f": {', '.join(r.run_id for r in active)}" if active else ""),
              {"active_runs": len(active)}),
        Check("cooldown", cooling, "no run requested yet" if hours_since is None else
              f"last run requested {hours_since:.1f} h ago; cooldown {settings.cooldown_hours:g} h",
              {"hours_since_last_run": hours_since, "cooldown_hours": settings.cooldown_hours}),
        Check("weekly_cap", len(this_week) >= settings.weekly_cap,
              f"{len(this_week)} run(s) requested in the last 7 days; cap {settings.weekly_cap}",
              {"runs_this_week": len(this_week), "weekly_cap": settings.weekly_cap}),
        Check("new_labels", evidence.reviewed < settings.min_new_reviews,
              f"{evidence.reviewed} newly reviewed images to train on; {settings.min_new_reviews} required",
              {"reviewed": evidence.reviewed, "required": settings.min_new_reviews}),
    ]


def decide(settings: PolicySettings, evidence: Evidence, decision_id: str) -> Decision:
    """Fire when a trigger fired and no guardrail holds it back; hold otherwise. Pure."""
    triggers = [_drift(settings, evidence), _defect_rate(settings, evidence), _false_alarms(settings, evidence),
                _new_reviews(settings, evidence)]
    guards = _guardrails(settings, evidence)
    fired = tuple(c.name for c in triggers if c.fired)
    blocked = tuple(c.name for c in guards if c.fired) if fired else ()
    action = FIRE if fired and not blocked else HOLD
    return Decision(decision_id, evidence.scope, evidence.time, action, fired, blocked, (*triggers, *guards))


def explain(decision: Decision) -> str:
    """The decision as an engineer reads it: the verdict, then each check with its numbers."""
    head = f"{decision.time}  {decision.scope}: {decision.action.upper()}"
    if decision.triggers:
        head += f"  (fired: {', '.join(decision.triggers)}"
        head += f"; held back by: {', '.join(decision.blocked_by)})" if decision.blocked_by else ")"
    lines = [head]
    for check in decision.checks:
        role = "guard" if check.name in GUARDRAILS else "trigger"
        mark = ("BLOCKS" if check.fired else "ok") if role == "guard" else ("FIRED" if check.fired else "-")
        lines.append(f"  {role:<7} {check.name:<13} {mark:<6} {check.summary}")
    return "\n".join(lines)


def evidence_windows(windows: Sequence[WindowStats], settings: PolicySettings) -> tuple[WindowStats, ...]:
    """The latest windows a DeviceEvidence carries (oldest first)."""
    return tuple(windows[-settings.windows_needed:])
