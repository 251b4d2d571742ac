"""Frame sources: OpenCV cameras/streams/files (with reconnect), a hot folder, and a synthetic demo source.

Every source answers read(timeout_s) within about timeout_s with a Frame or None, and is told
finish(frame, ok) once the frame was judged, so the hot folder can move the file to done/ or
failed/. A frame that cannot be decoded arrives as a Frame with `error` set: the pipeline
counts it; it never stops the agent.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from qcsight_core.errors import ImageError
from qcsight_core.imageio import decode_image, is_image_path
from qcsight_edge.clock import Backoff, Clock, SystemClock
from qcsight_edge.config import SourceConfig
from qcsight_edge.errors import SourceError
from qcsight_edge.redact import printable, redact_text, redact_uri

log = logging.getLogger(__name__)

# Hot-folder writers that cannot write atomically in place use one of these suffixes (or a
# leading dot) while writing and rename the file when it is complete.
PARTIAL_SUFFIXES = (".part", ".partial", ".tmp", ".uploading", ".crdownload")
DONE_DIR, FAILED_DIR = "done", "failed"
# A hot-folder file larger than this is refused unread: no part picture comes near it, and
# reading it whole would take the device's memory.
MAX_FILE_BYTES = 512 * 1024**2


@dataclass(frozen=True)
class Frame:
    """One picture from a source.

    Attributes:
        frame_id: unique per device (uuid hex), used for the alert and the stored image name.
        image: uint8 HxW or HxWx3 BGR; None when the source could not decode it (see error).
        source_ref: where it came from (a file name, the camera URI), for people reading alerts.
        error: why the frame is unusable, when it is.
        token: the source's own handle (the hot folder's file path).
        captured_at: monotonic seconds when the pipeline received it (latency starts here).
    """

    frame_id: str
    image: np.ndarray | None
    source_ref: str
    error: str | None = None
    token: Any = field(default=None, compare=False)
    captured_at: float = 0.0


def new_frame_id() -> str:
    return uuid.uuid4().hex


_FILE_NAMESPACE = uuid.UUID("0d6c2f4e-8a3b-4f0e-b1a7-2e9c5d4f7a31")


def file_frame_id(name: str, info: os.stat_result) -> str:
    """A frame id that stays the same for one file however often it is read (name, inode, size, mtime).

    A part read again after a crash gets the same id, and so its alert the same message id.
    """
    return uuid.uuid5(_FILE_NAMESPACE, f"{name}\0{info.st_ino}\0{info.st_size}\0{info.st_mtime_ns}").hex


class FrameSource(Protocol):
    """Where frames come from (a Camera in the general sense).

    lossless sources (the hot folder: each file is a part, and unread files simply wait on
    disk) make the pipeline wait for queue space; lossy ones (cameras) have their oldest
    queued frames dropped when inference falls behind.
    """

    lossless: bool

    def read(self, timeout_s: float) -> Frame | None:
        """The next frame, or None when none came within about timeout_s."""

    @property
    def exhausted(self) -> bool:
        """True when the source will never give another frame (a video file at its end)."""

    def finish(self, frame: Frame, ok: bool) -> None:
        """The frame was judged (ok) or could not be (not ok)."""

    def close(self) -> None:
        """Release the device/handles."""

    def stats(self) -> dict[str, Any]:
        """Counters for status messages."""


class _Pacer:
    """Spaces frames at most max_fps apart (0 = no cap); waits end early when `closed` is set."""

    def __init__(self, max_fps: float, clock: Clock, closed: threading.Event) -> None:
        self.interval = 1.0 / max_fps if max_fps > 0 else 0.0
        self.next_due = 0.0
        self._clock = clock
        self._closed = closed

    def wait(self, timeout_s: float) -> bool:
        """Wait until the next frame is due; False when that is further away than timeout_s (or the source closed)."""
        if self.interval <= 0:
            return True
        delay = self.next_due - self._clock.monotonic()
        if delay > timeout_s:
            self._clock.wait(self._closed, timeout_s)
            return False
        if delay > 0:
            return not self._clock.wait(self._closed, delay)
        return True

    def due(self) -> bool:
        return self.interval <= 0 or self._clock.monotonic() >= self.next_due

    def mark(self) -> None:
        if self.interval > 0:
            now = self._clock.monotonic()
            # On schedule: exactly one interval later (no drift). Late: due now, so a stall never
            # turns into a burst of catch-up frames.
            self.next_due = max(self.next_due + self.interval, now) if self.next_due else now + self.interval


class VideoCaptureLike(Protocol):
    """The part of cv2.VideoCapture the camera source uses."""

    def isOpened(self) -> bool: ...  # OpenCV's name

    def read(self) -> tuple[bool, np.ndarray | None]: ...

    def grab(self) -> bool: ...

    def retrieve(self) -> tuple[bool, np.ndarray | None]: ...

    def release(self) -> None: ...


STREAM_TIMEOUT_MS = 5000


def _opencv_capture(uri: str | int) -> VideoCaptureLike:
    import cv2

    if isinstance(uri, str) and "://" in uri:
        # A stream that stalls would otherwise block read() for FFmpeg's default (30 s or forever).
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_TIMEOUT_MS]
        stream: VideoCaptureLike = cv2.VideoCapture(uri, cv2.CAP_ANY, params)
        return stream
    capture: VideoCaptureLike = cv2.VideoCapture(uri)
    return capture


def is_live_uri(uri: str | int) -> bool:
    """A device index or a URL is live (reconnect when lost); a local file ends."""
    return isinstance(uri, int) or "://" in uri or not Path(uri).is_file()


class OpenCvCamera:
    """A USB camera (index), an RTSP/HTTP stream (URL) or a video file, through cv2.VideoCapture.

    A live source that fails to open or stops giving frames is released and reopened with
    exponential backoff (reconnect_initial_s doubling up to reconnect_max_s), so a camera that is
    unplugged and plugged back, or a stream that restarts, comes back by itself. A file is read
    once (or looped with loop=True), paced at max_fps; a live source is grabbed continuously and
    only every (1/max_fps) s retrieved, so the frames judged are fresh rather than stale buffer.
    Every wait (pacing, the reconnect delay) goes through `clock` and ends early on close().
    """

    lossless = False

    def __init__(self, config: SourceConfig,
                 capture_factory: Callable[[str | int], VideoCaptureLike] = _opencv_capture,
                 live: bool | None = None, clock: Clock | None = None) -> None:
        if config.uri is None:
            raise SourceError("camera source: uri is required")
        self.uri: str | int = config.uri
        # What messages and log lines say: rtsp://user:password@... must never leave the device.
        self.ref = printable(redact_uri(config.uri))
        self.config = config
        self.live = is_live_uri(self.uri) if live is None else live
        self._factory = capture_factory
        self._capture: VideoCaptureLike | None = None
        self._clock: Clock = clock or SystemClock()
        self._closed = threading.Event()
        self._pacer = _Pacer(config.max_fps, self._clock, self._closed)
        self._backoff = Backoff(config.reconnect_initial_s, config.reconnect_max_s)
        self._next_attempt = 0.0
        self._ended = False
        self.connects = 0
        self.disconnects = 0
        self.failed_opens = 0
        self.frames = 0

    @property
    def exhausted(self) -> bool:
        return self._ended

    @property
    def connected(self) -> bool:
        return self._capture is not None

    def _open(self) -> bool:
        try:
            capture = self._factory(self.uri)
            opened = capture.isOpened()
        except Exception as exc:  # OpenCV backends raise assorted errors for missing devices
            log.debug("camera %s: open raised %s", self.ref, printable(redact_text(str(exc), self.uri)))
            opened, capture = False, None
        if not opened:
            if capture is not None:
                capture.release()
            self.failed_opens += 1
            self._schedule_retry(f"cannot open {self.ref}")
            return False
        self._capture = capture
        self.connects += 1
        self._backoff.reset()
        if self.connects > 1:
            log.info("camera %s: reconnected", self.ref)
        return True

    def _schedule_retry(self, reason: str) -> None:
        delay = self._backoff.next()
        self._next_attempt = self._clock.monotonic() + delay
        log.warning("camera %s: %s; retrying in %.1f s", self.ref, reason, delay)

    def _lost(self, reason: str) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None
        if not self.live and not self.config.loop:
            self._ended = True
            log.info("camera %s: end of file after %d frames", self.ref, self.frames)
            return
        if self.live:
            self.disconnects += 1
            self._schedule_retry(reason)
        else:
            self._next_attempt = 0.0  # looping a file: reopen at once

    def read(self, timeout_s: float) -> Frame | None:
        if self._ended:
            self._clock.wait(self._closed, min(timeout_s, 0.05))
            return None
        if self._capture is None:
            wait = self._next_attempt - self._clock.monotonic()
            if wait > 0:
                self._clock.wait(self._closed, min(wait, timeout_s))
                return None
            if not self._open():
                return None
        assert self._capture is not None  # for mypy: _open() set it
        if self.live:
            return self._read_live(timeout_s)
        if not self._pacer.wait(timeout_s):
            return None
        ok, image = self._capture.read()
        return self._frame(ok, image)

    def _read_live(self, timeout_s: float) -> Frame | None:
        assert self._capture is not None
        deadline = self._clock.monotonic() + timeout_s
        while not self._pacer.due():
            # grab() keeps the driver's buffer drained without decoding frames nobody judges.
            if not self._capture.grab():
                self._lost("stream gave no frame")
                return None
            if self._clock.monotonic() >= deadline:
                return None
        ok, image = self._capture.read()
        return self._frame(ok, image)

    def _frame(self, ok: bool, image: np.ndarray | None) -> Frame | None:
        if not ok or image is None:
            self._lost("stream gave no frame")
            return None
        self._pacer.mark()
        self.frames += 1
        frame_id = new_frame_id()
        if image.dtype != np.uint8 or image.size == 0 or image.ndim not in (2, 3):
            return Frame(frame_id, None, self.ref, error=f"unusable frame {image.shape} {image.dtype}")
        return Frame(frame_id, image, self.ref)

    def finish(self, frame: Frame, ok: bool) -> None:
        pass  # nothing to hand back for a live picture

    def close(self) -> None:
        self._closed.set()
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    def stats(self) -> dict[str, Any]:
        return {"kind": "camera", "connected": self.connected, "frames": self.frames, "connects": self.connects,
                "disconnects": self.disconnects, "failed_opens": self.failed_opens}


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    stable_since: float


class HotFolderSource:
    """Image files dropped by the line into an inbox directory; each file is one part.

    Partial files are never read. Two conventions are honoured:
      * rename on complete: names starting with '.' or ending in .part/.partial/.tmp/.uploading
        are ignored; the writer renames the finished file to its final name (atomic on one
        filesystem);
      * otherwise a file is read only after its size and mtime have stayed the same for settle_s
        (seen on successive scans).
    Files are taken oldest first (mtime, then name). After judgement a file moves to done/,
    and one that cannot be decoded or judged to failed/ (both inside the inbox). Files still in the
    inbox when the agent stops are read again on the next start. done/ and failed/ are pruned
    every prune_every_s: files older than retain_s go, then the oldest until both folders
    together hold at most retain_bytes (0 turns either rule off), so a line cannot fill the disk.
    Settling, polling and pruning are timed by `clock`; a poll wait ends early on close().
    """

    lossless = True

    def __init__(self, inbox: Path, settle_s: float = 0.5, poll_s: float = 0.2, *, retain_s: float = 0.0,
                 retain_bytes: int = 0, prune_every_s: float = 60.0, clock: Clock | None = None) -> None:
        self.inbox = inbox
        self._clock: Clock = clock or SystemClock()
        self._closed = threading.Event()
        self.settle_s = settle_s
        self.poll_s = poll_s
        self.retain_s = retain_s
        self.retain_bytes = retain_bytes
        self.prune_every_s = prune_every_s
        self._next_prune = 0.0
        self.pruned_count = 0
        self.done_dir = inbox / DONE_DIR
        self.failed_dir = inbox / FAILED_DIR
        try:
            for directory in (inbox, self.done_dir, self.failed_dir):
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SourceError(f"{inbox}: cannot create the hot folder: {exc.strerror or exc}") from exc
        self._seen: dict[str, _Seen] = {}
        self._ready: list[str] = []
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        self._last_scan = -1e9
        self.read_count = 0
        self.done_count = 0
        self.failed_count = 0

    @property
    def exhausted(self) -> bool:
        return False

    @staticmethod
    def is_partial_name(name: str) -> bool:
        return name.startswith(".") or name.lower().endswith(PARTIAL_SUFFIXES)

    def scan(self) -> list[str]:
        """Update what is on disk; returns the names ready to read, oldest first.

        Symbolic links (and sockets, FIFOs, devices) are never read: a link could point anywhere
        on the device. They are moved aside to failed/ as they are, their targets untouched.
        """
        now = self._clock.monotonic()
        self._last_scan = now
        present: dict[str, tuple[int, int]] = {}
        try:
            entries = list(os.scandir(self.inbox))
        except OSError as exc:
            raise SourceError(f"{self.inbox}: cannot list the hot folder: {exc.strerror or exc}") from exc
        for entry in entries:
            if self.is_partial_name(entry.name) or not is_image_path(entry.name):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    continue
                if not entry.is_file(follow_symlinks=False):
                    self._refuse(entry.name, "a symbolic link or special file (not followed)")
                    continue
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # renamed or removed between listing and stat
            present[entry.name] = (stat.st_size, stat.st_mtime_ns)
        ready: list[tuple[int, str]] = []
        with self._lock:
            for name in list(self._seen):
                if name not in present:
                    del self._seen[name]
            for name, (size, mtime_ns) in present.items():
                seen = self._seen.get(name)
                if seen is None or (seen.size, seen.mtime_ns) != (size, mtime_ns):
                    self._seen[name] = seen = _Seen(size, mtime_ns, now)
                # An empty file that stays empty for the settle time is read too, and fails.
                if now - seen.stable_since >= self.settle_s and name not in self._in_flight:
                    ready.append((mtime_ns, name))
            self._ready = [name for _, name in sorted(ready)]
            return list(self._ready)

    def prune(self) -> int:
        """Apply the retention to done/ and failed/ now; returns how many files were deleted."""
        entries: list[tuple[int, int, Path]] = []
        for folder in (self.done_dir, self.failed_dir):
            try:
                with os.scandir(folder) as listing:
                    for entry in listing:
                        with contextlib.suppress(OSError):
                            if not entry.is_dir(follow_symlinks=False):
                                info = entry.stat(follow_symlinks=False)
                                entries.append((info.st_mtime_ns, info.st_size, Path(entry.path)))
            except OSError as exc:
                log.warning("hot folder: cannot list %s for pruning: %s", folder, exc.strerror or exc)
        entries.sort()
        # The filesystem's clock, not self._clock: the cutoff is compared with the files' real mtimes.
        cutoff_ns = time.time_ns() - int(self.retain_s * 1e9) if self.retain_s > 0 else None
        total = sum(size for _, size, _ in entries)
        removed, freed = 0, 0
        for mtime_ns, size, path in entries:
            too_old = cutoff_ns is not None and mtime_ns < cutoff_ns
            too_much = self.retain_bytes > 0 and total > self.retain_bytes
            if not (too_old or too_much):
                break  # oldest first: everything after this one is newer, and the total fits
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("hot folder: cannot prune %s: %s", printable(str(path)), exc.strerror or exc)
                continue
            total -= size
            removed += 1
            freed += size
        if removed:
            self.pruned_count += removed
            log.info("hot folder: pruned %d files (%d bytes) from %s/ and %s/ (retain_s %g, retain_bytes %d)",
                     removed, freed, DONE_DIR, FAILED_DIR, self.retain_s, self.retain_bytes)
        return removed

    def read(self, timeout_s: float) -> Frame | None:
        clock = self._clock
        if (self.retain_s > 0 or self.retain_bytes > 0) and clock.monotonic() >= self._next_prune:
            self._next_prune = clock.monotonic() + self.prune_every_s
            self.prune()
        deadline = clock.monotonic() + timeout_s
        while True:
            with self._lock:
                name = self._ready.pop(0) if self._ready else None
                if name is not None:
                    self._in_flight.add(name)
            if name is not None:
                return self._load(name)
            wait = self._last_scan + self.poll_s - clock.monotonic()
            if wait > 0:
                if clock.monotonic() + wait > deadline:
                    clock.wait(self._closed, deadline - clock.monotonic())
                    return None
                if clock.wait(self._closed, wait):
                    return None
            self.scan()
            if not self._ready and clock.monotonic() >= deadline:
                return None

    def _load(self, name: str) -> Frame:
        """Read and decode one file; any failure fails this file alone, moved to failed/ before the next is read.

        The boundary is deliberately broad: a decoder error of any kind (cv2.error for a header
        claiming 40000x40000 pixels, MemoryError) must not stop the agent, and must not leave the
        file in the inbox to stop it again on every restart.
        """
        path = self.inbox / name
        self.read_count += 1
        frame_id = new_frame_id()
        try:
            data, info = _read_regular_file(path, name)
            frame_id = file_frame_id(name, info)
            image = decode_image(data, name)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, ImageError) else f"{name}: {type(exc).__name__}: {exc}"
            self._move(path, frame_id, ok=False)
            log.warning("hot folder: %s not judged, moved to %s/: %s", printable(name), FAILED_DIR, printable(reason))
            return Frame(frame_id, None, name, error=reason)
        return Frame(frame_id, image, name, token=path)

    def _refuse(self, name: str, reason: str) -> None:
        log.warning("hot folder: %s is %s; moved to %s/", printable(name), reason, FAILED_DIR)
        self._move(self.inbox / name, new_frame_id(), ok=False)

    def finish(self, frame: Frame, ok: bool) -> None:
        path = frame.token
        if isinstance(path, Path):
            self._move(path, frame.frame_id, ok)

    def _move(self, path: Path, frame_id: str, ok: bool) -> None:
        target_dir = self.done_dir if ok else self.failed_dir
        target = target_dir / path.name
        if os.path.lexists(target):
            target = target_dir / f"{path.stem}.{frame_id[:8]}{path.suffix}"
        try:
            os.replace(path, target)
        except OSError as exc:
            # Left in flight on purpose: re-reading it would judge the same part again and again.
            log.error("hot folder: cannot move %s to %s: %s", printable(str(path)), target_dir, exc)
            return
        if ok:
            self.done_count += 1
        else:
            self.failed_count += 1
        with self._lock:
            self._in_flight.discard(path.name)
            self._seen.pop(path.name, None)

    def close(self) -> None:
        self._closed.set()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            waiting = len(self._seen) - len(self._in_flight)
        return {"kind": "hotfolder", "read": self.read_count, "done": self.done_count, "failed": self.failed_count,
                "waiting": max(0, waiting), "pruned": self.pruned_count}


def _read_regular_file(path: Path, name: str) -> tuple[bytes, os.stat_result]:
    """The bytes and stat of a regular file, never through a symbolic link (O_NOFOLLOW: no race with a new link)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageError(name, "a symbolic link (not followed)") from exc
        raise ImageError(name, f"cannot read file: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(name, "not a regular file")
        if info.st_size > MAX_FILE_BYTES:
            raise ImageError(name, f"{info.st_size} bytes, more than the {MAX_FILE_BYTES} a part picture may have")
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read(MAX_FILE_BYTES + 1), info
    except OSError as exc:
        raise ImageError(name, f"cannot read file: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


class SyntheticSource:
    """Rendered surface images (qcsight_core.synth) for the demo, some with defects, at max_fps.

    A fixed pool of pictures is rendered once and cycled, so the source costs no CPU per frame
    and memory stays bounded. Pacing waits go through `clock` and end early on close().
    """

    lossless = False

    def __init__(self, config: SourceConfig, pool_size: int = 64, clock: Clock | None = None) -> None:
        from qcsight_core import synth

        rng = np.random.default_rng(config.seed)
        self._pool: list[tuple[np.ndarray, str]] = []
        for _ in range(pool_size):
            defect = rng.random() < config.defect_rate
            label = str(rng.choice(synth.DEFECT_CLASSES)) if defect else synth.GOOD_CLASS
            picture = synth.render(rng, label, size=config.size)
            self._pool.append((picture.image, label))
        self._closed = threading.Event()
        self._pacer = _Pacer(config.max_fps, clock or SystemClock(), self._closed)
        self._index = 0
        self.frames = 0

    @property
    def exhausted(self) -> bool:
        return False

    def read(self, timeout_s: float) -> Frame | None:
        if not self._pacer.wait(timeout_s):
            return None
        image, label = self._pool[self._index]
        self._index = (self._index + 1) % len(self._pool)
        self._pacer.mark()
        self.frames += 1
        return Frame(new_frame_id(), image, f"synthetic:{label}")

    def finish(self, frame: Frame, ok: bool) -> None:
        pass

    def close(self) -> None:
        self._closed.set()

    def stats(self) -> dict[str, Any]:
        return {"kind": "synthetic", "frames": self.frames}


def open_source(config: SourceConfig, clock: Clock | None = None) -> FrameSource:
    """The source a configuration names, timed by `clock` (the system clock when None)."""
    if config.kind == "camera":
        return OpenCvCamera(config, clock=clock)
    if config.kind == "hotfolder":
        return HotFolderSource(Path(str(config.uri)), config.settle_s, config.poll_s, retain_s=config.retain_s,
                               retain_bytes=config.retain_bytes, clock=clock)
    return SyntheticSource(config, clock=clock)
