"""Time for the agent: one Clock (read it, wait on it) so windows, heartbeats, timeouts and backoff can be driven by
tests; and the one exponential Backoff every retry loop uses."""

from __future__ import annotations

import random
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

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        """Block until ``event`` is set or ``timeout_s`` passed; returns whether it was set."""


class SystemClock:
    """The real clocks."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        return event.wait(max(timeout_s, 0.0))


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

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        """Returns at once: the event's state, after moving the clock by timeout_s when it is not set."""
        if not event.is_set():
            self.advance(max(timeout_s, 0.0))
        return event.is_set()

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        with self._lock:
            self._mono += seconds
            self._wall += seconds


class Backoff:
    """Exponential backoff: the cap starts at min_s and doubles up to max_s with each delay; reset() starts again.

    With an ``rng`` each delay is drawn from [min_s, cap] (jitter, so a fleet that lost its link at
    the same moment does not come back in step); without one each delay is the cap itself (the
    camera's reconnect: 0.5, 1, 2, ... s, as its configuration documents). ``full_jitter`` draws
    from [0, cap] instead (the MQTT 3.1.1 reconnect, as the SDK's MQTT5 client does).
    """

    def __init__(self, min_s: float, max_s: float, rng: random.Random | None = None, *,
                 full_jitter: bool = False) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self._rng = rng
        self._floor = 0.0 if full_jitter else min_s
        self._cap = min_s

    def next(self) -> float:
        delay = self._cap if self._rng is None else self._rng.uniform(self._floor, self._cap)
        self._cap = min(self._cap * 2, self.max_s)
        return delay

    def reset(self) -> None:
        self._cap = self.min_s


def iso_utc(epoch_s: float) -> str:
    """RFC 3339 UTC with milliseconds, the form every qcsight message uses."""
    stamp = datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")
