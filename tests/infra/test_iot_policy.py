"""The synthesized IoT policies really confine a device: the same attempts as the Mosquitto ACL tests, same outcomes.

tests/edge/test_mqtt.py runs publishes against a real Mosquitto whose ACL stands in for IoT Core
(tests/edge/broker.py: `pattern readwrite qcsight/%u/#`). The IoT policies the stack deploys are
evaluated here (tests/infra/iot_eval.py) against those same attempts, and must agree; the same
publishes are also replayed on Mosquitto, so the two stand-ins are checked against each other.
Where the IoT policy is deliberately stricter than the test broker's ACL, the attempt is listed
apart with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.infra.cfn import ACCOUNT, REGION, as_list, resolve, resources
from tests.infra.iot_eval import ALLOW, Arn, Connection, Request, connect, evaluate, publish, receive, subscribe

ARN = Arn(REGION, ACCOUNT)
THING_VAR = "${iot:Connection.Thing.ThingName}"


@dataclass(frozen=True)
class Attempt:
    thing: str  # whose certificate (attached to that thing only)
    action: str  # connect, publish, subscribe, receive
    target: str  # client id, topic or topic filter
    allowed: bool
    why: str

    def request(self) -> Request:
        build = {"connect": connect, "publish": publish, "subscribe": subscribe, "receive": receive}[self.action]
        return build(ARN, self.target)

    def connection(self) -> Connection:
        client_id = self.target if self.action == "connect" else self.thing
        return Connection(client_id, frozenset({self.thing}))


# The attempts tests/edge/test_mqtt.py makes against Mosquitto, with Mosquitto's outcome there.
SHARED = [
    Attempt("thing-a", "connect", "thing-a", True, "every broker test connects thing-a with its own certificate"),
    Attempt("thing-a", "publish", "qcsight/thing-a/metrics", True, "test_metrics_alerts_and_status_arrive_intact"),
    Attempt("thing-a", "publish", "qcsight/thing-a/alerts", True, "test_metrics_alerts_and_status_arrive_intact"),
    Attempt("thing-a", "publish", "qcsight/thing-a/status", True, "test_metrics_alerts_and_status_arrive_intact"),
    Attempt("thing-a", "publish", "qcsight/thing-b/metrics", False,
            "test_mqtt5_policy_refusal_fails_the_future, test_mqtt311_policy_refusal_is_a_silent_drop"),
    Attempt("thing-b", "publish", "qcsight/thing-a/alerts", False, "the same refusal, the other way round"),
]
# Allowed by the test broker's `readwrite qcsight/%u/#`, refused by the IoT policy on purpose.
STRICTER = [
    Attempt("thing-a", "publish", "qcsight/thing-a/line/reject", False,
            "the line signal is a local topic (qcsight_core.topics.line_signal_topic); it must never reach the cloud"),
    Attempt("thing-a", "publish", "qcsight/thing-a/commands", False, "only the three message kinds go to the cloud"),
    Attempt("thing-a", "subscribe", "qcsight/thing-a/#", False, "the agent receives nothing over MQTT"),
    Attempt("thing-a", "receive", "qcsight/thing-a/status", False, "the agent receives nothing over MQTT"),
    Attempt("thing-a", "connect", "thing-b", False,
            "Mosquitto does not tie the client id to the certificate; IoT Core must (the rule passes clientid())"),
]
# Refused by both (no test of test_mqtt.py makes these; the broker's ACL refuses them too).
ALSO_REFUSED = [
    Attempt("thing-a", "subscribe", "qcsight/+/metrics", False, "reading other devices' telemetry"),
    Attempt("thing-a", "subscribe", "qcsight/#", False, "reading every device"),
    Attempt("thing-a", "receive", "qcsight/thing-b/alerts", False, "another device's alerts"),
    Attempt("thing-a", "publish", "qcsight/+/metrics", False, "a wildcard is not a topic name"),
    Attempt("thing-a", "publish", "$aws/things/thing-b/shadow/update", False, "another thing's shadow"),
]
ALL = SHARED + STRICTER + ALSO_REFUSED
# Extra attempts only the Greengrass core policy answers: its own deployment topics, nobody else's.
GREENGRASS = [
    Attempt("thing-a", "subscribe", "$aws/things/thing-a/jobs/notify-next", True, "deployments arrive as jobs"),
    Attempt("thing-a", "publish", "$aws/things/thing-a/jobs/123/update", True, "the nucleus reports job status"),
    Attempt("thing-a", "receive", "$aws/things/thing-a/jobs/notify-next", True, "deployments arrive as jobs"),
    Attempt("thing-a", "subscribe",
            "$aws/things/thing-a/shadow/name/AWSManagedGreengrassV2Deployment/update/delta", True,
            "thing deployments arrive through this named shadow"),
    Attempt("thing-a", "publish", "$aws/things/thing-a/greengrassv2/health/json", True, "fleet status reports"),
    Attempt("thing-a", "subscribe", "$aws/things/thing-b/jobs/notify-next", False, "another thing's deployments"),
    Attempt("thing-a", "publish", "$aws/things/thing-b/jobs/123/update", False, "another thing's job status"),
    Attempt("thing-a", "subscribe", "$aws/things/thing-a/shadow/update/delta", False, "its classic shadow: unused"),
    Attempt("thing-a", "subscribe", "$aws/things/+/jobs/#", False, "every thing's jobs"),
]


@pytest.fixture(scope="module")
def policies(templates: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    found = {props["PolicyName"]: resolve(props["PolicyDocument"])
             for _, _, props in resources(templates, "AWS::IoT::Policy")}
    assert set(found) == {"qcsight-device", "qcsight-greengrass-core"}
    return found


@pytest.mark.parametrize("attempt", ALL, ids=lambda a: f"{a.thing}-{a.action}-{a.target}")
def test_device_policy_alone(policies: dict[str, dict[str, Any]], attempt: Attempt) -> None:
    outcome = evaluate([policies["qcsight-device"]], attempt.request(), attempt.connection())
    assert (outcome == ALLOW) is attempt.allowed, attempt.why


@pytest.mark.parametrize("attempt", ALL + GREENGRASS, ids=lambda a: f"{a.thing}-{a.action}-{a.target}")
def test_greengrass_core_with_both_policies(policies: dict[str, dict[str, Any]], attempt: Attempt) -> None:
    """A Greengrass core gets both policies; the nucleus's topics must not widen the qcsight ones."""
    outcome = evaluate(list(policies.values()), attempt.request(), attempt.connection())
    assert (outcome == ALLOW) is attempt.allowed, attempt.why


