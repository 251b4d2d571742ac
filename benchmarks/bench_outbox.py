"""How fast the durable outbox + sender deliver, against raw MQTT publishing measured in the same run.

Starts a real Mosquitto on loopback (TLS client certificates, per-thing ACLs: the same broker
as the edge tests) and measures, over the same transport and in-flight window:

1. raw: publish N messages straight to the transport, no outbox (the baseline);
2. outbox: a producer stores N messages (``Outbox.put``: seq + message in one SQLite commit)
   while an ``OutboxSender`` drains them; end-to-end messages/s from the first store to the
   last ack, plus the store-only rate;
3. outage: the broker is stopped, N messages pile up in the outbox, the broker comes back;
   how long the backlog takes to drain (reconnect included), as messages/s.

Prints messages/s and the ratios to the raw baseline. Every ``put`` waits for one disk flush
(synchronous=FULL), so the store rate follows the disk: on a shared VM it moves run to run.
Needs the ``edge`` and ``dev`` extras and the ``mosquitto`` binary. Example::

    .venv/bin/python benchmarks/bench_outbox.py --messages 2000 --window 32
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "edge_agent")]

from qcsight_core import messages, topics  # noqa: E402
from qcsight_edge.mqtt import Mqtt5Publisher, Mqtt311Publisher, MqttSettings, make_publisher  # noqa: E402
from qcsight_edge.outbox import Outbox  # noqa: E402
from qcsight_edge.sender import OutboxSender, SenderSettings  # noqa: E402
from tests.edge.broker import Broker, Pki, device_message, find_mosquitto  # noqa: E402

KINDS = ("metrics", "alerts", "status")
THING = "bench-1"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000, help="messages per measurement (default 2000)")
    parser.add_argument("--window", type=int, default=32, help="publishes in flight at once, both paths (default 32)")
    parser.add_argument("--protocol", choices=("mqtt5", "mqtt311"), default="mqtt5")
    parser.add_argument("--iot-core-limits", action="store_true",
                        help="MQTT5: keep the client-side IoT Core throttle (100 publishes/s) on, as on a device")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up on one measurement after this (s)")
    return parser


def _payloads(n: int) -> list[tuple[str, str, bytes]]:
    out = []
    for seq in range(1, n + 1):
        kind = KINDS[seq % 3]
        message = device_message(kind, THING, seq)
        out.append((topics.topic(THING, kind), kind, messages.encode(message)))
    return out


def bench_raw(publisher: Mqtt5Publisher | Mqtt311Publisher, items: list[tuple[str, str, bytes]], window: int,
              timeout_s: float) -> float:
    """Messages/s publishing straight to the transport with ``window`` awaiting PUBACK."""
    slots = threading.BoundedSemaphore(window)
    failures: list[BaseException] = []
    futures: list[Future[None]] = []

    def done(future: Future[None]) -> None:
        if future.exception() is not None:
            failures.append(future.exception())  # type: ignore[arg-type]
        slots.release()

    start = time.perf_counter()
    for topic, _kind, payload in items:
        if not slots.acquire(timeout=timeout_s):
            raise RuntimeError("raw publish: no PUBACK within the timeout")
        future = publisher.publish(topic, payload)
        futures.append(future)
        future.add_done_callback(done)
    for future in futures:
        future.exception(timeout_s)
    elapsed = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"raw publish: {len(failures)} failed, first: {failures[0]}")
    return len(items) / elapsed


def _wait_empty(outbox: Outbox, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while outbox.depth:
        if time.monotonic() > deadline:
            raise RuntimeError(f"outbox still holds {outbox.depth} messages after {timeout_s}s")
        time.sleep(0.002)


def _store(outbox: Outbox, items: list[tuple[str, str, bytes]], sender: OutboxSender | None) -> float:
    start = time.perf_counter()
    for i, (topic, kind, payload) in enumerate(items):
        outbox.put(topic, kind, lambda seq, i=i, payload=payload: (f"b{i}-{seq}", payload))
        if sender is not None:
            sender.wake()
    return time.perf_counter() - start


def bench_outbox(publisher: Mqtt5Publisher | Mqtt311Publisher, items: list[tuple[str, str, bytes]], window: int,
                 folder: Path, timeout_s: float) -> tuple[float, float]:
    """(end-to-end messages/s, store-only messages/s) with a producer and the sender running together."""
    with Outbox(folder / "outbox.db", max_messages=len(items) + 10) as outbox:
        sender = OutboxSender(outbox, publisher, SenderSettings(window=window))
        sender.start()
        start = time.perf_counter()
        stored_s = _store(outbox, items, sender)
        _wait_empty(outbox, timeout_s)
        elapsed = time.perf_counter() - start
        sender.stop(5)
        failed = sender.stats().failed
    if failed:
        raise RuntimeError(f"outbox: {failed} publishes failed in a run with the broker up")
    return len(items) / elapsed, len(items) / stored_s


def bench_outage(broker: Broker, publisher: Mqtt5Publisher | Mqtt311Publisher, items: list[tuple[str, str, bytes]],
                 window: int, folder: Path, timeout_s: float) -> tuple[float, float]:
    """(seconds from broker start to empty outbox, of which seconds to reconnect) for a backlog of len(items)."""
    with Outbox(folder / "outage.db", max_messages=len(items) + 10) as outbox:
        sender = OutboxSender(outbox, publisher, SenderSettings(window=window, backoff_max_s=0.5))
        sender.start()
        broker.stop()
        deadline = time.monotonic() + 10
        while publisher.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        _store(outbox, items, sender)
        start = time.perf_counter()
        broker.start()
        while not publisher.connected and time.perf_counter() - start < timeout_s:
            time.sleep(0.001)
        reconnect_s = time.perf_counter() - start
        _wait_empty(outbox, timeout_s)
        drain_s = time.perf_counter() - start
        sender.stop(5)
    return drain_s, reconnect_s


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    # The outage is on purpose: keep the transport's expected warnings out of the figures.
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    binary = find_mosquitto()
    if binary is None:
        print("mosquitto is not installed (apt-get install mosquitto)", file=sys.stderr)
        return 1
    random.seed(0)
    with tempfile.TemporaryDirectory(prefix="bench-outbox-") as tmp:
        folder = Path(tmp)
        pki = Pki(folder / "pki")
        broker = Broker(binary, pki, folder / "broker")
        broker.start()
        ident = pki.identity(THING)
        settings = MqttSettings(endpoint=broker.host, port=broker.port, thing_name=THING, cert=ident.cert,
                                key=ident.key, ca=pki.ca, protocol=args.protocol, max_in_flight=max(args.window, 1),
                                min_reconnect_delay_s=0.05, max_reconnect_delay_s=0.5,
                                iot_core_limits=args.iot_core_limits)
        publisher = make_publisher(settings)
        try:
            publisher.connect(10)
            items = _payloads(args.messages)
            size = sum(len(p) for _, _, p in items) / len(items)
            bench_raw(publisher, items[: min(200, len(items))], args.window, args.timeout)  # warm-up, not counted
            raw = bench_raw(publisher, items, args.window, args.timeout)
            end_to_end, stored = bench_outbox(publisher, items, args.window, folder, args.timeout)
            drain_s, reconnect_s = bench_outage(broker, publisher, items, args.window, folder, args.timeout)
        finally:
            publisher.close(5)
            broker.kill()
    drain_rate = args.messages / drain_s
    print(f"outbox benchmark: {args.messages} messages of {size:.0f} B, {args.protocol}, window {args.window}, "
          f"IoT Core throttle {'on' if args.iot_core_limits else 'off'}, Mosquitto on loopback (TLS)")
    print(f"  raw publish (baseline)        {raw:9.0f} msg/s")
    print(f"  outbox + sender, end to end   {end_to_end:9.0f} msg/s   ratio to raw {end_to_end / raw:5.2f}")
    print(f"  outbox store only (put)       {stored:9.0f} msg/s   ratio to raw {stored / raw:5.2f}")
    sending = args.messages / max(drain_s - reconnect_s, 1e-9)
    print(f"  backlog drain after outage    {drain_rate:9.0f} msg/s   ratio to raw {drain_rate / raw:5.2f}"
          f"   ({args.messages} messages in {drain_s:.2f} s from broker start, reconnect {reconnect_s:.2f} s of it)")
    print(f"    of which sending once back  {sending:9.0f} msg/s   ratio to raw {sending / raw:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
