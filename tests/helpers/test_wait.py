"""The polling helper returns the first truthy value and fails with the state at the deadline."""

from __future__ import annotations

import itertools

import pytest

from tests.helpers.wait import eventually


def test_returns_first_truthy_value() -> None:
    counter = itertools.count()
    assert eventually(lambda: next(counter) >= 3 and "done", timeout_s=5) == "done"


def test_fails_with_message_built_at_the_deadline() -> None:
    seen: list[int] = []
    with pytest.raises(AssertionError, match=r"seen [1-9][0-9]* values \(waited 0.05 s\)"):
        eventually(lambda: seen.append(1) and False, timeout_s=0.05, interval_s=0.03,
                   message=lambda: f"seen {len(seen)} values")
