"""The Greengrass IPC session, publisher, configuration and update notices, driving the unmodified awsiotsdk client.

The peer is qcsight_gg/ipc_server.py, the IPC server of `qcsight gg run-local`: event-stream RPC on
a Unix socket that checks the framing, the SVCUID handshake, the request shapes and the mqttproxy
allow-list the way the nucleus does (in both flavours: the Java nucleus and Greengrass nucleus
lite). Its allow-list is taken from the agent's own recipe, so these tests also prove the recipe
lets the agent publish its messages and nothing else.
"""

from __future__ import annotations

import logging
import queue
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from awsiot.greengrasscoreipc.model import InvalidArgumentsError

from qcsight_core import messages, topics
from qcsight_core.errors import ConfigError
from qcsight_edge.errors import NotConnectedError, PublishError
from qcsight_edge.greengrass_ipc import (
    SOCKET_ENV,
    TOKEN_ENV,
    GreengrassConfig,
    GreengrassError,
    IpcPublisher,
    IpcSession,
    connect_ipc,
)
from qcsight_gg import ipc_server as ipc
from qcsight_gg.ipc_server import IpcServer
from tests.helpers.wait import eventually

THING = "line-7-camera-2"
SVCUID = "5b0f3b8e-e4f7-4c8a-9c1e-6f4ad3e2c011"
COMPONENT = "com.qcsight.EdgeAgent"
RECIPE = Path(__file__).resolve().parents[2] / "greengrass" / "recipes" / f"{COMPONENT}.yaml"
TIMEOUT = 5.0


def recipe_publish_resources(thing: str) -> list[str]:
    """The recipe's PublishToIoTCore resources with {iot:thingName} resolved, as the nucleus does."""
    recipe = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    policies = recipe["ComponentConfiguration"]["DefaultConfiguration"]["accessControl"]["aws.greengrass.ipc.mqttproxy"]
    return [r.replace("{iot:thingName}", thing) for p in policies.values()
            if "aws.greengrass#PublishToIoTCore" in p["operations"] for r in p["resources"]]


def served_configuration() -> dict[str, Any]:
    """What GetConfiguration serves: agent settings plus the nucleus's accessControl, as on a device."""
    recipe = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    return {"thing_name": THING, "metrics": {"window_s": 60}, "transport": {"kind": "ipc"},
            "accessControl": recipe["ComponentConfiguration"]["DefaultConfiguration"]["accessControl"]}


def small_validator(config: dict[str, Any]) -> object:
    """Stands in for AgentConfig.from_dict: names the field it refuses, refuses unknown keys."""
    allowed = {"thing_name", "metrics", "transport"}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ConfigError(unknown[0], config[unknown[0]], f"a known setting: {', '.join(sorted(allowed))}")
    topics.check_thing_name(config.get("thing_name"))  # type: ignore[arg-type]
    window = config.get("metrics", {}).get("window_s")
    if isinstance(window, bool) or not isinstance(window, (int, float)) or window <= 0:
        raise ConfigError("metrics.window_s", window, "a number of seconds, more than 0")
    return config


@pytest.fixture
def server() -> Iterator[IpcServer]:
    with IpcServer(SVCUID, COMPONENT, served_configuration(), recipe_publish_resources(THING)) as srv:
        yield srv
        assert srv.violations == [], "the SDK client broke the IPC protocol"


@pytest.fixture
def greengrass_env(server: IpcServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SOCKET_ENV, server.socket_path)
    monkeypatch.setenv(TOKEN_ENV, SVCUID)


@pytest.fixture
def session(greengrass_env: None) -> Iterator[IpcSession]:
    session = connect_ipc(TIMEOUT)
    yield session
    session.close(TIMEOUT)


def status_message(seq: int, event: str = "heartbeat") -> bytes:
    return messages.encode({**messages.envelope(messages.STATUS, THING, seq), "event": event, "state": "running",
                            "uptime_s": 12.5, "outbox": {"depth": seq, "bytes": 100 * seq, "evicted": 0}})


