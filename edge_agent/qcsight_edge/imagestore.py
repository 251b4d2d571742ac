"""Full-resolution images of alerted frames on local disk, under a byte cap; the oldest are evicted first."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcsight_core.imageio import encode_jpeg
from qcsight_edge.errors import ImageStoreError

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class ImageStoreStats:
    files: int
    bytes: int
    evicted: int


class ImageStore:
    """Keeps JPEGs named `<frame_id>.jpg` in one directory, total size at most max_bytes.

    Files written by an earlier run count towards the cap (oldest by mtime first), so a restart
    does not forget what is already on disk. References handed out in alerts are file names
    relative to the store directory.
    """

    def __init__(self, directory: Path, max_bytes: int, jpeg_quality: int = 90) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.jpeg_quality = jpeg_quality
        self.evicted = 0
        self._lock = threading.Lock()
        self._files: deque[tuple[str, int]] = deque()
        self._bytes = 0
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)  # pictures of the line: this user's alone
        except OSError as exc:
            raise ImageStoreError(f"{directory}: cannot create the image store: {exc.strerror or exc}") from exc
        self._scan()

    def _scan(self) -> None:
        entries = []
        for entry in os.scandir(self.directory):
            if entry.is_file() and entry.name.endswith(".jpg"):
                stat = entry.stat()
                entries.append((stat.st_mtime_ns, entry.name, stat.st_size))
        for _, name, size in sorted(entries):
            self._files.append((name, size))
            self._bytes += size
        with self._lock:
            self._evict(0)

    def encode(self, image: np.ndarray) -> bytes:
        """The JPEG this store would write (encoded once; the image upload sends the same bytes)."""
        return encode_jpeg(image, self.jpeg_quality)

    def save(self, frame_id: str, image: np.ndarray) -> str:
        """Write one image; returns its reference (file name). Evicts the oldest files to stay under the cap."""
        return self.save_jpeg(frame_id, self.encode(image))

    def save_jpeg(self, frame_id: str, data: bytes) -> str:
        """Write one encoded JPEG; returns its reference (file name). Evicts the oldest files to stay under the cap."""
        name = _SAFE.sub("_", frame_id)[:120] + ".jpg"
        if len(data) > self.max_bytes:
            raise ImageStoreError(f"{name}: {len(data)} bytes is more than the whole store ({self.max_bytes} bytes)")
        path = self.directory / name
        tmp = path.with_name(name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            raise ImageStoreError(f"{path}: cannot write: {exc.strerror or exc}") from exc
        with self._lock:
            self._evict(len(data))
            self._files.append((name, len(data)))
            self._bytes += len(data)
        return name

    def _evict(self, incoming: int) -> None:
        while self._files and self._bytes + incoming > self.max_bytes:
            name, size = self._files.popleft()
            self._bytes -= size
            try:
                (self.directory / name).unlink()
            except FileNotFoundError:
                pass  # removed by an operator; it no longer counts either way
            except OSError as exc:
                log.warning("image store: cannot evict %s: %s", name, exc)
            self.evicted += 1

    def stats(self) -> ImageStoreStats:
        with self._lock:
            return ImageStoreStats(len(self._files), self._bytes, self.evicted)
