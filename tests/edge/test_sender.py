"""The outbox sender: real broker, real SQLite, a broker outage, and a publisher process killed with -9."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest

from qcsight_core import messages, topics
from qcsight_edge.clock import Backoff, SystemClock
from qcsight_edge.errors import NotConnectedError, PublishRejectedError
from qcsight_edge.mqtt import MqttSettings, make_publisher
from qcsight_edge.outbox import Outbox
from qcsight_edge.sender import OutboxSender, SenderSettings
from tests.edge.broker import Broker, MqttSubscriber, Received, device_message, encoded
from tests.helpers.wait import eventually

REPO = Path(__file__).resolve().parents[2]
KINDS = ("metrics", "alerts", "status")


def _enqueue(outbox: Outbox, thing: str, kind: str) -> str:
    topic, message_id, payload = encoded(kind, thing, outbox.next_seq())
    assert outbox.enqueue(topic, payload, message_id, kind)
    return message_id


def _ids(received: list[Received]) -> list[str]:
    return [messages.decode(m.payload)["message_id"] for m in received]


def _wait_ids(cloud: MqttSubscriber, expected: set[str], timeout_s: float) -> set[str]:
    got = cloud.wait_for(lambda ms: expected <= set(_ids(ms)), timeout_s)
    return set(_ids(got))


# ---------------------------------------------------------------- against the broker


@pytest.mark.broker
@pytest.mark.parametrize("protocol", ["mqtt5", "mqtt311"])
def test_sender_drains_outbox_and_acks_only_what_arrived(protocol: str, tmp_path: Path, cloud: MqttSubscriber,
                                                         mqtt_settings: Callable[..., MqttSettings]) -> None:
    outbox = Outbox(tmp_path / "o.db")
    expected = {_enqueue(outbox, "thing-a", KINDS[i % 3]) for i in range(150)}
    publisher = make_publisher(mqtt_settings(protocol=protocol))
    publisher.connect(5)
    sender = OutboxSender(outbox, publisher, SenderSettings(window=16))
    sender.start()
    try:
        got = _wait_ids(cloud, expected, 15)
        assert sender.stop(5)
    finally:
        sender.stop(1)
        publisher.close(5)
    assert got == expected
    stats, counters = outbox.stats(), sender.stats()
    outbox.close()
    assert (stats.depth, stats.sent, counters.sent, counters.failed, counters.in_flight) == (0, 150, 150, 0, 0)


@pytest.mark.broker
def test_every_message_survives_a_broker_outage(tmp_path: Path, broker: Broker, cloud: MqttSubscriber,
                                                mqtt_settings: Callable[..., MqttSettings]) -> None:
    outbox = Outbox(tmp_path / "o.db")
    publisher = make_publisher(mqtt_settings())
    publisher.connect(5)
    sender = OutboxSender(outbox, publisher, SenderSettings(window=8, backoff_max_s=0.3))
    sender.start()
    enqueued: list[str] = []
    depth_while_down: list[int] = []
    stop_producing = threading.Event()

    def produce() -> None:
        i = 0
        while not stop_producing.is_set():
            enqueued.append(_enqueue(outbox, "thing-a", KINDS[i % 3]))
            sender.wake()
            i += 1
            time.sleep(0.005)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        cloud.wait_count(50, 5)
        broker.stop()
        # Messages keep coming while the broker is down (polled: a fixed pause failed on a busy machine).
        depth_while_down.append(eventually(lambda: outbox.depth if outbox.depth >= 50 else 0, timeout_s=20.0))
        broker.start()
        eventually(lambda: publisher.connected, timeout_s=20.0, message="the publisher did not reconnect")
        stop_producing.set()
        producer.join(5)
        got = cloud.wait_for(lambda ms: set(enqueued) <= set(_ids(ms)), 20)
        assert sender.stop(5)
    finally:
        stop_producing.set()
        sender.stop(1)
        publisher.close(5)
    ids = _ids(got)
    assert depth_while_down[0] >= 50, "the outage did not hold messages back"
    assert set(ids) == set(enqueued), f"missing {len(set(enqueued) - set(ids))} of {len(enqueued)}"
    assert outbox.stats().depth == 0
    outbox.close()
    # At least once: a message in flight at the disconnect may arrive twice, never zero times.
    assert len(ids) - len(set(ids)) <= sender.settings.window + publisher.settings.max_in_flight


@pytest.mark.broker
def test_stop_flushes_before_the_deadline_and_keeps_the_rest(tmp_path: Path, broker: Broker, cloud: MqttSubscriber,
                                                             mqtt_settings: Callable[..., MqttSettings]) -> None:
    outbox = Outbox(tmp_path / "o.db")
    expected = {_enqueue(outbox, "thing-a", "alerts") for _ in range(100)}
    publisher = make_publisher(mqtt_settings())
    publisher.connect(5)
    sender = OutboxSender(outbox, publisher)
    sender.start()
    assert sender.stop(10)  # started and stopped at once: still flushes everything it can
    assert _wait_ids(cloud, expected, 10) == expected
    # With the broker gone, stop() gives up at its deadline and the messages stay stored.
    broker.stop()
    for _ in range(20):
        _enqueue(outbox, "thing-a", "alerts")
    sender = OutboxSender(outbox, publisher)
    sender.start()
    started = time.monotonic()
    assert not sender.stop(0.5)
    assert time.monotonic() - started < 2.0
    assert outbox.stats().depth == 20 and outbox.stats().in_flight == 0
    publisher.close(5)
    outbox.close()


def publisher_process(argv: list[str]) -> int:
    """A device in miniature (Outbox + MQTT5 + OutboxSender), run as its own process.

    Arguments: outbox file, settings JSON, journal file, options JSON: ``produce`` (messages to
    enqueue, then drain and exit), ``pause_s`` between messages, sender ``window``.
    """
    db, settings_json, journal, options = argv[0], argv[1], argv[2], json.loads(argv[3])
    count, pause_s = int(options["produce"]), float(options.get("pause_s", 0.002))
    settings = MqttSettings(**{**json.loads(settings_json), "min_reconnect_delay_s": 0.05,
                               "max_reconnect_delay_s": 0.5, "iot_core_limits": False})
    outbox = Outbox(db)
    publisher = make_publisher(settings)
    publisher.connect(10)
    sender = OutboxSender(outbox, publisher, SenderSettings(window=int(options.get("window", 8))))
    sender.start()
    with open(journal, "a", buffering=1) as out:
        for i in range(count):
            kind = KINDS[i % 3]
            built: list[str] = []

            def build(seq: int, kind: str = kind, built: list[str] = built) -> tuple[str, bytes]:
                message = device_message(kind, settings.thing_name, seq)
                built.append(message["message_id"])
                return message["message_id"], messages.encode(message)

            seq, _ = outbox.put(topics.topic(settings.thing_name, kind), kind, build)
            out.write(f"{built[0]} {seq}\n")  # only after put() returned: the message is on disk
            sender.wake()
            time.sleep(pause_s)
    drained = sender.stop(15)
    publisher.close(5)
    print(json.dumps({"drained": drained, **dataclasses.asdict(outbox.stats())}), flush=True)
    outbox.close()
    return 0 if drained else 1


def _run_publisher(args: list[str]) -> subprocess.Popen[str]:
    code = "import sys; from tests.edge.test_sender import publisher_process; sys.exit(publisher_process(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'edge_agent'}"})


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.broker
def test_kill_9_while_draining_a_backlog_loses_nothing_and_never_reuses_a_seq(
        tmp_path: Path, broker: Broker, cloud: MqttSubscriber) -> None:
    db, journal = tmp_path / "device.db", tmp_path / "journal.txt"
    settings = broker.settings_json("thing-k")
    # A window of 1 drains about as fast as it enqueues, so the kill finds a backlog in the outbox.
    child = _run_publisher([str(db), settings, str(journal), json.dumps({"produce": 3000, "pause_s": 0, "window": 1})])
    try:
        cloud.wait_count(30, 15)
        broker.stop()  # an outage: the device keeps enqueuing, the backlog grows
        grown = _lines(journal) + 100
        eventually(lambda: _lines(journal) >= grown, 15, 0.005, "the backlog did not grow during the outage")
        received_at_restart = len(cloud.messages())
        broker.start()
        # Kill it while it drains the backlog: rows in flight, PUBACKs on the way, enqueues going on.
        cloud.wait_count(received_at_restart + 5, 15)
        assert child.poll() is None
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(5)
        if child.stdout:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    before_kill = dict(line.split() for line in journal.read_text().splitlines())
    assert len(before_kill) > len(set(_ids(cloud.messages()))), "no backlog left at the kill"
    # Restart on the same outbox file: it sends what was left, then produces more.
    again = _run_publisher([str(db), settings, str(journal), json.dumps({"produce": 30})])
    out, _ = again.communicate(timeout=40)
    assert again.returncode == 0, out
    final = json.loads(out.strip().splitlines()[-1])
    journaled = dict(line.split() for line in journal.read_text().splitlines())
    got = cloud.wait_for(lambda ms: set(journaled) <= set(_ids(ms)), 15)
    decoded = [messages.decode(m.payload) for m in got]
    unique = {m["message_id"]: m for m in decoded}
    assert set(journaled) <= set(unique), f"lost {len(set(journaled) - set(unique))} messages"
    # Nothing beyond what the outbox stored (a message stored just before the kill may lack a journal line).
    assert len(unique) == final["enqueued"] and final["depth"] == 0
    seqs = [m["seq"] for m in unique.values()]
    assert len(seqs) == len(set(seqs)), "two messages share a seq"
    assert all(int(journaled[i]) == unique[i]["seq"] for i in journaled)
    assert min(int(journaled[i]) for i in journaled if i not in before_kill) > max(map(int, before_kill.values()))
    assert all(m["thing"] == "thing-k" for m in decoded)


# ---------------------------------------------------------------- the loop's own rules, with a scripted transport


class ScriptedPublisher:
    """A transport whose futures the test settles by hand.

    No network peer can hold a PUBACK back or fail it on cue, so the window, the ack timeout and
    the backoff are checked against this small fake; everything else uses the real broker above.
    """

    def __init__(self) -> None:
        self.connected = True
        self.futures: list[tuple[str, Future[None]]] = []
        self.lock = threading.Lock()
        self.raise_on_publish = False

    def connect(self, timeout_s: float) -> None:
        pass

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> Future[None]:
        if self.raise_on_publish:
            raise RuntimeError("transport bug")
        future: Future[None] = Future()
        with self.lock:
            self.futures.append((json.loads(payload)["id"], future))
        return future

    def close(self, timeout_s: float) -> None:
        pass

    def open_futures(self) -> list[tuple[str, Future[None]]]:
        with self.lock:
            return [(i, f) for i, f in self.futures if not f.done()]

    def settle_all(self) -> bool:
        """PUBACK everything outstanding (only the test thread settles these futures)."""
        for _, future in self.open_futures():
            future.set_result(None)
        return True


class InstantClock:
    """Monotonic time that jumps forward by each wait; records the waits."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []
        self.lock = threading.Lock()

    def monotonic(self) -> float:
        with self.lock:
            return self.now

    def time(self) -> float:
        return 1_700_000_000.0 + self.monotonic()

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        with self.lock:
            self.waits.append(timeout_s)
            self.now += timeout_s
        time.sleep(0.0005)
        return event.is_set()


