"""The durable SQLite files (the outbox, the image upload queue): private, one process at a time, synced commits.

Both hold what the agent promised to deliver, so both follow one rule set: WAL with
``synchronous=FULL`` (a commit is on disk before it returns; on a factory line the power does
get cut), created 0600 in a 0700 folder (they hold pictures of the line), and an exclusive lock
beside the file for as long as it is open, because the in-flight marks live in one process's
memory and two processes draining one file would send everything twice.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from pathlib import Path

from qcsight_edge.errors import DatabaseOpenError

log = logging.getLogger(__name__)


def lock_beside(path: Path) -> int:
    """Create ``path`` (0600, folder 0700) and hold an exclusive lock on ``<path>.lock``; returns the lock's fd.

    The kernel drops the lock when the holder dies, even by kill -9.

    Raises:
        DatabaseOpenError: the file cannot be created, or another process holds the lock.
    """
    lock_path = path.with_name(path.name + ".lock")
    try:
        # SQLite gives the -wal and -shm files the database file's mode.
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise DatabaseOpenError(f"cannot create {path} and its lock file: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise DatabaseOpenError(f"in use by another process (lock {lock_path})") from exc
    return fd


def connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """A connection in WAL mode with synced commits; ``BEGIN IMMEDIATE`` is issued by ``Transaction``.

    Raises:
        sqlite3.Error: not a database, or WAL cannot be enabled.
    """
    # isolation_level=None: Transaction issues BEGIN IMMEDIATE itself so each operation is one transaction.
    db = sqlite3.connect(str(path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    try:
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.DatabaseError(f"journal_mode is {mode}, WAL could not be enabled")
        db.execute("PRAGMA synchronous=FULL")
    except BaseException:
        db.close()
        raise
    return db


def close(db: sqlite3.Connection, lock_fd: int, what: str) -> None:
    """Close a database opened by connect() and release its lock_beside() lock.

    The WAL is folded back into the main file first, so a clean shutdown leaves one file; a failed
    checkpoint is logged (``what`` names the store) and the close goes on: the WAL is still valid.
    """
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error as exc:
        log.warning("%s: checkpoint at close failed: %s", what, exc)
    db.close()
    os.close(lock_fd)


class Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception.

    ``synced=False`` commits without waiting for the disk (synchronous=NORMAL for this commit
    only). It is atomic all the same, and the next synced commit flushes it too, since the WAL
    is one sequential file; a power cut can only lose the unsynced commits after the last synced
    one. Used for acks alone: a lost ack resends a message, a duplicate the cloud drops by id.
    """

    def __init__(self, db: sqlite3.Connection, synced: bool = True) -> None:
        self._db = db
        self._synced = synced

    def __enter__(self) -> None:
        if not self._synced:
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            if exc_type is None:
                try:
                    self._db.execute("COMMIT")
                except sqlite3.Error:
                    self._rollback()  # a commit that failed (a full disk) must not leave the transaction open
                    raise
            else:
                self._rollback()
        finally:
            if not self._synced:
                self._db.execute("PRAGMA synchronous=FULL")

    def _rollback(self) -> None:
        # After some errors (SQLITE_FULL on a full disk) SQLite has already rolled back by itself,
        # and a second ROLLBACK would raise and hide the real error.
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
