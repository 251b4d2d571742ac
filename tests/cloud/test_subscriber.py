"""The local ingestion path end to end: devices publish to the real Mosquitto (TLS, per-thing ACL), the subscriber
stores what they send, and a spoofing device gets nothing into the store under another thing's name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from qcsight_cloud.errors import StoreError
from qcsight_cloud.ingest import Ingestor
from qcsight_cloud.records import Record
from qcsight_cloud.sqlite_store import SqliteStore
from qcsight_cloud.store import InboxQuery
from qcsight_cloud.subscriber import Subscriber, SubscriberSettings
from qcsight_core import messages, topics
from tests.cloud import builders
from tests.cloud.builders import T0
from tests.edge.broker import CLOUD, Broker
from tests.helpers.wait import eventually

pytest.importorskip("awscrt")
from qcsight_edge.errors import PublishRejectedError
from qcsight_edge.mqtt import Mqtt5Publisher, MqttSettings

pytestmark = pytest.mark.broker


def received(store: SqliteStore, thing: str) -> int:
    device = store.device(thing)
    return 0 if device is None else device.received


def _settings(broker: Broker, **overrides: object) -> SubscriberSettings:
    identity = broker.pki.identity(CLOUD)
    values: dict[str, object] = {"endpoint": broker.host, "port": broker.port, "cert": identity.cert,
                                 "key": identity.key, "ca": broker.pki.ca, "connect_timeout_s": 5.0,
                                 "batch_wait_s": 0.02, "retry_max_s": 0.2}
    values.update(overrides)
    return SubscriberSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def device(broker: Broker) -> Iterator[Callable[[str], Mqtt5Publisher]]:
    """Connected MQTT5 publishers with each thing's own certificate, closed at teardown."""
    opened: list[Mqtt5Publisher] = []

    def connect(thing: str) -> Mqtt5Publisher:
        ident = broker.pki.identity(thing)
        publisher = Mqtt5Publisher(MqttSettings(endpoint=broker.host, port=broker.port, thing_name=thing,
                                                cert=ident.cert, key=ident.key, ca=broker.pki.ca,
                                                iot_core_limits=False, connect_timeout_s=5.0))
        publisher.connect(5.0)
        opened.append(publisher)
        return publisher

    yield connect
    for publisher in opened:
        publisher.close(2.0)


def test_a_spoofing_device_gets_nothing_in_under_another_name(broker: Broker, tmp_path: Path,
                                                              device: Callable[[str], Mqtt5Publisher]) -> None:
    store = SqliteStore(tmp_path / "cloud.sqlite")
    subscriber = Subscriber(_settings(broker), Ingestor(store, lambda thing: "line-1"))
    subscriber.start()
    try:
        cam_a = device("cam-a")
        own = builders.alert("cam-a", 1, T0)
        cam_a.publish(topics.alerts_topic("cam-a"), messages.encode(own)).result(5)
        # The payload says cam-b, the connection (and so the topic the ACL allows) is cam-a.
        cam_a.publish(topics.alerts_topic("cam-a"), messages.encode(builders.alert("cam-b", 2, T0))).result(5)
        # cam-a publishing on cam-b's topic: the broker refuses it (MQTT5 PUBACK NOT_AUTHORIZED).
        with pytest.raises(PublishRejectedError, match="NOT_AUTHORIZED"):
            cam_a.publish(topics.alerts_topic("cam-b"), messages.encode(builders.alert("cam-b", 3, T0))).result(5)
        sentinel = builders.status("cam-a", 4, T0)
        cam_a.publish(topics.status_topic("cam-a"), messages.encode(sentinel)).result(5)

        eventually(lambda: subscriber.stats.acknowledged == 3, timeout_s=10, message=lambda: f"{subscriber.stats}")
        assert received(store, "cam-a") == 2
        assert store.get_alert(own["message_id"]) is not None
        assert store.device("cam-b") is None
        assert store.inbox(InboxQuery(thing="cam-b")).items == ()
        assert store.counters()["cam-a"] == {"drop.payload_thing_mismatch": 1}
    finally:
        subscriber.stop()
        store.close()


