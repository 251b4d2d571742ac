"""Frame sources against real files: video files through cv2.VideoCapture, a hot folder on disk, synthetic."""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from qcsight_edge.capture import (
    DONE_DIR,
    FAILED_DIR,
    Frame,
    HotFolderSource,
    OpenCvCamera,
    SyntheticSource,
    VideoCaptureLike,
    open_source,
)
from qcsight_edge.clock import ManualClock
from qcsight_edge.config import SourceConfig
from tests.edge.agent_helpers import write_video
from tests.helpers.images import write_image


def read_all(source: OpenCvCamera | HotFolderSource, want: int, timeout_s: float = 5.0) -> list[Frame]:
    frames: list[Frame] = []
    deadline = time.monotonic() + timeout_s
    while len(frames) < want and time.monotonic() < deadline:
        frame = source.read(0.05)
        if frame is not None:
            frames.append(frame)
    return frames


def test_video_file_is_read_to_its_end_then_exhausted(tmp_path: Path) -> None:
    video = write_video(tmp_path / "line.avi", [0, 60, 120, 180, 240])
    camera = OpenCvCamera(SourceConfig(kind="camera", uri=str(video), max_fps=0))
    assert not camera.live
    frames = read_all(camera, 5, timeout_s=2.0)
    assert camera.read(0.01) is None
    assert [round(float(f.image.mean()) / 60) for f in frames if f.image is not None] == [0, 1, 2, 3, 4]
    assert camera.exhausted
    assert len({f.frame_id for f in frames}) == 5


def test_video_file_loops_when_asked(tmp_path: Path) -> None:
    video = write_video(tmp_path / "line.avi", [10, 200])
    camera = OpenCvCamera(SourceConfig(kind="camera", uri=str(video), max_fps=0, loop=True))
    frames = read_all(camera, 5)
    assert len(frames) == 5 and not camera.exhausted
    assert camera.connects == 3


def test_file_playback_is_paced_at_max_fps(tmp_path: Path) -> None:
    video = write_video(tmp_path / "line.avi", [100] * 6)
    camera = OpenCvCamera(SourceConfig(kind="camera", uri=str(video), max_fps=20))
    start = time.monotonic()
    frames = read_all(camera, 6)
    elapsed = time.monotonic() - start
    assert len(frames) == 6
    assert elapsed >= 5 / 20 * 0.9  # 6 frames at 20 fps span 5 intervals


class UnpluggableCamera:
    """A real cv2.VideoCapture on a real video file, except that the camera can be 'unplugged'.

    The file's end plays the camera vanishing mid-stream (read() fails); after that, the next
    `outage` opens fail as a missing device does, then it opens again. Only the open failures are
    made up: no real peer can unplug a USB camera in a test.
    """

    def __init__(self, path: Path, outage: int, first_opens_fail: int = 0) -> None:
        self.path = path
        self.outage = outage
        self.fail_next = first_opens_fail
        self.open_times: list[float] = []
        self.opens = 0

    def __call__(self, uri: str | int) -> VideoCaptureLike:
        self.open_times.append(time.monotonic())
        if self.fail_next > 0:
            self.fail_next -= 1
            return cv2.VideoCapture(str(self.path.with_name("unplugged.avi")))  # isOpened() is False
        self.opens += 1
        self.fail_next = self.outage  # after this stream ends, the camera is gone for `outage` attempts
        capture: VideoCaptureLike = cv2.VideoCapture(str(self.path))
        return capture


