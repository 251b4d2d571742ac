"""The review app's page times at scale: inbox pages and review actions at ``--alerts`` (1M) alerts, SQLite.

The app runs under uvicorn on loopback, signed in as a local user, and is asked over one keep-alive
HTTP connection, as a browser asks it. Measured (ms, p50 / p95 over ``--repeats`` requests):

1. inbox, newest page of a line (50 rows, rendered HTML);
2. inbox, page 21 of a line (the cursor of 20 pages down: keyset paging costs the same deep down);
3. inbox, a line's unreviewed alerts of one class with a score range (filters no single index serves);
4. review action: POST a verdict and get the next alert's panel back (what each key press costs);
5. baseline, same run and server: ``/healthz`` (the HTTP and framework floor);
6. baseline, same run: the newest inbox page on a store of ``--small`` (10k) alerts (whether page time grows
   with the store's size).

The alerts/minute an operator reaches by keyboard is printed by tests/review/test_browser.py (real Chromium).
Needs the ``review``, ``cloud`` and ``dev`` extras. The 1M-alert store is kept in ``--dir`` for reuse. Example::

    nice -n 10 .venv/bin/python benchmarks/bench_review.py --alerts 1000000 --dir /tmp/bench-review
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import random
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "edge_agent"), str(REPO / "infra")]

from qcsight_cloud import timestamps  # noqa: E402
from qcsight_cloud.records import Alert, Origin  # noqa: E402
from qcsight_cloud.sqlite_store import SqliteStore  # noqa: E402
from qcsight_review.app import create_app  # noqa: E402
from qcsight_review.images import NoImages  # noqa: E402
from qcsight_review.settings import ReviewSettings  # noqa: E402
from qcsight_review.users import ENGINEER, UserStore  # noqa: E402

T0 = datetime(2026, 6, 1, tzinfo=timezone.utc)
LABELS = ("scratch", "spot", "crack", "dent")
PASSWORD = "bench password 123"
THUMB = {"format": "jpeg", "width": 64, "height": 48, "data": "A" * 344}  # ~256 bytes, as bench_ingest's


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alerts", type=int, default=1_000_000, help="alerts in the large store (default 1M)")
    parser.add_argument("--small", type=int, default=10_000, help="alerts in the baseline store (default 10k)")
    parser.add_argument("--lines", type=int, default=10, help="lines (default 10)")
    parser.add_argument("--things", type=int, default=100, help="devices (default 100)")
    parser.add_argument("--repeats", type=int, default=60, help="requests per case (default 60)")
    parser.add_argument("--dir", type=Path, help="keep the stores here and reuse them (default: a temp dir)")
    return parser


def fill(store: SqliteStore, n: int, lines: int, things: int, seed: int = 1) -> None:
    """n alerts a second apart across the devices, through the store's own put (batches of 5,000)."""
    have = store._read("SELECT count(*) AS n FROM alerts")[0]["n"]
    rng = random.Random(seed)
    batch: list[Alert] = []
    started = time.perf_counter()
    for i in range(have, n):
        thing = i % things
        label = LABELS[rng.randrange(len(LABELS))]
        score = round(rng.uniform(0.5, 1.0), 4)
        time_ = timestamps.iso(T0 + timedelta(seconds=i))
        message_id = f"m{i:09d}"
        batch.append(Alert(
            origin=Origin(message_id, f"cam-{thing:03d}", f"line-{thing % lines}", i // things + 1, time_, time_),
            alert_id=f"a{i}", frame_id=f"f{i}", model_name="tile", model_version=str(1 + i * 3 // n),
            status="defect", label=label, score=score, confidence=score,
            scores={"good": round(1 - score, 4), label: score}, image_ref=None, thumbnail=THUMB))
        if len(batch) == 5000 or i == n - 1:
            store.put(batch)
            batch = []
            if (i + 1) % 100_000 == 0:
                print(f"   {i + 1:>9,} alerts stored ({(i + 1 - have) / (time.perf_counter() - started):,.0f}/s)",
                      flush=True)


class Server:
    def __init__(self, app: Any) -> None:
        import uvicorn

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start within 30 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class Browser:
    """One keep-alive connection with the cookies a browser would keep."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, form: dict[str, str] | None = None) -> tuple[int, str]:
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        body = None
        if form is not None:
            body = urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        self.connection.request(method, path, body=body, headers=headers)
        response = self.connection.getresponse()
        text = response.read().decode()
        for header in response.headers.get_all("set-cookie") or []:
            name, value = header.split(";", 1)[0].split("=", 1)
            self.cookies[name] = value
        return response.status, text

    def sign_in(self, name: str) -> str:
        _, page = self.request("GET", "/login")
        token = re.search(r'name="csrf-token" content="([^"]+)"', page)
        assert token
        status, _ = self.request("POST", "/login", {"name": name, "password": PASSWORD, "csrf_token": token.group(1)})
        assert status == 303, status
        _, page = self.request("GET", "/inbox?line=line-0")
        token = re.search(r'name="csrf-token" content="([^"]+)"', page)
        assert token
        return token.group(1)


def timed(call: Callable[[], Any], repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def app_for(store: SqliteStore, folder: Path) -> Any:
    users = UserStore(folder / "users.sqlite", rounds=4)
    if users.get("bench") is None:
        users.add("bench", ENGINEER, PASSWORD)
    settings = ReviewSettings(store=f"sqlite:{store.path}", users=folder / "users.sqlite", secret=b"b" * 32,
                              page_size=50)
    return create_app(settings, store, NoImages(), users)


def measure_large(store: SqliteStore, folder: Path, lines: int, repeats: int) -> list[tuple[str, float, float]]:
    rng = random.Random(2)
    with Server(app_for(store, folder)) as server:
        browser = Browser(server.port)
        token = browser.sign_in("bench")

        def ok(method: str, path: str, form: dict[str, str] | None = None) -> str:
            status, text = browser.request(method, path, form)
            assert status == 200, (status, path, text[:300])
            return text

        deep = {}
        for line in range(3):
            cursor = ""
            for _ in range(20):
                page = ok("GET", f"/inbox?line=line-{line}" + (f"&cursor={cursor}" if cursor else ""))
                cursor = re.findall(r"cursor=([A-Za-z0-9_-]+)", page)[-1]
            deep[line] = cursor
        unreviewed = {"reviewed": "no"}

        def deep_page(line: int) -> str:
            return f"/inbox?line=line-{line}&cursor={deep[line]}"

        results = [
            ("healthz (baseline: HTTP floor)", *timed(lambda: ok("GET", "/healthz"), repeats)),
            ("inbox, newest page", *timed(lambda: ok("GET", f"/inbox?line=line-{rng.randrange(lines)}"), repeats)),
            ("inbox, page 21 (cursor)", *timed(lambda: ok("GET", deep_page(rng.randrange(3))), repeats)),
            ("inbox, unreviewed+class+score", *timed(lambda: ok("GET", "/inbox?" + urlencode({
                "line": f"line-{rng.randrange(lines)}", "label": "spot", "score_min": "0.9", **unreviewed})),
                repeats)),
        ]
        # Each review takes the newest unreviewed alert of line-0 and answers with the next one's panel.
        page = ok("GET", "/review?line=line-0&reviewed=no")

        def review() -> None:
            nonlocal page
            alert = re.search(r'data-alert="([^"]+)" data-count="(\d+)"', page)
            assert alert, page[:500]
            page = ok("POST", f"/alerts/{alert.group(1)}/review", {
                "action": "confirm", "expected_count": alert.group(2), "csrf_token": token, "line": "line-0",
                "reviewed": "no"})

        results.append(("review action + next panel", *timed(review, repeats)))
    return results


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    folder = args.dir or Path(tempfile.mkdtemp(prefix="bench-review-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; stores in {folder}")

    print(f"\nfilling the large store to {args.alerts:,} alerts ({args.lines} lines, {args.things} devices)")
    large = SqliteStore(folder / f"large-{args.alerts}.sqlite")
    fill(large, args.alerts, args.lines, args.things)
    small = SqliteStore(folder / f"small-{args.small}.sqlite")
    fill(small, args.small, args.lines, args.things)

    print(f"\npage times at {args.alerts:,} alerts (ms, p50 / p95 over {args.repeats} requests, one keep-alive "
          "connection)")
    results = measure_large(large, folder, args.lines, args.repeats)
    for name, p50, p95 in results:
        print(f"   {name:<32} {p50:7.2f} / {p95:7.2f}")
    with Server(app_for(small, folder)) as server:
        browser = Browser(server.port)
        browser.sign_in("bench")
        rng = random.Random(3)
        small_p50, small_p95 = timed(lambda: browser.request("GET", f"/inbox?line=line-{rng.randrange(args.lines)}"),
                                     args.repeats)
    print(f"   {'inbox, newest page at ' + format(args.small, ',') + ' (baseline)':<32} {small_p50:7.2f} / "
          f"{small_p95:7.2f}")
    floor = results[0][1]
    newest = results[1][1]
    print(f"\n   newest inbox page at {args.alerts:,} vs {args.small:,} alerts: {newest / small_p50:.2f}x (p50); "
          f"{newest / floor:.1f}x the healthz floor")
    review_p50 = results[-1][1]
    print(f"   a review action costs {review_p50:.1f} ms p50: the server alone allows {60_000 / review_p50:,.0f} "
          "reviews a minute for one operator")
    large.close()
    small.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
