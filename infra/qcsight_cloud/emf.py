"""CloudWatch metrics in embedded metric format (EMF): JSON log lines CloudWatch Logs turns into metrics.

The ingestion Lambda writes one document per metrics window (fleet defect rate, drift, latency,
dropped frames by line and by device) and one per message outcome (stored, duplicate, dropped by
reason), so dashboards and alarms need no PutMetricData call and no extra permission.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from qcsight_cloud import timestamps
from qcsight_cloud.ingest import DROPPED, Outcome
from qcsight_cloud.records import Window

NAMESPACE = "qcsight"
# CloudWatch accepts metric timestamps up to two weeks in the past and two hours in the future;
# a window's own end time is used when it lies in that range, its arrival time otherwise.
_MAX_PAST = timedelta(days=14) - timedelta(minutes=5)
_MAX_FUTURE = timedelta(hours=2) - timedelta(minutes=5)


def _epoch_ms(time: str) -> int:
    return int(timestamps.parse(time).timestamp() * 1000)


def document(namespace: str, dimensions: list[list[str]], members: Mapping[str, str],
             metrics: Mapping[str, tuple[float, str]], timestamp_ms: int,
             properties: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One EMF document: dimension values and metric values are root members, as the format requires.

    Args:
        dimensions: dimension sets (lists of member names); every name must be in ``members``.
        members: dimension values (strings).
        metrics: metric name -> (value, CloudWatch unit).
        properties: further root members, searchable in Logs Insights but not metrics.
    """
    missing = {name for dims in dimensions for name in dims} - set(members)
    if missing:
        raise ValueError(f"EMF dimensions {sorted(missing)} have no value")
    return {
        "_aws": {
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": namespace,
                "Dimensions": dimensions,
                "Metrics": [{"Name": name, "Unit": unit} for name, (_, unit) in metrics.items()],
            }],
        },
        **(properties or {}),
        **members,
        **{name: value for name, (value, _) in metrics.items()},
    }


def window_document(window: Window, namespace: str = NAMESPACE) -> dict[str, Any]:
    """The metrics of one window, by line and by device."""
    end = timestamps.parse(window.end)
    received = timestamps.parse(window.origin.received)
    stamp = window.end if received - _MAX_PAST <= end <= received + _MAX_FUTURE else window.origin.received
    values: dict[str, tuple[float | None, str]] = {
        "Frames": (window.frames, "Count"),
        "Defects": (window.defect, "Count"),
        "Uncertain": (window.uncertain, "Count"),
        "DroppedFrames": (window.dropped, "Count"),
        "DefectRate": (window.defect_rate, "None"),
        "LatencyP95": (window.latency_p95, "Milliseconds"),
        "ConfidencePSI": (window.confidence_psi, "None"),
        "BrightnessPSI": (window.brightness_psi, "None"),
        "Brightness": (window.brightness, "None"),
    }
    metrics = {name: (float(value), unit) for name, (value, unit) in values.items() if value is not None}
    members = {"Line": window.origin.line, "Thing": window.origin.thing}
    return document(namespace, [["Line"], ["Line", "Thing"]], members, metrics, _epoch_ms(stamp),
                    {"ModelVersion": window.model_version, "MessageId": window.origin.message_id,
                     "WindowEnd": window.end})


def outcome_document(outcome: Outcome, received: str, namespace: str = NAMESPACE) -> dict[str, Any]:
    """One message's outcome: stored or duplicate by kind, dropped by reason."""
    one = {"Messages": (1.0, "Count")}
    if outcome.status == DROPPED:
        return document(namespace, [["Outcome", "Reason"]], {"Outcome": DROPPED, "Reason": outcome.reason or "unknown"},
                        one, _epoch_ms(received), {"Identity": outcome.identity, "Detail": outcome.detail})
    return document(namespace, [["Kind", "Outcome"]], {"Kind": outcome.kind or "unknown", "Outcome": outcome.status},
                    one, _epoch_ms(received), {"Thing": outcome.identity, "MessageId": outcome.message_id})
