"""Records to flat rows and back: the column names of the SQLite tables and attribute names of DynamoDB items.

A row holds only str, int, float, bool and None; free-form maps (class scores, thumbnail, by-class
counts, details) are compact JSON strings, since nothing queries inside them. Reading casts every
number explicitly, so DynamoDB's Decimal values come back as the int or float the record declares.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from qcsight_cloud.records import (
    Alert,
    AlertSummary,
    Check,
    Decision,
    DeviceStatus,
    Origin,
    Review,
    ReviewState,
    Run,
    StatusEvent,
    Window,
)
from qcsight_cloud.store import sort_key

Row = dict[str, Any]


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, allow_nan=False)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def origin_row(origin: Origin, sort_time: str | None = None) -> Row:
    return {"message_id": origin.message_id, "thing": origin.thing, "line": origin.line, "seq": origin.seq,
            "time": origin.time, "received": origin.received,
            "sk": sort_key(sort_time or origin.time, origin.message_id)}


def origin_from(row: Mapping[str, Any]) -> Origin:
    return Origin(str(row["message_id"]), str(row["thing"]), str(row["line"]), int(row["seq"]), str(row["time"]),
                  str(row["received"]))


# ---------------------------------------------------------------- alerts


def alert_row(alert: Alert) -> Row:
    return {
        **origin_row(alert.origin),
        "alert_id": alert.alert_id, "frame_id": alert.frame_id, "model_name": alert.model_name,
        "model_version": alert.model_version, "status": alert.status, "label": alert.label,
        "score": float(alert.score), "confidence": float(alert.confidence), "scores": dumps(dict(alert.scores)),
        "image_ref": alert.image_ref,
        "thumbnail": None if alert.thumbnail is None else dumps(dict(alert.thumbnail)),
        **anomaly_fields(alert),
        **review_fields(alert.review),
    }


def anomaly_fields(alert: Alert) -> Row:
    """An anomaly alert's box and overlay (JSON text; None for a classifier's alert)."""
    return {"box": None if alert.box is None else dumps(dict(alert.box)),
            "overlay": None if alert.overlay is None else dumps(dict(alert.overlay))}


def review_fields(state: ReviewState) -> Row:
    return {"review_verdict": state.verdict, "review_label": state.label, "review_count": state.count}


def _review_state(row: Mapping[str, Any]) -> ReviewState:
    return ReviewState(_opt_str(row.get("review_verdict")), _opt_str(row.get("review_label")),
                       int(row.get("review_count") or 0))


def summary_from(row: Mapping[str, Any]) -> AlertSummary:
    return AlertSummary(
        origin=origin_from(row), alert_id=str(row["alert_id"]), frame_id=str(row["frame_id"]),
        model_name=str(row["model_name"]), model_version=str(row["model_version"]), status=str(row["status"]),
        label=str(row["label"]), score=float(row["score"]), confidence=float(row["confidence"]),
        scores={k: float(v) for k, v in json.loads(row["scores"]).items()}, image_ref=_opt_str(row.get("image_ref")),
        review=_review_state(row),
    )


def alert_from(row: Mapping[str, Any]) -> Alert:
    summary = summary_from(row)
    thumbnail, box, overlay = row.get("thumbnail"), row.get("box"), row.get("overlay")
    return Alert(**{name: getattr(summary, name) for name in summary.__dataclass_fields__},
                 thumbnail=None if thumbnail is None else json.loads(thumbnail),
                 box=None if box is None else json.loads(box), overlay=None if overlay is None else json.loads(overlay))


# ---------------------------------------------------------------- metrics windows and status events

_WINDOW_NUMBERS = ("seconds", "defect_rate", "confidence_p05", "confidence_p50", "confidence_p95", "latency_p50",
                   "latency_p95", "latency_p99", "brightness", "contrast", "sharpness")
_WINDOW_COUNTS = ("frames", "good", "defect", "uncertain", "dropped", "errors")


def window_row(window: Window) -> Row:
    row: Row = {**origin_row(window.origin, window.end), "start": window.start, "end": window.end,
                "model_name": window.model_name, "model_version": window.model_version,
                "by_class": dumps(dict(window.by_class)),
                "confidence_psi": window.confidence_psi, "brightness_psi": window.brightness_psi}
    row.update({name: int(getattr(window, name)) for name in _WINDOW_COUNTS})
    row.update({name: float(getattr(window, name)) for name in _WINDOW_NUMBERS})
    return row


def window_from(row: Mapping[str, Any]) -> Window:
    return Window(
        origin=origin_from(row), start=str(row["start"]), end=str(row["end"]), model_name=str(row["model_name"]),
        model_version=str(row["model_version"]),
        by_class={k: int(v) for k, v in json.loads(row["by_class"]).items()},
        confidence_psi=_opt_float(row.get("confidence_psi")), brightness_psi=_opt_float(row.get("brightness_psi")),
        **{name: int(row[name]) for name in _WINDOW_COUNTS},
        **{name: float(row[name]) for name in _WINDOW_NUMBERS},  # type: ignore[arg-type]  # names fixed above
    )


def status_row(event: StatusEvent) -> Row:
    return {**origin_row(event.origin), "event": event.event, "state": event.state,
            "uptime_s": float(event.uptime_s), "model_name": event.model_name, "model_version": event.model_version,
            "outbox_depth": event.outbox_depth, "outbox_bytes": event.outbox_bytes,
            "outbox_evicted": event.outbox_evicted, "error": event.error, "detail": dumps(dict(event.detail))}


def status_from(row: Mapping[str, Any]) -> StatusEvent:
    return StatusEvent(
        origin=origin_from(row), event=str(row["event"]), state=str(row["state"]), uptime_s=float(row["uptime_s"]),
        model_name=_opt_str(row.get("model_name")), model_version=_opt_str(row.get("model_version")),
        outbox_depth=_opt_int(row.get("outbox_depth")), outbox_bytes=_opt_int(row.get("outbox_bytes")),
        outbox_evicted=_opt_int(row.get("outbox_evicted")), error=_opt_str(row.get("error")),
        detail=json.loads(row.get("detail") or "{}"),
    )


# ---------------------------------------------------------------- devices

_DEVICE_INTS = ("received", "min_seq", "max_seq", "reordered", "error_count")
_DEVICE_OPT_INTS = ("outbox_depth", "outbox_bytes", "outbox_evicted", "status_seq", "model_seq", "window_seq")
_DEVICE_STRS = ("thing", "line", "first_seen", "last_seen", "last_time")
_DEVICE_OPT_STRS = ("state", "last_event", "last_status_at", "model_name", "model_version", "last_error",
                    "last_error_at", "last_window_end")
DEVICE_COLUMNS = (*_DEVICE_STRS, *_DEVICE_INTS, "by_kind", "uptime_s", *_DEVICE_OPT_STRS, *_DEVICE_OPT_INTS)


def device_row(device: DeviceStatus) -> Row:
    row: Row = {name: getattr(device, name) for name in DEVICE_COLUMNS if name != "by_kind"}
    row["by_kind"] = dumps(dict(device.by_kind))
    return row


def device_from(row: Mapping[str, Any]) -> DeviceStatus:
    strs = {name: str(row[name]) for name in _DEVICE_STRS}
    ints = {name: int(row[name]) for name in _DEVICE_INTS}
    opt_strs = {name: _opt_str(row.get(name)) for name in _DEVICE_OPT_STRS}
    opt_ints = {name: _opt_int(row.get(name)) for name in _DEVICE_OPT_INTS}
    by_kind = {k: int(v) for k, v in json.loads(row["by_kind"]).items()}
    return DeviceStatus(**strs, **ints, **opt_strs, **opt_ints,  # type: ignore[arg-type]  # names checked above
                        by_kind=by_kind, uptime_s=_opt_float(row.get("uptime_s")))


# ---------------------------------------------------------------- reviews, decisions, runs

REVIEW_COLUMNS = ("alert_id", "n", "review_id", "reviewer", "time", "action", "verdict", "label", "previous_verdict",
                  "previous_label", "undoes", "line", "thing", "predicted_label", "model_version")


def review_row(review: Review) -> Row:
    row: Row = {name: getattr(review, name) for name in REVIEW_COLUMNS}
    row["sk"] = sort_key(review.time, review.review_id)
    row["month"] = review.time[:7]
    return row


def review_from(row: Mapping[str, Any]) -> Review:
    return Review(
        alert_id=str(row["alert_id"]), n=int(row["n"]), review_id=str(row["review_id"]),
        reviewer=str(row["reviewer"]), time=str(row["time"]), action=str(row["action"]),
        verdict=_opt_str(row.get("verdict")), label=_opt_str(row.get("label")),
        previous_verdict=_opt_str(row.get("previous_verdict")), previous_label=_opt_str(row.get("previous_label")),
        undoes=_opt_int(row.get("undoes")), line=str(row["line"]), thing=str(row["thing"]),
        predicted_label=str(row["predicted_label"]), model_version=str(row["model_version"]),
    )


def decision_row(decision: Decision) -> Row:
    body = {"triggers": list(decision.triggers), "blocked_by": list(decision.blocked_by),
            "checks": [{"name": c.name, "fired": c.fired, "summary": c.summary, "numbers": dict(c.numbers)}
                       for c in decision.checks]}
    return {"decision_id": decision.decision_id, "scope": decision.scope, "time": decision.time,
            "action": decision.action, "sk": sort_key(decision.time, decision.decision_id),
            "month": decision.time[:7], "body": dumps(body)}


def decision_from(row: Mapping[str, Any]) -> Decision:
    body = json.loads(row["body"])
    checks = tuple(Check(c["name"], bool(c["fired"]), c["summary"], c["numbers"]) for c in body["checks"])
    return Decision(str(row["decision_id"]), str(row["scope"]), str(row["time"]), str(row["action"]),
                    tuple(body["triggers"]), tuple(body["blocked_by"]), checks)


def run_row(run: Run) -> Row:
    return {"run_id": run.run_id, "scope": run.scope, "requested": run.requested, "status": run.status,
            "sk": sort_key(run.requested, run.run_id),
            "body": dumps({"decision_id": run.decision_id, "finished": run.finished,
                           "model_version": run.model_version, "detail": dict(run.detail)})}


def run_from(row: Mapping[str, Any]) -> Run:
    body = json.loads(row["body"])
    return Run(str(row["run_id"]), str(row["scope"]), str(row["requested"]), str(row["status"]),
               body["decision_id"], body["finished"], body["model_version"], body["detail"])
