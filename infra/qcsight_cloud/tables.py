"""The DynamoDB tables of the cloud store: key schema, global secondary indexes and TTL, defined once.

``TABLES`` is what both the store (``create_table_request`` for tests and a first setup) and
the CDK stack build their tables from, so the code and the deployed tables cannot disagree.
Every sort key named ``sk`` is ``"<canonical time>#<unique id>"``, so a range of keys is a range
of time and a key is a keyset-paging cursor (see infra/README.md, "Access patterns").
"""

from __future__ import annotations

from typing import Any

S, N = "S", "N"

# What an inbox page shows of an alert: every attribute but the thumbnail, which stays in the base
# table (a 5-20 KB base64 JPEG copied into four indexes would quadruple their storage).
ALERT_SUMMARY_ATTRIBUTES = (
    "thing", "line", "seq", "time", "received", "alert_id", "frame_id", "model_name", "model_version",
    "status", "label", "score", "confidence", "scores", "image_ref", "review_verdict", "review_label", "review_count",
)


def _keys(hash_key: str, range_key: str | None = None) -> list[dict[str, str]]:
    schema = [{"AttributeName": hash_key, "KeyType": "HASH"}]
    if range_key is not None:
        schema.append({"AttributeName": range_key, "KeyType": "RANGE"})
    return schema


def _gsi(name: str, hash_key: str, range_key: str, include: tuple[str, ...] | None = None) -> dict[str, Any]:
    projection: dict[str, Any] = {"ProjectionType": "ALL"}
    if include is not None:
        projection = {"ProjectionType": "INCLUDE",
                      "NonKeyAttributes": [a for a in include if a not in (hash_key, range_key)]}
    return {"IndexName": name, "KeySchema": _keys(hash_key, range_key), "Projection": projection}


def _attrs(**types: str) -> list[dict[str, str]]:
    return [{"AttributeName": name, "AttributeType": kind} for name, kind in types.items()]


TABLES: dict[str, dict[str, Any]] = {
    # One item per alert. Indexes: a line's alerts, a device's alerts, a line's alerts of one class,
    # and a line's unreviewed alerts (sparse: `unreviewed_line` exists only while unreviewed).
    "alerts": {
        "KeySchema": _keys("message_id"),
        "AttributeDefinitions": _attrs(message_id=S, line=S, thing=S, sk=S, line_label=S, unreviewed_line=S),
        "GlobalSecondaryIndexes": [
            _gsi("by_line", "line", "sk", ALERT_SUMMARY_ATTRIBUTES),
            _gsi("by_thing", "thing", "sk", ALERT_SUMMARY_ATTRIBUTES),
            _gsi("by_line_label", "line_label", "sk", ALERT_SUMMARY_ATTRIBUTES),
            _gsi("unreviewed", "unreviewed_line", "sk", ALERT_SUMMARY_ATTRIBUTES),
        ],
        "TimeToLiveAttribute": None,
    },
    # Metrics windows: a device's time series, and a line's (fleet view, policy).
    "metrics": {
        "KeySchema": _keys("thing", "sk"),
        "AttributeDefinitions": _attrs(thing=S, sk=S, line=S),
        "GlobalSecondaryIndexes": [_gsi("by_line", "line", "sk")],
        "TimeToLiveAttribute": "expires",
    },
    # Status messages of a device (heartbeats, errors, model changes).
    "status": {
        "KeySchema": _keys("thing", "sk"),
        "AttributeDefinitions": _attrs(thing=S, sk=S),
        "GlobalSecondaryIndexes": [],
        "TimeToLiveAttribute": "expires",
    },
    # One item per device: latest status, model, outbox, errors, sequence tracking.
    "devices": {
        "KeySchema": _keys("thing"),
        "AttributeDefinitions": _attrs(thing=S),
        "GlobalSecondaryIndexes": [],
        "TimeToLiveAttribute": None,
    },
    # Reviews: an alert's history (n = 1, 2, ...), and every review in time order by month (audit
    # export, statistics). Reviews are written by people, a few thousand a day at most, so one
    # partition per month is far below DynamoDB's per-partition write limit.
    "reviews": {
        "KeySchema": _keys("alert_id", "n"),
        "AttributeDefinitions": _attrs(alert_id=S, n=N, month=S, sk=S),
        "GlobalSecondaryIndexes": [_gsi("by_month", "month", "sk")],
        "TimeToLiveAttribute": None,
    },
    # Ingestion counters (accepted, duplicates, drops by reason) per connection identity.
    "counters": {
        "KeySchema": _keys("identity", "name"),
        "AttributeDefinitions": _attrs(identity=S, name=S),
        "GlobalSecondaryIndexes": [],
        "TimeToLiveAttribute": None,
    },
    # Retraining decisions per scope (line), and all of them in time order by month.
    "decisions": {
        "KeySchema": _keys("scope", "sk"),
        "AttributeDefinitions": _attrs(scope=S, sk=S, month=S),
        "GlobalSecondaryIndexes": [_gsi("by_month", "month", "sk")],
        "TimeToLiveAttribute": None,
    },
    # Retraining runs per scope, by request time.
    "runs": {
        "KeySchema": _keys("scope", "sk"),
        "AttributeDefinitions": _attrs(scope=S, sk=S),
        "GlobalSecondaryIndexes": [],
        "TimeToLiveAttribute": None,
    },
}


def table_name(prefix: str, table: str) -> str:
    return f"{prefix}-{table}"


def create_table_request(prefix: str, table: str) -> dict[str, Any]:
    """A CreateTable request (on-demand capacity) for one of TABLES."""
    spec = TABLES[table]
    request: dict[str, Any] = {
        "TableName": table_name(prefix, table),
        "KeySchema": spec["KeySchema"],
        "AttributeDefinitions": spec["AttributeDefinitions"],
        "BillingMode": "PAY_PER_REQUEST",
    }
    if spec["GlobalSecondaryIndexes"]:
        request["GlobalSecondaryIndexes"] = spec["GlobalSecondaryIndexes"]
    return request
