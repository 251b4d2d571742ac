"""Waiting in tests: poll a condition until a deadline, never sleep a fixed time to let things settle."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(condition: Callable[[], T], timeout_s: float = 10.0, interval_s: float = 0.01,
               message: str | Callable[[], str] = "condition not reached") -> T:
    """Return the first truthy value of ``condition()``; fail the test if none comes within ``timeout_s``.

    ``message`` may be a callable so that the failure can describe the state at the deadline
    (what arrived, what the process printed) rather than the state when the wait began.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"{text} (waited {timeout_s:g} s)")
        time.sleep(interval_s)
