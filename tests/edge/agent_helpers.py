"""Helpers for the agent tests: real video files, reading what an outbox file holds, agent configurations."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from qcsight_core import messages
from tests.helpers.images import write_image


def write_video(path: Path, values: Sequence[int], size: tuple[int, int] = (48, 64), fps: float = 25.0) -> Path:
    """An MJPG .avi whose frame i is a flat grey of values[i] (real file, real codec)."""
    height, width = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise OSError(f"cannot write {path}")
    for value in values:
        writer.write(np.full((height, width, 3), value, np.uint8))
    writer.release()
    return path


def write_atomically(path: Path, value: int, size: tuple[int, int] = (60, 80), seed: int = 0) -> Path:
    """A real image dropped into a hot folder the way a line should: written under a hidden name, then renamed.

    With settle_s 0 (the tests' setting) a file written in place could be read half-written.
    """
    partial = path.with_name("." + path.name)  # a leading dot: never read; the suffix still tells cv2 the format
    write_image(partial, value=value, size=size, seed=seed)
    os.replace(partial, path)
    return path


def outbox_messages(path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Every message stored in an outbox file, oldest first, decoded and schema-checked.

    Opened read-only beside a running agent (SQLite WAL lets a reader in), so tests see exactly
    what the sender would publish.
    """
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        query = "SELECT payload FROM messages" + (" WHERE kind = ?" if kind else "") + " ORDER BY id"
        rows = db.execute(query, (kind,) if kind else ()).fetchall()
    finally:
        db.close()
    return [messages.decode(bytes(row[0])) for row in rows]


def by_schema(stored: list[dict[str, Any]], schema: str) -> list[dict[str, Any]]:
    return [m for m in stored if m["schema"] == schema]


def status_events(stored: list[dict[str, Any]]) -> list[str]:
    return [m["event"] for m in stored if m["schema"] == messages.STATUS]


def agent_config(tmp_path: Path, bundle: Path, **overrides: Any) -> dict[str, Any]:
    """A minimal agent configuration (as parsed YAML) with everything under tmp_path."""
    data: dict[str, Any] = {
        "thing_name": "line1-cam1",
        "state_dir": str(tmp_path / "state"),
        "model": {"bundle": str(bundle), "warmup_runs": 1, "intra_op_threads": 1},
        "source": {"kind": "hotfolder", "uri": str(tmp_path / "inbox"), "settle_s": 0.0, "poll_s": 0.02},
        "line_signal": {"kind": "none"},
        "metrics": {"window_s": 60, "heartbeat_s": 30},
        "config_reload_s": 0,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def to_json(data: Any) -> str:
    return json.dumps(data)
