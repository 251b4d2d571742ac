"""Cloud ingestion throughput and memory, inbox paging at scale, and policy evaluation time, each against a baseline
measured in the same run.

1. SQLite ingestion: Ingestor.ingest_batch (validate, check identity, store, track devices) on batches of
   ``--batch`` messages, as the broker subscriber does, one thread; messages/s and CPU seconds, against
   ``json.loads`` of the same payloads and against raw SQLite inserts of the same payloads (one row each, the
   same batches, WAL, synchronous=NORMAL). RSS is sampled every 10 % of ``--messages`` to show it stays flat.
2. Inbox at that size: page times (p50/p95) of the queries the review app makes, against a primary-key read.
3. DynamoDB ingestion on a moto server on loopback (``--dynamo-messages``; moto runs in this process and is
   far slower than DynamoDB, so this is a test of the request path, not of DynamoDB), against raw PutItem
   calls of the same messages on the same server.
4. Policy: decide() for ``--devices`` devices in ``--lines`` lines, against a loop that only sums the same
   windows' counts.

The message mix is 70 % alerts (256-byte thumbnails), 20 % metrics windows, 10 % heartbeats from
``--things`` devices. Needs the ``cloud`` and ``dev`` extras. Example::

    nice -n 10 .venv/bin/python benchmarks/bench_ingest.py --messages 1000000 --dynamo-messages 1000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "edge_agent"), str(REPO / "infra")]

import psutil  # noqa: E402

from qcsight_cloud import timestamps  # noqa: E402
from qcsight_cloud.ingest import Incoming, Ingestor  # noqa: E402
from qcsight_cloud.policy import DeviceEvidence, Evidence, PolicySettings, WindowStats, decide  # noqa: E402
from qcsight_cloud.sqlite_store import SqliteStore  # noqa: E402
from qcsight_cloud.store import InboxQuery, Store  # noqa: E402
from qcsight_core import messages, topics  # noqa: E402

T0 = datetime(2026, 3, 2, tzinfo=timezone.utc)
LABELS = ("crack", "spot", "scratch")
THUMBNAIL = {"format": "jpeg", "width": 64, "height": 48, "data": "A" * 256}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000, help="SQLite messages (default 200000)")
    parser.add_argument("--dynamo-messages", type=int, default=500, help="DynamoDB (moto) messages (default 500)")
    parser.add_argument("--things", type=int, default=1000, help="devices sending (default 1000)")
    parser.add_argument("--lines", type=int, default=100, help="lines (default 100)")
    parser.add_argument("--devices", type=int, default=10_000, help="devices for the policy figure (default 10000)")
    parser.add_argument("--batch", type=int, default=100, help="messages per store transaction (default 100)")
    parser.add_argument("--chunk", type=int, default=20_000, help="payloads generated at a time (default 20000)")
    parser.add_argument("--dir", type=Path, help="where the SQLite files go (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


# ---------------------------------------------------------------- messages


class Fleet:
    """Devices sending a reproducible mix; each keeps its own seq and clock."""

    def __init__(self, things: int, lines: int, seed: int) -> None:
        self.things = [f"cam-{i:05d}" for i in range(things)]
        self.line = {thing: f"line-{i % lines:03d}" for i, thing in enumerate(self.things)}
        self.seq = dict.fromkeys(self.things, 0)
        self.rng = random.Random(seed)
        self.clock = 0

    def next(self) -> tuple[str, str, bytes]:
        thing = self.things[self.rng.randrange(len(self.things))]
        self.seq[thing] += 1
        self.clock += 1
        seq = self.seq[thing]
        when = T0 + timedelta(milliseconds=50 * self.clock)
        roll = self.rng.random()
        if roll < 0.7:
            kind = "alerts"
            score = self.rng.uniform(0.5, 1.0)
            label = LABELS[self.rng.randrange(3)]
            body: dict[str, Any] = {
                "alert_id": uuid.uuid4().hex, "frame_id": f"f{seq}", "model": {"name": "tile", "version": "3"},
                "verdict": {"status": "defect" if score > 0.6 else "uncertain", "label": label, "score": score,
                            "confidence": score, "scores": {"good": 1 - score, label: score}},
                "thumbnail": THUMBNAIL, "image_ref": f"s3://images/{thing}/{seq}.jpg"}
            schema = messages.ALERT
        elif roll < 0.9:
            kind, schema = "metrics", messages.METRICS
            frames = 600
            defects = self.rng.randrange(0, 12)
            body = {"window": {"start": timestamps.iso(when - timedelta(seconds=60)), "end": timestamps.iso(when),
                               "seconds": 60}, "model": {"name": "tile", "version": "3"},
                    "counts": {"frames": frames, "good": frames - defects, "defect": defects, "uncertain": 0,
                               "dropped": 0, "errors": 0}, "by_class": {"good": frames - defects, "crack": defects},
                    "defect_rate": defects / frames, "confidence": {"p05": 0.5, "p50": 0.9, "p95": 0.99},
                    "latency_ms": {"p50": 5.0, "p95": 7.5, "p99": 9.0},
                    "input": {"brightness": 120.0, "contrast": 30.0, "sharpness": 250.0},
                    "drift": {"confidence_psi": self.rng.uniform(0, 0.1), "brightness_psi": self.rng.uniform(0, 0.1)}}
        else:
            kind, schema = "status", messages.STATUS
            body = {"event": "heartbeat", "state": "running", "uptime_s": float(seq),
                    "model": {"name": "tile", "version": "3"}, "outbox": {"depth": 0, "bytes": 0, "evicted": 0}}
        message = {"schema": schema, "message_id": uuid.uuid4().hex, "thing": thing, "seq": seq,
                   "time": timestamps.iso(when), **body}
        return thing, topics.topic(thing, kind), json.dumps(message, separators=(",", ":")).encode()

    def chunks(self, total: int, size: int) -> Iterator[list[Incoming]]:
        received = timestamps.iso(T0)
        left = total
        while left > 0:
            n = min(size, left)
            left -= n
            yield [Incoming(t, topic, payload, received) for t, topic, payload in (self.next() for _ in range(n))]


def rss_mb() -> float:
    return float(psutil.Process().memory_info().rss) / 2**20


# ---------------------------------------------------------------- 1. SQLite ingestion


class Timer:
    """Wall and CPU seconds of a block: on a shared machine the CPU figure is the one-core rate."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def bench_json(payloads: list[bytes]) -> Timer:
    with Timer() as timer:
        for payload in payloads:
            json.loads(payload)
    return timer


