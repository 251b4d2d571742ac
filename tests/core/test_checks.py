"""Checking a configuration value: text and integral floats coerced, then range-checked; errors name the field."""

from __future__ import annotations

import argparse

import pytest

from qcsight_core.checks import (
    INT_MAX,
    argument,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_size,
)
from qcsight_core.errors import ConfigError

HUGE = int("9" * 400)


@pytest.mark.parametrize(("value", "expected"), [(10, 10), ("10", 10), (" 10 ", 10), (10.0, 10), ("10.0", 10),
                                                 ("1e3", 1000), (-3, -3)])
def test_int_accepts_what_yaml_sagemaker_and_greengrass_send(value: object, expected: int) -> None:
    result = check_int("f", value)
    assert result == expected and type(result) is int


@pytest.mark.parametrize("value", [10.5, "10.5", True, "ten", None, [1], "1e400", float("inf"), float("nan"),
                                   "9" * 5000, HUGE, INT_MAX + 1])
def test_int_refuses_what_is_not_a_whole_number_naming_the_field(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        check_int("sender.window", value)
    assert caught.value.field == "sender.window"
    assert str(caught.value).startswith("invalid configuration sender.window=")
    assert len(str(caught.value)) < 300, "a 400-digit value is cut short in the message"


def test_int_bounds_are_in_the_message() -> None:
    assert check_int("port", "65535", 1, 65535) == 65535
    with pytest.raises(ConfigError, match=r"^invalid configuration mqtt\.port=0: an integer from 1 to 65535$"):
        check_int("mqtt.port", 0, 1, 65535)
    with pytest.raises(ConfigError, match=r"an integer at least 1$"):
        check_int("window", "-2", 1)
    with pytest.raises(ConfigError, match=r"an integer at most 5$"):
        check_int("window", 6, high=5)
    with pytest.raises(ConfigError, match=r"an integer at least 0 \(and below 2\*\*63\)$"):
        check_int("seed", HUGE, 0)


@pytest.mark.parametrize(("value", "expected"), [("0.5", 0.5), (1, 1.0), (" 2e-3 ", 0.002), (0.0, 0.0)])
def test_number_accepts_text_and_ints(value: object, expected: float) -> None:
    result = check_number("f", value)
    assert result == expected and type(result) is float


@pytest.mark.parametrize("value", [True, "nan", "inf", float("-inf"), "1e400", HUGE, "fast", None, "0x10"])
def test_number_refuses_bools_non_finite_and_overflow(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        check_number("lr", value)
    assert caught.value.field == "lr" and "a finite number" in caught.value.allowed


def test_number_bounds_open_and_closed() -> None:
    with pytest.raises(ConfigError, match=r"^invalid configuration source\.max_fps=-1: a number at least 0\.0$"):
        check_number("source.max_fps", -1, 0.0)
    assert check_number("f", 1.0, 0.0, 1.0) == 1.0
    with pytest.raises(ConfigError, match=r"a number at least 0\.0 and below 1\.0$"):
        check_number("val", 1.0, 0.0, 1.0, open_high=True)
    with pytest.raises(ConfigError, match=r"a number more than 0 and at most 100$"):
        check_number("max_payload_mb", "0", 0, 100, open_low=True)
    assert check_number("max_payload_mb", "100", 0, 100, open_low=True) == 100.0


def test_choice_and_bool() -> None:
    assert check_choice("amp", "bf16", ("auto", "bf16")) == "bf16"
    with pytest.raises(ConfigError, match=r"amp='BF16': one of auto, bf16$"):
        check_choice("amp", "BF16", ("auto", "bf16"))
    with pytest.raises(ConfigError):
        check_choice("amp", 1, ("1",))
    assert [check_bool("b", v) for v in (True, "true", "Yes", "on", "1", 1)] == [True] * 6
    assert [check_bool("b", v) for v in (False, "false", "NO", "off", "0", 0)] == [False] * 6
    for bad in ("maybe", 2, 1.0, None):
        with pytest.raises(ConfigError, match="true or false"):
            check_bool("hflip", bad)


@pytest.mark.parametrize(("value", "expected"), [
    ("256MiB", 256 * 1024**2), ("1.5GB", 1_500_000_000), ("1 gib", 1024**3), ("4096", 4096), (4096, 4096),
    (4096.0, 4096), ("10k", 10_000), ("7b", 7),
])
def test_size_reads_counts_and_units(value: object, expected: int) -> None:
    assert check_size("outbox.max_bytes", value) == expected


@pytest.mark.parametrize("value", ["lots", "-1MiB", "1e3MB", True, "9" * 400 + "MiB", HUGE, "100", 0.5])
def test_size_refuses_nonsense_and_overflow(value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        check_size("outbox.max_bytes", value, 1024)
    assert caught.value.field == "outbox.max_bytes" and "'256MiB'" in caught.value.allowed


def test_argument_lets_argparse_name_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="p")
    parser.add_argument("--count", type=argument(check_int, 1))
    parser.add_argument("--recall", type=argument(check_number, 0.0, 1.0, open_low=True))
    assert parser.parse_args(["--count", "3", "--recall", "1"]).count == 3
    with pytest.raises(SystemExit):
        parser.parse_args(["--count", "0"])
    assert "argument --count: an integer at least 1, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--recall", "0"])
    assert "argument --recall: a number more than 0.0 and at most 1.0, got '0'" in capsys.readouterr().err