def test_camera_that_disappears_comes_back_with_backoff(tmp_path: Path) -> None:
    video = write_video(tmp_path / "cam.avi", [50, 100, 150])
    factory = UnpluggableCamera(video, outage=3, first_opens_fail=1)
    config = SourceConfig(kind="camera", uri=str(video), max_fps=0, reconnect_initial_s=0.04, reconnect_max_s=0.1)
    camera = OpenCvCamera(config, capture_factory=factory, live=True)
    frames = read_all(camera, 6, timeout_s=5.0)
    assert len(frames) == 6, camera.stats()
    assert [round(float(f.image.mean()) / 50) for f in frames if f.image is not None] == [1, 2, 3, 1, 2, 3]
    stats = camera.stats()
    assert stats["connects"] == 2 and stats["disconnects"] == 1
    assert stats["failed_opens"] == 4  # one before the first connect, three during the outage
    assert camera.connected and not camera.exhausted
    # Backoff: waits between the outage's attempts grow (0.04 -> 0.08 -> 0.1 cap), never a busy loop.
    gaps = np.diff(factory.open_times[2:])
    assert len(gaps) == 3
    assert gaps[0] >= 0.035 and gaps[1] >= 0.07 and gaps[2] >= 0.09
    assert gaps[2] < 1.0


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def http_camera(folder: Path, port: int = 0) -> Iterator[int]:
    """A network camera: an HTTP server streaming a real video file (OpenCV reads it through FFmpeg)."""
    server = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_network_camera_that_goes_away_is_reconnected_when_it_returns(tmp_path: Path) -> None:
    write_video(tmp_path / "cam.avi", [50, 100, 150])
    config = SourceConfig(kind="camera", max_fps=0, reconnect_initial_s=0.2, reconnect_max_s=0.4)
    with http_camera(tmp_path) as port:
        camera = OpenCvCamera(replace(config, uri=f"http://127.0.0.1:{port}/cam.avi"))
        assert camera.live
        first = read_all(camera, 3)
    # The server is gone: the end of its stream is a lost camera, and reopening is refused.
    deadline = time.monotonic() + 5.0
    while camera.failed_opens < 2 and time.monotonic() < deadline:
        assert camera.read(0.05) is None
    assert camera.disconnects == 1 and camera.failed_opens >= 2 and not camera.connected
    with http_camera(tmp_path, port):
        second = read_all(camera, 3)
    values = [round(float(f.image.mean()) / 50) for f in first + second if f.image is not None]
    assert values == [1, 2, 3, 1, 2, 3]
    assert camera.connects == 2 and not camera.exhausted


def test_live_camera_that_never_opens_keeps_retrying_without_blocking(tmp_path: Path) -> None:
    config = SourceConfig(kind="camera", uri=str(tmp_path / "no-camera.avi"), reconnect_initial_s=0.02,
                          reconnect_max_s=0.05)
    camera = OpenCvCamera(config, live=True)
    start = time.monotonic()
    assert read_all(camera, 1, timeout_s=0.4) == []
    assert time.monotonic() - start < 1.0
    assert camera.failed_opens >= 3 and not camera.exhausted


# ---------------------------------------------------------------------------------------------- hot folder


