"""What the cloud store holds: alerts, metrics windows, status events, device status, reviews, decisions, runs.

Records are plain frozen dataclasses: ingestion builds them from validated device messages, the
store keeps and returns them, and the review app, fleet view and policy read them. Every time
field is a canonical string (see :mod:`qcsight_cloud.timestamps`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Review actions an operator takes; "undo" reverts the latest review still in effect.
CONFIRM, FALSE_ALARM, RELABEL, UNDO = "confirm", "false_alarm", "relabel", "undo"
REVIEW_ACTIONS = (CONFIRM, FALSE_ALARM, RELABEL, UNDO)
# What a review says about the part: a defect (of `label`), or a false alarm (the part is good).
DEFECT, GOOD = "defect", "false_alarm"

RUN_STATES = ("requested", "running", "succeeded", "failed", "cancelled")
RUN_ACTIVE = ("requested", "running")


@dataclass(frozen=True)
class Origin:
    """Where a message came from: identity (= thing), the line it belonged to then, and when it arrived."""

    message_id: str
    thing: str
    line: str
    seq: int
    time: str  # device clock
    received: str  # cloud clock


@dataclass(frozen=True)
class ReviewState:
    """The current verdict of an alert, derived from its reviews (never stored as the source of truth)."""

    verdict: str | None = None  # DEFECT, GOOD or None (not reviewed)
    label: str | None = None
    count: int = 0  # reviews recorded so far, undos included

    @property
    def reviewed(self) -> bool:
        return self.verdict is not None


@dataclass(frozen=True)
class AlertSummary:
    """An alert as the inbox lists it (no thumbnail bytes)."""

    origin: Origin
    alert_id: str
    frame_id: str
    model_name: str
    model_version: str
    status: str  # the device verdict: defect | uncertain (| good)
    label: str  # the model's class
    score: float
    confidence: float
    scores: Mapping[str, float]
    image_ref: str | None
    review: ReviewState = ReviewState()

    @property
    def message_id(self) -> str:
        return self.origin.message_id


@dataclass(frozen=True)
class Alert(AlertSummary):
    """An alert with its thumbnail (format, width, height, base64 data) when the device sent one.

    An anomaly bundle's alert also carries ``box`` (the hottest region, x0/y0/x1/y1 as 0..1 of the
    judged image, and its peak) and ``overlay`` (a thumbnail with the score map blended in).
    """

    thumbnail: Mapping[str, Any] | None = None
    box: Mapping[str, float] | None = None
    overlay: Mapping[str, Any] | None = None

    def summary(self) -> AlertSummary:
        return AlertSummary(self.origin, self.alert_id, self.frame_id, self.model_name, self.model_version,
                            self.status, self.label, self.score, self.confidence, self.scores, self.image_ref,
                            self.review)


@dataclass(frozen=True)
class Window:
    """One metrics window of one device (a qcsight.metrics/1 message, flattened)."""

    origin: Origin
    start: str
    end: str
    seconds: float
    model_name: str
    model_version: str
    frames: int
    good: int
    defect: int
    uncertain: int
    dropped: int
    errors: int
    by_class: Mapping[str, int]
    defect_rate: float
    confidence_p05: float
    confidence_p50: float
    confidence_p95: float
    latency_p50: float
    latency_p95: float
    latency_p99: float
    brightness: float
    contrast: float
    sharpness: float
    confidence_psi: float | None
    brightness_psi: float | None


@dataclass(frozen=True)
class StatusEvent:
    """One qcsight.status/1 message (start, stop, model change, error, heartbeat)."""

    origin: Origin
    event: str
    state: str
    uptime_s: float
    model_name: str | None
    model_version: str | None
    outbox_depth: int | None
    outbox_bytes: int | None
    outbox_evicted: int | None
    error: str | None
    detail: Mapping[str, Any] = field(default_factory=dict)


Record = Alert | Window | StatusEvent


@dataclass(frozen=True)
class DeviceStatus:
    """Everything the cloud knows about one device, kept current by ingestion.

    Sequence tracking tolerates reordering: ``gaps`` is the number of seqs between the lowest and
    highest received that never arrived (a late message fills its gap when it comes).
    """

    thing: str
    line: str
    first_seen: str
    last_seen: str  # cloud clock of the latest arrival: what silence is measured against
    last_time: str  # device clock of the newest message (by seq)
    received: int  # distinct messages accepted
    by_kind: Mapping[str, int]
    min_seq: int
    max_seq: int
    reordered: int  # messages that arrived after one with a higher seq
    state: str | None = None
    last_event: str | None = None
    last_status_at: str | None = None
    uptime_s: float | None = None
    model_name: str | None = None
    model_version: str | None = None
    outbox_depth: int | None = None
    outbox_bytes: int | None = None
    outbox_evicted: int | None = None
    error_count: int = 0
    last_error: str | None = None
    last_error_at: str | None = None
    last_window_end: str | None = None
    # The seq of the message that last set the status fields, the model, and last_window_end: a
    # message older (by seq) than these never overwrites what a newer one said.
    status_seq: int | None = None
    model_seq: int | None = None
    window_seq: int | None = None

    @property
    def gaps(self) -> int:
        return max(0, self.max_seq - self.min_seq + 1 - self.received)


@dataclass(frozen=True)
class Review:
    """One operator action on one alert: appended, never changed.

    ``n`` numbers the alert's reviews from 1; (alert, n) is unique, which is what makes two
    concurrent reviewers of one alert conflict instead of overwriting each other.
    """

    alert_id: str  # the alert's message_id
    n: int
    review_id: str
    reviewer: str
    time: str
    action: str
    verdict: str | None  # the alert's verdict after this review
    label: str | None
    previous_verdict: str | None
    previous_label: str | None
    undoes: int | None  # for an undo: the n of the review it reverted
    line: str
    thing: str
    predicted_label: str
    model_version: str


@dataclass(frozen=True)
class ClassReviewStats:
    """Reviewed alerts of one predicted class on one line, and how many operators called false alarms."""

    line: str
    label: str
    reviewed: int
    false_alarms: int

    @property
    def false_alarm_rate(self) -> float | None:
        return self.false_alarms / self.reviewed if self.reviewed else None


@dataclass(frozen=True)
class ReviewStats:
    """Review statistics over alerts reviewed since ``since`` (their current verdicts)."""

    since: str
    by_class: tuple[ClassReviewStats, ...]

    def reviewed(self, line: str | None = None) -> int:
        return sum(row.reviewed for row in self.by_class if line is None or row.line == line)

    def false_alarms(self, line: str | None = None) -> int:
        return sum(row.false_alarms for row in self.by_class if line is None or row.line == line)


@dataclass(frozen=True)
class Check:
    """One trigger or guardrail the policy evaluated, with the numbers that decided it."""

    name: str
    fired: bool
    summary: str
    numbers: Mapping[str, float | int | str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """A retraining decision for one scope (a line): fire or hold, and why."""

    decision_id: str
    scope: str
    time: str
    action: str  # "fire" or "hold"
    triggers: tuple[str, ...]  # names of the triggers that fired
    blocked_by: tuple[str, ...]  # guardrails that held a fired trigger back
    checks: tuple[Check, ...]


@dataclass(frozen=True)
class Run:
    """A retraining run the policy asked for; the pipeline moves it through RUN_STATES."""

    run_id: str
    scope: str
    requested: str
    status: str
    decision_id: str | None = None
    finished: str | None = None
    model_version: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)
