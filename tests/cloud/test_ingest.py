"""Ingestion: identity from the connection, drops by reason, duplicates; the Lambda handler and its EMF output."""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Mapping
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from qcsight_cloud import lambda_ingest, timestamps
from qcsight_cloud.emf import outcome_document, window_document
from qcsight_cloud.ingest import DROPPED, DUPLICATE, STORED, Dropped, Incoming, Ingestor, Outcome, check
from qcsight_cloud.records import Alert, Window
from qcsight_cloud.sqlite_store import SqliteStore
from qcsight_cloud.store import Store
from qcsight_core import messages, topics
from tests.cloud import builders
from tests.cloud.builders import T0


def _alert_bytes(**changes: Any) -> bytes:
    message = builders.alert("cam-a", 1, T0)
    message.update(changes)
    return json.dumps(message).encode()


@pytest.mark.parametrize(("identity", "topic", "payload", "reason"), [
    ("cam a", "qcsight/cam a/alerts", _alert_bytes(), "bad_identity"),
    ("cam-a", "qcsight/cam-a/other", _alert_bytes(), "bad_topic"),
    ("cam-a", "elsewhere/cam-a/alerts", _alert_bytes(), "bad_topic"),
    ("cam-a", "qcsight/cam-b/alerts", _alert_bytes(), "identity_topic_mismatch"),
    ("cam-a", "qcsight/cam-a/alerts", b"{not json", "invalid_payload"),
    ("cam-a", "qcsight/cam-a/alerts", _alert_bytes(schema="qcsight.alert/2"), "invalid_payload"),
    ("cam-a", "qcsight/cam-a/alerts", _alert_bytes(seq="7"), "invalid_payload"),
    ("cam-a", "qcsight/cam-a/alerts", _alert_bytes(time="2026-03-02T08:00:00"), "invalid_payload"),
    ("cam-a", "qcsight/cam-a/metrics", _alert_bytes(), "schema_topic_mismatch"),
    ("cam-a", "qcsight/cam-a/alerts", _alert_bytes(thing="cam-b"), "payload_thing_mismatch"),
], ids=lambda v: v if isinstance(v, str) and "/" not in v and " " not in v else None)
def test_a_message_that_fails_a_check_is_dropped_with_its_reason(identity: str, topic: str, payload: bytes,
                                                                reason: str) -> None:
    result = check(Incoming(identity, topic, payload, timestamps.iso(T0)))
    assert isinstance(result, Dropped)
    assert result.reason == reason, result.detail
    assert result.identity == identity


def test_a_valid_message_becomes_a_record_on_its_line_whatever_its_time_offset() -> None:
    message = builders.alert("cam-a", 4, T0)
    message["time"] = "2026-03-02T09:30:00.250+01:30"
    result = check(Incoming("cam-a", topics.alerts_topic("cam-a"), messages.encode(message), timestamps.iso(T0)),
                   line_of=lambda thing: {"cam-a": "line-7"}[thing])
    assert isinstance(result, Alert)
    assert (result.origin.line, result.origin.seq, result.origin.time) == ("line-7", 4, "2026-03-02T08:00:00.250Z")


