"""The annotated example configuration and the JSON Schema of the agent's configuration, both from its definition.

``python -m qcsight_edge.config_docs`` writes ``edge_agent/agent.example.yaml`` and
``edge_agent/agent.schema.json``; ``--check`` exits 1 naming the file that is stale (a test runs
it, so a setting changed in `qcsight_edge.config` without regenerating fails the suite).
Nothing here is written by hand: each key, its default, its bounds and its comment come from the
dataclass fields and their ``setting(...)`` metadata.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import textwrap
import typing
from dataclasses import MISSING, Field
from pathlib import Path
from typing import Any

from qcsight_edge.config import AgentConfig
from qcsight_edge.settings import default_of, field_types, section_type, settings_of

EXAMPLE = "agent.example.yaml"
SCHEMA = "agent.schema.json"
WIDTH = 110
_SIZE_PATTERN = r"^\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]i?[bB]?|[bB])?\s*$"

HEADER = """\
# qcsight edge agent configuration: `qcsight agent --config agent.yaml`
#
# Written by `python -m qcsight_edge.config_docs` from qcsight_edge/config.py; do not edit by hand.
# Every setting is shown with its default unless marked "required". Relative paths are resolved
# against the folder of this file. Unknown keys are refused (a typo never passes silently), and a
# bad value stops the agent before anything starts with a message naming the field, e.g.
#   qcsight agent: error: invalid configuration source.max_fps=-1: a number from 0.0 to 1000.0
# Numbers and booleans may also be given as text ('0.5', 'true') and whole numbers as 10.0, as
# Greengrass serves them; they are range-checked all the same. Check a file without running it:
# `qcsight agent --config agent.yaml --check`. JSON Schema of this file: agent.schema.json.
#
# Under Greengrass (`qcsight agent --greengrass`) the same keys come from the component
# configuration; `accessControl` is ignored. Proposed updates are validated with these same rules.
"""


# ---------------------------------------------------------------- the example file


def example_yaml() -> str:
    """The annotated example configuration: every setting with its default (or an example where required)."""
    lines = [HEADER]
    _section_lines(AgentConfig, lines, indent="")
    return "\n".join(lines).rstrip("\n") + "\n"


def _section_lines(cls: type, lines: list[str], indent: str) -> None:
    for f in settings_of(cls):
        hint = field_types(cls)[f.name]
        nested = section_type(hint)
        help_text = f.metadata["help"]
        if nested is not None:
            doc = inspect.cleandoc(nested.__doc__ or "")
            lines.append("")
            lines.extend(_comment(f"{f.name}: {doc}" if doc else help_text, indent))
            optional = f.default is None and any(default_of(g) is MISSING for g in settings_of(nested))
            if optional:  # roi: off unless given, and then its keys are required
                lines.append(f"{indent}{f.name}: null")
                lines.append(f"{indent}# {f.name}:")
                _commented_section(nested, lines, indent + "#   ")
            else:
                lines.append(f"{indent}{f.name}:")
                _section_lines(nested, lines, indent + "  ")
            continue
        if lines[-1].startswith(" "):  # the first setting after a section
            lines.append("")
        lines.extend(_comment(_described(f, hint), indent))
        lines.append(f"{indent}{f.name}: {_yaml_scalar(_shown_default(f))}")


def _commented_section(cls: type, lines: list[str], indent: str) -> None:
    for f in settings_of(cls):
        lines.append(f"{indent}{f.name}: {_yaml_scalar(_shown_default(f))}")


def _described(f: Field[Any], hint: Any) -> str:
    meta = f.metadata
    text = str(meta["help"])
    if meta["choices"]:
        text += f" [{' | '.join(meta['choices'])}]"
    bounds = _bounds_text(f, hint)
    if bounds:
        text += f" [{bounds}]"
    if default_of(f) is MISSING:
        text += " (required)"
    return text


def _bounds_text(f: Field[Any], hint: Any) -> str:
    meta = f.metadata
    if hint not in (int, float):
        return ""
    low, high = meta["low"], meta["high"]
    parts = []
    if low is not None:
        parts.append(f"> {low}" if meta["open_low"] else f">= {low}")
    if high is not None:
        parts.append(f"<= {high}")
    kind = "bytes" if meta["size"] else ("integer" if hint is int else "number")
    return " ".join([kind, *parts])


def _shown_default(f: Field[Any]) -> Any:
    value = default_of(f)
    if value is MISSING:
        return f.metadata["example"]
    if f.metadata["size"] and isinstance(value, int):
        return _human_size(value)
    return str(value) if isinstance(value, Path) else value


def _human_size(value: int) -> int | str:
    for unit, scale in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value and value % scale == 0:
            return f"{value // scale}{unit}"
    return value


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return str(value)
    text = str(value)
    return json.dumps(text) if text == "" or any(c in text for c in ":#{}[],&*!|>'\"%@`") else text


def _comment(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, width=WIDTH - len(indent), initial_indent=f"{indent}# ",
                         subsequent_indent=f"{indent}#   ", break_on_hyphens=False) or [f"{indent}#"]


# ---------------------------------------------------------------- the JSON Schema


def json_schema() -> dict[str, Any]:
    """The configuration as JSON Schema (2020-12): types, bounds, choices, defaults, descriptions; no unknown keys."""
    schema = _object_schema(AgentConfig)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://qcsight.example/schemas/agent-config.json",
            "title": "qcsight edge agent configuration",
            "description": "Written by `python -m qcsight_edge.config_docs` from qcsight_edge/config.py. Values are "
                           "shown in their typed form; the agent also accepts numbers and booleans as text and whole "
                           "numbers as floats (as Greengrass serves them), range-checked all the same.",
            **schema}


def _object_schema(cls: type) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    required: list[str] = []
    for f in settings_of(cls):
        hint = field_types(cls)[f.name]
        properties[f.name] = _property_schema(f, hint)
        if _required(f, hint):
            required.append(f.name)
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if cls.__doc__:
        schema["description"] = inspect.cleandoc(cls.__doc__).split("\n\n")[0]
    if required:
        schema["required"] = required
    return schema


def _required(f: Field[Any], hint: Any) -> bool:
    """Whether a configuration must give the key: no default, and for a section, a key of its own without one."""
    nested = section_type(hint)
    if default_of(f) is not MISSING:
        return False
    return nested is None or any(_required(g, field_types(nested)[g.name]) for g in settings_of(nested))


def _property_schema(f: Field[Any], hint: Any) -> dict[str, Any]:
    meta = f.metadata
    nested = section_type(hint)
    if nested is not None:
        body = _object_schema(nested)
        body["description"] = meta["help"]
        optional = type(None) in typing.get_args(hint)
        return {"anyOf": [body, {"type": "null"}], "description": meta["help"]} if optional else body
    schema: dict[str, Any] = {"description": meta["help"]}
    if meta["choices"]:
        schema["enum"] = list(meta["choices"])
    elif hint is bool:
        schema["type"] = "boolean"
    elif hint is int and meta["size"]:
        schema["anyOf"] = [{"type": "integer", "minimum": meta["low"] or 0},
                           {"type": "string", "pattern": _SIZE_PATTERN}]
    elif hint in (int, float):
        schema["type"] = "integer" if hint is int else "number"
        if meta["low"] is not None:
            schema["exclusiveMinimum" if meta["open_low"] else "minimum"] = meta["low"]
        if meta["high"] is not None:
            schema["maximum"] = meta["high"]
    else:
        types = [t for t in (typing.get_args(hint) or (hint,)) if t is not type(None)]
        names = sorted({"integer" if t is int else "string" for t in types})
        nullable = type(None) in typing.get_args(hint)
        schema["type"] = [*names, "null"] if nullable else (names[0] if len(names) == 1 else names)
    default = default_of(f)
    if default is not MISSING and not meta["state_file"]:
        schema["default"] = str(default) if isinstance(default, Path) else default
    return schema


def schema_json() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=False) + "\n"


# ---------------------------------------------------------------- the command


def outputs() -> dict[str, str]:
    """File name (in edge_agent/) -> its content."""
    return {EXAMPLE: example_yaml(), SCHEMA: schema_json()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qcsight_edge.config_docs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path(__file__).resolve().parents[1],
                        help="where agent.example.yaml and agent.schema.json live (default: edge_agent/)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file differs from the "
                        "definition")
    args = parser.parse_args(argv)
    stale = []
    for name, text in outputs().items():
        path = args.dir / name
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"stale: {', '.join(stale)} in {args.dir}; run python -m qcsight_edge.config_docs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
