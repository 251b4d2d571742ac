"""Secrets and privacy: camera credentials never leave the device; its files are private; an exposed key is flagged."""

from __future__ import annotations

import logging
import shutil
import stat
from pathlib import Path

import cv2
import numpy as np
import pytest

from qcsight_edge.agent import Agent, AgentParts, build_parts
from qcsight_edge.capture import OpenCvCamera
from qcsight_edge.clock import ManualClock
from qcsight_edge.config import AgentConfig
from qcsight_edge.imagestore import ImageStore
from qcsight_edge.line_signal import NoLineSignal
from qcsight_edge.outbox import Outbox
from qcsight_edge.redact import printable, redact_uri
from tests.edge.agent_helpers import agent_config, outbox_messages, write_video
from tests.edge.broker import Pki, free_port
from tests.helpers.models import make_tiny_bundle
from tests.helpers.wait import eventually

SECRET_URI = "rtsp://admin:s3cret-pw@127.0.0.1:9/stream1?channel=2&token=tok-4242"
SECRETS = ("admin", "s3cret-pw", "tok-4242")


def test_redact_uri() -> None:
    assert redact_uri(SECRET_URI) == "rtsp://***:***@127.0.0.1:9/stream1?channel=2&token=***"
    assert redact_uri("http://cam.local/video.cgi?user=admin&pwd=x&fps=5") == \
        "http://cam.local/video.cgi?user=***&pwd=***&fps=5"
    assert redact_uri("rtsp://cam.local:554/live") == "rtsp://cam.local:554/live"
    assert redact_uri(0) == "0" and redact_uri("/videos/line.avi") == "/videos/line.avi"
    assert "x" not in redact_uri("rtsp://u:x@[bad/stream").split("://")[1].replace("***", "")
    assert printable("a\nb\x1bc\\") == "a\\nb\\x1bc\\\\"


def test_camera_credentials_never_reach_a_message_the_status_config_echo_or_a_log_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_tiny_bundle(tmp_path / "bundle")
    data = agent_config(tmp_path, tmp_path / "bundle", source={"kind": "camera", "uri": SECRET_URI, "max_fps": 0})
    del data["source"]["settle_s"], data["source"]["poll_s"]
    config = AgentConfig.from_dict(data)
    video = write_video(tmp_path / "bright.avi", [240] * 5)
    with caplog.at_level(logging.DEBUG):
        # The camera as configured, opening for real: refused (nothing listens on port 9), logged, retried.
        unreachable = OpenCvCamera(config.source, live=True)
        assert unreachable.read(0.5) is None and unreachable.failed_opens == 1
        # The same URI through a capture that plays a real video of bright (defect) parts.
        camera = OpenCvCamera(config.source, capture_factory=lambda _uri: cv2.VideoCapture(str(video)), live=True)
        parts = AgentParts(source=camera, outbox=Outbox(config.outbox.path), line_signal=NoLineSignal(),
                           image_store=ImageStore(config.image_store.dir, config.image_store.max_bytes))
        agent = Agent(config, parts, clock=ManualClock())
        agent.start()
        try:
            eventually(lambda: len(outbox_messages(config.outbox.path, "alerts")) >= 2)
        finally:
            agent.stop()
    stored = outbox_messages(config.outbox.path)
    alerts = [m for m in stored if m["schema"] == "qcsight.alert/1"]
    assert alerts and {a["source"] for a in alerts} == {"rtsp://***:***@127.0.0.1:9/stream1?channel=2&token=***"}
    start = next(m for m in stored if m.get("event") == "start")
    assert start["detail"]["config"]["source"]["uri"].startswith("rtsp://***:***@")
    payloads = Path(config.outbox.path).read_bytes() + b"".join(
        p.read_bytes() for p in Path(config.outbox.path).parent.glob("outbox.db*"))
    assert "cannot open rtsp://***:***@127.0.0.1:9" in caplog.text
    for secret in SECRETS:
        assert secret not in caplog.text, secret
        assert secret.encode() not in payloads, secret
        assert all(secret not in str(m) for m in stored), secret


def test_outbox_and_image_store_are_private(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path / "bundle")
    config = AgentConfig.from_dict(agent_config(tmp_path, tmp_path / "bundle"))
    parts = build_parts(config)
    try:
        assert parts.image_store is not None
        parts.image_store.save("frame-1", np.zeros((8, 8, 3), np.uint8))
        parts.outbox.next_seq()
    finally:
        parts.outbox.close()
    state = config.outbox.path.parent
    assert _mode(state) == 0o700 and _mode(config.image_store.dir) == 0o700
    files = [*state.glob("outbox.db*"), *config.image_store.dir.iterdir()]
    assert len(files) >= 3 and all(_mode(path) == 0o600 for path in files), {p.name: oct(_mode(p)) for p in files}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_an_outbox_file_created_loosely_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    path.touch(mode=0o644)
    path.chmod(0o644)
    Outbox(path).close()
    assert _mode(path) == 0o600


def test_the_agent_warns_when_the_private_key_is_readable_by_others(tmp_path: Path, pki: Pki,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    make_tiny_bundle(tmp_path / "bundle")
    ident = pki.identity("line1-cam1")
    key = tmp_path / "device.key"
    shutil.copyfile(ident.key, key)
    key.chmod(0o644)
    data = agent_config(tmp_path, tmp_path / "bundle", transport={
        "kind": "mqtt5", "endpoint": "127.0.0.1", "port": free_port(), "cert": str(ident.cert), "key": str(key),
        "ca": str(pki.ca), "iot_core_limits": False})
    with caplog.at_level(logging.WARNING):
        parts = build_parts(AgentConfig.from_dict(data))
    try:
        warnings = [r.getMessage() for r in caplog.records if "device.key" in r.getMessage()]
        assert len(warnings) == 1 and "0644" in warnings[0] and "chmod 600" in warnings[0]
    finally:
        assert parts.publisher is not None
        parts.publisher.close(2.0)
        parts.outbox.close()
    caplog.clear()
    key.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        parts = build_parts(AgentConfig.from_dict(data))
    assert parts.publisher is not None
    parts.publisher.close(2.0)
    parts.outbox.close()
    assert not [r for r in caplog.records if "device.key" in r.getMessage()]