def test_the_ingestor_counts_drops_and_duplicates_under_the_connection_identity(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite")
    ingestor = Ingestor(store)
    good = builders.alert("cam-a", 1, T0)
    spoof = builders.alert("cam-b", 2, T0)  # cam-a's connection, claiming to be cam-b
    batch = [builders.incoming(good), builders.incoming(good),
             Incoming("cam-a", topics.alerts_topic("cam-a"), messages.encode(spoof), timestamps.iso(T0)),
             builders.incoming(spoof, identity="cam-a"), Incoming("cam-a", "qcsight/cam-a/alerts", b"[]", "x")]
    outcomes = ingestor.ingest_batch(batch)
    assert [o.status for o in outcomes] == [STORED, DUPLICATE, DROPPED, DROPPED, DROPPED]
    assert [o.reason for o in outcomes[2:]] == ["payload_thing_mismatch", "identity_topic_mismatch", "invalid_payload"]
    assert store.counters() == {"cam-a": {"drop.identity_topic_mismatch": 1, "drop.invalid_payload": 1,
                                          "drop.payload_thing_mismatch": 1, "duplicate": 1}}
    assert store.device("cam-b") is None, "nothing is stored for the thing a payload pretended to be"


# ---------------------------------------------------------------- the IoT rule and the Lambda handler


def rule_event(message: dict[str, Any], *, clientid: str | None = None, topic: str | None = None) -> dict[str, Any]:
    """The event the rule SQL (RULE_SQL) hands the function for one MQTT message."""
    kind = builders.KIND_OF_SCHEMA[message["schema"]]
    thing = str(message["thing"])
    return {"payload": base64.b64encode(messages.encode(message)).decode(), "clientid": clientid or thing,
            "principal": "3f2ac9d1e0b4", "topic": topic or topics.topic(thing, kind),
            "received_ms": int(T0.timestamp() * 1000) + 1500}


def test_the_rule_sql_passes_the_raw_payload_and_the_connection_identity() -> None:
    assert set(lambda_ingest.RULE_SQL) == set(topics.KINDS)
    for kind, sql in lambda_ingest.RULE_SQL.items():
        assert "encode(*, 'base64') AS payload" in sql
        assert "clientid() AS clientid" in sql and "topic() AS topic" in sql and "principal() AS principal" in sql
        assert sql.endswith(f"FROM 'qcsight/+/{kind}'")


def test_the_rule_sql_is_a_valid_create_topic_rule_request() -> None:
    """The CDK stack will create these rules; botocore's IoT model checks the request shape here."""
    import boto3
    from botocore.stub import Stubber

    client = boto3.client("iot", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(client) as stub:
        for kind, sql in lambda_ingest.RULE_SQL.items():
            request = {"ruleName": f"qcsight_ingest_{kind}", "topicRulePayload": {
                "sql": sql, "awsIotSqlVersion": lambda_ingest.RULE_SQL_VERSION, "ruleDisabled": False,
                "actions": [{"lambda": {"functionArn": "arn:aws:lambda:us-east-1:123456789012:function:ingest"}}],
                "errorAction": {"sqs": {"queueUrl": "https://sqs.us-east-1.amazonaws.com/123456789012/dlq",
                                        "roleArn": "arn:aws:iam::123456789012:role/rule", "useBase64": True}}}}
            stub.add_response("create_topic_rule", {}, request)
            client.create_topic_rule(**request)
        stub.assert_no_pending_responses()


@pytest.mark.parametrize(("event", "says"), [
    ({"payload": "AAAA", "topic": "qcsight/a/alerts", "received_ms": 1}, "clientid missing"),
    ({"payload": "AAAA", "clientid": "a", "received_ms": 1}, "topic missing"),
    ({"payload": "!!!", "clientid": "a", "topic": "qcsight/a/alerts", "received_ms": 1}, "not base64"),
    ({"payload": "AAAA", "clientid": "a", "topic": "qcsight/a/alerts", "received_ms": "1"}, "received_ms"),
    ({"clientid": "a", "topic": "qcsight/a/alerts", "received_ms": 1}, "payload missing"),
    ([1, 2], "not an object"),
])
def test_a_malformed_rule_event_is_a_counted_drop(event: Any, says: str, tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite")
    emitted: list[Mapping[str, Any]] = []
    result = lambda_ingest.handle(event, Ingestor(store), emitted.append)
    assert result["status"] == DROPPED and result["reason"] == "bad_event"
    [counts] = store.counters().values()
    assert counts == {"drop.bad_event": 1}
    [document] = emitted
    check_emf(document)
    assert says in document["Detail"]


def test_the_handler_stores_a_window_and_emits_its_metrics(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite")
    ingestor = Ingestor(store, lambda thing: "line-1")
    emitted: list[Mapping[str, Any]] = []
    window = builders.metrics("cam-a", 1, T0, frames=200, defects=6, confidence_psi=0.31)
    assert lambda_ingest.handle(rule_event(window), ingestor, emitted.append)["status"] == STORED
    assert lambda_ingest.handle(rule_event(window), ingestor, emitted.append)["status"] == DUPLICATE
    spoof = builders.alert("cam-b", 2, T0)
    assert lambda_ingest.handle(rule_event(spoof, clientid="cam-a", topic="qcsight/cam-a/alerts"), ingestor,
                                emitted.append)["reason"] == "payload_thing_mismatch"

    for document in emitted:
        check_emf(document)
    stored, metrics_doc, duplicate, dropped = emitted
    assert (stored["Outcome"], stored["Kind"], duplicate["Outcome"], dropped["Reason"]) == (
        STORED, "metrics", DUPLICATE, "payload_thing_mismatch")
    assert (metrics_doc["Line"], metrics_doc["Thing"], metrics_doc["Frames"], metrics_doc["Defects"]) == (
        "line-1", "cam-a", 200.0, 6.0)
    assert metrics_doc["ConfidencePSI"] == 0.31
    assert metrics_doc["_aws"]["Timestamp"] == int(T0.timestamp() * 1000), "the window's own end time"
    device = store.device("cam-a")
    assert device is not None and device.last_seen == "2026-03-02T08:00:01.500Z", "received time from the rule"


@pytest.mark.cloud
def test_the_lambda_entry_point_ingests_into_dynamodb(dynamo_store: Store, aws_env: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """handler(event, context) exactly as Lambda calls it, configured by its environment, on the moto tables."""
    monkeypatch.setenv("QCSIGHT_STORE", "dynamodb:qcsight-test")
    monkeypatch.setenv("QCSIGHT_FLEET", json.dumps({"lines": {"lambda-line": {"things": ["lambda-cam"]}}}))
    lambda_ingest._app.cache_clear()
    out = io.StringIO()
    message = builders.alert("lambda-cam", 1, T0)
    try:
        with redirect_stdout(out):
            result = lambda_ingest.handler(rule_event(message), None)
            again = lambda_ingest.handler(rule_event(message), None)
    finally:
        lambda_ingest._app.cache_clear()
    assert (result["status"], again["status"]) == (STORED, DUPLICATE)
    stored = dynamo_store.get_alert(message["message_id"])
    assert stored is not None and stored.origin.line == "lambda-line"
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    for line in lines:
        check_emf(json.loads(line))


# ---------------------------------------------------------------- EMF


def check_emf(document: Mapping[str, Any]) -> None:
    """The embedded metric format specification's rules, with CloudWatch's limits from botocore's model."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("cloudwatch")
    units = set(model.shape_for("StandardUnit").enum)
    meta = document["_aws"]
    assert set(meta) <= {"Timestamp", "CloudWatchMetrics", "LogGroupName", "LogStreamName"}
    assert isinstance(meta["Timestamp"], int) and meta["Timestamp"] > 10**12, "milliseconds since the epoch"
    assert isinstance(meta["CloudWatchMetrics"], list) and meta["CloudWatchMetrics"]
    for directive in meta["CloudWatchMetrics"]:
        assert set(directive) == {"Namespace", "Dimensions", "Metrics"}
        assert 1 <= len(directive["Namespace"]) <= 255 and re.fullmatch(r"[^:].*", directive["Namespace"])
        for dimension_set in directive["Dimensions"]:
            assert len(dimension_set) <= 30
            for name in dimension_set:
                assert 1 <= len(name) <= 255
                value = document[name]
                assert isinstance(value, str) and 1 <= len(value) <= 1024, f"dimension {name} must be a string"
        assert 1 <= len(directive["Metrics"]) <= 100
        for metric in directive["Metrics"]:
            assert set(metric) <= {"Name", "Unit", "StorageResolution"}
            assert 1 <= len(metric["Name"]) <= 255
            assert metric.get("Unit", "None") in units
            assert metric.get("StorageResolution", 60) in (1, 60)
            value = document[metric["Name"]]
            values = value if isinstance(value, list) else [value]
            assert len(values) <= 100
            assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    json.dumps(document, allow_nan=False)


def test_emf_documents_follow_the_specification() -> None:
    window = check(builders.incoming(builders.metrics("cam-a", 1, T0, brightness_psi=None)), lambda t: "line-1")
    assert isinstance(window, Window)
    document = window_document(window)
    check_emf(document)
    assert "BrightnessPSI" not in document, "an absent drift score is no metric, not a zero"
    assert document["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["Line"], ["Line", "Thing"]]

    late = check(builders.incoming(builders.metrics("cam-a", 2, T0), received=T0.replace(month=5)), lambda t: "l")
    assert isinstance(late, Window)
    assert window_document(late)["_aws"]["Timestamp"] == int(T0.replace(month=5).timestamp() * 1000), \
        "a window older than CloudWatch accepts is stamped with its arrival"
    bad = check(Incoming("x y", "t", b"", "2026-01-01T00:00:00.000Z"))
    assert isinstance(bad, Dropped)
    check_emf(outcome_document(Outcome(DROPPED, "x y", None, reason=bad.reason, detail=bad.detail),
                               "2026-01-01T00:00:00.000Z"))