def alert_message(seq: int) -> bytes:
    return messages.encode({
        **messages.envelope(messages.ALERT, THING, seq), "alert_id": f"a-{seq}", "frame_id": f"f-{seq}",
        "model": {"name": "tiny", "version": "1"},
        "verdict": {"status": "defect", "label": "scratch", "score": 0.91, "confidence": 0.91,
                    "scores": {"good": 0.05, "scratch": 0.91, "spot": 0.04}},
    })


# --- connecting -----------------------------------------------------------------------------------


@pytest.mark.parametrize("environ, missing", [
    ({}, [SOCKET_ENV, TOKEN_ENV]),
    ({TOKEN_ENV: SVCUID}, [SOCKET_ENV]),
    ({SOCKET_ENV: "/tmp/x.socket", TOKEN_ENV: ""}, [TOKEN_ENV]),
])
def test_outside_greengrass_connect_says_so_and_names_the_variables(environ: dict[str, str],
                                                                    missing: list[str]) -> None:
    with pytest.raises(GreengrassError, match="not running under Greengrass") as info:
        connect_ipc(TIMEOUT, environ=environ)
    for name in missing:
        assert name in str(info.value)
    assert "mqtt transport" in str(info.value)


def test_wrong_svcuid_is_refused_with_a_clear_error(server: IpcServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SOCKET_ENV, server.socket_path)
    monkeypatch.setenv(TOKEN_ENV, "not-the-token")
    with pytest.raises(GreengrassError, match=rf"refused the IPC connection: {TOKEN_ENV}"):
        connect_ipc(TIMEOUT)
    (attempt,) = server.connect_attempts
    assert attempt.auth_token == "not-the-token" and attempt.version == "0.1.0" and not attempt.accepted


def test_missing_socket_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "no-nucleus.socket"
    with pytest.raises(GreengrassError, match=rf"cannot reach the Greengrass nucleus IPC socket {path}"):
        connect_ipc(TIMEOUT, environ={SOCKET_ENV: str(path), TOKEN_ENV: SVCUID})


def test_a_nucleus_that_never_answers_times_out() -> None:
    with tempfile.TemporaryDirectory(prefix="qcs-gg-") as folder, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        path = f"{folder}/ipc.socket"
        silent.bind(path)
        silent.listen(1)
        started = time.monotonic()
        with pytest.raises(GreengrassError, match=r"did not accept the IPC connection within 0.3s"):
            connect_ipc(0.3, environ={SOCKET_ENV: path, TOKEN_ENV: SVCUID})
        assert time.monotonic() - started < 2.0


# --- publishing -----------------------------------------------------------------------------------


def test_published_messages_reach_the_nucleus_exactly(server: IpcServer, session: IpcSession) -> None:
    publisher = IpcPublisher.from_session(session)
    publisher.connect(TIMEOUT)
    assert publisher.connected
    sent = [(topics.status_topic(THING), status_message(1, "start"), 1),
            (topics.alerts_topic(THING), alert_message(2), 1),
            (topics.status_topic(THING), status_message(3), 0)]
    futures = [publisher.publish(topic, payload, qos) for topic, payload, qos in sent]
    for future in futures:
        assert future.result(TIMEOUT) is None

    received = server.published
    assert [(m.topic, m.payload, m.qos, m.retain) for m in received] == [
        (topic, payload, str(qos), False) for topic, payload, qos in sent]
    assert [messages.decode(m.payload)["seq"] for m in received] == [1, 2, 3]
    requests = [r for r in server.requests if r.operation == ipc.PUBLISH]
    assert [r.stream_id for r in requests] == [1, 2, 3]  # one stream per operation, in order

    publisher.close(TIMEOUT)
    assert not publisher.connected
    with pytest.raises(NotConnectedError):
        publisher.publish(topics.status_topic(THING), status_message(4)).result(TIMEOUT)
    assert len(server.published) == 3


