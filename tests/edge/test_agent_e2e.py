"""End to end: the real `qcsight agent` process, MQTT5 with client certificates, a real Mosquitto broker.

Alerts must reach the cloud subscriber exactly once after de-duplication by message id, through a
broker restart and a kill -9 of the agent; the line's reject signal goes to the broker directly.
The stress test does the same through ten broker restarts and ten kills with parts arriving
throughout, against the verdicts of `qcsight batch score` on the same files.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from qcsight_core import messages
from tests.edge.agent_helpers import AgentProcess, agent_config, outbox_messages, write_atomically
from tests.edge.broker import Broker, MqttSubscriber, Received
from tests.edge.stress import StressPlan, run_stress
from tests.helpers.models import make_tiny_bundle
from tests.helpers.wait import eventually

pytestmark = pytest.mark.broker

THING = "line1-cam1"


@pytest.fixture
def agent_files(tmp_path: Path, broker: Broker) -> Iterator[tuple[Path, AgentProcess]]:
    make_tiny_bundle(tmp_path / "bundle")
    ident = broker.pki.identity(THING)
    tls = {"endpoint": broker.host, "port": broker.port, "cert": str(ident.cert), "key": str(ident.key),
           "ca": str(broker.pki.ca)}
    data = agent_config(
        tmp_path, tmp_path / "bundle",
        transport={"kind": "mqtt5", **tls, "iot_core_limits": False, "connect_timeout_s": 3,
                   "min_reconnect_delay_s": 0.1, "max_reconnect_delay_s": 0.5, "ack_timeout_s": 5},
        line_signal={"kind": "mqtt", **tls},
        stop_deadline_s=10,
    )
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(data))
    agent = AgentProcess(tmp_path / "agent.yaml", tmp_path / "agent.log")
    try:
        yield tmp_path, agent
    finally:
        agent.kill()


def alerts(received: list[Received]) -> list[dict[str, Any]]:
    return [messages.decode(r.payload) for r in received if r.topic == f"qcsight/{THING}/alerts"]


def unique_alert_sources(received: list[Received]) -> set[str]:
    return {m["source"] for m in {m["message_id"]: m for m in alerts(received)}.values()}


def wait_done(inbox: Path, count: int, timeout_s: float = 30.0) -> None:
    eventually(lambda: len(list((inbox / "done").glob("*.png"))) >= count, timeout_s,
               message=f"{count} parts not judged")


def drop(inbox: Path, names: list[str]) -> None:
    for name in names:
        write_atomically(inbox / name, 240)  # bright: the tiny model calls it a defect


def test_alerts_arrive_exactly_once_through_broker_restart_and_agent_kill(
        agent_files: tuple[Path, AgentProcess], broker: Broker, cloud: MqttSubscriber) -> None:
    tmp_path, agent = agent_files
    inbox = tmp_path / "inbox"
    agent.start()

    drop(inbox, ["p01.png", "p02.png", "p03.png"])
    received = cloud.wait_for(lambda got: len(unique_alert_sources(got)) >= 3, 30.0)
    assert unique_alert_sources(received) == {"p01.png", "p02.png", "p03.png"}, agent.log()
    rejects = [json.loads(r.payload) for r in received if r.topic == f"qcsight/{THING}/line/reject"]
    assert {r["source"] for r in rejects} >= {"p01.png", "p02.png", "p03.png"}

    # Broker down: parts keep being judged, their alerts wait in the outbox ...
    broker.stop()
    drop(inbox, ["p04.png", "p05.png", "p06.png"])
    wait_done(inbox, 6)
    # ... and the agent dies hard before it could send them. A part in done/ has its alert in the
    # outbox already: no pause before the kill (a pause here once hid a lost alert).
    agent.kill()
    stored = outbox_messages(tmp_path / "state" / "outbox.db", "alerts")
    assert {m["source"] for m in stored} == {"p04.png", "p05.png", "p06.png"}

    broker.start()
    assert cloud.wait_connected(10.0)
    agent.start()
    drop(inbox, ["p07.png", "p08.png"])
    expected = {f"p0{i}.png" for i in range(1, 9)}
    received = cloud.wait_for(lambda got: unique_alert_sources(got) >= expected, 40.0)
    assert unique_alert_sources(received) == expected, agent.log() + broker.log_tail()

    assert agent.signal(signal.SIGTERM) == 0, agent.log()
    received = cloud.wait_for(
        lambda got: any(m.get("event") == "stop" for m in map(_decode, got) if m is not None), 15.0)

    # Exactly once after de-duplication: one message id per part, and every copy of an id identical.
    by_id: dict[str, bytes] = {}
    for r in received:
        if r.topic == f"qcsight/{THING}/alerts":
            assert by_id.setdefault(json.loads(r.payload)["message_id"], r.payload) == r.payload
    sources = sorted(json.loads(p)["source"] for p in by_id.values())
    assert sources == sorted(expected)
    # Sequence numbers continue across the kill: the outbox persisted them.
    seqs = [messages.decode(r.payload)["seq"] for r in received if r.topic.startswith(f"qcsight/{THING}/")
            and not r.topic.endswith("/line/reject")]
    assert len(set(seqs)) == len({messages.decode(r.payload)["message_id"] for r in received
                                  if not r.topic.endswith("/line/reject")})
    # SIGTERM flushed everything: the outbox is empty and the last message is the stop status.
    assert outbox_messages(tmp_path / "state" / "outbox.db") == []
    events = [m["event"] for m in map(_decode, received) if m is not None and m["schema"] == messages.STATUS]
    assert events.count("start") == 2 and events[-1] == "stop"


def _decode(r: Received) -> dict[str, Any] | None:
    if r.topic.endswith("/line/reject"):
        return None
    return messages.decode(r.payload)


@pytest.mark.slow
def test_no_alert_is_lost_through_ten_broker_restarts_and_ten_agent_kills(
        tmp_path: Path, broker: Broker, cloud: MqttSubscriber) -> None:
    result = run_stress(tmp_path, broker, cloud, StressPlan(parts=100, broker_restarts=10, agent_kills=10))
    figures = result.figures()
    assert result.broker_restarts >= 10 and result.agent_kills >= 10, figures
    assert result.done + result.failed == result.parts, figures
    assert len(result.expected) >= 20, figures  # the scenario really alerts on a good share of the parts
    assert result.lost == set(), f"{figures} lost {sorted(result.lost)}\n{result.agent_log[-4000:]}"
    assert result.unexpected == set() and result.verdict_mismatches == [], (figures, result.verdict_mismatches)
    # A part judged again after a kill between its commit and its move keeps its alert's message id.
    assert result.unique_alert_ids == len(result.received), (figures, result.extra)
