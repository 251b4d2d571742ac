"""Helpers for the agent tests: real video files, reading what an outbox file holds, agent configurations,
the real `qcsight agent` process."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
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


REPO = Path(__file__).resolve().parents[2]


class AgentProcess:
    """The real `qcsight agent --config` process, its output appended to one log file across restarts."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO / "edge_agent")}
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            self.process = subprocess.Popen([sys.executable, "-m", "qcsight_core.cli", "agent", "--config",
                                             str(self.config_path)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                            cwd=self.config_path.parent)

    @property
    def running(self) -> bool:
        """The process started last says it is running (its signal handlers are installed by then)."""
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            return b" running: model " in log.read()

    def signal(self, signum: int, timeout_s: float = 30.0) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        return self.process.wait(timeout_s)

    def signal_stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM; returns the exit code."""
        return self.signal(signal.SIGTERM, timeout_s)

    def kill(self) -> None:
        """SIGKILL (kill -9), and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