def test_a_topic_outside_the_recipe_policy_fails_clearly(server: IpcServer, session: IpcSession) -> None:
    publisher = IpcPublisher.from_session(session)
    for topic in (topics.metrics_topic("another-thing"), topics.line_signal_topic(THING)):
        with pytest.raises(PublishError, match="accessControl") as info:
            publisher.publish(topic, status_message(1)).result(TIMEOUT)
        assert repr(topic) in str(info.value)
        assert not isinstance(info.value, NotConnectedError)
    assert server.published == []
    # The connection survives a refused publish.
    publisher.publish(topics.metrics_topic(THING), status_message(2)).result(TIMEOUT)
    assert [m.topic for m in server.published] == [topics.metrics_topic(THING)]


def test_publish_rejections_carry_the_nucleus_reason(server: IpcServer, session: IpcSession) -> None:
    publisher = IpcPublisher.from_session(session)
    with pytest.raises(PublishError, match="QoS 2"):
        publisher.publish(topics.status_topic(THING), b"{}", qos=2).result(TIMEOUT)
    with pytest.raises(PublishError, match=r"could not publish .* exceeds 131072"):
        publisher.publish(topics.status_topic(THING), b"x" * (128 * 1024 + 1)).result(TIMEOUT)
    # The SDK itself would send a request without qos; the stand-in answers as the nucleus does.
    response = session.client.publish_to_iot_core_async(topic_name=topics.status_topic(THING), payload=b"{}")
    with pytest.raises(InvalidArgumentsError) as info:
        response.result(TIMEOUT)
    assert info.value.message == "QoS is required"
    assert server.published == []


def test_publish_after_the_nucleus_goes_away_is_not_connected(server: IpcServer, session: IpcSession) -> None:
    publisher = IpcPublisher.from_session(session)
    publisher.publish(topics.status_topic(THING), status_message(1)).result(TIMEOUT)
    server.stop()
    eventually(lambda: not publisher.connected, TIMEOUT, message="the publisher still says it is connected")
    with pytest.raises(NotConnectedError):
        publisher.connect(TIMEOUT)
    with pytest.raises(NotConnectedError):
        publisher.publish(topics.status_topic(THING), status_message(2)).result(TIMEOUT)


# --- configuration --------------------------------------------------------------------------------


def test_get_returns_the_served_configuration_without_access_control(server: IpcServer,
                                                                      session: IpcSession) -> None:
    config = GreengrassConfig(session, small_validator, timeout_s=TIMEOUT)
    served = server.configuration()
    assert "accessControl" in served
    got = config.get()
    assert got == {k: v for k, v in served.items() if k != "accessControl"}
    small_validator(got)  # what the agent gets passes its validator as it is
    (request,) = [r for r in server.requests if r.operation == ipc.GET_CONFIGURATION]
    assert request.body == {"keyPath": []}


def test_configuration_updates_reach_the_callback(server: IpcServer, session: IpcSession,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    config = GreengrassConfig(session, small_validator, timeout_s=TIMEOUT)
    updates: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=10)
    config.subscribe(updates.put)
    server.wait_for_subscriptions(TIMEOUT)

    changed = {**server.configuration(), "metrics": {"window_s": 15}, "transport": {"kind": "none"}}
    assert server.set_configuration(changed) == 2  # one event per changed key, as the nucleus sends
    assert updates.get(timeout=TIMEOUT) == {k: v for k, v in changed.items() if k != "accessControl"}

    # A change that fails validation is logged, naming the field, and not delivered.
    with caplog.at_level(logging.ERROR, logger="qcsight_edge.greengrass_ipc"):
        server.set_configuration({**changed, "metrics": {"window_s": -1}})
        wait_for_log(caplog, "metrics.window_s")
    server.set_configuration({**changed, "metrics": {"window_s": 30}})
    assert updates.get(timeout=TIMEOUT)["metrics"] == {"window_s": 30}
    # A later change is the marker: a configuration delivered twice (the second event of the first
    # deployment) would be queued before it. Stale events read the current configuration, so they cannot follow it.
    server.set_configuration({**changed, "metrics": {"window_s": 31}})
    assert updates.get(timeout=TIMEOUT)["metrics"] == {"window_s": 31}, "a configuration was delivered twice"
    config.close()


