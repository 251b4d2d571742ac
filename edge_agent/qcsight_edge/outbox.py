"""The durable outbox: every device message is stored in SQLite before it is sent and deleted after its ack.

One SQLite file in WAL mode holds the pending messages, the per-device sequence counter and the
lifetime counters (enqueued, sent, evicted). It survives a broker outage, a ``kill -9`` and a
power cut: ``synchronous=FULL`` makes every commit durable on disk before it returns, because
on a factory line the power does get cut, and with NORMAL a power loss could roll back the last
commits, losing alerts the agent believed stored and moving the sequence counter backwards (the
cloud would then see one seq on two different messages). A synced commit costs one disk flush
(0.3-6 ms measured on a busy shared VM); ``put`` stores a message and its seq in one commit,
and acks are committed without a flush, since an ack lost to a power cut only means a resend.

The outbox is bounded by message count and by payload bytes. When a new message does not fit,
messages are evicted by kind, lowest priority first: metrics (oldest first), then status, then
alerts, because alerts are what operators review. The incoming message takes part in that
order, so a new metric never pushes out a stored alert: it is itself dropped (and counted).

Thread-safe: the pipeline thread enqueues while the sender thread claims and acks.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from qcsight_core.checks import check_int
from qcsight_core.errors import ConfigError
from qcsight_edge import durable
from qcsight_edge.errors import DatabaseOpenError, OutboxError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# Eviction priority: lower goes first when the outbox is full.
PRIORITY: Mapping[str, int] = {"metrics": 0, "status": 1, "alerts": 2}
_COUNTERS = ("enqueued", "sent", "evicted", "dead_lettered")
# Dead letters kept for inspection; beyond this the oldest go (the counter keeps counting).
DEAD_LETTER_LIMIT = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    kind TEXT NOT NULL,
    priority INTEGER NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_priority ON messages (priority, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    kind TEXT NOT NULL,
    created REAL NOT NULL,
    failed REAL NOT NULL,
    reason TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class OutboxMessage:
    """One stored message; ``row_id`` is what ``ack``/``release`` take."""

    row_id: int
    message_id: str
    topic: str
    payload: bytes
    kind: str
    created: float


@dataclass(frozen=True)
class DeadLetter:
    """A message the peer refused for good (NOT_AUTHORIZED, too large, ...), kept with the reason instead of sent."""

    message_id: str
    topic: str
    payload: bytes
    kind: str
    created: float
    failed: float
    reason: str


@dataclass(frozen=True)
class OutboxStats:
    """Counters for the status message; ``enqueued``/``sent``/``evicted`` persist across restarts."""

    depth: int
    bytes: int
    in_flight: int
    enqueued: int
    sent: int
    evicted: int
    seq: int
    dead_lettered: int = 0

    def for_status(self) -> dict[str, int]:
        """The ``outbox`` object of a ``qcsight.status/1`` message."""
        return {"depth": self.depth, "bytes": self.bytes, "evicted": self.evicted, "dead_letters": self.dead_lettered}


class Outbox:
    """A bounded, durable FIFO of device messages with a persistent sequence counter.

    Args:
        path: the SQLite file (created with its parent folder if missing).
        max_messages: most messages held; beyond it the eviction order applies.
        max_bytes: most payload bytes held; a single payload larger than this is refused.
        busy_timeout_s: how long a statement waits for a lock held by another process.
    """

    def __init__(self, path: Path | str, *, max_messages: int = 10_000, max_bytes: int = 64 * 1024 * 1024,
                 busy_timeout_s: float = 5.0) -> None:
        for name, value in (("max_messages", max_messages), ("max_bytes", max_bytes)):
            if not isinstance(value, int):  # built in code: a number, not the text a configuration may hold
                raise ConfigError(f"outbox.{name}", value, "an integer of at least 1")
            check_int(f"outbox.{name}", value, 1)
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._in_flight: set[int] = set()
        self._closed = False
        self._lock_fd = self._lock_file()
        try:
            self._db = durable.connect(self.path, busy_timeout_s)
        except OSError as exc:
            os.close(self._lock_fd)
            raise OutboxError(f"outbox {self.path}: cannot open: {exc}") from exc
        except sqlite3.Error as exc:
            os.close(self._lock_fd)
            raise OutboxError(f"outbox {self.path}: not a usable outbox database: {exc}") from exc
        try:
            self._open_schema()
            self._depth, self._bytes = self._count_rows()
        except sqlite3.Error as exc:
            self._db.close()
            os.close(self._lock_fd)
            raise OutboxError(f"outbox {self.path}: not a usable outbox database: {exc}") from exc
        log.info("outbox %s: %d messages (%d bytes) pending, next seq %d", self.path, self._depth, self._bytes,
                 self._meta("seq") + 1)

    def _lock_file(self) -> int:
        try:
            return durable.lock_beside(self.path)
        except DatabaseOpenError as exc:
            raise OutboxError(f"outbox {self.path}: {exc}") from exc

    def _open_schema(self) -> None:
        self._db.executescript(_SCHEMA)
        with self._transaction():
            self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            for key in ("seq", *_COUNTERS):
                self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, 0)", (key,))
        version = self._meta("schema_version")
        if version != SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"schema version {version}; this qcsight reads {SCHEMA_VERSION}")

    # ------------------------------------------------------------ internals (caller holds the lock)

    def _transaction(self, *, synced: bool = True) -> durable.Transaction:
        return durable.Transaction(self._db, synced)

    def _meta(self, key: str) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _bump(self, key: str, by: int) -> None:
        if by:
            self._db.execute("UPDATE meta SET value = value + ? WHERE key = ?", (by, key))

    def _check_open(self) -> None:
        if self._closed:
            raise OutboxError(f"outbox {self.path}: already closed")

    def _count_rows(self) -> tuple[int, int]:
        count, total = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()
        return int(count), int(total)

    def _fits(self, count: int, total: int, size: int) -> bool:
        return count + 1 <= self.max_messages and total + size <= self.max_bytes

    def _make_room(self, size: int, priority: int) -> bool:
        """Evict until one more message of ``size`` fits; False if the new message itself loses."""
        count, total = self._depth, self._bytes
        victims: list[int] = []
        for level in sorted(set(PRIORITY.values())):
            if self._fits(count, total, size):
                break
            if level > priority:
                # Everything still stored outranks the newcomer, so the newcomer is the one dropped.
                return False
            rows = self._db.execute("SELECT id, size FROM messages WHERE priority = ? ORDER BY id", (level,))
            for row_id, row_size in rows:
                victims.append(row_id)
                count -= 1
                total -= row_size
                if self._fits(count, total, size):
                    break
        if not self._fits(count, total, size):
            return False
        if victims:
            self._db.executemany("DELETE FROM messages WHERE id = ?", [(row_id,) for row_id in victims])
            self._bump("evicted", len(victims))
            self._in_flight.difference_update(victims)
            log.warning("outbox full: evicted %d messages (metrics, then status, then alerts)", len(victims))
        self._depth, self._bytes = count, total
        return True

    # ------------------------------------------------------------ public API

    def next_seq(self) -> int:
        """The next per-device sequence number (1, 2, ...), committed to disk before it is returned.

        It never repeats, even after a crash; a number taken but never enqueued leaves a gap.
        """
        with self._lock:
            self._check_open()
            try:
                with self._transaction():
                    self._bump("seq", 1)
                    return self._meta("seq")
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: cannot advance seq: {exc}") from exc

    def put(self, topic: str, kind: str, build: Callable[[int], tuple[str, bytes]]) -> tuple[int, bool]:
        """Take the next seq and store the message built with it, in one transaction (one disk sync).

        Args:
            topic: the MQTT topic it goes to.
            kind: ``metrics``, ``status`` or ``alerts``.
            build: called with the seq, under the outbox lock; returns (message_id, payload). Keep
                it to building and encoding the message. If it raises, nothing is stored and the
                seq is not used.

        Returns:
            (seq, stored); stored is False when the eviction order dropped the message at once.
        """
        self._check_kind(kind)
        with self._lock:
            self._check_open()
            try:
                with self._transaction():
                    self._bump("seq", 1)
                    seq = self._meta("seq")
                    message_id, payload = build(seq)
                    stored = self._insert(topic, bytes(payload), message_id, kind, None)
            except sqlite3.Error as exc:
                self._reload_totals()
                raise OutboxError(f"outbox {self.path}: cannot store a {kind} message: {exc}") from exc
            except BaseException:
                self._reload_totals()
                raise
            return seq, stored

    def enqueue(self, topic: str, payload: bytes, message_id: str, kind: str, *, created: float | None = None) -> bool:
        """Store one message durably; returns False when the eviction order dropped it at once.

        Args:
            topic: the MQTT topic it goes to.
            payload: the encoded message.
            message_id: the envelope's unique id; enqueuing the same id twice stores it once.
            kind: ``metrics``, ``status`` or ``alerts`` (sets its eviction priority).
            created: epoch seconds; now if omitted.

        Raises:
            OutboxError: the kind is unknown, the payload alone exceeds ``max_bytes``, or SQLite failed.
        """
        self._check_kind(kind)
        with self._lock:
            self._check_open()
            try:
                with self._transaction():
                    return self._insert(topic, bytes(payload), message_id, kind, created)
            except sqlite3.Error as exc:
                self._reload_totals()
                raise OutboxError(f"outbox {self.path}: cannot store message {message_id}: {exc}") from exc
            except BaseException:
                self._reload_totals()
                raise

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in PRIORITY:
            raise OutboxError(f"outbox: unknown message kind {kind!r}; one of {', '.join(PRIORITY)}")

    def _insert(self, topic: str, data: bytes, message_id: str, kind: str, created: float | None) -> bool:
        """Store one message inside the caller's transaction; in-memory totals follow on success."""
        size = len(data)
        if size > self.max_bytes:
            raise OutboxError(f"outbox: message {message_id} is {size} bytes, more than max_bytes={self.max_bytes}")
        priority = PRIORITY[kind]
        if self._db.execute("SELECT 1 FROM messages WHERE message_id = ?", (message_id,)).fetchone():
            return True
        if not self._make_room(size, priority):
            self._bump("evicted", 1)
            log.warning("outbox full of higher-priority messages: dropped new %s %s", kind, message_id)
            return False
        self._db.execute(
            "INSERT INTO messages (message_id, topic, payload, kind, priority, created, size)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (message_id, topic, data, kind, priority, time.time() if created is None else created, size))
        self._bump("enqueued", 1)
        self._depth += 1
        self._bytes += size
        return True

    def claim(self, limit: int) -> list[OutboxMessage]:
        """The oldest ``limit`` messages not already in flight, now marked in flight.

        In-flight marks live in memory only: after a restart every stored message is sendable again.
        """
        if limit < 1:
            return []
        with self._lock:
            self._check_open()
            if self._depth <= len(self._in_flight):
                return []
            try:
                rows = self._claim_rows(limit)
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: cannot read messages: {exc}") from exc
            batch = [OutboxMessage(row[0], row[1], row[2], bytes(row[3]), row[4], row[5]) for row in rows]
            self._in_flight.update(msg.row_id for msg in batch)
            return batch

    def _claim_rows(self, limit: int) -> list[tuple[int, str, str, bytes, str, float]]:
        # Skip in-flight ids in SQL only when there are few; otherwise read a wider page and filter.
        page = limit + len(self._in_flight)
        rows = self._db.execute(
            "SELECT id, message_id, topic, payload, kind, created FROM messages ORDER BY id LIMIT ?", (page,))
        out = []
        for row in rows:
            if row[0] not in self._in_flight:
                out.append(row)
                if len(out) == limit:
                    break
        return out

    def ack(self, row_ids: Iterable[int]) -> int:
        """Delete acknowledged messages; returns how many were still stored (evicted ones are skipped).

        The delete is committed without a disk sync (see durable.Transaction): after a power cut an ack
        may be undone and the message sent again, never lost.
        """
        ids = list(dict.fromkeys(row_ids))
        if not ids:
            return 0
        with self._lock:
            self._check_open()
            try:
                with self._transaction(synced=False):
                    removed, freed = 0, 0
                    for chunk in _chunks(ids, 500):
                        marks = ",".join("?" * len(chunk))
                        row = self._db.execute(
                            f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages WHERE id IN ({marks})",
                            chunk).fetchone()
                        self._db.execute(f"DELETE FROM messages WHERE id IN ({marks})", chunk)
                        removed += int(row[0])
                        freed += int(row[1])
                    self._bump("sent", removed)
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: cannot delete acknowledged messages: {exc}") from exc
            self._in_flight.difference_update(ids)
            self._depth -= removed
            self._bytes -= freed
            return removed

    def dead_letter(self, refused: Iterable[tuple[int, str]]) -> int:
        """Move messages the peer refused for good out of the queue, with the reason; returns how many moved.

        A refused message left in the queue would be retried forever and, sent first, hold up
        everything behind it. Dead letters stay in the file (the newest DEAD_LETTER_LIMIT) for a
        person to inspect; committed with a disk sync like a store, since the message leaves the queue.
        """
        items = list(dict(refused).items())
        if not items:
            return 0
        now = time.time()
        with self._lock:
            self._check_open()
            try:
                with self._transaction():
                    moved, freed = 0, 0
                    for row_id, reason in items:
                        row = self._db.execute("SELECT size FROM messages WHERE id = ?", (row_id,)).fetchone()
                        if row is None:
                            continue  # evicted meanwhile
                        self._db.execute(
                            "INSERT INTO dead_letters (message_id, topic, payload, kind, created, failed, reason)"
                            " SELECT message_id, topic, payload, kind, created, ?, ? FROM messages WHERE id = ?",
                            (now, reason, row_id))
                        self._db.execute("DELETE FROM messages WHERE id = ?", (row_id,))
                        moved += 1
                        freed += int(row[0])
                    self._bump("dead_lettered", moved)
                    self._db.execute("DELETE FROM dead_letters WHERE id <= (SELECT MAX(id) FROM dead_letters) - ?",
                                     (DEAD_LETTER_LIMIT,))
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: cannot move refused messages aside: {exc}") from exc
            self._in_flight.difference_update(row_id for row_id, _ in items)
            self._depth -= moved
            self._bytes -= freed
            return moved

    def dead_letters(self, limit: int = DEAD_LETTER_LIMIT) -> list[DeadLetter]:
        """The newest dead letters, oldest first."""
        with self._lock:
            self._check_open()
            try:
                rows = self._db.execute(
                    "SELECT message_id, topic, payload, kind, created, failed, reason FROM dead_letters"
                    " ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: cannot read dead letters: {exc}") from exc
        return [DeadLetter(r[0], r[1], bytes(r[2]), r[3], r[4], r[5], r[6]) for r in reversed(rows)]

    def release(self, row_ids: Iterable[int]) -> None:
        """Return in-flight messages to the queue (their publish failed); they keep their place."""
        with self._lock:
            self._in_flight.difference_update(row_ids)

    def stats(self) -> OutboxStats:
        with self._lock:
            self._check_open()
            try:
                counters = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
            except sqlite3.Error as exc:
                raise OutboxError(f"outbox {self.path}: cannot read counters: {exc}") from exc
            return OutboxStats(depth=self._depth, bytes=self._bytes, in_flight=len(self._in_flight),
                               enqueued=int(counters.get("enqueued", 0)), sent=int(counters.get("sent", 0)),
                               evicted=int(counters.get("evicted", 0)), seq=int(counters.get("seq", 0)),
                               dead_lettered=int(counters.get("dead_lettered", 0)))

    @property
    def depth(self) -> int:
        """Messages stored now (in flight included); cheap, no SQL."""
        with self._lock:
            return self._depth

    @property
    def pending(self) -> int:
        """Messages stored and not in flight; cheap, no SQL."""
        with self._lock:
            return self._depth - len(self._in_flight)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            durable.close(self._db, self._lock_fd, f"outbox {self.path}")

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reload_totals(self) -> None:
        # After a rolled-back transaction the in-memory totals may be off; SQLite is the truth.
        try:
            self._depth, self._bytes = self._count_rows()
        except sqlite3.Error as exc:
            log.error("outbox %s: cannot recount messages: %s", self.path, exc)


def _chunks(items: list[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