def bench_raw_sqlite(path: Path, payloads: list[bytes], batch: int) -> Timer:
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE raw (message_id TEXT PRIMARY KEY, payload BLOB NOT NULL)")
    rows = [(uuid.uuid4().hex, p) for p in payloads]
    with Timer() as timer:
        for i in range(0, len(rows), batch):
            db.execute("BEGIN")
            db.executemany("INSERT INTO raw VALUES (?, ?)", rows[i:i + batch])
            db.execute("COMMIT")
    db.close()
    return timer


def bench_sqlite_ingest(store: SqliteStore, fleet: Fleet, args: argparse.Namespace) -> dict[str, Any]:
    ingestor = Ingestor(store, fleet.line.__getitem__)
    busy = cpu = 0.0
    done = 0
    samples: list[tuple[int, float]] = []
    step = max(args.messages // 10, 1)
    next_sample = step
    baselines: dict[str, Any] = {}
    for chunk in fleet.chunks(args.messages, args.chunk):
        if not baselines:  # the baselines run on the first chunk's payloads, before they are ingested
            payloads = [m.payload for m in chunk]
            baselines["n"] = len(payloads)
            baselines["json"] = bench_json(payloads)
            baselines["raw_sqlite"] = bench_raw_sqlite(store.path.with_name("raw.sqlite"), payloads, args.batch)
        wall, process = time.perf_counter(), time.process_time()
        for i in range(0, len(chunk), args.batch):
            ingestor.ingest_batch(chunk[i:i + args.batch])
        busy += time.perf_counter() - wall
        cpu += time.process_time() - process
        done += len(chunk)
        if done >= next_sample:
            samples.append((done, rss_mb()))
            print(f"  {done:>9,} messages  {done / busy:8,.0f} msg/s  RSS {samples[-1][1]:7.1f} MB", flush=True)
            next_sample = (done // step + 1) * step
    return {"rate": done / busy, "cpu_s": cpu, "wall_s": busy, "samples": samples, **baselines}


# ---------------------------------------------------------------- 2. inbox at scale


def _timed(call: Callable[[], Any], repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def bench_inbox(store: Store, fleet: Fleet, repeats: int = 40) -> list[tuple[str, float, float]]:
    rng = random.Random(1)
    lines = sorted(set(fleet.line.values()))
    deep_cursor: dict[str, str | None] = {}
    for line in lines[:5]:  # a cursor 20 pages (1,000 alerts) down each line
        cursor = None
        for _ in range(20):
            cursor = store.inbox(InboxQuery(line=line, limit=50, cursor=cursor)).cursor
        deep_cursor[line] = cursor
    some = store.inbox(InboxQuery(line=lines[0], limit=50)).items
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("get_alert by id (baseline)", lambda: store.get_alert(some[rng.randrange(len(some))].message_id)),
        ("line, newest 50", lambda: store.inbox(InboxQuery(line=rng.choice(lines), limit=50))),
        ("line, page 21 (cursor)", lambda: store.inbox(InboxQuery(line=(line := rng.choice(lines[:5])), limit=50,
                                                                  cursor=deep_cursor[line]))),
        ("line + class", lambda: store.inbox(InboxQuery(line=rng.choice(lines), label="spot", limit=50))),
        ("line, unreviewed", lambda: store.inbox(InboxQuery(line=rng.choice(lines), reviewed=False, limit=50))),
        ("device", lambda: store.inbox(InboxQuery(thing=rng.choice(fleet.things), limit=50))),
        ("line + score 0.9-1 + 1 h", lambda: store.inbox(InboxQuery(
            line=rng.choice(lines), score_min=0.9, since=T0 + timedelta(hours=2), until=T0 + timedelta(hours=3),
            limit=50))),
    ]
    return [(name, *_timed(call, repeats)) for name, call in cases]


# ---------------------------------------------------------------- 3. DynamoDB on moto


def bench_dynamo(fleet: Fleet, n: int) -> dict[str, float]:
    from tests.helpers.aws import FAKE_ENV, moto_server

    os.environ.update(FAKE_ENV)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with moto_server() as url:
        os.environ["AWS_ENDPOINT_URL"] = url
        from qcsight_cloud.dynamodb_store import DynamoStore, to_item

        store = DynamoStore.from_environment("bench")
        store.create_tables()
        store.client.create_table(TableName="bench-raw", BillingMode="PAY_PER_REQUEST",
                                  KeySchema=[{"AttributeName": "message_id", "KeyType": "HASH"}],
                                  AttributeDefinitions=[{"AttributeName": "message_id", "AttributeType": "S"}])
        [batch] = list(fleet.chunks(n, n))
        start = time.perf_counter()
        for item in batch:
            store.client.put_item(TableName="bench-raw", Item=to_item(
                {"message_id": uuid.uuid4().hex, "payload": item.payload.decode()}))
        raw = n / (time.perf_counter() - start)
        ingestor = Ingestor(store, fleet.line.__getitem__)
        start = time.perf_counter()
        for item in batch:
            ingestor.ingest(item)
        rate = n / (time.perf_counter() - start)
    return {"rate": rate, "raw_put": raw}


# ---------------------------------------------------------------- 4. policy


def bench_policy(devices: int, lines: int, seed: int) -> dict[str, float]:
    settings = PolicySettings()
    rng = random.Random(seed)
    now = timestamps.iso(T0)
    evidence = []
    per_line = devices // lines
    for line in range(lines):
        devs = []
        for d in range(per_line):
            windows = tuple(WindowStats(600, rng.randrange(12), rng.uniform(0, 0.3), rng.uniform(0, 0.3))
                            for _ in range(settings.windows_needed))
            devs.append(DeviceEvidence(f"cam-{line}-{d}", windows, 600 * settings.rate_baseline_windows,
                                       rng.randrange(100, 400)))
        reviewed = rng.randrange(0, 400)
        evidence.append(Evidence(f"line-{line}", now, tuple(devs), reviewed, rng.randrange(0, reviewed // 3 + 1), ()))

    start = time.perf_counter()
    total = 0
    for ev in evidence:
        for dev in ev.devices:
            for w in dev.recent:
                total += w.frames + w.defects
    baseline = time.perf_counter() - start
    start = time.perf_counter()
    fired = sum(decide(settings, ev, str(i)).action == "fire" for i, ev in enumerate(evidence))
    elapsed = time.perf_counter() - start
    return {"decide_s": elapsed, "baseline_s": baseline, "fired": fired, "windows": devices * settings.windows_needed}


def main() -> int:
    args = get_args_parser().parse_args()
    logging.basicConfig(level=logging.ERROR)
    folder = args.dir or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; files in {folder}")

    print(f"\n1. SQLite ingestion of {args.messages:,} messages from {args.things:,} devices, batches of {args.batch}")
    fleet = Fleet(args.things, args.lines, args.seed)
    store = SqliteStore(folder / "cloud.sqlite")
    result = bench_sqlite_ingest(store, fleet, args)
    samples = result["samples"]
    n = args.messages
    ingest_cpu, ingest_wall = n / result["cpu_s"], n / result["wall_s"]
    print("   (per CPU second = on one core; wall rates depend on what else the machine runs)")
    print(f"   ingest        {ingest_cpu:10,.0f} msg per CPU s   {ingest_wall:10,.0f} msg/s wall "
          f"({result['cpu_s'] / result['wall_s']:.2f} cores used)")
    for name, label in (("json", "json.loads"), ("raw_sqlite", "raw sqlite")):
        timer: Timer = result[name]
        cpu_rate, wall_rate = result["n"] / timer.cpu, result["n"] / timer.wall
        print(f"   {label:<13} {cpu_rate:10,.0f} msg per CPU s   {wall_rate:10,.0f} msg/s wall -> ingest is "
              f"{cpu_rate / ingest_cpu:.1f}x slower per CPU s ({wall_rate / ingest_wall:.1f}x wall)")
    if len(samples) >= 2:
        first_n, first_mb = samples[0]
        last_n, last_mb = samples[-1]
        print(f"   RSS {first_mb:.1f} MB at {first_n:,} -> {last_mb:.1f} MB at {last_n:,} messages "
              f"({(last_mb - first_mb) / max(1, (last_n - first_n)) * 1e5:+.2f} MB per 100k)")
    print(f"   store file {sum(p.stat().st_size for p in folder.glob('cloud.sqlite*')) / 2**20:,.0f} MB")

    alerts = store._read("SELECT count(*) AS n FROM alerts")[0]["n"]
    print(f"\n2. Inbox pages at {alerts:,} alerts (ms, p50 / p95 over 40 requests)")
    for name, p50, p95 in bench_inbox(store, fleet):
        print(f"   {name:<28} {p50:7.2f} / {p95:7.2f}")
    store.close()

    if args.dynamo_messages:
        print(f"\n3. DynamoDB (moto server, in-process) ingestion of {args.dynamo_messages:,} messages")
        dyn = bench_dynamo(Fleet(args.things, args.lines, args.seed + 1), args.dynamo_messages)
        print(f"   ingest        {dyn['rate']:10,.1f} msg/s")
        print(f"   raw PutItem   {dyn['raw_put']:10,.1f} items/s -> ingest is {dyn['raw_put'] / dyn['rate']:.1f}x "
              "slower (2 requests a message: read the device, one transaction)")

    print(f"\n4. Policy for {args.devices:,} devices in {args.lines} lines")
    pol = bench_policy(args.devices, args.lines, args.seed)
    per_device_us = pol["decide_s"] / args.devices * 1e6
    print(f"   decide()      {pol['decide_s'] * 1000:8.1f} ms for all lines ({per_device_us:.1f} us a device; "
          f"{pol['fired']} lines fired)")
    print(f"   sum counts    {pol['baseline_s'] * 1000:8.1f} ms over the same {pol['windows']:,} windows "
          f"-> decide is {pol['decide_s'] / pol['baseline_s']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
