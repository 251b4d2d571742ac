"""The hot folder against hostile files: decoder bombs, symlinks out of the inbox, empty files, control characters."""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from pathlib import Path

import pytest

from qcsight_edge.agent import Agent, build_parts
from qcsight_edge.capture import DONE_DIR, FAILED_DIR, Frame, HotFolderSource
from qcsight_edge.clock import ManualClock
from qcsight_edge.config import AgentConfig
from tests.edge.agent_helpers import agent_config, write_atomically
from tests.helpers.images import write_image
from tests.helpers.models import make_tiny_bundle
from tests.helpers.wait import eventually


def png_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """A complete, valid-looking PNG of 68 bytes whose header claims width x height RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def read_one(source: HotFolderSource, timeout_s: float = 5.0) -> Frame:
    return eventually(lambda: source.read(0.05), timeout_s, message="no file was read")


def test_a_png_bomb_fails_alone_and_is_in_failed_before_the_next_file_is_read(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    source = HotFolderSource(inbox, settle_s=0.0, poll_s=0.02)
    bomb = png_bomb()
    assert len(bomb) == 68
    (inbox / "a-bomb.png").write_bytes(bomb)
    os.utime(inbox / "a-bomb.png", (time.time() - 10, time.time() - 10))  # the oldest: read first
    write_image(inbox / "b-good.png", value=200)

    first = read_one(source)
    assert first.source_ref == "a-bomb.png" and first.image is None
    assert first.error is not None and "a-bomb.png" in first.error
    assert (inbox / FAILED_DIR / "a-bomb.png").read_bytes() == bomb  # out of the inbox before the next read
    second = read_one(source)
    assert second.source_ref == "b-good.png" and second.image is not None
    assert source.stats()["failed"] == 1


def test_the_agent_survives_a_png_bomb_and_judges_the_next_part(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path / "bundle")
    config = AgentConfig.from_dict(agent_config(tmp_path, tmp_path / "bundle", stop_deadline_s=2))
    agent = Agent(config, build_parts(config), clock=ManualClock())
    inbox = Path(str(config.source.uri))
    (inbox / "bomb.png").write_bytes(png_bomb())
    try:
        agent.start()
        write_atomically(inbox / "part.png", 240)
        eventually(lambda: (inbox / DONE_DIR / "part.png").exists(), message="the part after the bomb was not judged")
        assert (inbox / FAILED_DIR / "bomb.png").exists()
        assert agent.pipeline is not None and agent.pipeline.fatal is None and not agent.pipeline.finished
    finally:
        agent.stop()


def test_a_symlink_out_of_the_inbox_is_not_followed(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    source = HotFolderSource(inbox, settle_s=0.0, poll_s=0.02)
    secret = write_image(tmp_path / "outside" / "secret.png", value=99)
    (inbox / "link.png").symlink_to(secret)
    write_image(inbox / "real.png", value=50)
    frame = read_one(source)
    assert frame.source_ref == "real.png"  # the link is never handed out as a picture
    assert source.read(0.1) is None
    moved = inbox / FAILED_DIR / "link.png"
    assert moved.is_symlink() and secret.exists()  # the link itself moved aside; its target untouched
    assert source.stats()["failed"] == 1


def test_a_zero_byte_file_goes_to_failed_after_the_settle_time(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    source = HotFolderSource(inbox, settle_s=0.3, poll_s=0.02)
    (inbox / "empty.jpg").write_bytes(b"")
    started = time.monotonic()
    frame = read_one(source)
    assert time.monotonic() - started >= 0.3
    assert frame.source_ref == "empty.jpg" and frame.image is None and "empty" in (frame.error or "")
    assert (inbox / FAILED_DIR / "empty.jpg").exists() and not (inbox / "empty.jpg").exists()


def test_file_names_are_escaped_in_log_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inbox = tmp_path / "inbox"
    source = HotFolderSource(inbox, settle_s=0.0, poll_s=0.02)
    name = "x\n2026-01-01 00:00:00 INFO qcsight_edge.agent: all good\x1b[2J.jpg"
    (inbox / name).write_bytes(b"\xff\xd8\xff\xe0 not a picture")
    with caplog.at_level(logging.WARNING):
        frame = read_one(source)
    assert frame.image is None
    records = [r.getMessage() for r in caplog.records]
    assert any("x\\n2026-01-01" in m and "\\x1b[2J" in m for m in records), records
    assert not any("\n" in m or "\x1b" in m for m in records)


def _aged(path: Path, size: int, age_s: float) -> Path:
    path.write_bytes(b"\x00" * size)
    when = time.time() - age_s
    os.utime(path, (when, when))
    return path


def test_done_and_failed_are_pruned_by_age_and_by_total_size(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    source = HotFolderSource(inbox, settle_s=0.0, poll_s=0.02, retain_s=3600.0, retain_bytes=2500)
    _aged(inbox / DONE_DIR / "week-old.png", 100, 7 * 86400)
    _aged(inbox / FAILED_DIR / "day-old.jpg", 100, 86400)
    _aged(inbox / DONE_DIR / "c.png", 1000, 300)  # within the age, but the oldest of what is over the size cap
    _aged(inbox / FAILED_DIR / "b.jpg", 1000, 200)
    _aged(inbox / DONE_DIR / "a.png", 1000, 100)
    assert source.read(0.05) is None  # pruning runs as part of reading, on the capture thread
    left = sorted(p.name for d in (DONE_DIR, FAILED_DIR) for p in (inbox / d).iterdir())
    assert left == ["a.png", "b.jpg"]
    assert source.stats()["pruned"] == 3


def test_retention_comes_from_the_configuration_and_zero_keeps_everything(tmp_path: Path) -> None:
    from qcsight_edge.capture import open_source
    from qcsight_edge.config import AgentConfig

    inbox = tmp_path / "inbox"
    data = {"thing_name": "t", "model": {"bundle": "b"},
            "source": {"kind": "hotfolder", "uri": str(inbox), "retain_s": 0, "retain_bytes": 0}}
    config = AgentConfig.from_dict(data)
    assert (config.source.retain_s, config.source.retain_bytes) == (0.0, 0)
    source = open_source(config.source)
    _aged(inbox / DONE_DIR / "ancient.png", 10_000, 400 * 86400)
    assert source.read(0.05) is None
    assert (inbox / DONE_DIR / "ancient.png").exists()
    defaults = AgentConfig.from_dict({**data, "source": {"kind": "hotfolder", "uri": str(inbox)}}).source
    assert (defaults.retain_s, defaults.retain_bytes) == (7 * 86400.0, 1024**3)


def test_a_part_read_again_after_a_crash_keeps_its_frame_id_and_so_its_alert_id(tmp_path: Path) -> None:
    from qcsight_edge.outputs import alert_ids

    inbox = tmp_path / "inbox"
    write_image(inbox / "part.png", value=200)
    first = read_one(HotFolderSource(inbox, settle_s=0.0, poll_s=0.02))  # read, never finished: killed
    restarted = HotFolderSource(inbox, settle_s=0.0, poll_s=0.02)
    again = read_one(restarted)
    assert first.frame_id == again.frame_id
    assert alert_ids("t", first.frame_id) == alert_ids("t", again.frame_id)
    restarted.finish(again, True)
    write_image(inbox / "part.png", value=200)  # the next part under the same name: a new file, a new id
    assert read_one(restarted).frame_id != first.frame_id
    assert alert_ids("t", "a")[0] != alert_ids("t", "b")[0] != alert_ids("u", "a")[0]
