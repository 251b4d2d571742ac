"""The whole agent on real peers: a hot folder of real image files, the tiny ONNX model, a SQLite outbox.

Windows and heartbeats run on a ManualClock; the SIGTERM test runs the real `qcsight agent` process.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

from qcsight_core import messages
from qcsight_core.errors import BundleIntegrityError
from qcsight_edge.agent import Agent, FileConfigWatcher, build_parts
from qcsight_edge.capture import DONE_DIR, FAILED_DIR
from qcsight_edge.clock import ManualClock
from qcsight_edge.config import AgentConfig, load_config
from qcsight_edge.line_signal import CallbackLineSignal
from tests.edge.agent_helpers import agent_config, by_schema, outbox_messages, status_events, write_atomically
from tests.edge.broker import Pki, free_port
from tests.helpers.images import write_image
from tests.helpers.models import make_tiny_bundle
from tests.helpers.wait import eventually

REPO = Path(__file__).resolve().parents[2]


class RunningAgent:
    def __init__(self, tmp_path: Path, config_data: dict[str, Any], watch: Path | None = None) -> None:
        self.config_path = tmp_path / "agent.yaml"
        self.config_path.write_text(yaml.safe_dump(config_data))
        self.config = load_config(self.config_path)
        self.parts = build_parts(self.config)
        self.rejects: list[Mapping[str, Any]] = []
        self.parts.line_signal = CallbackLineSignal(self.rejects.append)
        self.clock = ManualClock()
        self.agent = Agent(self.config, self.parts, clock=self.clock,
                           config_poll=FileConfigWatcher(self.config_path) if watch else None)
        self.inbox = Path(str(self.config.source.uri))

    def drop(self, name: str, value: int) -> None:
        write_atomically(self.inbox / name, value)  # never seen half-written (settle_s is 0 here)

    def wait_judged(self, count: int) -> None:
        def done() -> bool:
            stats = self.parts.source.stats()
            return bool(stats["done"] + stats["failed"] >= count)

        eventually(done)
        assert self.agent.outputs is not None and self.agent.outputs.flush(10.0)  # alerts are built off-thread

    def stored(self) -> list[dict[str, Any]]:
        return outbox_messages(self.config.outbox.path)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[RunningAgent]:
    make_tiny_bundle(tmp_path / "bundle-v1", version="1")
    data = agent_config(tmp_path, tmp_path / "bundle-v1", config_reload_s=1)
    run = RunningAgent(tmp_path, data, watch=tmp_path / "agent.yaml")
    yield run
    run.agent.stop()


def test_frames_become_alerts_line_signals_metrics_and_status(running: RunningAgent) -> None:
    agent = running.agent
    agent.start()
    running.drop("001-dark.png", 20)
    running.drop("002-bright.png", 240)
    (running.inbox / "003-garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 corrupt part picture")
    running.wait_judged(3)
    running.clock.advance(60)
    agent.tick()  # closes the 60 s window and sends the 30 s heartbeat

    stored = running.stored()
    assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1))
    assert status_events(stored) == ["start", "heartbeat"]
    start = by_schema(stored, messages.STATUS)[0]
    assert start["model"] == {"name": "tiny", "version": "1"} and start["state"] == "running"
    assert start["outbox"]["depth"] == 0  # nothing was stored before the start message itself

    (alert,) = by_schema(stored, messages.ALERT)
    assert alert["verdict"]["status"] == "defect" and alert["source"] == "002-bright.png"
    assert alert["model"]["version"] == "1"
    thumb = alert["thumbnail"]
    assert max(thumb["width"], thumb["height"]) <= 160
    decoded = cv2.imdecode(np.frombuffer(base64.b64decode(thumb["data"]), np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (thumb["height"], thumb["width"], 3) and decoded.mean() > 200
    full = cv2.imread(str(running.config.image_store.dir / alert["image_ref"]))
    assert full.shape == (60, 80, 3)

    assert [r["frame_id"] for r in running.rejects] == [alert["frame_id"]]
    assert running.rejects[0]["reject"] is True and running.rejects[0]["source"] == "002-bright.png"

    (metrics,) = by_schema(stored, messages.METRICS)
    assert metrics["counts"] == {"frames": 2, "good": 1, "defect": 1, "uncertain": 0, "dropped": 0, "errors": 1}
    assert metrics["window"]["seconds"] == 60.0 and metrics["defect_rate"] == 0.5
    assert set(metrics["drift"]) == {"confidence_psi", "brightness_psi"}
    assert 20 < metrics["input"]["brightness"] < 240

    heartbeat = by_schema(stored, messages.STATUS)[-1]
    assert heartbeat["detail"]["frames"]["judged"] == 2 and heartbeat["detail"]["frames"]["errors"] == 1
    assert heartbeat["outbox"]["depth"] == len(stored) - 1
    assert sorted(p.name for p in (running.inbox / DONE_DIR).iterdir()) == ["001-dark.png", "002-bright.png"]
    assert [p.name for p in (running.inbox / FAILED_DIR).iterdir()] == ["003-garbage.jpg"]

    assert agent.stop() is True  # transport none: everything is persisted, nothing to flush
    final = outbox_messages(running.config.outbox.path)
    assert status_events(final)[-1] == "stop"
    assert by_schema(final, messages.STATUS)[-1]["state"] == "stopped"


def test_hot_swap_from_a_changed_config_file_and_refusal_of_a_tampered_bundle(running: RunningAgent,
                                                                              tmp_path: Path) -> None:
    agent = running.agent
    agent.start()
    running.drop("a.png", 240)
    running.wait_judged(1)

    make_tiny_bundle(tmp_path / "bundle-v2", version="2")
    data = yaml.safe_load(running.config_path.read_text())
    data["model"]["bundle"] = str(tmp_path / "bundle-v2")
    running.config_path.write_text(yaml.safe_dump(data))
    running.clock.advance(1.0)
    agent.tick()  # sees the changed file, loads v2 in the background
    assert agent.models is not None and agent.models.wait_idle(10.0)
    running.drop("b.png", 240)
    running.wait_judged(2)

    make_tiny_bundle(tmp_path / "bundle-v3", version="3")
    with (tmp_path / "bundle-v3" / "model.onnx").open("r+b") as handle:
        handle.seek(40)
        handle.write(b"\x7f")
    data["model"]["bundle"] = str(tmp_path / "bundle-v3")
    data["model"]["precision"] = "fp32"
    running.config_path.write_text(yaml.safe_dump(data))
    running.clock.advance(1.0)
    agent.tick()
    assert agent.models.wait_idle(10.0)
    running.drop("c.png", 240)
    running.wait_judged(3)

    stored = running.stored()
    alerts = by_schema(stored, messages.ALERT)
    assert [(a["source"], a["model"]["version"]) for a in alerts] == [("a.png", "1"), ("b.png", "2"), ("c.png", "2")]
    assert status_events(stored) == ["start", "model_change", "model_rejected"]
    change = next(m for m in stored if m.get("event") == "model_change")
    assert change["model"]["version"] == "2" and change["detail"]["previous"]["version"] == "1"
    rejected = next(m for m in stored if m.get("event") == "model_rejected")
    assert rejected["model"]["version"] == "2"  # the running model stays
    assert "bundle-v3" in rejected["detail"]["bundle"] and "sha256" in rejected["error"]
    # The v1 window was closed at the swap, so its metrics carry v1 (drift is per model).
    metrics = by_schema(stored, messages.METRICS)
    assert [m["model"]["version"] for m in metrics] == ["1"] and metrics[0]["counts"]["frames"] == 1


def test_invalid_config_change_is_refused_and_reported(running: RunningAgent) -> None:
    running.agent.start()
    data = yaml.safe_load(running.config_path.read_text())
    data["queue_size"] = -1
    running.config_path.write_text(yaml.safe_dump(data))
    running.clock.advance(1.0)
    running.agent.tick()
    error = [m for m in running.stored() if m.get("event") == "error"]
    assert len(error) == 1 and "queue_size" in error[0]["error"]
    assert running.agent.config.queue_size == 4


def test_the_reload_loop_survives_any_bad_config_file_and_applies_the_next_good_one(running: RunningAgent,
                                                                                  tmp_path: Path) -> None:
    agent = running.agent
    agent.start()
    good = yaml.safe_load(running.config_path.read_text())

    def reload() -> None:
        running.clock.advance(1.0)
        agent.tick()  # must never raise: the line keeps running whatever the file holds

    bad_versions: list[Callable[[Path], object]] = [
        lambda p: p.write_text("thing_name: [unclosed\n"),
        lambda p: p.write_bytes(b"\xff\xfe not utf-8 \x00\x01"),
        lambda p: p.write_text(yaml.safe_dump({**good, "stop_deadline_s": 10**400})),
        lambda p: p.write_text(yaml.safe_dump({**good, "outbox": {"max_bytes": "1" + "0" * 400}})),
        lambda p: p.write_text("- a list\n- not a mapping\n"),
        lambda p: p.unlink(),
        lambda p: p.mkdir(),  # replaced by something that cannot be read
    ]
    for write in bad_versions:
        write(running.config_path)
        reload()
    running.config_path.rmdir()

    make_tiny_bundle(tmp_path / "bundle-v2", version="2")
    running.config_path.write_text(yaml.safe_dump({**good, "model": {**good["model"],
                                                                    "bundle": str(tmp_path / "bundle-v2")}}))
    reload()
    assert agent.models is not None and agent.models.wait_idle(10.0)
    running.drop("after.png", 240)
    running.wait_judged(1)
    alerts = by_schema(running.stored(), messages.ALERT)
    assert [a["model"]["version"] for a in alerts] == ["2"]
    errors = [m["error"] for m in running.stored() if m.get("event") == "error"]
    assert len(errors) == 6 and any("stop_deadline_s" in e for e in errors), errors
    assert agent.pipeline is not None and agent.pipeline.fatal is None


def test_a_tampered_bundle_at_start_is_refused_with_an_error_status(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path / "bundle")
    (tmp_path / "bundle" / "model.onnx").write_bytes(b"tampered")
    config = AgentConfig.from_dict(agent_config(tmp_path, tmp_path / "bundle"))
    parts = build_parts(config)
    agent = Agent(config, parts, clock=ManualClock())
    with pytest.raises(BundleIntegrityError):
        agent.start()
    agent.stop()
    error, stop = outbox_messages(config.outbox.path)
    assert error["event"] == "error" and "sha256" in error["error"] and str(tmp_path / "bundle") in error["error"]
    assert error["state"] == "failed" and "model" not in error
    assert stop["event"] == "stop"


def test_sigterm_stops_the_real_agent_process_with_exit_0_and_the_outbox_persisted(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path / "bundle")
    data = agent_config(tmp_path, tmp_path / "bundle",
                        source={"kind": "synthetic", "size": 64, "max_fps": 50, "defect_rate": 0.5, "uri": None},
                        metrics={"window_s": 3600, "heartbeat_s": 3600})
    del data["source"]["settle_s"], data["source"]["poll_s"]
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(data))
    outbox = tmp_path / "state" / "outbox.db"
    env = {**os.environ, "PYTHONPATH": str(REPO / "edge_agent")}
    process = subprocess.Popen([sys.executable, "-m", "qcsight_core.cli", "agent", "--config",
                                str(tmp_path / "agent.yaml")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=env, cwd=tmp_path)
    try:
        def alerts_stored() -> bool:
            try:
                return len(outbox_messages(outbox, "alerts")) >= 3
            except Exception:
                return False  # the database is not created yet

        eventually(alerts_stored, 30.0)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    log_text = output.decode(errors="replace")
    assert process.returncode == 0, log_text
    assert "SIGTERM received" in log_text
    stored = outbox_messages(outbox)
    assert status_events(stored)[0] == "start" and status_events(stored)[-1] == "stop"
    assert stored[-1]["event"] == "stop"
    (metrics,) = by_schema(stored, messages.METRICS)  # the last, partial window is not lost
    alerts = by_schema(stored, messages.ALERT)
    assert metrics["counts"]["defect"] + metrics["counts"]["uncertain"] == len(alerts)
    assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1))
    wal = tmp_path / "state" / "outbox.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # closed cleanly: the WAL was checkpointed


def test_an_unreachable_broker_never_holds_up_the_line(tmp_path: Path, pki: Pki) -> None:
    make_tiny_bundle(tmp_path / "bundle")
    ident = pki.identity("line1-cam1")
    data = agent_config(tmp_path, tmp_path / "bundle", stop_deadline_s=1.0, transport={
        "kind": "mqtt5", "endpoint": "127.0.0.1", "port": free_port(), "cert": str(ident.cert), "key": str(ident.key),
        "ca": str(pki.ca), "connect_timeout_s": 3.0, "iot_core_limits": False})
    config = AgentConfig.from_dict(data)
    parts = build_parts(config)
    agent = Agent(config, parts, clock=ManualClock())
    inbox = Path(str(config.source.uri))
    write_image(inbox / "early.png", value=240, size=(40, 40))
    started = time.monotonic()
    agent.start()
    eventually(lambda: (inbox / DONE_DIR / "early.png").exists(), 10.0, message="the part was never judged")
    judged_at = time.monotonic() - started
    assert judged_at < 2.5  # judged while the transport was still trying to connect
    assert time.monotonic() - started < 2.5 and agent.sender is not None and not agent.sender.stats().connected
    assert agent.outputs is not None and agent.outputs.flush(5.0)
    stop_began = time.monotonic()
    assert agent.stop() is False  # nothing could be delivered ...
    assert time.monotonic() - stop_began < 6.0  # ... and stopping kept to its deadline
    stored = outbox_messages(config.outbox.path)
    assert [m["schema"] for m in stored].count(messages.ALERT) == 1  # ... but everything is kept for later
    assert status_events(stored) == ["start", "stop"]
