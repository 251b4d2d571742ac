"""The durable image upload queue: each alerted part's full image is stored here before its alert, then uploaded.

One SQLite file (``uploads.db``, the outbox's rules: private, locked, WAL, synced commits) holds
each pending image as a row: the alert id, the object key and URI the alert names, the JPEG bytes
and their sha256. It survives an outage of the link, a ``kill -9`` and a power cut; a row is
deleted only after the store acknowledged the whole object. The JPEG lives inside the row, so
an image and its job are one commit: there is no moment where one exists without the other.

Bounded by image count and bytes: when a new image does not fit, the oldest pending images are
evicted (never the one being uploaded), counted, and recorded as lost with the reason. Images
refused for good (access denied, no such bucket) move to the same table with the store's reason.
Every lost image is reported once in a status message (``unreported``/``mark_reported``), so the
cloud can tell "still uploading" from "will never arrive".

Thread-safe: the alert thread puts while the uploader thread claims and settles.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from qcsight_core.checks import check_int
from qcsight_core.errors import ConfigError
from qcsight_edge import durable
from qcsight_edge.errors import DatabaseOpenError, ImageNotQueuedError, UploadQueueError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# Lost images kept for inspection (refused ones with their JPEG); beyond this the oldest go, counters keep counting.
LOST_LIMIT = 200
_COUNTERS = ("enqueued", "uploaded", "evicted", "dead_lettered")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    alert_id TEXT NOT NULL UNIQUE,
    key TEXT NOT NULL,
    uri TEXT NOT NULL,
    data BLOB NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS lost (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    alert_id TEXT NOT NULL,
    key TEXT NOT NULL,
    uri TEXT NOT NULL,
    data BLOB,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created REAL NOT NULL,
    lost REAL NOT NULL,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    reported INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class QueuedImage:
    """What the alert says about its image: where it goes and what it is."""

    alert_id: str
    uri: str
    sha256: str


@dataclass(frozen=True)
class UploadJob:
    """One pending image; ``row_id`` is what ``done``/``retry``/``dead_letter`` take."""

    row_id: int
    alert_id: str
    key: str
    uri: str
    data: bytes
    sha256: str
    created: float
    attempts: int


@dataclass(frozen=True)
class LostImage:
    """An image that will not be uploaded: ``kind`` is ``evicted`` (backlog full) or ``refused`` (by the store)."""

    row_id: int
    alert_id: str
    uri: str
    kind: str
    reason: str
    lost: float


@dataclass(frozen=True)
class UploadQueueStats:
    """For status: the backlog now, and lifetime counters (they persist across restarts)."""

    backlog: int
    bytes: int
    enqueued: int
    uploaded: int
    evicted: int
    dead_lettered: int
    oldest_created: float | None


class UploadQueue:
    """A bounded, durable FIFO of images to upload.

    Args:
        path: the SQLite file (created 0600, with its folder 0700, if missing).
        max_images: most images held; beyond it the oldest are evicted.
        max_bytes: most JPEG bytes held; a single image larger than this is refused.
        busy_timeout_s: how long a statement waits for a lock held by another process.
    """

    def __init__(self, path: Path | str, *, max_images: int = 10_000, max_bytes: int = 1024**3,
                 busy_timeout_s: float = 5.0) -> None:
        for name, value in (("max_images", max_images), ("max_bytes", max_bytes)):
            if not isinstance(value, int):  # built in code: a number, not the text a configuration may hold
                raise ConfigError(f"image_upload.{name}", value, "an integer of at least 1")
            check_int(f"image_upload.{name}", value, 1)
        self.path = Path(path)
        self.max_images = max_images
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._in_flight: set[int] = set()
        self._closed = False
        try:
            self._lock_fd = durable.lock_beside(self.path)
        except DatabaseOpenError as exc:
            raise UploadQueueError(f"upload queue {self.path}: {exc}") from exc
        try:
            self._db = durable.connect(self.path, busy_timeout_s)
            self._open_schema()
            self._count, self._bytes = self._count_rows()
        except (OSError, sqlite3.Error) as exc:
            if hasattr(self, "_db"):
                self._db.close()
            os.close(self._lock_fd)
            raise UploadQueueError(f"upload queue {self.path}: not a usable upload queue: {exc}") from exc
        log.info("upload queue %s: %d images (%d bytes) pending", self.path, self._count, self._bytes)

    def _open_schema(self) -> None:
        self._db.executescript(_SCHEMA)
        with durable.Transaction(self._db):
            self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            for key in _COUNTERS:
                self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, 0)", (key,))
        version = self._meta("schema_version")
        if version != SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"schema version {version}; this qcsight reads {SCHEMA_VERSION}")

    # ------------------------------------------------------------ internals (caller holds the lock)

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _bump(self, key: str, by: int) -> None:
        if by:
            self._db.execute("UPDATE meta SET value = value + ? WHERE key = ?", (by, key))

    def _count_rows(self) -> tuple[int, int]:
        count, total = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM uploads").fetchone()
        return int(count), int(total)

    def _check_open(self) -> None:
        if self._closed:
            raise UploadQueueError(f"upload queue {self.path}: already closed")

    def _fits(self, count: int, total: int, size: int) -> bool:
        return count + 1 <= self.max_images and total + size <= self.max_bytes

    def _evict_for(self, size: int, now: float) -> int:
        """Move the oldest pending images (never one in flight) to ``lost`` until one more of ``size`` fits."""
        count, total = self._count, self._bytes
        victims: list[tuple[int, int]] = []
        if not self._fits(count, total, size):
            for row_id, row_size in self._db.execute("SELECT id, size FROM uploads ORDER BY id"):
                if row_id in self._in_flight:
                    continue
                victims.append((row_id, row_size))
                count -= 1
                total -= row_size
                if self._fits(count, total, size):
                    break
        if not self._fits(count, total, size):
            raise ImageNotQueuedError(f"upload queue {self.path}: no room for an image of {size} bytes even after "
                                      f"evicting every pending image but the one being uploaded")
        reason = f"evicted: the upload backlog was full (max_images={self.max_images}, max_bytes={self.max_bytes})"
        for row_id, _ in victims:
            # The JPEG is not kept: eviction happens because there is no room for it.
            self._db.execute(
                "INSERT INTO lost (alert_id, key, uri, data, size, sha256, created, lost, kind, reason)"
                " SELECT alert_id, key, uri, NULL, size, sha256, created, ?, 'evicted', ? FROM uploads WHERE id = ?",
                (now, reason, row_id))
            self._db.execute("DELETE FROM uploads WHERE id = ?", (row_id,))
        self._bump("evicted", len(victims))
        self._trim_lost()
        self._count, self._bytes = count, total
        return len(victims)

    def _trim_lost(self) -> None:
        self._db.execute("DELETE FROM lost WHERE id <= (SELECT MAX(id) FROM lost) - ?", (LOST_LIMIT,))

    def _reload_totals(self) -> None:
        # After a rolled-back transaction the in-memory totals may be off; SQLite is the truth.
        try:
            self._count, self._bytes = self._count_rows()
        except sqlite3.Error as exc:
            log.error("upload queue %s: cannot recount images: %s", self.path, exc)

    # ------------------------------------------------------------ public API

    def put(self, alert_id: str, key: str, uri: str, data: bytes) -> QueuedImage:
        """Store one image durably (one synced commit); evicts the oldest pending images when full.

        Storing the same alert id again stores nothing and returns the first image's URI and hash,
        so a part judged again after a crash names the object its first alert named.

        Raises:
            ImageNotQueuedError: the image alone is larger than the queue (the alert goes without it).
            UploadQueueError: SQLite failed (a full disk); nothing was stored.
        """
        size = len(data)
        if size > self.max_bytes:
            raise ImageNotQueuedError(f"image of alert {alert_id}: {size} bytes is more than the whole upload queue "
                                      f"(image_upload.max_bytes={self.max_bytes})")
        digest = hashlib.sha256(data).hexdigest()
        now = time.time()
        with self._lock:
            self._check_open()
            try:
                with durable.Transaction(self._db):
                    row = self._db.execute("SELECT uri, sha256 FROM uploads WHERE alert_id = ?",
                                           (alert_id,)).fetchone()
                    if row is not None:
                        return QueuedImage(alert_id, str(row[0]), str(row[1]))
                    evicted = self._evict_for(size, now)
                    self._db.execute(
                        "INSERT INTO uploads (alert_id, key, uri, data, size, sha256, created)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)", (alert_id, key, uri, data, size, digest, now))
                    self._bump("enqueued", 1)
            except sqlite3.Error as exc:
                self._reload_totals()
                raise UploadQueueError(f"upload queue {self.path}: cannot store the image of alert {alert_id}: "
                                       f"{exc}") from exc
            except BaseException:
                self._reload_totals()
                raise
            self._count += 1
            self._bytes += size
        if evicted:
            log.warning("upload queue full: evicted the %d oldest pending images (reported in status as lost)",
                        evicted)
        return QueuedImage(alert_id, uri, digest)

    def claim(self) -> UploadJob | None:
        """The oldest image not in flight, now marked in flight; None when there is none.

        In-flight marks live in memory only: after a restart every stored image is uploaded again
        (a PUT of the same bytes to the same key is harmless).
        """
        with self._lock:
            self._check_open()
            try:
                marks = ",".join("?" * len(self._in_flight))
                row = self._db.execute(
                    "SELECT id, alert_id, key, uri, data, sha256, created, attempts FROM uploads"
                    + (f" WHERE id NOT IN ({marks})" if marks else "") + " ORDER BY id LIMIT 1",
                    tuple(self._in_flight)).fetchone()
            except sqlite3.Error as exc:
                raise UploadQueueError(f"upload queue {self.path}: cannot read images: {exc}") from exc
            if row is None:
                return None
            self._in_flight.add(int(row[0]))
            return UploadJob(int(row[0]), row[1], row[2], row[3], bytes(row[4]), row[5], float(row[6]), int(row[7]))

    def done(self, row_id: int) -> bool:
        """Delete an uploaded image; False if it was no longer stored.

        Committed without a disk sync: a done lost to a power cut only uploads the image again.
        """
        with self._lock:
            self._check_open()
            self._in_flight.discard(row_id)
            try:
                with durable.Transaction(self._db, synced=False):
                    row = self._db.execute("SELECT size FROM uploads WHERE id = ?", (row_id,)).fetchone()
                    if row is None:
                        return False
                    self._db.execute("DELETE FROM uploads WHERE id = ?", (row_id,))
                    self._bump("uploaded", 1)
            except sqlite3.Error as exc:
                self._reload_totals()
                raise UploadQueueError(f"upload queue {self.path}: cannot delete an uploaded image: {exc}") from exc
            self._count -= 1
            self._bytes -= int(row[0])
            return True

    def retry(self, row_id: int, error: str) -> None:
        """The upload failed for now: the image goes back to the queue, in its place, with the error noted."""
        with self._lock:
            self._check_open()
            self._in_flight.discard(row_id)
            try:
                with durable.Transaction(self._db, synced=False):
                    self._db.execute("UPDATE uploads SET attempts = attempts + 1, last_error = ? WHERE id = ?",
                                     (error[:500], row_id))
            except sqlite3.Error as exc:  # the count of attempts is information, not state: never fatal
                log.warning("upload queue %s: cannot note a failed attempt: %s", self.path, exc)

    def dead_letter(self, row_id: int, reason: str) -> bool:
        """Move an image the store refused for good to ``lost``, with the reason and its JPEG; False if gone."""
        with self._lock:
            self._check_open()
            self._in_flight.discard(row_id)
            try:
                with durable.Transaction(self._db):
                    row = self._db.execute("SELECT size FROM uploads WHERE id = ?", (row_id,)).fetchone()
                    if row is None:
                        return False
                    self._db.execute(
                        "INSERT INTO lost (alert_id, key, uri, data, size, sha256, created, lost, kind, reason)"
                        " SELECT alert_id, key, uri, data, size, sha256, created, ?, 'refused', ?"
                        " FROM uploads WHERE id = ?", (time.time(), reason, row_id))
                    self._db.execute("DELETE FROM uploads WHERE id = ?", (row_id,))
                    self._bump("dead_lettered", 1)
                    self._trim_lost()
            except sqlite3.Error as exc:
                self._reload_totals()
                raise UploadQueueError(f"upload queue {self.path}: cannot move a refused image aside: {exc}") from exc
            self._count -= 1
            self._bytes -= int(row[0])
            return True

    def release_all(self) -> None:
        """Forget every in-flight mark (the uploader stopped mid-upload): those images are pending again."""
        with self._lock:
            self._in_flight.clear()

    def lost(self, *, unreported_only: bool = False, limit: int = LOST_LIMIT) -> list[LostImage]:
        """Lost images, oldest first (``unreported_only``: those no status message has named yet)."""
        where = " WHERE reported = 0" if unreported_only else ""
        with self._lock:
            self._check_open()
            try:
                rows = self._db.execute(
                    f"SELECT id, alert_id, uri, kind, reason, lost FROM lost{where} ORDER BY id LIMIT ?",
                    (limit,)).fetchall()
            except sqlite3.Error as exc:
                raise UploadQueueError(f"upload queue {self.path}: cannot read lost images: {exc}") from exc
        return [LostImage(int(r[0]), r[1], r[2], r[3], r[4], float(r[5])) for r in rows]

    def lost_image(self, row_id: int) -> bytes | None:
        """The JPEG of a refused image (evicted ones are not kept)."""
        with self._lock:
            self._check_open()
            row = self._db.execute("SELECT data FROM lost WHERE id = ?", (row_id,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def mark_reported(self, row_ids: list[int]) -> None:
        """Lost images a stored status message now names; they are not reported again."""
        if not row_ids:
            return
        with self._lock:
            self._check_open()
            try:
                with durable.Transaction(self._db, synced=False):
                    self._db.executemany("UPDATE lost SET reported = 1 WHERE id = ?", [(i,) for i in row_ids])
            except sqlite3.Error as exc:  # reported again next time: a duplicate, never a loss
                log.warning("upload queue %s: cannot mark lost images reported: %s", self.path, exc)

    def stats(self) -> UploadQueueStats:
        with self._lock:
            self._check_open()
            try:
                counters = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
                oldest = self._db.execute("SELECT MIN(created) FROM uploads").fetchone()[0]
            except sqlite3.Error as exc:
                raise UploadQueueError(f"upload queue {self.path}: cannot read counters: {exc}") from exc
            return UploadQueueStats(backlog=self._count, bytes=self._bytes, enqueued=int(counters.get("enqueued", 0)),
                                    uploaded=int(counters.get("uploaded", 0)),
                                    evicted=int(counters.get("evicted", 0)),
                                    dead_lettered=int(counters.get("dead_lettered", 0)),
                                    oldest_created=None if oldest is None else float(oldest))

    @property
    def backlog(self) -> int:
        """Images stored now (the one in flight included); cheap, no SQL."""
        with self._lock:
            return self._count

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            durable.close(self._db, self._lock_fd, f"upload queue {self.path}")

    def __enter__(self) -> UploadQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
