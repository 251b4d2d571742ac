"""Time for the agent: a Clock interface so windows and heartbeats can be driven by tests."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import Protocol


class Clock(Protocol):
    """Monotonic seconds for intervals, wall-clock seconds for timestamps in messages."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin; never goes back."""

    def time(self) -> float:
        """Seconds since the Unix epoch (UTC)."""


class SystemClock:
    """The real clocks."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told to; thread-safe so a test can advance it while the agent runs."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._lock = threading.Lock()
        self._mono = 0.0
        self._wall = start

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def time(self) -> float:
        with self._lock:
            return self._wall

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        with self._lock:
            self._mono += seconds
            self._wall += seconds


def iso_utc(epoch_s: float) -> str:
    """RFC 3339 UTC with milliseconds, the form every qcsight message uses."""
    stamp = datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")
