"""The store in one SQLite file: the local stand-in for the DynamoDB tables, with the same access patterns.

WAL mode, so the review app reads while ingestion writes (other processes included). A batch of
records is one transaction: the ingestion subscriber acknowledges a batch to the broker only
after it committed, so a crash loses nothing the broker believes delivered. ``synchronous=NORMAL``
keeps a commit in memory until the next checkpoint: safe against a process crash, not against a
power cut of the host (``durable=True`` syncs every commit, at about 10x the cost per batch on
this VM's disk).

The indexes mirror the DynamoDB ones (infra/README.md, "Access patterns"): an inbox page is a
range read of one index in sort-key order, so page 1 and page 10,000 cost the same.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcsight_cloud import codec, timestamps
from qcsight_cloud.errors import NotFoundError, ReviewConflictError, StoreError
from qcsight_cloud.records import (
    Alert,
    AlertSummary,
    Decision,
    DeviceStatus,
    Record,
    Review,
    ReviewStats,
    Run,
    StatusEvent,
    Window,
)
from qcsight_cloud.store import (
    LOWEST_KEY,
    InboxQuery,
    Page,
    Store,
    current_state,
    encode_cursor,
    next_review,
    stats_from_reviews,
)
from qcsight_cloud.tracking import advance

SCHEMA_VERSION = 1
_ORIGIN = "message_id TEXT NOT NULL UNIQUE, sk TEXT NOT NULL, thing TEXT NOT NULL, line TEXT NOT NULL, " \
          "seq INTEGER NOT NULL, time TEXT NOT NULL, received TEXT NOT NULL"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alerts (
    id INTEGER PRIMARY KEY, {_ORIGIN},
    alert_id TEXT NOT NULL, frame_id TEXT NOT NULL, model_name TEXT NOT NULL, model_version TEXT NOT NULL,
    status TEXT NOT NULL, label TEXT NOT NULL, score REAL NOT NULL, confidence REAL NOT NULL, scores TEXT NOT NULL,
    image_ref TEXT, thumbnail TEXT, box TEXT, overlay TEXT,
    review_verdict TEXT, review_label TEXT, review_count INTEGER NOT NULL DEFAULT 0,
    reviewed INTEGER GENERATED ALWAYS AS (review_verdict IS NOT NULL) VIRTUAL
);
CREATE INDEX IF NOT EXISTS alerts_by_line ON alerts (line, sk);
CREATE INDEX IF NOT EXISTS alerts_by_thing ON alerts (thing, sk);
CREATE INDEX IF NOT EXISTS alerts_by_line_label ON alerts (line, label, sk);
CREATE INDEX IF NOT EXISTS alerts_unreviewed ON alerts (line, sk) WHERE reviewed = 0;
CREATE TABLE IF NOT EXISTS metrics (
    id INTEGER PRIMARY KEY, {_ORIGIN},
    start TEXT NOT NULL, "end" TEXT NOT NULL, seconds REAL NOT NULL, model_name TEXT NOT NULL,
    model_version TEXT NOT NULL, frames INTEGER NOT NULL, good INTEGER NOT NULL, defect INTEGER NOT NULL,
    uncertain INTEGER NOT NULL, dropped INTEGER NOT NULL, errors INTEGER NOT NULL, by_class TEXT NOT NULL,
    defect_rate REAL NOT NULL, confidence_p05 REAL NOT NULL, confidence_p50 REAL NOT NULL,
    confidence_p95 REAL NOT NULL, latency_p50 REAL NOT NULL, latency_p95 REAL NOT NULL, latency_p99 REAL NOT NULL,
    brightness REAL NOT NULL, contrast REAL NOT NULL, sharpness REAL NOT NULL, confidence_psi REAL,
    brightness_psi REAL
);
CREATE INDEX IF NOT EXISTS metrics_by_thing ON metrics (thing, sk);
CREATE INDEX IF NOT EXISTS metrics_by_line ON metrics (line, sk);
CREATE TABLE IF NOT EXISTS status (
    id INTEGER PRIMARY KEY, {_ORIGIN},
    event TEXT NOT NULL, state TEXT NOT NULL, uptime_s REAL NOT NULL, model_name TEXT, model_version TEXT,
    outbox_depth INTEGER, outbox_bytes INTEGER, outbox_evicted INTEGER, error TEXT, detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS status_by_thing ON status (thing, sk);
CREATE TABLE IF NOT EXISTS devices (
    thing TEXT PRIMARY KEY, line TEXT NOT NULL, first_seen TEXT NOT NULL, last_seen TEXT NOT NULL,
    last_time TEXT NOT NULL, received INTEGER NOT NULL, min_seq INTEGER NOT NULL, max_seq INTEGER NOT NULL,
    reordered INTEGER NOT NULL, error_count INTEGER NOT NULL, by_kind TEXT NOT NULL, uptime_s REAL,
    state TEXT, last_event TEXT, last_status_at TEXT, model_name TEXT, model_version TEXT, last_error TEXT,
    last_error_at TEXT, last_window_end TEXT, outbox_depth INTEGER, outbox_bytes INTEGER, outbox_evicted INTEGER,
    status_seq INTEGER, model_seq INTEGER, window_seq INTEGER
);
CREATE TABLE IF NOT EXISTS counters (
    identity TEXT NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL, PRIMARY KEY (identity, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reviews (
    alert_id TEXT NOT NULL, n INTEGER NOT NULL, review_id TEXT NOT NULL UNIQUE, reviewer TEXT NOT NULL,
    time TEXT NOT NULL, sk TEXT NOT NULL, month TEXT NOT NULL, action TEXT NOT NULL, verdict TEXT, label TEXT,
    previous_verdict TEXT, previous_label TEXT, undoes INTEGER, line TEXT NOT NULL, thing TEXT NOT NULL,
    predicted_label TEXT NOT NULL, model_version TEXT NOT NULL, PRIMARY KEY (alert_id, n)
);
CREATE INDEX IF NOT EXISTS reviews_by_time ON reviews (sk);
-- Reviews are append-only: the database itself refuses to change or delete one.
CREATE TRIGGER IF NOT EXISTS reviews_no_update BEFORE UPDATE ON reviews
    BEGIN SELECT RAISE(ABORT, 'reviews are append-only'); END;
CREATE TRIGGER IF NOT EXISTS reviews_no_delete BEFORE DELETE ON reviews
    BEGIN SELECT RAISE(ABORT, 'reviews are append-only'); END;
CREATE TABLE IF NOT EXISTS decisions (
    decision_id TEXT PRIMARY KEY, scope TEXT NOT NULL, time TEXT NOT NULL, action TEXT NOT NULL, sk TEXT NOT NULL,
    month TEXT NOT NULL, body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_by_scope ON decisions (scope, sk);
CREATE INDEX IF NOT EXISTS decisions_by_time ON decisions (sk);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, scope TEXT NOT NULL, requested TEXT NOT NULL, status TEXT NOT NULL, sk TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_scope ON runs (scope, sk);
"""
# Which index serves each InboxQuery.index, and the condition on its leading column(s).
_INBOX_INDEX = {
    "thing": ("alerts_by_thing", "thing = :thing"),
    "unreviewed": ("alerts_unreviewed", "line = :line AND reviewed = 0"),
    "line_label": ("alerts_by_line_label", "line = :line AND label = :label"),
    "line": ("alerts_by_line", "line = :line"),
}
_SUMMARY_COLUMNS = ("message_id, sk, thing, line, seq, time, received, alert_id, frame_id, model_name, model_version, "
                    "status, label, score, confidence, scores, image_ref, review_verdict, review_label, review_count")
