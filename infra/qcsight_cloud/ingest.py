"""Ingestion: (connection identity, topic, payload bytes) -> a validated record in the store, or a counted drop.

The identity comes from the connection, never from the payload: the IoT rule's ``clientid()`` in
AWS (the IoT policy lets a certificate connect only with its own thing name as client id), the
certificate's CN locally (the broker's ACL lets it publish only under ``qcsight/<CN>/``, so the
topic's thing *is* the identity). A message is dropped, and counted under its identity with a
reason, when:

- ``bad_identity``: the identity is not a thing name;
- ``bad_topic``: the topic is not ``qcsight/<thing>/<metrics|alerts|status>``;
- ``identity_topic_mismatch``: the identity published on another thing's topic;
- ``invalid_payload``: not JSON, an unknown schema or major version, a field of the wrong type,
  a time without a UTC offset (qcsight_core.messages decides, as on the device);
- ``schema_topic_mismatch``: e.g. an alert on the metrics topic;
- ``payload_thing_mismatch``: the payload's ``thing`` names someone else.

Delivery is at least once: a message_id already stored is a duplicate, stored once and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qcsight_cloud import timestamps
from qcsight_cloud.records import Alert, Origin, Record, StatusEvent, Window
from qcsight_cloud.store import UNASSIGNED, Store
from qcsight_cloud.tracking import kind_of
from qcsight_core import messages, topics
from qcsight_core.errors import ConfigError, MessageError

log = logging.getLogger(__name__)

DROP_REASONS = ("bad_identity", "bad_topic", "identity_topic_mismatch", "invalid_payload", "schema_topic_mismatch",
                "payload_thing_mismatch", "bad_event")
SCHEMA_OF_KIND = {"metrics": messages.METRICS, "alerts": messages.ALERT, "status": messages.STATUS}
STORED, DUPLICATE, DROPPED = "stored", "duplicate", "dropped"
_MAX_IDENTITY = 128  # counters keep at most this much of an identity that is not a thing name
_MAX_TOPIC, _MAX_DETAIL = 256, 500

LineOf = Callable[[str], str]


@dataclass(frozen=True)
class Incoming:
    """One message as it arrived: who sent it (from the connection), where, what, and when."""

    identity: str
    topic: str
    payload: bytes
    received: str  # canonical time the broker (or the subscriber) received it
    principal: str | None = None


@dataclass(frozen=True)
class Dropped:
    """A message refused before storage, with the reason counted and a detail logged."""

    identity: str
    topic: str
    reason: str
    detail: str


@dataclass(frozen=True)
class Outcome:
    """What became of one message."""

    status: str  # STORED, DUPLICATE or DROPPED
    identity: str
    kind: str | None
    message_id: str | None = None
    reason: str | None = None
    detail: str | None = None
    record: Record | None = None


def no_lines(thing: str) -> str:
    return UNASSIGNED


def check(incoming: Incoming, line_of: LineOf = no_lines) -> Record | Dropped:
    """Validate one message against its connection identity and topic; pure (no I/O but ``line_of``)."""
    identity, topic = incoming.identity, incoming.topic

    def drop(reason: str, detail: str) -> Dropped:
        # Both may carry what a device sent; bounded, since they go to logs and metrics.
        return Dropped(identity[:_MAX_IDENTITY], topic[:_MAX_TOPIC], reason, detail[:_MAX_DETAIL])

    try:
        topics.check_thing_name(identity)
    except ConfigError:
        return drop("bad_identity", f"connection identity {identity[:_MAX_IDENTITY]!r} is not a thing name")
    try:
        topic_thing, kind = topics.parse_topic(topic)
    except ConfigError as exc:
        return drop("bad_topic", str(exc))
    if topic_thing != identity:
        return drop("identity_topic_mismatch", f"{identity} published on {topic}")
    try:
        message = messages.decode(incoming.payload)
    except MessageError as exc:
        return drop("invalid_payload", str(exc))
    if message["schema"].split("/")[0] != SCHEMA_OF_KIND[kind].split("/")[0]:
        return drop("schema_topic_mismatch", f"{message['schema']} on the {kind} topic")
    if message["thing"] != identity:
        return drop("payload_thing_mismatch", f"payload says thing {str(message['thing'])[:_MAX_IDENTITY]!r}, "
                                              f"the connection is {identity}")
    try:
        return to_record(kind, message, line_of(identity), incoming.received)
    except MessageError as exc:
        return drop("invalid_payload", str(exc))


def to_record(kind: str, message: Mapping[str, Any], line: str, received: str) -> Record:
    """The store record of a validated message; raises MessageError for a time that is not ISO-8601 UTC."""
    origin = Origin(str(message["message_id"]), str(message["thing"]), line, int(message["seq"]),
                    timestamps.canonical(message["time"], "message.time"), received)
    model = message.get("model") or {}
    if kind == "alerts":
        verdict = message["verdict"]
        return Alert(
            origin=origin, alert_id=message["alert_id"], frame_id=message["frame_id"], model_name=model["name"],
            model_version=model["version"], status=verdict["status"], label=verdict["label"],
            score=float(verdict["score"]), confidence=float(verdict["confidence"]),
            scores={k: float(v) for k, v in verdict["scores"].items()}, image_ref=message.get("image_ref"),
            thumbnail=message.get("thumbnail"), box=message.get("box"), overlay=message.get("overlay"),
        )
    if kind == "metrics":
        window, counts = message["window"], message["counts"]
        confidence, latency, inputs = message["confidence"], message["latency_ms"], message["input"]
        drift = message["drift"]
        return Window(
            origin=origin, start=timestamps.canonical(window["start"], "message.window.start"),
            end=timestamps.canonical(window["end"], "message.window.end"), seconds=float(window["seconds"]),
            model_name=model["name"], model_version=model["version"], frames=counts["frames"], good=counts["good"],
            defect=counts["defect"], uncertain=counts["uncertain"], dropped=counts["dropped"],
            errors=counts["errors"], by_class=dict(message["by_class"]), defect_rate=float(message["defect_rate"]),
            confidence_p05=float(confidence["p05"]), confidence_p50=float(confidence["p50"]),
            confidence_p95=float(confidence["p95"]), latency_p50=float(latency["p50"]),
            latency_p95=float(latency["p95"]), latency_p99=float(latency["p99"]),
            brightness=float(inputs["brightness"]), contrast=float(inputs["contrast"]),
            sharpness=float(inputs["sharpness"]), confidence_psi=_opt_float(drift.get("confidence_psi")),
            brightness_psi=_opt_float(drift.get("brightness_psi")),
        )
    outbox = message.get("outbox") or {}
    return StatusEvent(
        origin=origin, event=message["event"], state=message["state"], uptime_s=float(message["uptime_s"]),
        model_name=model.get("name"), model_version=model.get("version"), outbox_depth=outbox.get("depth"),
        outbox_bytes=outbox.get("bytes"), outbox_evicted=outbox.get("evicted"), error=message.get("error"),
        detail=dict(message.get("detail") or {}),
    )


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


class Ingestor:
    """Checks messages and stores what passes; the same for the Lambda handler and the local subscriber.

    Args:
        store: where records and counters go.
        line_of: the line (thing group) a thing belongs to now; recorded with each message.
    """

    def __init__(self, store: Store, line_of: LineOf = no_lines) -> None:
        self.store = store
        self.line_of = line_of

    def ingest(self, incoming: Incoming) -> Outcome:
        return self.ingest_batch([incoming])[0]

    def ingest_batch(self, batch: Sequence[Incoming]) -> list[Outcome]:
        """Check and store a batch; records go to the store in one call (one SQLite transaction).

        Raises:
            StoreError: nothing of the batch may be assumed stored; the caller retries it
                (redelivery is safe: a message stored before the failure counts as a duplicate).
        """
        checked = [check(incoming, self.line_of) for incoming in batch]
        records = [c for c in checked if not isinstance(c, Dropped)]
        stored = iter(self.store.put(records)) if records else iter(())
        drops: dict[str, dict[str, int]] = {}
        outcomes: list[Outcome] = []
        for item in checked:
            if isinstance(item, Dropped):
                counts = drops.setdefault(item.identity, {})
                counts[f"drop.{item.reason}"] = counts.get(f"drop.{item.reason}", 0) + 1
                outcomes.append(_dropped(item))
                continue
            new = next(stored)
            outcomes.append(Outcome(STORED if new else DUPLICATE, item.origin.thing, kind_of(item),
                                    item.origin.message_id, record=item))
        for identity, counts in drops.items():
            self.store.count(identity, counts)
        return outcomes

    def drop(self, dropped: Dropped) -> Outcome:
        """Count and log a message refused before it could even be checked (e.g. a malformed rule event)."""
        self.store.count(dropped.identity, {f"drop.{dropped.reason}": 1})
        return _dropped(dropped)


def _dropped(item: Dropped) -> Outcome:
    log.warning("dropped a message from %s on %s: %s (%s)", item.identity, item.topic, item.reason, item.detail)
    kind = item.topic.rsplit("/", 1)[-1]
    return Outcome(DROPPED, item.identity, kind if kind in topics.KINDS else None, reason=item.reason,
                   detail=item.detail)