class WaitCountingClock(SystemClock):
    """The real clock, counting the waits the sender starts: a pass that sent something never waits."""

    def __init__(self) -> None:
        self.waits = 0
        self.lock = threading.Lock()

    def wait(self, event: threading.Event, timeout_s: float) -> bool:
        with self.lock:
            self.waits += 1
        return super().wait(event, timeout_s)


def _fill(outbox: Outbox, n: int) -> None:
    for i in range(n):
        outbox.enqueue("qcsight/t/status", json.dumps({"id": f"m{i}"}).encode(), f"m{i}", "status")


def test_window_bounds_in_flight_and_only_successes_are_acked(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    _fill(outbox, 20)
    transport = ScriptedPublisher()
    clock = WaitCountingClock()
    sender = OutboxSender(outbox, transport, SenderSettings(window=4, backoff_min_s=0.01, backoff_max_s=0.02),
                          clock=clock)
    sender.start()
    try:
        eventually(lambda: len(transport.open_futures()) == 4)
        waits_before = clock.waits
        sender.wake()
        # A wait begun after the fourth publish ends a pass that looked at the 16 rows left and sent none.
        eventually(lambda: clock.waits > waits_before)
        assert len(transport.futures) == 4  # never more than the window
        first = transport.open_futures()
        first[0][1].set_result(None)
        first[1][1].set_exception(PublishRejectedError("qcsight/t/status", "PUBACK NOT_AUTHORIZED"))
        first[2][1].set_exception(NotConnectedError("dropped"))
        first[3][1].set_result(None)
        eventually(lambda: sender.stats().sent == 2 and sender.stats().failed == 2)
        assert sender.stats().last_error is not None
        with sqlite3.connect(tmp_path / "o.db") as db:  # what is committed on disk, read beside the sender
            stored = {row[0] for row in db.execute("SELECT message_id FROM messages")}
        assert len(stored) == 18
        assert first[0][0] not in stored and first[3][0] not in stored
        assert first[1][0] in stored and first[2][0] in stored  # failures stay in the outbox
    finally:
        sender.stop(0.2)
    outbox.close()


def test_unacknowledged_publish_times_out_and_is_retried(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    _fill(outbox, 1)
    transport = ScriptedPublisher()
    clock = InstantClock()
    sender = OutboxSender(outbox, transport, SenderSettings(window=1, ack_timeout_s=3.0), clock=clock,
                          rng=random.Random(1))
    sender.start()
    try:
        eventually(lambda: len(transport.futures) >= 2, 5.0)  # the same row sent again after 3 s without PUBACK
        assert [i for i, _ in transport.futures[:2]] == ["m0", "m0"]
        eventually(lambda: sender.stats().timed_out >= 1)
        assert "no PUBACK" in (sender.stats().last_error or "")
        eventually(lambda: transport.settle_all() and outbox.depth == 0)
    finally:
        sender.stop(1)
    outbox.close()


def test_backoff_while_offline_grows_with_jitter_and_is_capped(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    _fill(outbox, 3)
    transport = ScriptedPublisher()
    transport.connected = False
    clock = InstantClock()
    sender = OutboxSender(outbox, transport, SenderSettings(backoff_min_s=0.1, backoff_max_s=2.0), clock=clock,
                          rng=random.Random(7))
    sender.start()
    eventually(lambda: len(clock.waits) >= 30)
    transport.connected = True
    eventually(lambda: transport.settle_all() and outbox.depth == 0)
    assert sender.stop(1)
    waits = clock.waits[:30]
    assert all(0.1 <= w <= 2.0 for w in waits)
    assert max(waits[:3]) <= 0.4  # starts near the minimum...
    assert max(waits[10:]) > 1.0  # ...grows towards the cap...
    assert len({round(w, 6) for w in waits[10:]}) > 10  # ...with jitter, not in lockstep
    assert transport.futures and outbox.depth == 0
    outbox.close()


def test_a_transport_that_raises_does_not_kill_the_thread(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    _fill(outbox, 2)
    transport = ScriptedPublisher()
    transport.raise_on_publish = True
    sender = OutboxSender(outbox, transport, SenderSettings(backoff_min_s=0.01, backoff_max_s=0.02))
    sender.start()
    eventually(lambda: sender.stats().failed >= 3)
    assert sender.running and "transport bug" in (sender.stats().last_error or "")
    transport.raise_on_publish = False
    eventually(lambda: transport.settle_all() and outbox.depth == 0)
    assert sender.stop(2)
    assert outbox.stats().sent == 2
    outbox.close()


def test_backoff_bounds() -> None:
    backoff = Backoff(0.5, 4.0, random.Random(3))
    delays = [backoff.next() for _ in range(20)]
    assert all(0.5 <= d <= 4.0 for d in delays) and delays[0] == 0.5
    backoff.reset()
    assert backoff.next() == 0.5


@pytest.mark.broker
def test_a_message_the_broker_refuses_for_good_is_dead_lettered_and_the_rest_flows(
        tmp_path: Path, cloud: MqttSubscriber, mqtt_settings: Callable[..., MqttSettings]) -> None:
    outbox = Outbox(tmp_path / "o.db")
    # thing-a may not publish under thing-b: Mosquitto's ACL answers PUBACK NOT_AUTHORIZED, every time.
    topic, foreign_id, payload = encoded("alerts", "thing-b", outbox.next_seq())
    assert outbox.enqueue(topic, payload, foreign_id, "alerts")
    # Over IoT Core's 128 KiB payload limit: refused without being sent.
    big = {**device_message("status", "thing-a", outbox.next_seq()), "detail": {"blob": "x" * 140_000}}
    assert outbox.enqueue(topics.topic("thing-a", "status"), messages.encode(big), big["message_id"], "status")
    expected = {_enqueue(outbox, "thing-a", kind) for kind in KINDS}
    publisher = make_publisher(mqtt_settings())
    publisher.connect(5)
    sender = OutboxSender(outbox, publisher, SenderSettings(window=4, backoff_max_s=0.3))
    sender.start()
    try:
        assert _wait_ids(cloud, expected, 10) == expected
        assert sender.stop(5)  # drained: nothing blocks the head of the outbox
    finally:
        sender.stop(1)
        publisher.close(5)
    stats = outbox.stats()
    letters = {letter.message_id: letter for letter in outbox.dead_letters()}
    outbox.close()
    assert stats.depth == 0 and stats.dead_lettered == 2 and stats.for_status()["dead_letters"] == 2
    assert set(letters) == {foreign_id, big["message_id"]}
    assert "NOT_AUTHORIZED" in letters[foreign_id].reason and letters[foreign_id].payload == payload
    assert "131072" in letters[big["message_id"]].reason
    assert sender.stats().dead_lettered == 2