def test_token_exchange_only_through_this_fleets_role_alias(policies: dict[str, dict[str, Any]]) -> None:
    both = list(policies.values())
    a = Connection("thing-a", frozenset({"thing-a"}))
    assume = "iot:AssumeRoleWithCertificate"
    assert evaluate(both, Request(assume, ARN.rolealias("qcsight-token-exchange")), a) == ALLOW
    assert evaluate(both, Request(assume, ARN.rolealias("someone-elses-alias")), a) != ALLOW
    assert evaluate([policies["qcsight-device"]], Request(assume, ARN.rolealias("qcsight-token-exchange")), a) != ALLOW


def test_every_device_resource_is_built_from_the_thing_name(policies: dict[str, dict[str, Any]]) -> None:
    for name, policy in policies.items():
        for statement in policy["Statement"]:
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            if all(action.startswith("greengrass:") for action in actions) or \
                    actions == ["iot:AssumeRoleWithCertificate"]:
                continue  # Greengrass data plane ("*", AWS's minimal policy) and the fleet's one role alias
            for resource in as_list(statement["Resource"]):
                assert THING_VAR in resource, f"{name} {statement.get('Sid')}: {resource} is not scoped by thing name"


# ---------------------------------------------------------------- the same publishes on the real Mosquitto


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Any]:
    from tests.edge.broker import REQUIRE_ENV, Broker, Pki, find_mosquitto

    binary = find_mosquitto()
    if binary is None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"mosquitto is not installed and {REQUIRE_ENV}=1 requires broker tests to run")
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    broker = Broker(binary, Pki(tmp_path / "pki"), tmp_path / "broker")
    try:
        broker.start()
        yield broker
    finally:
        broker.kill()


@pytest.mark.broker
def test_mosquitto_gives_the_shared_publishes_the_same_outcomes(policies: dict[str, dict[str, Any]],
                                                              mosquitto: Any) -> None:
    from qcsight_edge.errors import PublishRejectedError
    from qcsight_edge.mqtt import MqttSettings, make_publisher

    publishes = [attempt for attempt in SHARED if attempt.action == "publish"]
    for thing in sorted({attempt.thing for attempt in publishes}):
        ident = mosquitto.pki.identity(thing)
        publisher = make_publisher(MqttSettings(
            endpoint=mosquitto.host, port=mosquitto.port, thing_name=thing, cert=ident.cert, key=ident.key,
            ca=mosquitto.pki.ca, protocol="mqtt5", connect_timeout_s=3.0, ack_timeout_s=5,
            min_reconnect_delay_s=0.05, max_reconnect_delay_s=0.5, iot_core_limits=False))
        try:
            publisher.connect(5)
            for attempt in (a for a in publishes if a.thing == thing):
                try:
                    publisher.publish(attempt.target, b"{}").result(5)
                    broker_allowed = True
                except PublishRejectedError:
                    broker_allowed = False
                iot_allowed = evaluate([policies["qcsight-device"]], attempt.request(), attempt.connection()) == ALLOW
                assert broker_allowed is attempt.allowed is iot_allowed, (attempt, broker_allowed, iot_allowed)
        finally:
            publisher.close(5)