def test_an_exception_in_the_update_callback_is_logged_and_the_subscription_lives_on(
        server: IpcServer, session: IpcSession, caplog: pytest.LogCaptureFixture) -> None:
    config = GreengrassConfig(session, small_validator, timeout_s=TIMEOUT)
    seen: queue.Queue[int] = queue.Queue(maxsize=10)

    def on_update(new: dict[str, Any]) -> None:
        seen.put(new["metrics"]["window_s"])
        if new["metrics"]["window_s"] == 5:
            raise RuntimeError("agent failed to apply the change")

    config.subscribe(on_update, validate_proposals=False)
    server.wait_for_subscriptions(TIMEOUT, validation=False)
    base = server.configuration()
    with caplog.at_level(logging.ERROR, logger="qcsight_edge.greengrass_ipc"):
        server.set_configuration({**base, "metrics": {"window_s": 5}})
        assert seen.get(timeout=TIMEOUT) == 5
        wait_for_log(caplog, "agent failed to apply the change")
    server.set_configuration({**base, "metrics": {"window_s": 6}})
    assert seen.get(timeout=TIMEOUT) == 6
    config.close()


def test_proposed_configurations_are_validated_before_deployment(server: IpcServer, session: IpcSession) -> None:
    config = GreengrassConfig(session, small_validator, timeout_s=TIMEOUT)
    config.subscribe(lambda new: None)
    server.wait_for_subscriptions(TIMEOUT)
    good = {**server.configuration(), "metrics": {"window_s": 10}}

    bad_window = server.propose_configuration({**good, "metrics": {"window_s": 0}}, "deployment-1", TIMEOUT)
    assert bad_window["status"] == "REJECTED" and bad_window["deploymentId"] == "deployment-1"
    assert "metrics.window_s" in bad_window["message"]

    bad_key = server.propose_configuration({**good, "windw_s": 10}, "deployment-2", TIMEOUT)
    assert bad_key["status"] == "REJECTED" and "windw_s" in bad_key["message"]

    accepted = server.propose_configuration(good, "deployment-3", TIMEOUT)
    assert accepted == {"status": "ACCEPTED", "deploymentId": "deployment-3"}
    config.close()


def test_a_validator_bug_rejects_rather_than_lets_a_config_through(server: IpcServer, session: IpcSession) -> None:
    def broken(config: dict[str, Any]) -> object:
        raise KeyError("model")

    config = GreengrassConfig(session, broken, timeout_s=TIMEOUT)
    config.subscribe(lambda new: None)
    server.wait_for_subscriptions(TIMEOUT)
    report = server.propose_configuration(server.configuration(), "deployment-9", TIMEOUT)
    assert report["status"] == "REJECTED" and "validator failed" in report["message"]
    config.close()


def wait_for_log(caplog: pytest.LogCaptureFixture, text: str) -> None:
    def mentioned() -> bool:
        return any(text in record.getMessage() or (record.exc_text and text in record.exc_text)
                   or (record.exc_info and text in str(record.exc_info[1])) for record in caplog.records)

    eventually(mentioned, TIMEOUT,
               message=lambda: f"no log record mentioning {text!r}: {[r.getMessage() for r in caplog.records]}")


# --- the stand-in checks what the nucleus checks --------------------------------------------------


