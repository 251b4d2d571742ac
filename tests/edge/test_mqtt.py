"""MQTT transports against a real Mosquitto with TLS client certificates and per-thing ACLs."""

from __future__ import annotations

import logging
import socket
import ssl
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qcsight_core import messages, topics
from qcsight_core.errors import ConfigError
from qcsight_edge.errors import NotConnectedError, PublishError, PublishRejectedError
from qcsight_edge.mqtt import Mqtt5Publisher, Mqtt311Publisher, MqttSettings, make_publisher
from tests.edge.broker import Broker, MqttSubscriber, Pki, device_message
from tests.helpers.wait import eventually

PROTOCOLS = ["mqtt5", "mqtt311"]


# ---------------------------------------------------------------- settings (no broker)


def _settings(tmp_path: Path, **overrides: Any) -> MqttSettings:
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("-----BEGIN CERTIFICATE-----\n")
    values: dict[str, Any] = {"endpoint": "abc-ats.iot.eu-west-1.amazonaws.com", "port": 8883,
                              "thing_name": "line-1", "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem",
                              "ca": tmp_path / "ca.pem"}
    values.update(overrides)
    return MqttSettings(**values)


@pytest.mark.parametrize(("field", "value", "says"), [
    ("port", 0, "mqtt.port"),
    ("port", "8883", "mqtt.port"),
    ("endpoint", "mqtts://host", "mqtt.endpoint"),
    ("thing_name", "line 1", "thing_name"),
    ("protocol", "mqtt4", "mqtt.protocol"),
    ("keep_alive_s", 2, "mqtt.keep_alive_s"),
    ("max_reconnect_delay_s", 0.5, "mqtt.max_reconnect_delay_s"),
    ("max_in_flight", 0, "mqtt.max_in_flight"),
])
def test_settings_name_the_bad_field(tmp_path: Path, field: str, value: Any, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        _settings(tmp_path, **{field: value})


def test_missing_or_wrong_certificate_file_is_named(tmp_path: Path) -> None:
    settings = _settings(tmp_path, cert=tmp_path / "nope.pem")
    with pytest.raises(ConfigError, match=r"mqtt\.cert.*nope\.pem.*does not exist"):
        Mqtt5Publisher(settings)
    (tmp_path / "key.txt").write_text("not a key")
    with pytest.raises(ConfigError, match=r"mqtt\.key.*key\.txt.*PEM"):
        Mqtt311Publisher(_settings(tmp_path, key=tmp_path / "key.txt"))


def test_settings_without_a_broker_are_refused_when_connecting(tmp_path: Path) -> None:
    """The transport and line-signal sections are MqttSettings with kind none allowed; connecting needs them all."""
    with pytest.raises(ConfigError, match=r"mqtt\.endpoint.*required"):
        Mqtt5Publisher(_settings(tmp_path, endpoint=""))
    with pytest.raises(ConfigError, match=r"mqtt\.ca.*PEM"):
        Mqtt5Publisher(_settings(tmp_path, ca=None))
    with pytest.raises(ConfigError, match=r"thing_name"):
        Mqtt5Publisher(_settings(tmp_path, thing_name=""))


# ---------------------------------------------------------------- against the broker



def _connect(build: Callable[..., MqttSettings], **kw: Any) -> Mqtt5Publisher | Mqtt311Publisher:
    publisher = make_publisher(build(**kw))
    publisher.connect(5)
    return publisher


@pytest.mark.broker
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_metrics_alerts_and_status_arrive_intact(protocol: str, mqtt_settings: Callable[..., MqttSettings],
                                                 cloud: MqttSubscriber) -> None:
    publisher = _connect(mqtt_settings, protocol=protocol)
    try:
        assert publisher.connected
        sent = {}
        for seq, kind in enumerate(["metrics", "alerts", "status"], start=1):
            message = device_message(kind, "thing-a", seq)
            publisher.publish(topics.topic("thing-a", kind), messages.encode(message)).result(5)
            sent[message["message_id"]] = (topics.topic("thing-a", kind), message)
        got = cloud.wait_count(3, 5)
    finally:
        publisher.close(5)
    assert len(got) == 3
    for item in got:
        decoded = messages.decode(item.payload)  # schema-valid on the cloud side too
        topic, message = sent[decoded["message_id"]]
        assert item.topic == topic
        assert decoded == message
    assert {messages.decode(i.payload)["schema"] for i in got} == {messages.METRICS, messages.ALERT, messages.STATUS}


@pytest.mark.broker
def test_mqtt5_policy_refusal_fails_the_future(mqtt_settings: Callable[..., MqttSettings],
                                               cloud: MqttSubscriber) -> None:
    publisher = _connect(mqtt_settings, thing="thing-a")
    try:
        foreign = publisher.publish(topics.metrics_topic("thing-b"), b'{"from":"a"}')
        with pytest.raises(PublishRejectedError, match="NOT_AUTHORIZED") as info:
            foreign.result(5)
        assert info.value.topic == "qcsight/thing-b/metrics"
        publisher.publish(topics.metrics_topic("thing-a"), b'{"own":1}').result(5)
        # The own message is the marker: published after the refused one on the same connection, it arrives
        # after anything the refused one could have delivered, so no fixed wait is needed to see nothing else.
        got = cloud.wait_count(1, 5)
    finally:
        publisher.close(5)
    assert [m.topic for m in got] == ["qcsight/thing-a/metrics"]


@pytest.mark.broker
def test_mqtt311_policy_refusal_is_a_silent_drop(mqtt_settings: Callable[..., MqttSettings],
                                                 cloud: MqttSubscriber) -> None:
    """MQTT 3.1.1 has no PUBACK reason code: Mosquitto acks the forbidden publish and drops it."""
    publisher = _connect(mqtt_settings, thing="thing-a", protocol="mqtt311")
    try:
        publisher.publish(topics.metrics_topic("thing-b"), b'{"from":"a"}').result(5)  # acked...
        publisher.publish(topics.metrics_topic("thing-a"), b'{"own":1}').result(5)
        got = cloud.wait_count(1, 5)  # the marker, published after the forbidden one (see above)
    finally:
        publisher.close(5)
    assert [m.topic for m in got] == ["qcsight/thing-a/metrics"]  # ...but never delivered


def _raw_connect(broker: Broker, context: ssl.SSLContext) -> bytes:
    """Send an MQTT 3.1.1 CONNECT over TLS with a bare socket; returns the first bytes of the reply."""
    body = b"\x00\x04MQTT\x04\x02\x00\x1e" + struct.pack("!H", 4) + b"anon"  # clean session, keep-alive 30 s
    with socket.create_connection((broker.host, broker.port), timeout=3) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(bytes([0x10, len(body)]) + body)
        return tls.recv(4)


@pytest.mark.broker
def test_broker_refuses_tls_without_client_certificate(broker: Broker, pki: Pki) -> None:
    context = ssl.create_default_context(cafile=str(broker.pki.ca))
    with pytest.raises(ssl.SSLError):
        _raw_connect(broker, context)
    assert "peer did not return a certificate" in broker.log.read_text()
    # The same bytes with a client certificate get a CONNACK: the refusal above is about the certificate.
    ident = pki.identity("thing-a")
    context.load_cert_chain(ident.cert, ident.key)
    assert _raw_connect(broker, context)[:1] == b"\x20"


@pytest.mark.broker
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_untrusted_client_certificate_cannot_connect(protocol: str, broker: Broker, pki: Pki) -> None:
    rogue = pki.rogue_identity("thing-a")
    settings = MqttSettings(endpoint=broker.host, port=broker.port, thing_name="thing-a", cert=rogue.cert,
                            key=rogue.key, ca=pki.ca, protocol=protocol, min_reconnect_delay_s=0.2,
                            max_reconnect_delay_s=1.0, connect_timeout_s=2.0)
    publisher = make_publisher(settings)
    try:
        with pytest.raises(NotConnectedError, match=r"not connected to 127\.0\.0\.1"):
            publisher.connect(1.5)
        assert not publisher.connected
        with pytest.raises(NotConnectedError):
            publisher.publish(topics.metrics_topic("thing-a"), b"{}").result(1)
    finally:
        publisher.close(5)
    assert "certificate verify failed" in broker.log.read_text()


@pytest.mark.broker
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_reconnects_after_broker_restart(protocol: str, broker: Broker, mqtt_settings: Callable[..., MqttSettings],
                                         cloud: MqttSubscriber) -> None:
    publisher = _connect(mqtt_settings, protocol=protocol)
    try:
        broker.stop()
        eventually(lambda: not publisher.connected, 5.0, message="still connected after the broker stopped")
        offline = publisher.publish(topics.status_topic("thing-a"), b"{}")
        with pytest.raises(NotConnectedError):
            offline.result(1)  # fails at once instead of waiting in the SDK's memory
        broker.start()
        eventually(lambda: publisher.connected, 8.0, message=lambda: f"no reconnect: {publisher.last_error}")
        publisher.publish(topics.status_topic("thing-a"), b'{"back":1}').result(5)
        assert cloud.wait_for(lambda ms: any(m.payload == b'{"back":1}' for m in ms), 8)
    finally:
        publisher.close(5)


@pytest.mark.broker
def test_mqtt311_keeps_retrying_a_first_connection(mosquitto_bin: str, pki: Pki, tmp_path: Path) -> None:
    """The SDK's 3.1.1 connection does not retry a first connect that failed; ours does, with backoff."""
    down = Broker(mosquitto_bin, pki, tmp_path / "late")
    ident = pki.identity("thing-a")
    publisher = Mqtt311Publisher(MqttSettings(
        endpoint=down.host, port=down.port, thing_name="thing-a", cert=ident.cert, key=ident.key, ca=pki.ca,
        protocol="mqtt311", min_reconnect_delay_s=0.1, max_reconnect_delay_s=0.4, connect_timeout_s=1.0))
    try:
        with pytest.raises(NotConnectedError):
            publisher.connect(0.5)
        down.start()
        publisher.connect(6)
        assert publisher.connected
        publisher.publish(topics.status_topic("thing-a"), b"{}").result(5)
    finally:
        publisher.close(5)
        down.kill()


@pytest.mark.broker
def test_in_flight_bound_fails_fast(mqtt_settings: Callable[..., MqttSettings], cloud: MqttSubscriber) -> None:
    publisher = _connect(mqtt_settings, max_in_flight=2)
    try:
        futures = [publisher.publish(topics.metrics_topic("thing-a"), b"{}") for _ in range(50)]
        errors = [f.exception(5) for f in futures]
    finally:
        publisher.close(5)
    refused = [e for e in errors if e is not None]
    assert refused, "50 publishes at once never exceeded max_in_flight=2"
    assert all(isinstance(e, PublishError) and "max_in_flight=2" in str(e) for e in refused)
    assert errors.count(None) >= 2


@pytest.mark.broker
def test_callback_errors_never_reach_the_sdk_thread(mqtt_settings: Callable[..., MqttSettings],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    publisher = Mqtt5Publisher(mqtt_settings())
    with caplog.at_level(logging.ERROR, logger="qcsight_edge.mqtt"):
        publisher._on_connection_failure(None)  # type: ignore[arg-type]  # what a CRT bug could hand us
        publisher._on_disconnection(object())  # type: ignore[arg-type]
    assert "MQTT callback _on_connection_failure failed" in caplog.text
    publisher.close(1)
