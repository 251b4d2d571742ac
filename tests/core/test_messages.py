"""Message schemas: valid messages round-trip, anything malformed is refused by name."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from qcsight_core import messages
from qcsight_core.errors import ConfigError, MessageError
from qcsight_core.topics import alerts_topic, line_signal_topic, metrics_topic, parse_topic, status_topic


def metrics_message() -> dict[str, Any]:
    return {
        **messages.envelope(messages.METRICS, "line-1", 7),
        "window": {"start": "2026-01-01T00:00:00Z", "end": "2026-01-01T00:01:00Z", "seconds": 60},
        "model": {"name": "tile", "version": "3"},
        "counts": {"frames": 10, "good": 8, "defect": 1, "uncertain": 1, "dropped": 0, "errors": 0},
        "by_class": {"good": 8, "crack": 1, "spot": 1},
        "defect_rate": 0.1,
        "confidence": {"p05": 0.5, "p50": 0.9, "p95": 0.99},
        "latency_ms": {"p50": 5.0, "p95": 7.5, "p99": 9.0},
        "input": {"brightness": 120.5, "contrast": 30.1, "sharpness": 250.0},
        "drift": {"confidence_psi": 0.01, "brightness_psi": None},
    }


def alert_message() -> dict[str, Any]:
    return {
        **messages.envelope(messages.ALERT, "line-1", 8),
        "alert_id": "a1", "frame_id": "f1", "model": {"name": "tile", "version": "3"},
        "verdict": {"status": "defect", "label": "crack", "score": 0.9, "confidence": 0.8,
                    "scores": {"good": 0.1, "crack": 0.8, "spot": 0.1}},
        "thumbnail": {"format": "jpeg", "width": 64, "height": 48, "data": "AAAA"},
        "image_ref": "s3://qc-images/images/line-1/2026-01-01/a1.jpg",
        "image_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    }


def status_message() -> dict[str, Any]:
    return {**messages.envelope(messages.STATUS, "line-1", 9), "event": "heartbeat", "state": "running",
            "uptime_s": 12.5, "outbox": {"depth": 3, "bytes": 900, "evicted": 0}}


@pytest.mark.parametrize("factory", [metrics_message, alert_message, status_message])
def test_round_trip(factory: Any) -> None:
    message = factory()
    assert messages.decode(messages.encode(message)) == message


def test_every_message_gets_a_unique_id() -> None:
    ids = {messages.envelope(messages.STATUS, "t", i)["message_id"] for i in range(100)}
    assert len(ids) == 100


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda m: m.pop("seq"), r"message\.seq: required"),
        (lambda m: m.__setitem__("seq", "7"), r"message\.seq: expected int, got str"),
        (lambda m: m.__setitem__("seq", -1), r"message\.seq: must be 0 or more"),
        (lambda m: m["counts"].pop("dropped"), r"message\.counts\.dropped: required"),
        (lambda m: m["counts"].__setitem__("frames", True), r"message\.counts\.frames: expected int, got bool"),
        (lambda m: m["by_class"].__setitem__("crack", 1.5), r"message\.by_class\.crack: expected int"),
        (lambda m: m.__setitem__("defect_rate", float("nan")), r"message\.defect_rate: must be a finite"),
        (lambda m: m.__setitem__("schema", "qcsight.metrics/2"), "unsupported major version"),
        (lambda m: m.__setitem__("schema", "acme.metrics/1"), "unknown schema"),
    ],
)
def test_malformed_metrics_are_refused_by_field(mutate: Any, error: str) -> None:
    message = copy.deepcopy(metrics_message())
    mutate(message)
    with pytest.raises(MessageError, match=error):
        messages.validate(message)


def test_minor_version_is_accepted() -> None:
    message = status_message()
    message["schema"] = "qcsight.status/1.4"
    assert messages.validate(message) == messages.STATUS


def test_bad_alert_status_and_status_event() -> None:
    alert = alert_message()
    alert["verdict"]["status"] = "maybe"
    with pytest.raises(MessageError, match=r"verdict\.status: 'maybe' is not one of"):
        messages.validate(alert)
    status = status_message()
    status["event"] = "reboot"
    with pytest.raises(MessageError, match=r"message\.event"):
        messages.validate(status)


def test_an_alert_from_before_image_upload_still_reads_and_the_image_hash_is_checked() -> None:
    older = alert_message()
    del older["image_sha256"]
    older["image_ref"] = "f1.jpg"  # a file name in the device's local image store
    assert messages.validate(older) == messages.ALERT
    alert = alert_message()
    alert["image_sha256"] = 12
    with pytest.raises(MessageError, match=r"message\.image_sha256: expected str"):
        messages.validate(alert)


def test_payloads_that_are_not_messages() -> None:
    with pytest.raises(MessageError, match="not valid JSON"):
        messages.decode(b"\xff\xfe{")
    with pytest.raises(MessageError, match="expected a JSON object"):
        messages.decode(json.dumps([1, 2]))
    with pytest.raises(MessageError, match="schema: required"):
        messages.decode("{}")


def test_topics_are_scoped_by_thing() -> None:
    assert metrics_topic("line-1") == "qcsight/line-1/metrics"
    assert alerts_topic("line-1") == "qcsight/line-1/alerts"
    assert status_topic("line-1") == "qcsight/line-1/status"
    assert line_signal_topic("line-1") == "qcsight/line-1/line/reject"
    assert parse_topic("qcsight/line-1/alerts") == ("line-1", "alerts")
    for bad in ("a/b", "line/1", "", "x" * 129, "+", "#"):
        with pytest.raises(ConfigError, match="thing_name"):
            metrics_topic(bad)
    with pytest.raises(ConfigError):
        parse_topic("qcsight/line-1/other")
