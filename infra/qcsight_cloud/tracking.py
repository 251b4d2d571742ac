"""A device's status after one more accepted message: pure, and the same for both stores.

Delivery is at least once and may reorder, so every field says which message set it: the
latest-by-seq status, model and window win, whatever order they arrive in; ``last_seen`` is the
cloud's clock of the latest arrival (silence is measured against it, never the device's clock).
Both stores call :func:`advance` under their own concurrency control (a SQLite transaction; a
DynamoDB conditional write on ``received``), so a duplicate is never counted twice.
"""

from __future__ import annotations

from dataclasses import replace

from qcsight_cloud.records import Alert, DeviceStatus, Record, StatusEvent, Window

KIND_OF = {Alert: "alerts", Window: "metrics", StatusEvent: "status"}


def kind_of(record: Record) -> str:
    return KIND_OF[type(record)]


def _newer(seq: int, guard: int | None) -> bool:
    return guard is None or seq > guard


def advance(device: DeviceStatus | None, record: Record) -> DeviceStatus:
    """The device's status once ``record`` (new, not a duplicate) is accepted."""
    origin = record.origin
    kind = kind_of(record)
    if device is None:
        device = DeviceStatus(thing=origin.thing, line=origin.line, first_seen=origin.received,
                              last_seen=origin.received, last_time=origin.time, received=0, by_kind={},
                              min_seq=origin.seq, max_seq=origin.seq, reordered=0)
    by_kind = dict(device.by_kind)
    by_kind[kind] = by_kind.get(kind, 0) + 1
    seq = origin.seq
    reordered = device.reordered + (1 if device.received and seq < device.max_seq else 0)
    updated = replace(
        device,
        line=origin.line,
        last_seen=max(device.last_seen, origin.received),
        last_time=origin.time if seq >= device.max_seq else device.last_time,
        received=device.received + 1,
        by_kind=by_kind,
        min_seq=min(device.min_seq, seq),
        max_seq=max(device.max_seq, seq),
        reordered=reordered,
    )
    if isinstance(record, StatusEvent):
        updated = _status(updated, record)
    if isinstance(record, (Window, StatusEvent)) and record.model_version is not None \
            and _newer(seq, updated.model_seq):
        updated = replace(updated, model_name=record.model_name, model_version=record.model_version, model_seq=seq)
    if isinstance(record, Window) and _newer(seq, updated.window_seq):
        updated = replace(updated, last_window_end=record.end, window_seq=seq)
    return updated


def _status(device: DeviceStatus, event: StatusEvent) -> DeviceStatus:
    seq = event.origin.seq
    if event.event == "error" or event.error:
        # Every error counts, in any order; the newest (by seq) is the one shown.
        device = replace(device, error_count=device.error_count + 1)
        if device.last_error_at is None or event.origin.time >= device.last_error_at:
            device = replace(device, last_error=event.error or "error", last_error_at=event.origin.time)
    if not _newer(seq, device.status_seq):
        return device
    return replace(
        device,
        state=event.state,
        last_event=event.event,
        last_status_at=event.origin.time,
        uptime_s=event.uptime_s,
        outbox_depth=event.outbox_depth if event.outbox_depth is not None else device.outbox_depth,
        outbox_bytes=event.outbox_bytes if event.outbox_bytes is not None else device.outbox_bytes,
        outbox_evicted=event.outbox_evicted if event.outbox_evicted is not None else device.outbox_evicted,
        status_seq=seq,
    )
