"""Configuration values checked one way everywhere: coerced from text or an integral float, then range-checked.

Configuration reaches qcsight typed loosely: YAML gives ints and floats, SageMaker passes every
hyperparameter as a string, Greengrass Lite returns YAML numbers as strings (``'0.5'``), and a
configuration merge can turn ``10`` into ``10.0``. Each check accepts those spellings, returns
the value in its proper type, and otherwise raises `ConfigError` naming the field, the value and
what is allowed. ``True`` is never a number, NaN and infinity never pass, and an overflow (a
400-digit integer where a float is wanted, ``1e400``) is a ConfigError, not an OverflowError.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Iterable
from decimal import Decimal, InvalidOperation
from typing import TypeVar

from qcsight_core.errors import ConfigError

T = TypeVar("T")

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
# An integer setting ends up in C somewhere (SQLite, a socket, a seed): 64 bits at most, bound or not.
INT_MAX = 2**63 - 1
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
               "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def _bounds(kind: str, low: float | None, high: float | None, open_low: bool = False, open_high: bool = False) -> str:
    if low is not None and high is not None and not open_low and not open_high:
        return f"{kind} from {low} to {high}"
    parts = []
    if low is not None:
        parts.append(f"more than {low}" if open_low else f"at least {low}")
    if high is not None:
        parts.append(f"below {high}" if open_high else f"at most {high}")
    return f"{kind} " + " and ".join(parts) if parts else kind


def _as_int(value: object) -> int | None:
    """The integer a value spells, or None: an int, an integral finite float, or such a number as text."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:  # also Python's limit on the digits of an int
            pass
        try:
            number = float(text)
        except ValueError:
            return None
        return int(number) if math.isfinite(number) and number.is_integer() else None
    return None


def _as_float(value: object) -> float | None:
    """The finite float a value spells, or None (bools, NaN, infinities and overflows are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):  # OverflowError: an int too large for a float
        return None
    return number if math.isfinite(number) else None


def check_int(field: str, value: object, low: int | None = None, high: int | None = None) -> int:
    """An integer within [low, high] (either bound optional, never above INT_MAX); '10' and 10.0 are 10."""
    number = _as_int(value)
    limit = INT_MAX if high is None else high
    if number is None or (low is not None and number < low) or number > limit:
        raise ConfigError(field, value, _bounds("an integer", low, high) + _beyond_int_max(number, high))
    return number


def _beyond_int_max(number: int | None, high: int | None) -> str:
    return " (and below 2**63)" if high is None and number is not None and number > INT_MAX else ""


def check_number(field: str, value: object, low: float | None = None, high: float | None = None, *,
                 open_low: bool = False, open_high: bool = False) -> float:
    """A finite number within [low, high]; open_low/open_high exclude the bound. '0.5' is 0.5."""
    number = _as_float(value)
    ok = number is not None
    if number is not None and low is not None:
        ok = number > low if open_low else number >= low
    if ok and number is not None and high is not None:
        ok = number < high if open_high else number <= high
    if number is None or not ok:
        kind = "a number" if low is not None or high is not None else "a finite number"
        raise ConfigError(field, value, _bounds(kind, low, high, open_low, open_high))
    return number


def check_choice(field: str, value: object, choices: Iterable[str]) -> str:
    """One of the choices, compared exactly (no case folding: the choices are identifiers)."""
    allowed = tuple(choices)
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(field, value, f"one of {', '.join(allowed)}")
    return value


def check_bool(field: str, value: object) -> bool:
    """A boolean, or the words true/false, yes/no, on/off, 1/0 (SageMaker passes booleans as text)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (str, int)):
        text = str(value).strip().lower()
        if text in TRUE_WORDS:
            return True
        if text in FALSE_WORDS:
            return False
    raise ConfigError(field, value, "true or false")


def check_size(field: str, value: object, low: int = 0, high: int | None = None) -> int:
    """A byte count: an integer, or text such as '256MiB', '1.5GB', '4096' (k/M/G/T are 1000s, Ki/Mi/... 1024s)."""
    parsed = None
    if isinstance(value, str) and (match := _SIZE.match(value)):
        unit = (match.group(2) or "").lower().rstrip("b")
        try:  # Decimal: exact for any length of digits, where a float would overflow or round
            parsed = int(Decimal(match.group(1)) * _SIZE_UNITS[unit])
        except InvalidOperation:
            parsed = None
    elif not isinstance(value, str):
        parsed = _as_int(value)
    limit = INT_MAX if high is None else high
    if parsed is None or parsed < low or parsed > limit:
        allowed = _bounds("a byte count", low, high) + _beyond_int_max(parsed, high)
        raise ConfigError(field, value, allowed + ": an integer or e.g. '256MiB'")
    return parsed


def argument(check: Callable[..., T], *bounds: object, **options: object) -> Callable[[str], T]:
    """An argparse ``type=`` made from a check: argparse names the flag, the check says what is allowed.

    ``argument(check_int, 1)`` accepts a whole number of at least 1, and refuses anything else with
    e.g. ``argument --instance-count: an integer at least 1, got '0'``.
    """
    def parse(text: str) -> T:
        try:
            return check("", text, *bounds, **options)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(f"{exc.allowed}, got {text!r}") from None

    parse.__name__ = check.__name__.removeprefix("check_")  # argparse names the type in some messages
    return parse
