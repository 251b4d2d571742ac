"""The durable outbox on real SQLite files: order, bounds, eviction, persistence, kill -9, threads."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qcsight_core import messages
from qcsight_core.errors import ConfigError, MessageError
from qcsight_edge.errors import OutboxError
from qcsight_edge.outbox import Outbox
from tests.edge.broker import encoded
from tests.helpers.wait import eventually

REPO = Path(__file__).resolve().parents[2]


def _put(outbox: Outbox, kind: str, n: int = 1, size: int = 10) -> list[str]:
    ids = []
    for _ in range(n):
        seq = outbox.next_seq()
        message_id = f"{kind}-{seq}"
        assert outbox.enqueue(f"qcsight/t/{kind}", b"x" * size, message_id, kind)
        ids.append(message_id)
    return ids


def _stored(outbox: Outbox) -> list[str]:
    batch = outbox.claim(10_000)
    outbox.release(m.row_id for m in batch)
    return [m.message_id for m in batch]


def test_fifo_claim_release_ack(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as outbox:
        topic, message_id, payload = encoded("alerts", "thing-a", outbox.next_seq())
        assert outbox.enqueue(topic, payload, message_id, "alerts")
        ids = [message_id, *_put(outbox, "metrics", 4)]
        first = outbox.claim(2)
        assert [m.message_id for m in first] == ids[:2]
        assert (first[0].topic, first[0].payload, first[0].kind) == (topic, payload, "alerts")
        second = outbox.claim(10)  # in-flight rows are not handed out twice
        assert [m.message_id for m in second] == ids[2:]
        assert outbox.claim(10) == []
        outbox.release([first[1].row_id])  # a failed publish keeps its place in the queue
        assert [m.message_id for m in outbox.claim(10)] == [ids[1]]
        assert outbox.ack([first[0].row_id, first[1].row_id]) == 2
        assert outbox.ack([first[0].row_id]) == 0  # a second ack of the same row changes nothing
        # Acks commit without a disk flush; every other write must still be synced (2 = FULL).
        assert outbox._db.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert outbox._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        stats = outbox.stats()
        assert (stats.depth, stats.sent, stats.enqueued, stats.in_flight) == (3, 2, 5, 3)
        assert stats.bytes == sum(len(m.payload) for m in second)
        assert stats.for_status() == {"depth": 3, "bytes": stats.bytes, "evicted": 0, "dead_letters": 0}


def test_messages_counters_and_seq_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as outbox:
        ids = _put(outbox, "alerts", 3)
        outbox.ack([outbox.claim(1)[0].row_id])
        outbox.claim(5)  # in flight when the process goes away: must be sendable after reopen
    with Outbox(path) as outbox:
        assert [m.message_id for m in outbox.claim(10)] == ids[1:]
        stats = outbox.stats()
        assert (stats.depth, stats.sent, stats.enqueued, stats.seq) == (2, 1, 3, 3)
        assert outbox.next_seq() == 4


def test_put_takes_the_seq_and_stores_in_one_step(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as outbox:
        seq, stored = outbox.put("qcsight/thing-a/alerts", "alerts",
                                 lambda seq: encoded("alerts", "thing-a", seq)[1:])
        assert (seq, stored) == (1, True)
        [message] = outbox.claim(1)
        assert messages.decode(message.payload)["seq"] == 1
        assert messages.decode(message.payload)["message_id"] == message.message_id

        def broken(seq: int) -> tuple[str, bytes]:
            raise MessageError("message.verdict: required field is missing")

        with pytest.raises(MessageError):
            outbox.put("t", "alerts", broken)
        assert outbox.stats().depth == 1  # nothing stored, and the seq was not used
        assert outbox.next_seq() == 2


def test_same_message_id_is_stored_once(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as outbox:
        assert outbox.enqueue("t", b"a", "same", "status")
        assert outbox.enqueue("t", b"a", "same", "status")
        assert outbox.stats().depth == 1


def test_eviction_order_metrics_then_status_then_alerts(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_messages=6) as outbox:
        alerts = _put(outbox, "alerts", 2)
        metrics = _put(outbox, "metrics", 2)
        status = _put(outbox, "status", 2)
        assert outbox.stats().depth == 6
        new_alerts = _put(outbox, "alerts", 2)  # full: the two metrics go, oldest first
        assert _stored(outbox) == alerts + status + new_alerts
        assert outbox.stats().evicted == 2
        more_alerts = _put(outbox, "alerts", 1)  # then status, oldest first
        assert _stored(outbox) == [*alerts, status[1], *new_alerts, *more_alerts]
        # Only alerts and one status left: a new metric is the lowest priority, so it is the one dropped.
        assert not outbox.enqueue("t", b"m", "late-metric", "metrics")
        assert "late-metric" not in _stored(outbox)
        assert outbox.stats().evicted == 4
        _put(outbox, "alerts", 2)  # then alerts, oldest first
        kept = _stored(outbox)
        assert alerts[0] not in kept and status[1] not in kept
        assert len(kept) == 6
        assert metrics[0] not in kept


def test_byte_bound_and_oversized_message(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_bytes=1000) as outbox:
        metrics = _put(outbox, "metrics", 3, size=300)
        alerts = _put(outbox, "alerts", 1, size=300)  # 1200 > 1000: the oldest metric goes
        assert _stored(outbox) == metrics[1:] + alerts
        assert outbox.stats().bytes == 900
        with pytest.raises(OutboxError, match="1001 bytes, more than max_bytes=1000"):
            outbox.enqueue("t", b"x" * 1001, "huge", "alerts")
        with pytest.raises(OutboxError, match="unknown message kind 'frames'"):
            outbox.enqueue("t", b"x", "k", "frames")


def test_bad_bounds_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"outbox\.max_messages"):
        Outbox(tmp_path / "o.db", max_messages=0)
    with pytest.raises(ConfigError, match=r"outbox\.max_bytes"):
        Outbox(tmp_path / "o.db", max_bytes=-1)


def test_a_second_opener_and_a_corrupt_file_are_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path), pytest.raises(OutboxError, match="in use by another process"):
        Outbox(path)
    with Outbox(path):  # the lock is released at close
        pass
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(OutboxError, match=r"bad\.db: not a usable outbox database"):
        Outbox(bad)
    with sqlite3.connect(tmp_path / "old.db") as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        db.execute("INSERT INTO meta VALUES ('schema_version', 99)")
    with pytest.raises(OutboxError, match="schema version 99"):
        Outbox(tmp_path / "old.db")


def test_concurrent_enqueue_and_drain(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db", max_messages=100_000)
    per_producer, producers = 100, 3
    acked: list[str] = []
    done = threading.Event()
    errors: list[BaseException] = []

    def produce(k: int) -> None:
        try:
            for i in range(per_producer):
                outbox.enqueue("t", b"p", f"{k}-{i}-{outbox.next_seq()}", ("metrics", "status", "alerts")[i % 3])
        except BaseException as exc:
            errors.append(exc)

    def drain() -> None:
        try:
            while not (done.is_set() and outbox.depth == 0):
                batch = outbox.claim(16)
                acked.extend(m.message_id for m in batch)
                outbox.ack(m.row_id for m in batch)
                if not batch:
                    time.sleep(0.001)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(producers)]
    drainers = [threading.Thread(target=drain) for _ in range(2)]
    for t in threads + drainers:
        t.start()
    for t in threads:
        t.join(30)
    done.set()
    for t in drainers:
        t.join(30)
    stats = outbox.stats()
    outbox.close()
    assert not errors
    assert len(acked) == len(set(acked)) == per_producer * producers  # no row handed to two drainers
    assert (stats.depth, stats.bytes, stats.sent, stats.enqueued) == (0, 0, 300, 300)
    assert stats.seq == 300


_CHILD = """
import sys
from qcsight_edge.outbox import Outbox
outbox = Outbox(sys.argv[1])
out = open(sys.argv[2], "a", buffering=1)
while True:
    # Both ways of taking a seq: put() (seq and message in one commit) and next_seq() + enqueue().
    seq, _ = outbox.put("qcsight/t/alerts", "alerts", lambda seq: (f"m-{seq}", b"a" * 200))
    out.write(f"{seq}\\n")  # written only after the call returned: what the caller was promised
    seq = outbox.next_seq()
    outbox.enqueue("qcsight/t/alerts", b"a" * 200, f"m-{seq}", "alerts")
    out.write(f"{seq}\\n")
"""


def test_kill_9_loses_no_enqueued_message_and_seq_never_repeats(tmp_path: Path) -> None:
    db, journal = tmp_path / "o.db", tmp_path / "journal.txt"
    promised: list[int] = []
    for _round in range(2):
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(db), str(journal)], cwd=REPO,
                                 env={**os.environ, "PYTHONPATH": str(REPO / "edge_agent")})
        try:
            want = len(promised) + 100
            eventually(lambda: journal.exists() and len(journal.read_text().splitlines()) >= want,  # noqa: B023
                       20, message="the child did not journal 100 more messages")
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(5)
        assert child.returncode == -signal.SIGKILL
        promised = [int(line) for line in journal.read_text().splitlines()]
    assert len(promised) >= 200
    assert len(promised) == len(set(promised)), "a seq was handed out twice across a kill -9"
    assert promised == sorted(promised)
    with Outbox(db) as outbox:
        stored = {int(m.message_id.split("-")[1]) for m in outbox.claim(100_000)}
        assert set(promised) <= stored  # every enqueue that returned is on disk
        assert outbox.next_seq() > max(stored)