class FlakyStore(SqliteStore):
    """The real SQLite store, refusing writes while ``failing`` (a disk full, a locked file)."""

    failing = False

    def put(self, records: Sequence[Record]) -> list[bool]:
        if self.failing:
            raise StoreError("injected: the disk is full")
        return super().put(records)


def test_nothing_is_lost_while_the_ingester_is_down_or_its_store_fails(
        broker: Broker, tmp_path: Path, device: Callable[[str], Mqtt5Publisher]) -> None:
    store = FlakyStore(tmp_path / "cloud.sqlite")
    settings = _settings(broker, client_id="ingest-1", receive_maximum=8, batch_size=4)
    first = Subscriber(settings, Ingestor(store))
    first.start()
    first.stop()  # the broker keeps its session and queues for it

    cam = device("cam-a")
    sent = [builders.metrics("cam-a", seq, T0) for seq in range(1, 21)]
    for message in sent[:10]:
        cam.publish(topics.metrics_topic("cam-a"), messages.encode(message)).result(5)

    store.failing = True  # stored nothing, acknowledged nothing: the broker must redeliver all of it
    second = Subscriber(settings, Ingestor(store))
    second.start()
    for message in sent[10:]:
        cam.publish(topics.metrics_topic("cam-a"), messages.encode(message)).result(5)
    eventually(lambda: second.stats.store_failures >= 2, timeout_s=10, message=lambda: f"stats {second.stats}")
    assert second.stats.acknowledged == 0
    assert 0 < second.stats.received <= settings.receive_maximum, "flow control bounds what is in flight to us"
    assert second.stats.left_unacknowledged == 0
    second.stop(timeout_s=2.0)

    store.failing = False
    third = Subscriber(settings, Ingestor(store))
    third.start()
    try:
        cam.publish(topics.metrics_topic("cam-a"), messages.encode(sent[0])).result(5)  # a duplicate on top
        eventually(lambda: received(store, "cam-a") == 20, timeout_s=15,
                   message=lambda: f"stats {third.stats}, device {store.device('cam-a')}")
        device_status = store.device("cam-a")
        assert device_status is not None
        assert (device_status.min_seq, device_status.max_seq, device_status.gaps) == (1, 20, 0)
        eventually(lambda: store.counters().get("cam-a", {}).get("duplicate", 0) >= 1, timeout_s=10)
    finally:
        third.stop()
        store.close()


def test_qcsight_cloud_ingest_runs_until_sigterm(broker: Broker, tmp_path: Path,
                                                 device: Callable[[str], Mqtt5Publisher]) -> None:
    cloud = broker.pki.identity(CLOUD)
    db = tmp_path / "cloud.sqlite"
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("lines:\n  line-9: {things: [cam-a]}\n")
    log = tmp_path / "ingest.log"
    command = [sys.executable, "-m", "qcsight_core.cli", "cloud", "ingest", "--store", f"sqlite:{db}",
               "--fleet", str(fleet_file), "--endpoint", broker.host, "--port", str(broker.port),
               "--cert", str(cloud.cert), "--key", str(cloud.key), "--ca", str(broker.pki.ca)]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        eventually(lambda: "ingesting qcsight/+/+" in log.read_text(), timeout_s=30, message=log.read_text)
        message = builders.alert("cam-a", 1, T0)
        device("cam-a").publish(topics.alerts_topic("cam-a"), messages.encode(message)).result(5)
        store = SqliteStore(db)
        eventually(lambda: store.get_alert(message["message_id"]) is not None, timeout_s=10, message=log.read_text)
        stored = store.get_alert(message["message_id"])
        assert stored is not None and stored.origin.line == "line-9"
        store.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)
