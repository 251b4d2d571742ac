"""Times in the store: UTC, millisecond precision, ``YYYY-MM-DDTHH:MM:SS.mmmZ``.

One fixed-width form makes time strings sort as times do, which both stores rely on: SQLite
indexes and DynamoDB sort keys compare strings. Devices send ISO-8601 with an offset; anything
without one is refused rather than guessed to be UTC.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from qcsight_core.errors import MessageError

WIDTH = len("2026-01-01T00:00:00.000Z")


def iso(moment: datetime) -> str:
    """The canonical string of an aware datetime."""
    if moment.tzinfo is None:
        raise ValueError(f"{moment!r} has no timezone; qcsight stores UTC times only")
    utc = moment.astimezone(timezone.utc)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def parse(text: str) -> datetime:
    """An aware datetime from any ISO-8601 string with an offset (``Z`` included)."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset")
    return moment.astimezone(timezone.utc)


def canonical(text: object, field: str) -> str:
    """Canonical form of a device time; MessageError names the field when it is not ISO-8601 with an offset."""
    if not isinstance(text, str):
        raise MessageError(f"{field}: expected an ISO-8601 time string, got {type(text).__name__}")
    try:
        return iso(parse(text))
    except ValueError as exc:
        raise MessageError(f"{field}: {text!r} is not an ISO-8601 time with a UTC offset ({exc})") from None


def now() -> datetime:
    return datetime.now(timezone.utc)


def seconds_between(earlier: str, later: str) -> float:
    return (parse(later) - parse(earlier)) / timedelta(seconds=1)
