"""Device-to-cloud message schemas (qcsight.metrics/1, qcsight.alert/1, qcsight.status/1).

Each message carries a unique id and a per-device sequence number so the cloud can drop
duplicates of an at-least-once delivery. Validation runs on both ends; an unknown major
version is refused, never guessed at.

Within a major version a schema only grows: new fields are optional, and readers ignore
fields they do not know (validate checks the ones it knows), so an older reader takes a
newer writer's message and the reverse. qcsight.alert/1 grew this way by `box` (the hottest
region of an anomaly bundle's score map, relative to the judged image) and `overlay` (a
thumbnail of that image with the score map blended in).

An alert's full image: ``image_ref`` says where it is, ``image_sha256`` what it is.
``s3://<bucket>/<prefix>images/<thing>/<YYYY-MM-DD>/<alert_id>.jpg`` (``image_key``) when the
device uploads images: the alert names the object before the upload finishes (the alert must
not wait for a slow or offline link), and the object exists only once complete (one signed PUT,
which S3 makes visible whole or not at all), so its existence is the signal that the upload
finished (an S3 event notification, or a HEAD when someone opens the alert). An image that will
never arrive (evicted from a full backlog, refused for good) is named in a status ``error``
message's ``detail.images_lost``. ``file://...`` for a folder target (written under a temporary
name and renamed when complete); a bare file name in the device's local image store when
nothing uploads.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from qcsight_core.errors import MessageError

METRICS, ALERT, STATUS = "qcsight.metrics/1", "qcsight.alert/1", "qcsight.status/1"
STATUS_EVENTS = ("start", "stop", "model_change", "model_rejected", "error", "heartbeat")
VERDICT_STATUSES = ("good", "defect", "uncertain")

_NUMBER = (int, float)


@dataclass(frozen=True)
class Field:
    """One field: its type(s), whether required, and for objects the nested fields."""

    types: tuple[type, ...]
    required: bool = True
    fields: Mapping[str, Field] | None = None
    choices: tuple[str, ...] | None = None
    values: tuple[type, ...] | None = None  # type of every value in a free-keyed object


def _req(*types: type, **kw: Any) -> Field:
    return Field(types, True, **kw)


def _opt(*types: type, **kw: Any) -> Field:
    return Field(types, False, **kw)


_MODEL = {"name": _req(str), "version": _req(str)}
_ENVELOPE = {
    "schema": _req(str),
    "message_id": _req(str),
    "thing": _req(str),
    "seq": _req(int),
    "time": _req(str),
}
_QUANTILES = {"p50": _req(*_NUMBER), "p95": _req(*_NUMBER), "p99": _req(*_NUMBER)}
_THUMBNAIL = {"format": _req(str), "width": _req(int), "height": _req(int), "data": _req(str)}

SCHEMAS: dict[str, dict[str, Field]] = {
    METRICS: {
        **_ENVELOPE,
        "window": _req(dict, fields={"start": _req(str), "end": _req(str), "seconds": _req(*_NUMBER)}),
        "model": _req(dict, fields=_MODEL),
        "counts": _req(dict, fields={
            "frames": _req(int), "good": _req(int), "defect": _req(int), "uncertain": _req(int),
            "dropped": _req(int), "errors": _req(int),
        }),
        "by_class": _req(dict, values=(int,)),
        "defect_rate": _req(*_NUMBER),
        "confidence": _req(dict, fields={"p05": _req(*_NUMBER), "p50": _req(*_NUMBER), "p95": _req(*_NUMBER)}),
        "latency_ms": _req(dict, fields=_QUANTILES),
        "input": _req(dict, fields={"brightness": _req(*_NUMBER), "contrast": _req(*_NUMBER),
                                    "sharpness": _req(*_NUMBER)}),
        "drift": _req(dict, fields={"confidence_psi": _opt(*_NUMBER), "brightness_psi": _opt(*_NUMBER)}),
    },
    ALERT: {
        **_ENVELOPE,
        "alert_id": _req(str),
        "frame_id": _req(str),
        "model": _req(dict, fields=_MODEL),
        "verdict": _req(dict, fields={
            "status": _req(str, choices=VERDICT_STATUSES), "label": _req(str), "score": _req(*_NUMBER),
            "confidence": _req(*_NUMBER), "scores": _req(dict, values=_NUMBER),
        }),
        "thumbnail": _opt(dict, fields=_THUMBNAIL),
        "image_ref": _opt(str),
        "image_sha256": _opt(str),
        "box": _opt(dict, fields={"x0": _req(*_NUMBER), "y0": _req(*_NUMBER), "x1": _req(*_NUMBER),
                                  "y1": _req(*_NUMBER), "peak": _opt(*_NUMBER)}),
        "overlay": _opt(dict, fields=_THUMBNAIL),
    },
    STATUS: {
        **_ENVELOPE,
        "event": _req(str, choices=STATUS_EVENTS),
        "state": _req(str),
        "uptime_s": _req(*_NUMBER),
        "model": _opt(dict, fields=_MODEL),
        "outbox": _opt(dict, fields={"depth": _req(int), "bytes": _req(int), "evicted": _req(int),
                                     "dead_letters": _opt(int)}),
        "error": _opt(str),
        "detail": _opt(dict),
    },
}
SCHEMA_PREFIXES = {s.split("/")[0]: s for s in SCHEMAS}


_IMAGE_KEY = re.compile(r"^(?P<prefix>.*)images/(?P<thing>[A-Za-z0-9:_-]{1,128})/(?P<date>\d{4}-\d{2}-\d{2})/"
                        r"(?P<alert_id>[A-Za-z0-9_-]{1,128})\.jpg$")


def image_key(prefix: str, thing: str, epoch_s: float, alert_id: str) -> str:
    """Where an alert's full image goes in the bucket: ``<prefix>images/<thing>/<YYYY-MM-DD>/<alert_id>.jpg``.

    The date is the UTC day the image was stored on the device. The thing name in the key lets the
    role's IAM policy scope each device to its own images (``${credentials-iot:ThingName}``).
    """
    day = datetime.fromtimestamp(epoch_s, timezone.utc).strftime("%Y-%m-%d")
    key = f"{prefix}images/{thing}/{day}/{alert_id}.jpg"
    if not _IMAGE_KEY.match(key):
        raise MessageError(f"image key {key!r}: thing and alert id must be 1-128 of letters, digits, ':', '_', '-'")
    return key


def parse_image_key(key: str) -> tuple[str, str, str, str]:
    """(prefix, thing, date, alert_id) of an image key, e.g. from an S3 event; MessageError for any other key."""
    match = _IMAGE_KEY.match(key)
    if match is None:
        raise MessageError(f"image key {key!r}: expected <prefix>images/<thing>/<YYYY-MM-DD>/<alert_id>.jpg")
    return match["prefix"], match["thing"], match["date"], match["alert_id"]


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_message_id() -> str:
    return uuid.uuid4().hex


def _check(value: Any, spec: Field, path: str) -> None:
    if isinstance(value, bool) and bool not in spec.types:
        raise MessageError(f"{path}: expected {'/'.join(t.__name__ for t in spec.types)}, got bool")
    if not isinstance(value, spec.types):
        raise MessageError(f"{path}: expected {'/'.join(t.__name__ for t in spec.types)}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise MessageError(f"{path}: must be a finite number, got {value}")
    if spec.choices is not None and value not in spec.choices:
        raise MessageError(f"{path}: {value!r} is not one of {', '.join(spec.choices)}")
    data: Any = value  # isinstance above narrowed value to object for mypy
    if spec.fields is not None:
        _check_object(data, spec.fields, path)
    if spec.values is not None:
        for key, item in data.items():
            _check(item, Field(spec.values), f"{path}.{key}")


def _check_object(data: Mapping[str, Any], fields: Mapping[str, Field], path: str) -> None:
    for name, spec in fields.items():
        if name not in data or data[name] is None:
            if spec.required:
                raise MessageError(f"{path}.{name}: required field is missing")
            continue
        _check(data[name], spec, f"{path}.{name}")


def validate(message: Mapping[str, Any]) -> str:
    """Check a decoded message against its schema; returns the schema name.

    Raises:
        MessageError: not an object, unknown schema or major version, or a field of the wrong type.
    """
    if not isinstance(message, Mapping):
        raise MessageError(f"message: expected a JSON object, got {type(message).__name__}")
    schema = message.get("schema")
    if not isinstance(schema, str):
        raise MessageError("message.schema: required field is missing")
    prefix, _, version = schema.partition("/")
    known = SCHEMA_PREFIXES.get(prefix)
    if known is None:
        raise MessageError(f"message.schema: unknown schema {schema!r}")
    if version.split(".")[0] != known.split("/")[1]:
        raise MessageError(f"message.schema: unsupported major version {schema!r}; this qcsight reads {known!r}")
    _check_object(message, SCHEMAS[known], "message")
    if message["seq"] < 0:
        raise MessageError("message.seq: must be 0 or more")
    return known


def envelope(schema: str, thing: str, seq: int) -> dict[str, Any]:
    """The fields every message starts with."""
    return {"schema": schema, "message_id": new_message_id(), "thing": thing, "seq": seq, "time": utc_now()}


def encode(message: Mapping[str, Any]) -> bytes:
    """Validate and serialise a message to compact UTF-8 JSON."""
    validate(message)
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode("utf-8")


def decode(payload: bytes | str) -> dict[str, Any]:
    """Parse and validate a payload; raises MessageError for anything malformed."""
    try:
        message = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"message: not valid JSON: {exc}") from exc
    validate(message)
    return dict(message)
