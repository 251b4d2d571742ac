"""How a configuration setting is declared and read: the machinery under qcsight_edge.config.

A setting is a dataclass field made with `setting(...)`: its default, and in its metadata its
bounds, choices and help. `Section` reads one mapping of a configuration by those fields (text
and integral floats coerced through `qcsight_core.checks`, then range-checked, errors naming
the field), and refuses keys no field declares. `default_of`, `settings_of` and `section_type`
are what the example file and the JSON Schema (config_docs.py) are written from.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Collection, Mapping
from dataclasses import MISSING, Field, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from qcsight_core.checks import check_int, check_number, check_size
from qcsight_core.errors import ConfigError

_INTEGER_TEXT = re.compile(r"^\s*[+-]?\d+\s*$")


def setting(default: Any = MISSING, *, help: str, low: float | None = None, high: float | None = None,
            open_low: bool = False, choices: tuple[str, ...] = (), size: bool = False, file: bool = False,
            state_file: str | None = None, example: Any = None, internal: bool = False,
            custom: bool = False, absent: Any = MISSING, default_factory: Any = MISSING) -> Any:
    """A configuration field: its default, and in its metadata what the reader, the schema and the example need.

    Args:
        help: what the setting does (the example file's comment, the schema's description).
        low, high, open_low: bounds of a number (``open_low``: more than ``low``).
        choices: the words a text setting allows.
        size: a byte count (an integer, or text such as '256MiB').
        file: a path that must name an existing file when given.
        state_file: a path whose default is this name inside ``state_dir``.
        example: what the example file shows for a required setting.
        internal: set by the program, not read from the configuration (the MQTT thing name, protocol).
        custom: read by the section's reader itself (a value of several types, or one needing another field).
        absent: the value when the configuration leaves the setting out, for a field the dataclass requires.
    """
    meta = {"help": help, "low": low, "high": high, "open_low": open_low, "choices": choices, "size": size,
            "file": file, "state_file": state_file, "example": example, "internal": internal, "custom": custom,
            "absent": absent}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def coerce_integer(value: Any) -> Any:
    """'10', ' 10 ' and 10.0 as 10; any other value unchanged."""
    if isinstance(value, str) and _INTEGER_TEXT.match(value):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def coerce_boolean(value: Any) -> Any:
    """'true' and 'false' (any case) as booleans; any other value unchanged (only these words are booleans)."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


def settings_of(cls: type) -> list[Field[Any]]:
    """The fields of a configuration dataclass the configuration holds (not the internal ones), in file order.

    A subclass's own fields come before those it inherits (a section's kind before its MQTT settings).
    """
    own = list(inspect.get_annotations(cls))
    listed = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}
    return [listed[n] for n in own if n in listed] + [f for n, f in listed.items() if n not in own]


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each field of a configuration dataclass."""
    if cls not in _FIELD_TYPES:
        _FIELD_TYPES[cls] = typing.get_type_hints(cls)
    return _FIELD_TYPES[cls]


def section_type(hint: Any) -> type | None:
    """The dataclass a field holds (``Roi | None`` -> Roi), or None for a plain value."""
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and is_dataclass(candidate):
            return candidate
    return None


def check_typed(settings: Any, f: Field[Any], value: Any) -> None:
    """A setting of an instance built in code (not read): its type and bounds, nothing coerced (the reader coerces).

    ``settings.where`` names the section in the error (``mqtt.port``).
    """
    name = f"{settings.where}.{f.name}"
    hint = field_types(type(settings))[f.name]
    meta = f.metadata
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(name, value, "true or false")
    if hint in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                 or (hint is int and not isinstance(value, int))):
        raise ConfigError(name, value, "an integer" if hint is int else "a number")
    if hint is int:
        check_int(name, value, _int(meta["low"]), _int(meta["high"]))
    elif hint is float:
        check_number(name, value, meta["low"], meta["high"], open_low=meta["open_low"])
    elif meta["choices"] and value not in meta["choices"]:
        raise ConfigError(name, value, f"one of {', '.join(meta['choices'])}")
    elif hint is str and not isinstance(value, str):
        raise ConfigError(name, value, "a string")
    elif meta["file"] and value is not None and (not isinstance(value, Path) or not str(value)):
        raise ConfigError(name, value, "a path to a PEM file")


def _int(bound: float | None) -> int | None:
    return None if bound is None else int(bound)


def default_of(f: Field[Any], state_dir: Path | None = None) -> Any:
    """What a setting is when the configuration leaves it out: MISSING when it is required."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    if f.metadata.get("absent", MISSING) is not MISSING:
        return f.metadata["absent"]
    if f.metadata.get("state_file"):
        return (state_dir or Path("qcsight-state")) / f.metadata["state_file"]
    return MISSING


def plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in settings_of(type(value))}
    if isinstance(value, Path):
        return str(value)
    return value


class Section:
    """Typed reads from one mapping that remember which keys were used, to refuse unknown ones."""

    def __init__(self, data: Any, prefix: str, base_dir: Path | None) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(prefix or "configuration", data, "a mapping of settings")
        self.data = data
        self.prefix = prefix
        self.base_dir = base_dir
        self.used: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def raw(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        value = self.data.get(key, default)
        return default if value is None else value

    def required(self, key: str) -> Any:
        value = self.raw(key)
        if value is None or value == "":
            raise ConfigError(self.name(key), None, "required")
        return value

    def section(self, key: str) -> Section:
        return Section(self.raw(key, {}), self.name(key), self.base_dir)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(key, default)
        if value not in choices:
            raise ConfigError(self.name(key), value, f"one of {', '.join(choices)}")
        return str(value)

    def boolean(self, key: str, default: bool) -> bool:
        given = self.raw(key, default)
        value = coerce_boolean(given)
        if not isinstance(value, bool):
            raise ConfigError(self.name(key), given, "true or false")
        return value

    def integer(self, key: str, default: int, low: int | None, high: int | None = None) -> int:
        return check_int(self.name(key), self.raw(key, default), low, high)

    def number(self, key: str, default: float, low: float | None, high: float | None = None, *,
               open_low: bool = False) -> float:
        return check_number(self.name(key), self.raw(key, default), low, high, open_low=open_low)

    def size(self, key: str, default: int, low: int) -> int:
        """A byte count: an integer or a string such as '256MiB' or '1GB'."""
        return check_size(self.name(key), self.raw(key, default), low)

    def text(self, key: str, default: str = "") -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise ConfigError(self.name(key), value, "a string")
        return value

    def path(self, key: str, default: str | Path | None = None) -> Path:
        value = self.required(key) if default is None else self.raw(key, str(default))
        if not isinstance(value, str):
            raise ConfigError(self.name(key), value, "a path")
        path = Path(value).expanduser()
        if not path.is_absolute() and self.base_dir is not None:
            path = self.base_dir / path
        return path

    def optional_path(self, key: str) -> Path | None:
        return None if self.raw(key) in (None, "") else self.path(key)

    def existing_file(self, key: str) -> Path | None:
        path = self.optional_path(key)
        if path is not None and not path.is_file():
            raise ConfigError(self.name(key), str(path), "an existing file")
        return path

    def finish(self) -> None:
        unknown = sorted(str(k) for k in self.data if k not in self.used)
        if unknown:
            where = self.prefix or "the configuration"
            raise ConfigError(self.name(unknown[0]), self.data[unknown[0]],
                              f"a known setting of {where}: {', '.join(sorted(self.used))}")



    def read(self, cls: type, name: str, *, default: Any = MISSING, low: float | None = None,
             state_dir: Path | None = None) -> Any:
        """One setting of cls, read by its type and metadata; default and low override the definition's."""
        f = next(f for f in fields(cls) if f.name == name)
        hint = field_types(cls)[name]
        meta = f.metadata
        if default is MISSING:
            default = default_of(f, state_dir)
        low = meta["low"] if low is None else low
        if hint is bool:
            return self.boolean(name, default)
        if hint is int and meta["size"]:
            return self.size(name, default, int(low or 0))
        if hint is int:
            return self.integer(name, _none_if_missing(default), _int(low), _int(meta["high"]))
        if hint is float:
            return self.number(name, default, low, meta["high"], open_low=meta["open_low"])
        if meta["choices"]:
            return self.choice(name, default, meta["choices"])
        if hint is str:
            return self.text(name, default)
        if hint is Path:
            return self.path(name, None if default is MISSING else default)
        if meta["file"]:
            return self.existing_file(name)
        if hint == Path | None:
            return self.optional_path(name)
        raise TypeError(f"{cls.__name__}.{name}: no reader for {hint}")  # a definition error, found by the tests

    def read_all(self, cls: type, *, defaults: Mapping[str, Any] | None = None,
                 lows: Mapping[str, float] | None = None, state_dir: Path | None = None,
                 skip: Collection[str] = ()) -> dict[str, Any]:
        """Every plain setting of cls (not sections, not custom ones, not those in skip), by name."""
        values: dict[str, Any] = {}
        for f in settings_of(cls):
            if f.name in skip or f.metadata["custom"] or section_type(field_types(cls)[f.name]) is not None:
                continue
            values[f.name] = self.read(cls, f.name, default=(defaults or {}).get(f.name, MISSING),
                                       low=(lows or {}).get(f.name), state_dir=state_dir)
        return values


def _none_if_missing(value: Any) -> Any:
    """A required integer: the check names it when absent (None is never an integer)."""
    return None if value is MISSING else value
