"""MQTT topic names, built in one place and scoped by thing name."""

from __future__ import annotations

import re

from qcsight_core.errors import ConfigError

ROOT = "qcsight"
KINDS = ("metrics", "alerts", "status")
# IoT Core thing names: 1-128 of [a-zA-Z0-9:_-].
_THING_NAME = re.compile(r"^[A-Za-z0-9:_-]{1,128}$")


def check_thing_name(thing: str) -> str:
    if not isinstance(thing, str) or not _THING_NAME.match(thing):
        raise ConfigError("thing_name", thing, "1-128 characters from letters, digits, ':', '_' and '-'")
    return thing


def topic(thing: str, kind: str) -> str:
    if kind not in KINDS:
        raise ConfigError("topic kind", kind, f"one of {', '.join(KINDS)}")
    return f"{ROOT}/{check_thing_name(thing)}/{kind}"


def metrics_topic(thing: str) -> str:
    return topic(thing, "metrics")


def alerts_topic(thing: str) -> str:
    return topic(thing, "alerts")


def status_topic(thing: str) -> str:
    return topic(thing, "status")


def line_signal_topic(thing: str) -> str:
    """The local (never cloud) topic carrying the reject signal to the line controller."""
    return f"{ROOT}/{check_thing_name(thing)}/line/reject"


def parse_topic(name: str) -> tuple[str, str]:
    """(thing, kind) from a qcsight device topic; raises ConfigError for anything else."""
    parts = name.split("/")
    if len(parts) != 3 or parts[0] != ROOT or parts[2] not in KINDS:
        raise ConfigError("topic", name, f"{ROOT}/<thing>/<{'|'.join(KINDS)}>")
    return check_thing_name(parts[1]), parts[2]