def test_framing_round_trip_and_crc_checks() -> None:
    headers = [ipc.Header(":message-type", ipc.INT32, 0), ipc.Header("flag", ipc.BOOL_TRUE, True),
               ipc.Header("name", ipc.STRING, "héllo"), ipc.Header("blob", ipc.BYTE_BUF, b"\x00\x01"),
               ipc.Header("big", ipc.INT64, -(2**40)), ipc.Header("id", ipc.UUID, bytes(range(16)))]
    data = ipc.encode_message(headers, b'{"a":1}')
    decoded = ipc.decode_message(data)
    assert decoded.headers == tuple(headers) and decoded.payload == b'{"a":1}'
    with pytest.raises(ipc.FramingError, match="prelude CRC32"):
        ipc.decode_message(bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(ipc.FramingError, match="message CRC32"):
        ipc.decode_message(data[:-6] + bytes([data[-6] ^ 1]) + data[-5:])


class RawClient:
    """A hand-driven event-stream client, for the cases a correct SDK never produces."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)

    def send(self, message_type: int, stream_id: int, headers: list[ipc.Header], payload: bytes,
             flags: int = 0) -> None:
        rpc = [ipc.Header(":message-type", ipc.INT32, message_type), ipc.Header(":message-flags", ipc.INT32, flags),
               ipc.Header(":stream-id", ipc.INT32, stream_id)]
        self.sock.sendall(ipc.encode_message(headers + rpc, payload))

    def receive(self) -> ipc.Message | None:
        prelude = self.sock.recv(12, socket.MSG_WAITALL)
        if not prelude:
            return None
        (total,) = struct.unpack(">I", prelude[:4])
        return ipc.decode_message(prelude + self.sock.recv(total - 12, socket.MSG_WAITALL))

    def connect(self, token: str, version: str = "0.1.0") -> ipc.Message | None:
        self.send(ipc.CONNECT, 0, [ipc.Header(":version", ipc.STRING, version)], f'{{"authToken": "{token}"}}'.encode())
        return self.receive()

    def close(self) -> None:
        self.sock.close()


def test_stand_in_refuses_what_the_nucleus_refuses() -> None:
    with IpcServer(SVCUID, COMPONENT, {"thing_name": THING}, [f"qcsight/{THING}/status"]) as server:
        early = RawClient(server.socket_path)
        early.send(ipc.APPLICATION_MESSAGE, 1, [ipc.Header("operation", ipc.STRING, ipc.PUBLISH)], b"{}")
        reply = early.receive()
        assert reply is not None and reply.get(":message-type") == ipc.PROTOCOL_ERROR
        early.close()

        old = RawClient(server.socket_path)
        ack = old.connect(SVCUID, version="0.0.9")
        assert ack is not None and ack.get(":message-type") == ipc.CONNECT_ACK
        assert not ack.get(":message-flags") & ipc.CONNECTION_ACCEPTED
        assert old.receive() is None  # the server hangs up after refusing
        old.close()

        client = RawClient(server.socket_path)
        ack = client.connect(SVCUID)
        assert ack is not None and ack.get(":message-flags") & ipc.CONNECTION_ACCEPTED
        json_headers = [ipc.Header(":content-type", ipc.STRING, "application/json")]

        unknown = ipc.Header("operation", ipc.STRING, "aws.greengrass#Nope")
        model = ipc.Header("service-model-type", ipc.STRING, "x")
        client.send(ipc.APPLICATION_MESSAGE, 1, [*json_headers, unknown, model], b"{}")
        reply = client.receive()
        assert reply is not None and reply.get(":message-type") == ipc.APPLICATION_ERROR
        assert b"unsupported operation" in reply.payload and reply.get(":message-flags") & ipc.TERMINATE_STREAM

        request = ipc.OPERATIONS[ipc.PUBLISH].request
        client.send(ipc.APPLICATION_MESSAGE, 2, [*json_headers, ipc.Header("operation", ipc.STRING, ipc.PUBLISH),
                                                 ipc.Header("service-model-type", ipc.STRING, request)],
                    b'{"qos": "1", "payload": ""}')
        reply = client.receive()
        assert reply is not None and reply.get("service-model-type") == "aws.greengrass#InvalidArgumentsError"
        assert b"Topic is required" in reply.payload

        operation = ipc.Header("operation", ipc.STRING, ipc.PUBLISH)
        client.send(ipc.APPLICATION_MESSAGE, 4, [*json_headers, operation], b"{}")
        reply = client.receive()
        assert reply is not None and reply.get(":message-type") == ipc.PROTOCOL_ERROR
        assert b"does not follow 2" in reply.payload
        client.close()
        assert any("does not follow" in v for v in server.violations)
        assert [a.accepted for a in server.connect_attempts] == [False, True]


# --- both nuclei: Greengrass nucleus lite -----------------------------------------------------------


@pytest.fixture
def lite(monkeypatch: pytest.MonkeyPatch) -> Iterator[IpcServer]:
    with IpcServer(SVCUID, COMPONENT, served_configuration(), recipe_publish_resources(THING),
                   flavor=ipc.LITE) as srv:
        monkeypatch.setenv(SOCKET_ENV, srv.socket_path)
        monkeypatch.setenv(TOKEN_ENV, SVCUID)
        yield srv
        assert srv.violations == [], "the SDK client broke the IPC protocol"


def test_lite_refuses_validation_and_updates_are_validated_on_receipt(
        lite: IpcServer, caplog: pytest.LogCaptureFixture) -> None:
    session = connect_ipc(TIMEOUT)
    config = GreengrassConfig(session, small_validator, timeout_s=TIMEOUT)
    updates: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=10)
    with caplog.at_level(logging.INFO, logger="qcsight_edge.greengrass_ipc"):
        config.subscribe(updates.put)  # Lite refuses the validation subscription: not fatal
    assert not config.validates_proposals
    # The refusal's text is Lite's _message, which awsiotsdk does not read into ServiceError.message.
    assert any("does not validate proposed configurations" in r.getMessage()
               and "Unhandled operation requested" in r.getMessage() for r in caplog.records)
    lite.wait_for_subscriptions(TIMEOUT, validation=False)
    with caplog.at_level(logging.ERROR, logger="qcsight_edge.greengrass_ipc"):
        lite.set_configuration({**lite.configuration(), "metrics": {"window_s": 0}})
        wait_for_log(caplog, "metrics.window_s")
    assert updates.empty(), "a bad update is refused on receipt"
    lite.set_configuration({**lite.configuration(), "metrics": {"window_s": 15}})
    assert updates.get(timeout=TIMEOUT)["metrics"] == {"window_s": 15}
    config.close()
    session.close(TIMEOUT)


@pytest.mark.parametrize("flavor", [ipc.CLASSIC, ipc.LITE])
def test_a_refused_publish_carries_the_nucleus_text_on_both_nuclei(flavor: str) -> None:
    with IpcServer(SVCUID, COMPONENT, served_configuration(), recipe_publish_resources(THING),
                   flavor=flavor) as server:
        session = connect_ipc(TIMEOUT, environ={SOCKET_ENV: server.socket_path, TOKEN_ENV: SVCUID})
        publisher = IpcPublisher.from_session(session)
        with pytest.raises(PublishError, match="accessControl") as info:
            publisher.publish(topics.line_signal_topic(THING), status_message(1)).result(TIMEOUT)
        assert "is not authorized to perform" in str(info.value), "the nucleus's own text, read from _message on Lite"
        session.close(TIMEOUT)


def test_component_updates_are_deferred_while_busy_and_refused_quietly_on_lite(monkeypatch: pytest.MonkeyPatch) -> None:
    from qcsight_edge.greengrass_ipc import ComponentUpdates

    busy = [True]
    with IpcServer(SVCUID, COMPONENT, served_configuration(), recipe_publish_resources(THING)) as server:
        session = connect_ipc(TIMEOUT, environ={SOCKET_ENV: server.socket_path, TOKEN_ENV: SVCUID})
        updates = ComponentUpdates(session, lambda: busy[0], recheck_ms=250, timeout_s=TIMEOUT)
        assert updates.subscribe()
        server.wait_until(lambda: server.update_subscribers() == [COMPONENT], TIMEOUT, "the update subscription")
        assert server.notify_component_update("deployment-7") == 1
        server.wait_until(lambda: len(server.deferrals) == 1, TIMEOUT, "a deferral")
        busy[0] = False
        server.notify_component_update("deployment-7")
        server.wait_until(lambda: len(server.deferrals) == 2, TIMEOUT, "the go-ahead")
        assert [(d.deployment_id, d.recheck_after_ms) for d in server.deferrals] == [("deployment-7", 250),
                                                                                    ("deployment-7", 0)]
        updates.close()
        session.close(TIMEOUT)
    with IpcServer(SVCUID, COMPONENT, served_configuration(), flavor=ipc.LITE) as server:
        session = connect_ipc(TIMEOUT, environ={SOCKET_ENV: server.socket_path, TOKEN_ENV: SVCUID})
        assert not ComponentUpdates(session, lambda: True, timeout_s=TIMEOUT).subscribe()
        session.close(TIMEOUT)


# --- a lost IPC connection (issue 10 item 4) ----------------------------------------------------------


def test_a_dropped_connection_is_reopened_and_publishing_and_updates_resume(
        server: IpcServer, greengrass_env: None) -> None:
    from qcsight_edge.greengrass_ipc import IpcLink, ReconnectPolicy

    gave_up: list[str] = []
    link = IpcLink(lambda on_lost: connect_ipc(TIMEOUT, on_lost=on_lost),
                   ReconnectPolicy(give_up_after_s=10.0, initial_delay_s=0.05, check_s=0.2), gave_up.append)
    link.start()
    publisher = IpcPublisher(link)
    config = GreengrassConfig(link, small_validator, timeout_s=TIMEOUT)
    updates: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=10)
    config.subscribe(updates.put)
    server.wait_for_subscriptions(TIMEOUT)
    publisher.publish(topics.status_topic(THING), status_message(1)).result(TIMEOUT)

    assert server.drop_connections() == 1
    # A change made while the agent is disconnected is not lost: it is read on the new session.
    server.set_configuration({**server.configuration(), "metrics": {"window_s": 42}})
    server.wait_until(lambda: sum(a.accepted for a in server.connect_attempts) == 2, TIMEOUT, "a new session")
    assert updates.get(timeout=TIMEOUT)["metrics"] == {"window_s": 42}
    server.wait_for_subscriptions(TIMEOUT)  # subscriptions made again on the new session
    eventually(lambda: publisher.connected, TIMEOUT, message="the publisher did not reconnect")
    publisher.publish(topics.status_topic(THING), status_message(2)).result(TIMEOUT)
    server.set_configuration({**server.configuration(), "metrics": {"window_s": 43}})
    assert updates.get(timeout=TIMEOUT)["metrics"] == {"window_s": 43}
    assert [messages.decode(p.payload)["seq"] for p in server.published] == [1, 2]
    assert link.reconnects == 1 and gave_up == []
    config.close()
    link.close(TIMEOUT)


def test_a_nucleus_gone_past_the_limit_is_reported_once(server: IpcServer, greengrass_env: None) -> None:
    from qcsight_edge.greengrass_ipc import IpcLink, ReconnectPolicy

    gave_up: queue.Queue[str] = queue.Queue(maxsize=2)
    link = IpcLink(lambda on_lost: connect_ipc(1.0, on_lost=on_lost),
                   ReconnectPolicy(give_up_after_s=0.6, initial_delay_s=0.05, check_s=0.1), gave_up.put)
    link.start()
    started = time.monotonic()
    server.stop(remove_dir=False)
    reason = gave_up.get(timeout=TIMEOUT)
    assert "unreachable" in reason and "limit 0.6s" in reason
    assert 0.6 <= time.monotonic() - started < 4.0
    assert not link.connected and gave_up.empty()
    link.close(TIMEOUT)
    server.start()  # the fixture's teardown stops it again
