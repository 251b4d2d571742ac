"""The IoT policy evaluator on its own: each rule it implements, including the ones that refuse."""

from __future__ import annotations

from typing import Any

import pytest

from tests.infra.iot_eval import (
    ALLOW,
    DENY,
    IMPLICIT_DENY,
    Arn,
    Connection,
    PolicyEvaluationError,
    Request,
    connect,
    evaluate,
    publish,
    receive,
    subscribe,
)

ARN = Arn("eu-west-1", "111111111111")
THING = "${iot:Connection.Thing.ThingName}"
A = Connection("thing-a", frozenset({"thing-a"}))


def _policy(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def _allow(action: Any, resource: Any, **extra: Any) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": action, "Resource": resource, **extra}


def test_nothing_is_allowed_without_a_matching_statement() -> None:
    assert evaluate([], publish(ARN, "a"), A) == IMPLICIT_DENY
    assert evaluate([_policy(_allow("iot:Publish", ARN.topic("b")))], publish(ARN, "a"), A) == IMPLICIT_DENY


def test_explicit_deny_wins_over_allow_across_policies() -> None:
    allow_all = _policy(_allow("iot:*", "*"))
    deny = _policy({"Effect": "Deny", "Action": "iot:Publish", "Resource": ARN.topic("secret/*")})
    assert evaluate([allow_all], publish(ARN, "secret/x"), A) == ALLOW
    assert evaluate([allow_all, deny], publish(ARN, "secret/x"), A) == DENY
    assert evaluate([allow_all, deny], publish(ARN, "open/x"), A) == ALLOW


@pytest.mark.parametrize(("pattern", "action", "expected"), [
    ("iot:Publish", "iot:Publish", True),
    ("IOT:publish", "iot:Publish", True),  # actions are case-insensitive
    ("iot:Pub*", "iot:Publish", True),
    ("iot:?ublish", "iot:Publish", True),
    ("iot:Publish", "iot:Subscribe", False),
    ("greengrass:*", "iot:Publish", False),
])
def test_action_wildcards(pattern: str, action: str, expected: bool) -> None:
    result = evaluate([_policy(_allow(pattern, "*"))], Request(action, ARN.topic("t")), A)
    assert (result == ALLOW) is expected


def test_resources_are_case_sensitive_and_take_star_and_question_mark() -> None:
    policy = [_policy(_allow("iot:Publish", [ARN.topic("line/*/metrics"), ARN.topic("cell-?")]))]
    assert evaluate(policy, publish(ARN, "line/7/metrics"), A) == ALLOW
    assert evaluate(policy, publish(ARN, "line/7/sub/metrics"), A) == ALLOW  # '*' crosses '/' in a policy
    assert evaluate(policy, publish(ARN, "Line/7/metrics"), A) == IMPLICIT_DENY
    assert evaluate(policy, publish(ARN, "cell-1"), A) == ALLOW
    assert evaluate(policy, publish(ARN, "cell-10"), A) == IMPLICIT_DENY


def test_mqtt_wildcards_are_literal_characters_of_a_topic_filter() -> None:
    policy = [_policy(_allow("iot:Subscribe", ARN.topicfilter("qcsight/thing-a/*")))]
    assert evaluate(policy, subscribe(ARN, "qcsight/thing-a/#"), A) == ALLOW
    assert evaluate(policy, subscribe(ARN, "qcsight/+/metrics"), A) == IMPLICIT_DENY
    assert evaluate(policy, subscribe(ARN, "qcsight/#"), A) == IMPLICIT_DENY


def test_topic_and_topicfilter_resources_are_different_things() -> None:
    topic_only = [_policy(_allow(["iot:Subscribe", "iot:Publish"], ARN.topic("qcsight/thing-a/metrics")))]
    assert evaluate(topic_only, publish(ARN, "qcsight/thing-a/metrics"), A) == ALLOW
    assert evaluate(topic_only, subscribe(ARN, "qcsight/thing-a/metrics"), A) == IMPLICIT_DENY
    filter_only = [_policy(_allow(["iot:Subscribe", "iot:Receive"], ARN.topicfilter("qcsight/thing-a/metrics")))]
    assert evaluate(filter_only, subscribe(ARN, "qcsight/thing-a/metrics"), A) == ALLOW
    assert evaluate(filter_only, receive(ARN, "qcsight/thing-a/metrics"), A) == IMPLICIT_DENY


def test_thing_name_variable_resolves_only_for_an_attached_thing() -> None:
    policy = [_policy(_allow("iot:Connect", ARN.client(THING)))]
    assert evaluate(policy, connect(ARN, "thing-a"), A) == ALLOW
    # Same certificate, another client id: the variable resolves to nothing, so nothing matches.
    assert evaluate(policy, connect(ARN, "thing-b"), Connection("thing-b", frozenset({"thing-a"}))) == IMPLICIT_DENY
    # A certificate attached to no thing.
    assert evaluate(policy, connect(ARN, "thing-a"), Connection("thing-a")) == IMPLICIT_DENY


def test_client_id_variable_always_resolves_and_is_literal() -> None:
    policy = [_policy(_allow("iot:Publish", ARN.topic("c/${iot:ClientId}")))]
    assert evaluate(policy, publish(ARN, "c/anyone"), Connection("anyone")) == ALLOW
    # A '*' inside the client id is not a wildcard once substituted.
    assert evaluate(policy, publish(ARN, "c/other"), Connection("*")) == IMPLICIT_DENY
    assert evaluate(policy, publish(ARN, "c/*"), Connection("*")) == ALLOW


def test_escaped_literal_characters() -> None:
    policy = [_policy(_allow("iot:Publish", ARN.topic("a/${*}")))]
    assert evaluate(policy, publish(ARN, "a/*"), A) == ALLOW
    assert evaluate(policy, publish(ARN, "a/b"), A) == IMPLICIT_DENY


def test_is_attached_condition() -> None:
    policy = [_policy(_allow("iot:Connect", ARN.client("${iot:ClientId}"),
                             Condition={"Bool": {"iot:Connection.Thing.IsAttached": "true"}}))]
    assert evaluate(policy, connect(ARN, "thing-a"), A) == ALLOW
    assert evaluate(policy, connect(ARN, "thing-x"), Connection("thing-x", frozenset({"thing-a"}))) == IMPLICIT_DENY


def test_string_conditions_and_if_exists() -> None:
    like = [_policy(_allow("iot:Connect", "*", Condition={"StringLike": {"iot:ClientId": "line7-*"}}))]
    assert evaluate(like, connect(ARN, "line7-cam1"), Connection("line7-cam1")) == ALLOW
    assert evaluate(like, connect(ARN, "line8-cam1"), Connection("line8-cam1")) == IMPLICIT_DENY
    not_equals = [_policy(_allow("iot:Connect", "*", Condition={"StringNotEquals": {"iot:ClientId": ["x", "y"]}}))]
    assert evaluate(not_equals, connect(ARN, "x"), Connection("x")) == IMPLICIT_DENY
    if_exists = [_policy(_allow("iot:Connect", "*",
                                Condition={"StringEqualsIfExists": {"iot:Connection.Thing.ThingName": "thing-a"}}))]
    assert evaluate(if_exists, connect(ARN, "loose"), Connection("loose")) == ALLOW  # no thing: key absent
    assert evaluate(if_exists, connect(ARN, "thing-a"), A) == ALLOW


def test_not_action_and_not_resource() -> None:
    policy = [_policy({"Effect": "Allow", "NotAction": "iot:Connect", "NotResource": ARN.topic("private/*")})]
    assert evaluate(policy, publish(ARN, "public/x"), A) == ALLOW
    assert evaluate(policy, publish(ARN, "private/x"), A) == IMPLICIT_DENY
    assert evaluate(policy, connect(ARN, "thing-a"), A) == IMPLICIT_DENY


@pytest.mark.parametrize("statement", [
    _allow("iot:Connect", "*", Condition={"DateGreaterThan": {"aws:CurrentTime": "2020-01-01"}}),
    _allow("iot:Connect", "*", Condition={"StringEquals": {"iot:Connection.Thing.ThingTypeName": "x"}}),
    _allow("iot:Connect", ARN.client("${iot:Certificate.Subject.CommonName}")),
    {"Effect": "Allow", "Action": "iot:Connect", "Resource": "*", "Principal": "*"},
    {"Effect": "Maybe", "Action": "iot:Connect", "Resource": "*"},
])
def test_what_is_not_implemented_raises_instead_of_guessing(statement: dict[str, Any]) -> None:
    with pytest.raises(PolicyEvaluationError):
        evaluate([_policy(statement)], connect(ARN, "thing-a"), A)
