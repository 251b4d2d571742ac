"""Device messages and ingestion inputs for the cloud tests, built with qcsight_core like the agent builds them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from qcsight_cloud import timestamps
from qcsight_cloud.ingest import Incoming
from qcsight_core import messages, topics

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=timezone.utc)
KIND_OF_SCHEMA = {messages.METRICS: "metrics", messages.ALERT: "alerts", messages.STATUS: "status"}


def _envelope(schema: str, thing: str, seq: int, time: datetime) -> dict[str, Any]:
    message = messages.envelope(schema, thing, seq)
    message["time"] = timestamps.iso(time)
    return message


def metrics(thing: str, seq: int, end: datetime, *, frames: int = 100, defects: int = 2, confidence_psi: float = 0.02,
            brightness_psi: float | None = 0.01, model: str = "3", dropped: int = 0, latency_p95: float = 7.5,
            window_s: float = 60.0) -> dict[str, Any]:
    start = end - timedelta(seconds=window_s)
    return {
        **_envelope(messages.METRICS, thing, seq, end),
        "window": {"start": timestamps.iso(start), "end": timestamps.iso(end), "seconds": window_s},
        "model": {"name": "tile", "version": model},
        "counts": {"frames": frames, "good": frames - defects, "defect": defects, "uncertain": 0, "dropped": dropped,
                   "errors": 0},
        "by_class": {"good": frames - defects, "crack": defects},
        "defect_rate": defects / frames if frames else 0.0,
        "confidence": {"p05": 0.5, "p50": 0.9, "p95": 0.99},
        "latency_ms": {"p50": 5.0, "p95": latency_p95, "p99": latency_p95 + 2},
        "input": {"brightness": 120.0, "contrast": 30.0, "sharpness": 250.0},
        "drift": {"confidence_psi": confidence_psi, "brightness_psi": brightness_psi},
    }


def alert(thing: str, seq: int, time: datetime, *, label: str = "crack", status: str = "defect", score: float = 0.9,
          model: str = "3", thumbnail: bool = True) -> dict[str, Any]:
    message = {
        **_envelope(messages.ALERT, thing, seq, time),
        "alert_id": f"{thing}-alert-{seq}", "frame_id": f"{thing}-frame-{seq}",
        "model": {"name": "tile", "version": model},
        "verdict": {"status": status, "label": label, "score": score, "confidence": score,
                    "scores": {"good": round(1 - score, 6), label: score}},
        "image_ref": f"file:///var/qcsight/images/{thing}-{seq}.jpg",
    }
    if thumbnail:
        message["thumbnail"] = {"format": "jpeg", "width": 64, "height": 48, "data": "AAEC"}
    return message


def status(thing: str, seq: int, time: datetime, *, event: str = "heartbeat", state: str = "running",
           error: str | None = None, model: str | None = "3", outbox_depth: int = 0) -> dict[str, Any]:
    message: dict[str, Any] = {
        **_envelope(messages.STATUS, thing, seq, time), "event": event, "state": state, "uptime_s": float(seq),
        "outbox": {"depth": outbox_depth, "bytes": outbox_depth * 100, "evicted": 0},
    }
    if model is not None:
        message["model"] = {"name": "tile", "version": model}
    if error is not None:
        message["error"] = error
    return message


def incoming(message: dict[str, Any], *, identity: str | None = None, topic: str | None = None,
             received: datetime | None = None) -> Incoming:
    """The message as it arrives from its own thing (unless identity/topic say otherwise)."""
    thing = str(message["thing"])
    kind = KIND_OF_SCHEMA[message["schema"]]
    when = received or timestamps.parse(message["time"])
    return Incoming(identity or thing, topic or topics.topic(thing, kind), messages.encode(message),
                    timestamps.iso(when))