_INBOX_CHUNK = 200


class SqliteStore:
    """The Store protocol on one SQLite file; safe to share between threads (one connection, one lock)."""

    def __init__(self, path: str | Path, *, durable: bool = False, timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None,
                                       check_same_thread=False)
            self._db.row_factory = _dict_row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._db.executescript(SCHEMA)
            self._add_anomaly_columns()
            self._check_version()
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.path}: cannot open: {exc}") from exc
        self._lock = threading.RLock()

    def _add_anomaly_columns(self) -> None:
        """A file made before alerts carried box and overlay gains the two columns (nullable: old rows stay)."""
        present = {row["name"] for row in self._db.execute("PRAGMA table_info(alerts)")}
        for column in ("box", "overlay"):
            if column not in present:
                self._db.execute(f"ALTER TABLE alerts ADD COLUMN {column} TEXT")

    def _check_version(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row["value"]) != SCHEMA_VERSION:
            raise StoreError(f"store {self.path}: schema version {row['value']}; this qcsight reads {SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------ writes

    def _transaction(self) -> _Transaction:
        return _Transaction(self)

    def put(self, records: Sequence[Record]) -> list[bool]:
        results: list[bool] = []
        with self._transaction() as db:
            devices: dict[str, DeviceStatus | None] = {}
            duplicates: dict[str, int] = {}
            for record in records:
                row, table = _row_of(record)
                cursor = db.execute(_insert_ignore(table, row), row)
                new = cursor.rowcount == 1
                results.append(new)
                thing = record.origin.thing
                if not new:
                    duplicates[thing] = duplicates.get(thing, 0) + 1
                    continue
                if thing not in devices:
                    devices[thing] = self._device(db, thing)
                devices[thing] = advance(devices[thing], record)
            for device in devices.values():
                assert device is not None
                row = codec.device_row(device)
                db.execute(_upsert("devices", row), row)
            for thing, n in duplicates.items():
                _add_count(db, thing, "duplicate", n)
        return results

    def count(self, identity: str, counts: Mapping[str, int]) -> None:
        with self._transaction() as db:
            for name, n in counts.items():
                _add_count(db, identity, name, n)

    def add_review(self, alert_id: str, reviewer: str, action: str, label: str | None = None, *,
                   expected_count: int | None = None, time: datetime | None = None) -> Review:
        with self._transaction() as db:
            row = db.execute("SELECT * FROM alerts WHERE message_id = ?", (alert_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"alert {alert_id!r} is not in the store")
            alert = codec.alert_from(row)
            reviews = [codec.review_from(r) for r in
                       db.execute("SELECT * FROM reviews WHERE alert_id = ? ORDER BY n", (alert_id,))]
            if expected_count is not None and expected_count != len(reviews):
                raise ReviewConflictError(f"alert {alert_id} has {len(reviews)} reviews, the reviewer saw "
                                          f"{expected_count}: reload it")
            review = next_review(alert, reviews, reviewer, action, label, uuid.uuid4().hex,
                                 timestamps.iso(time or timestamps.now()))
            review_row = codec.review_row(review)
            try:
                db.execute(_insert("reviews", review_row), review_row)
            except sqlite3.IntegrityError as exc:
                raise ReviewConflictError(f"alert {alert_id} was reviewed concurrently: {exc}") from exc
            state = current_state([*reviews, review])
            fields = codec.review_fields(state)
            db.execute("UPDATE alerts SET review_verdict = :review_verdict, review_label = :review_label, "
                       "review_count = :review_count WHERE message_id = :message_id",
                       {**fields, "message_id": alert_id})
        return review

    def record_decision(self, decision: Decision) -> None:
        row = codec.decision_row(decision)
        with self._transaction() as db:
            db.execute(_insert("decisions", row), row)

    def put_run(self, run: Run) -> None:
        row = codec.run_row(run)
        with self._transaction() as db:
            db.execute(_upsert("runs", row, key="run_id"), row)

    # ------------------------------------------------------------ reads

    def _read(self, sql: str, params: Mapping[str, Any] | Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: read failed: {exc}") from exc

    def _device(self, db: sqlite3.Connection, thing: str) -> DeviceStatus | None:
        row = db.execute("SELECT * FROM devices WHERE thing = ?", (thing,)).fetchone()
        return None if row is None else codec.device_from(row)

    def counters(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = {}
        for row in self._read("SELECT identity, name, value FROM counters ORDER BY identity, name"):
            result.setdefault(row["identity"], {})[row["name"]] = int(row["value"])
        return result

    def device(self, thing: str) -> DeviceStatus | None:
        rows = self._read("SELECT * FROM devices WHERE thing = ?", (thing,))
        return codec.device_from(rows[0]) if rows else None

    def devices(self) -> list[DeviceStatus]:
        return [codec.device_from(row) for row in self._read("SELECT * FROM devices ORDER BY thing")]

    def windows(self, *, since: datetime, until: datetime | None = None, thing: str | None = None,
                line: str | None = None, limit: int = 10_000, newest_first: bool = False) -> list[Window]:
        where, params = _series_where(thing, line, since, until)
        index = "metrics_by_thing" if thing is not None else "metrics_by_line"
        order = "DESC" if newest_first else "ASC"
        rows = self._read(f"SELECT * FROM metrics INDEXED BY {index} WHERE {where} ORDER BY sk {order} LIMIT :limit",
                          {**params, "limit": limit})
        return [codec.window_from(row) for row in rows]

    def status_events(self, thing: str, *, since: datetime, limit: int = 1000) -> list[StatusEvent]:
        rows = self._read("SELECT * FROM status WHERE thing = :thing AND sk >= :lo ORDER BY sk LIMIT :limit",
                          {"thing": thing, "lo": timestamps.iso(since), "limit": limit})
        return [codec.status_from(row) for row in rows]

    def get_alert(self, message_id: str) -> Alert | None:
        rows = self._read("SELECT * FROM alerts WHERE message_id = ?", (message_id,))
        return codec.alert_from(rows[0]) if rows else None

    def get_alerts(self, message_ids: Sequence[str]) -> list[Alert]:
        found: dict[str, Alert] = {}
        ids = list(dict.fromkeys(message_ids))
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._read(f"SELECT * FROM alerts WHERE message_id IN ({marks})", chunk):
                found[row["message_id"]] = codec.alert_from(row)
        return [found[i] for i in message_ids if i in found]

    def inbox(self, query: InboxQuery) -> Page:
        index, condition = _INBOX_INDEX[query.index]
        params = {"thing": query.thing, "line": query.line, "label": query.label, "lo": query.lower}
        sql = (f"SELECT {_SUMMARY_COLUMNS} FROM alerts INDEXED BY {index} WHERE {condition} "
               "AND sk >= :lo AND sk < :hi ORDER BY sk DESC LIMIT :chunk")
        items: list[AlertSummary] = []
        scanned = 0
        upper = query.upper  # exclusive: everything at or above it was examined
        index_has_more = True
        while len(items) < query.limit and scanned < query.scan_budget:
            chunk = min(_INBOX_CHUNK, query.scan_budget - scanned)
            rows = self._read(sql, {**params, "hi": upper, "chunk": chunk})
            for row in rows:
                scanned += 1
                upper = row["sk"]
                summary = codec.summary_from(row)
                if query.matches(summary):
                    items.append(summary)
                    if len(items) == query.limit:
                        break
            if len(items) < query.limit and len(rows) < chunk:
                index_has_more = False
                break
        if index_has_more and len(items) == query.limit:
            index_has_more = bool(self._read(sql, {**params, "hi": upper, "chunk": 1}))
        return Page(tuple(items), encode_cursor(upper) if index_has_more else None, scanned)

    def reviews(self, alert_id: str) -> list[Review]:
        return [codec.review_from(row) for row in
                self._read("SELECT * FROM reviews WHERE alert_id = ? ORDER BY n", (alert_id,))]

    def export_reviews(self, since: datetime | None = None, until: datetime | None = None) -> Iterator[Review]:
        lo = timestamps.iso(since) if since is not None else LOWEST_KEY
        hi = timestamps.iso(until) + "~" if until is not None else "~"
        while True:
            rows = self._read("SELECT * FROM reviews INDEXED BY reviews_by_time WHERE sk > :lo AND sk < :hi "
                              "ORDER BY sk LIMIT 500", {"lo": lo, "hi": hi})
            yield from (codec.review_from(row) for row in rows)
            if len(rows) < 500:
                return
            lo = rows[-1]["sk"]

    def review_stats(self, since: datetime, line: str | None = None) -> ReviewStats:
        return stats_from_reviews(timestamps.iso(since), self.export_reviews(since), line)

    def decisions(self, scope: str | None = None, since: datetime | None = None, limit: int = 50) -> list[Decision]:
        lo = timestamps.iso(since) if since is not None else LOWEST_KEY
        if scope is None:
            rows = self._read("SELECT * FROM decisions WHERE sk >= ? ORDER BY sk DESC LIMIT ?", (lo, limit))
        else:
            rows = self._read("SELECT * FROM decisions WHERE scope = ? AND sk >= ? ORDER BY sk DESC LIMIT ?",
                              (scope, lo, limit))
        return [codec.decision_from(row) for row in rows]

    def runs(self, scope: str, since: datetime | None = None) -> list[Run]:
        lo = timestamps.iso(since) if since is not None else LOWEST_KEY
        rows = self._read("SELECT * FROM runs WHERE scope = ? AND sk >= ? ORDER BY sk", (scope, lo))
        return [codec.run_from(row) for row in rows]

    def explain_inbox(self, query: InboxQuery) -> str:
        """SQLite's plan for an inbox page (tests check that it is an index range, never a table scan)."""
        index, condition = _INBOX_INDEX[query.index]
        sql = (f"EXPLAIN QUERY PLAN SELECT {_SUMMARY_COLUMNS} FROM alerts INDEXED BY {index} WHERE {condition} "
               "AND sk >= :lo AND sk < :hi ORDER BY sk DESC LIMIT 10")
        rows = self._read(sql, {"thing": query.thing, "line": query.line, "label": query.label, "lo": LOWEST_KEY,
                                "hi": "~"})
        return "\n".join(str(row["detail"]) for row in rows)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT under the store's lock; rolls back and raises StoreError on failure."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        self.store._lock.acquire()
        try:
            self.store._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self.store._lock.release()
            raise StoreError(f"store {self.store.path}: cannot begin a write: {exc}") from exc
        return self.store._db

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        db = self.store._db
        try:
            if kind is None:
                try:
                    db.execute("COMMIT")
                except sqlite3.Error as error:
                    db.execute("ROLLBACK")
                    raise StoreError(f"store {self.store.path}: commit failed: {error}") from error
            else:
                db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"store {self.store.path}: write failed: {exc}") from exc
        finally:
            self.store._lock.release()


def _dict_row(cursor: sqlite3.Cursor, values: tuple[Any, ...]) -> dict[str, Any]:
    return {column[0]: value for column, value in zip(cursor.description, values, strict=True)}


def _row_of(record: Record) -> tuple[dict[str, Any], str]:
    if isinstance(record, Alert):
        return codec.alert_row(record), "alerts"
    if isinstance(record, Window):
        return codec.window_row(record), "metrics"
    return codec.status_row(record), "status"


def _columns(row: Mapping[str, Any]) -> tuple[str, str]:
    names = ", ".join(f'"{name}"' for name in row)
    values = ", ".join(f":{name}" for name in row)
    return names, values


def _insert(table: str, row: Mapping[str, Any]) -> str:
    return _insert_sql(table, tuple(row))


def _insert_ignore(table: str, row: Mapping[str, Any]) -> str:
    return _insert_sql(table, tuple(row), " ON CONFLICT (message_id) DO NOTHING")


def _upsert(table: str, row: Mapping[str, Any], key: str = "thing") -> str:
    return _upsert_sql(table, tuple(row), key)


# Statements are built once per table and column set: building them per row cost ~20 % of ingestion.
@functools.lru_cache(maxsize=64)
def _insert_sql(table: str, names: tuple[str, ...], tail: str = "") -> str:
    columns, values = _columns(dict.fromkeys(names))
    return f"INSERT INTO {table} ({columns}) VALUES ({values}){tail}"


@functools.lru_cache(maxsize=64)
def _upsert_sql(table: str, names: tuple[str, ...], key: str) -> str:
    updates = ", ".join(f'"{name}" = excluded."{name}"' for name in names if name != key)
    return _insert_sql(table, names, f" ON CONFLICT ({key}) DO UPDATE SET {updates}")


def _add_count(db: sqlite3.Connection, identity: str, name: str, n: int) -> None:
    db.execute("INSERT INTO counters VALUES (?, ?, ?) ON CONFLICT (identity, name) DO UPDATE SET value = value + ?",
               (identity, name, n, n))


def _series_where(thing: str | None, line: str | None, since: datetime,
                  until: datetime | None) -> tuple[str, dict[str, Any]]:
    if thing is None and line is None:
        raise StoreError("a metrics series needs a thing or a line")
    params: dict[str, Any] = {"lo": timestamps.iso(since),
                              "hi": timestamps.iso(until) + "~" if until is not None else "~"}
    where = "sk >= :lo AND sk < :hi"
    if thing is not None:
        where = "thing = :thing AND " + where
        params["thing"] = thing
    if line is not None:
        where = "line = :line AND " + where
        params["line"] = line
    return where, params


if TYPE_CHECKING:

    def _implements_store(store: SqliteStore) -> Store:
        return store  # mypy proves SqliteStore satisfies the Store protocol