def jpeg_bytes(value: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    image = np.clip(value + rng.integers(-5, 6, size=(40, 56, 3)), 0, 255).astype(np.uint8)
    ok, data = cv2.imencode(".jpg", image)
    assert ok
    return data.tobytes()


def test_hot_folder_does_not_read_a_file_still_being_written(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    source = HotFolderSource(inbox, settle_s=0.5, poll_s=0.02)
    data = jpeg_bytes(200)
    target = inbox / "part-0001.jpg"
    with target.open("wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        # Half written: seen, but never handed out while the writer is still going.
        assert source.read(0.1) is None
        time.sleep(0.05)
        handle.write(data[len(data) // 2:])
    assert source.read(0.1) is None  # just completed: size/mtime changed, the settle time starts again
    frame = source.read(2.0)
    assert frame is not None and frame.error is None and frame.image is not None
    assert frame.image.shape == (40, 56, 3)
    source.finish(frame, ok=True)
    assert (inbox / DONE_DIR / "part-0001.jpg").read_bytes() == data
    assert not target.exists()


def test_hot_folder_rename_on_complete_convention(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    source = HotFolderSource(inbox, settle_s=0.0, poll_s=0.02)
    (inbox / "a.jpg.part").write_bytes(jpeg_bytes(100))
    (inbox / ".b.jpg").write_bytes(jpeg_bytes(100))
    (inbox / "notes.txt").write_text("not an image")
    assert source.read(0.1) is None
    os.replace(inbox / "a.jpg.part", inbox / "a.jpg")
    frame = source.read(0.5)
    assert frame is not None and frame.source_ref == "a.jpg" and frame.error is None


def test_hot_folder_moves_judged_files_to_done_and_bad_ones_to_failed(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    source = HotFolderSource(inbox, settle_s=0.0, poll_s=0.02)
    write_image(inbox / "001.png", value=30)
    time.sleep(0.01)
    (inbox / "002.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg")
    time.sleep(0.01)
    write_image(inbox / "003.jpg", value=220)
    frames = read_all(source, 3)
    assert [f.source_ref for f in frames] == ["001.png", "002.jpg", "003.jpg"]  # oldest first
    assert frames[1].image is None and "002.jpg" in (frames[1].error or "")
    assert source.read(0.1) is None  # in flight: not handed out twice
    for frame in frames:
        source.finish(frame, ok=frame.error is None)
    assert sorted(p.name for p in (inbox / DONE_DIR).iterdir()) == ["001.png", "003.jpg"]
    assert [p.name for p in (inbox / FAILED_DIR).iterdir()] == ["002.jpg"]
    assert source.stats() == {"kind": "hotfolder", "read": 3, "done": 2, "failed": 1, "waiting": 0, "pruned": 0}
    # A part with the same name again (next shift) does not overwrite the first in done/.
    write_image(inbox / "001.png", value=40)
    again = read_all(source, 1)
    source.finish(again[0], ok=True)
    assert len(list((inbox / DONE_DIR).glob("001*.png"))) == 2


def test_unfinished_files_are_read_again_after_a_restart(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    write_image(inbox / "x.png", value=10)
    first = HotFolderSource(inbox, settle_s=0.0, poll_s=0.02)
    assert read_all(first, 1)[0].source_ref == "x.png"  # read, never finished: the agent died
    second = HotFolderSource(inbox, settle_s=0.0, poll_s=0.02)
    assert read_all(second, 1)[0].source_ref == "x.png"


def test_synthetic_source_renders_a_bounded_pool_with_defects() -> None:
    source = open_source(SourceConfig(kind="synthetic", size=64, defect_rate=0.5, max_fps=0, seed=3))
    assert isinstance(source, SyntheticSource)
    frames = [source.read(0.1) for _ in range(80)]
    labels = {f.source_ref for f in frames if f is not None}
    assert "synthetic:good" in labels and len(labels) >= 3
    first = frames[0]
    assert first is not None and first.image is not None and first.image.shape == (64, 64, 3)
    assert frames[64] is not None and frames[64].image is first.image  # cycled, not re-rendered


def test_pacing_runs_on_the_injected_clock_without_drift_or_catch_up_bursts() -> None:
    clock = ManualClock()
    source = SyntheticSource(SourceConfig(kind="synthetic", size=32, max_fps=10), pool_size=2, clock=clock)
    assert source.read(1.0) is not None and clock.monotonic() == 0.0  # the first frame is due at once
    assert source.read(0.04) is None  # the next is 0.1 s away: a shorter read gives up after its timeout
    assert clock.monotonic() == pytest.approx(0.04)
    assert source.read(1.0) is not None
    assert clock.monotonic() == pytest.approx(0.1)  # on the schedule, not 0.1 s after the read that gave up
    clock.advance(1.0)  # a stall of ten intervals (inference fell behind)
    times = []
    for _ in range(4):
        assert source.read(1.0) is not None
        times.append(round(clock.monotonic(), 6))
    assert times == [1.1, 1.1, 1.2, 1.3]  # the late frame and one more at once, then the schedule: no burst of ten
    source.close()
    assert source.read(1.0) is None and clock.monotonic() == pytest.approx(1.3)  # closed: no more waiting


@pytest.mark.parametrize("kind", ["camera", "hotfolder"])
def test_open_source_builds_the_configured_kind(tmp_path: Path, kind: str) -> None:
    source = open_source(SourceConfig(kind=kind, uri=str(tmp_path / "x")))
    assert type(source).__name__ == {"camera": "OpenCvCamera", "hotfolder": "HotFolderSource"}[kind]
    source.close()
