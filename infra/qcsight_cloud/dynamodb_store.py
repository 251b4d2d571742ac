"""The store on DynamoDB (tables of qcsight_cloud.tables.TABLES), for the Lambda functions and the review app in AWS.

Writes that must be exactly-once are transactions: a message's item goes in only if its key is
new, together with its device's item only if the device's ``received`` count is still what this
writer read (optimistic concurrency; two Lambda invocations for one device retry instead of
overwriting each other). A review goes in only if its number is new, together with the alert's
derived verdict only if the alert's review count is unchanged. Requests are built as plain dicts
against the low-level client, which botocore validates against the DynamoDB service model.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from qcsight_cloud import codec, timestamps
from qcsight_cloud.errors import NotFoundError, ReviewConflictError, StoreError
from qcsight_cloud.records import (
    Alert,
    AlertSummary,
    Decision,
    DeviceStatus,
    Record,
    Review,
    ReviewStats,
    Run,
    StatusEvent,
    Window,
)
from qcsight_cloud.store import (
    LOWEST_KEY,
    InboxQuery,
    Page,
    Store,
    current_state,
    decode_cursor,
    encode_cursor,
    next_review,
    stats_from_reviews,
)
from qcsight_cloud.tables import TABLES, create_table_request, table_name
from qcsight_cloud.tracking import advance

log = logging.getLogger(__name__)

# Attempts at one message when another writer updated its device in between (each reads again).
MAX_DEVICE_ATTEMPTS = 8
_INBOX_INDEX = {"thing": ("by_thing", "thing"), "unreviewed": ("unreviewed", "unreviewed_line"),
                "line_label": ("by_line_label", "line_label"), "line": ("by_line", "line")}
_DEFAULT_DECISION_MONTHS = 13
_serializer = TypeSerializer()
_deserializer = TypeDeserializer()


def _attribute(value: Any) -> dict[str, Any]:
    if isinstance(value, float):
        value = Decimal(repr(value))
    result: dict[str, Any] = _serializer.serialize(value)
    return result


def to_item(row: Mapping[str, Any]) -> dict[str, Any]:
    """A DynamoDB item from a codec row; None values are left out (absent attribute)."""
    return {name: _attribute(value) for name, value in row.items() if value is not None}


def from_item(item: Mapping[str, Any]) -> dict[str, Any]:
    return {name: _deserializer.deserialize(value) for name, value in item.items()}


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class DynamoStore:
    """The Store protocol on the DynamoDB tables ``<prefix>-<table>``."""

    def __init__(self, client: Any, prefix: str, *, retention_days: int = 90,
                 rng: random.Random | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.retention_s = retention_days * 86400
        self._rng = rng or random.Random()
        self.names = {table: table_name(prefix, table) for table in TABLES}

    @classmethod
    def from_environment(cls, prefix: str, *, retention_days: int = 90) -> DynamoStore:
        """A store on the default boto3 session (region, credentials and AWS_ENDPOINT_URL from the environment)."""
        import boto3

        config = Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=5, read_timeout=10)
        return cls(boto3.client("dynamodb", config=config), prefix, retention_days=retention_days)

    def create_tables(self, timeout_s: float = 120.0) -> None:
        """Create any missing table of TABLES and wait until all are active (tests, a first local setup).

        In AWS the CDK stack creates them, with encryption and point-in-time recovery.
        """
        for table in TABLES:
            try:
                self.client.create_table(**create_table_request(self.prefix, table))
            except ClientError as exc:
                if _code(exc) != "ResourceInUseException":
                    raise StoreError(f"DynamoDB: cannot create {self.names[table]}: {exc}") from exc
        waiter = self.client.get_waiter("table_exists")
        for table, spec in TABLES.items():
            waiter.wait(TableName=self.names[table], WaiterConfig={"Delay": 1, "MaxAttempts": max(1, int(timeout_s))})
            if spec["TimeToLiveAttribute"]:
                self.client.update_time_to_live(TableName=self.names[table], TimeToLiveSpecification={
                    "Enabled": True, "AttributeName": spec["TimeToLiveAttribute"]})

    def close(self) -> None:
        self.client.close()

    def _call(self, operation: str, **request: Any) -> dict[str, Any]:
        try:
            response: dict[str, Any] = getattr(self.client, operation)(**request)
        except (ClientError, BotoCoreError) as exc:
            raise StoreError(f"DynamoDB {operation} on {request.get('TableName', 'tables')} failed: {exc}") from exc
        return response

    # ------------------------------------------------------------ ingestion

    def _record_item(self, record: Record) -> tuple[str, dict[str, Any], str]:
        """(table, item, key attribute) of a record; a put on condition the key attribute does not exist
        refuses a message already stored."""
        if isinstance(record, Alert):
            row = codec.alert_row(record)
            row["line_label"] = f"{record.origin.line}#{record.label}"
            row["unreviewed_line"] = None if record.review.reviewed else record.origin.line
            return self.names["alerts"], to_item(row), "message_id"
        row = codec.window_row(record) if isinstance(record, Window) else codec.status_row(record)
        row["expires"] = int(timestamps.parse(record.origin.received).timestamp()) + self.retention_s
        table = self.names["metrics" if isinstance(record, Window) else "status"]
        return table, to_item(row), "sk"

    def _get_device(self, thing: str) -> DeviceStatus | None:
        response = self._call("get_item", TableName=self.names["devices"], Key={"thing": {"S": thing}},
                              ConsistentRead=True)
        item = response.get("Item")
        return None if item is None else codec.device_from(from_item(item))

    def put(self, records: Sequence[Record]) -> list[bool]:
        return [self._put_one(record) for record in records]

    def _put_one(self, record: Record) -> bool:
        table, item, key = self._record_item(record)
        thing = record.origin.thing
        for attempt in range(MAX_DEVICE_ATTEMPTS):
            device = self._get_device(thing)
            updated = advance(device, record)
            device_item = to_item(codec.device_row(updated))
            device_put: dict[str, Any] = {"TableName": self.names["devices"], "Item": device_item}
            if device is None:
                device_put["ConditionExpression"] = "attribute_not_exists(#t)"
                device_put["ExpressionAttributeNames"] = {"#t": "thing"}
            else:
                device_put["ConditionExpression"] = "#r = :seen"
                device_put["ExpressionAttributeNames"] = {"#r": "received"}
                device_put["ExpressionAttributeValues"] = {":seen": {"N": str(device.received)}}
            try:
                self.client.transact_write_items(TransactItems=[
                    {"Put": {"TableName": table, "Item": item, "ConditionExpression": "attribute_not_exists(#k)",
                             "ExpressionAttributeNames": {"#k": key}}},
                    {"Put": device_put},
                ])
                return True
            except ClientError as exc:
                if _code(exc) != "TransactionCanceledException":
                    raise StoreError(f"DynamoDB: storing {record.origin.message_id} failed: {exc}") from exc
                reasons = [r.get("Code", "None") for r in exc.response.get("CancellationReasons", [])]
                if reasons and reasons[0] == "ConditionalCheckFailed":
                    self.count(thing, {"duplicate": 1})
                    return False
                log.debug("device %s changed under message %s (%s); attempt %d", thing, record.origin.message_id,
                          reasons, attempt + 1)
                time.sleep(self._rng.uniform(0, 0.01 * 2 ** attempt))
            except BotoCoreError as exc:
                raise StoreError(f"DynamoDB: storing {record.origin.message_id} failed: {exc}") from exc
        raise StoreError(f"DynamoDB: device {thing} kept changing; message {record.origin.message_id} not stored "
                         f"after {MAX_DEVICE_ATTEMPTS} attempts (the caller retries it)")

    def count(self, identity: str, counts: Mapping[str, int]) -> None:
        for name, n in counts.items():
            self._call("update_item", TableName=self.names["counters"],
                       Key={"identity": {"S": identity}, "name": {"S": name}},
                       UpdateExpression="ADD #v :n", ExpressionAttributeNames={"#v": "value"},
                       ExpressionAttributeValues={":n": {"N": str(int(n))}})

    # ------------------------------------------------------------ reads

    def _pages(self, operation: str, **request: Any) -> Iterator[dict[str, Any]]:
        while True:
            response = self._call(operation, **request)
            for item in response.get("Items", []):
                yield from_item(item)
            last = response.get("LastEvaluatedKey")
            if not last:
                return
            request["ExclusiveStartKey"] = last

    def counters(self) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = {}
        for row in self._pages("scan", TableName=self.names["counters"]):
            result.setdefault(str(row["identity"]), {})[str(row["name"])] = int(row["value"])
        return {identity: dict(sorted(names.items())) for identity, names in sorted(result.items())}

    def device(self, thing: str) -> DeviceStatus | None:
        return self._get_device(thing)

    def devices(self) -> list[DeviceStatus]:
        found = [codec.device_from(row) for row in self._pages("scan", TableName=self.names["devices"])]
        return sorted(found, key=lambda d: d.thing)

    def windows(self, *, since: datetime, until: datetime | None = None, thing: str | None = None,
                line: str | None = None, limit: int = 10_000, newest_first: bool = False) -> list[Window]:
        if thing is None and line is None:
            raise StoreError("a metrics series needs a thing or a line")
        hi = timestamps.iso(until) + "~" if until is not None else "~"
        request: dict[str, Any] = {
            "TableName": self.names["metrics"],
            "KeyConditionExpression": "#h = :h AND #sk BETWEEN :lo AND :hi",
            "ExpressionAttributeValues": {":h": {"S": thing or line}, ":lo": {"S": timestamps.iso(since)},
                                          ":hi": {"S": hi}},
            "ExpressionAttributeNames": {"#h": "thing" if thing is not None else "line", "#sk": "sk"},
            "ScanIndexForward": not newest_first,
            "Limit": min(limit, 1000),
        }
        if thing is None:
            request["IndexName"] = "by_line"
        elif line is not None:
            request["FilterExpression"] = "#line = :line"
            request["ExpressionAttributeNames"]["#line"] = "line"
            request["ExpressionAttributeValues"][":line"] = {"S": line}
        found: list[Window] = []
        for row in self._pages("query", **request):
            found.append(codec.window_from(row))
            if len(found) >= limit:
                break
        return found

    def status_events(self, thing: str, *, since: datetime, limit: int = 1000) -> list[StatusEvent]:
        found: list[StatusEvent] = []
        for row in self._pages("query", TableName=self.names["status"],
                               KeyConditionExpression="#t = :t AND #sk >= :lo",
                               ExpressionAttributeNames={"#t": "thing", "#sk": "sk"},
                               ExpressionAttributeValues={":t": {"S": thing}, ":lo": {"S": timestamps.iso(since)}}):
            found.append(codec.status_from(row))
            if len(found) >= limit:
                break
        return found

    def get_alert(self, message_id: str) -> Alert | None:
        response = self._call("get_item", TableName=self.names["alerts"], Key={"message_id": {"S": message_id}})
        item = response.get("Item")
        return None if item is None else codec.alert_from(from_item(item))

    def get_alerts(self, message_ids: Sequence[str]) -> list[Alert]:
        found: dict[str, Alert] = {}
        ids = list(dict.fromkeys(message_ids))
        table = self.names["alerts"]
        for start in range(0, len(ids), 100):
            keys: list[dict[str, Any]] = [{"message_id": {"S": i}} for i in ids[start:start + 100]]
            for attempt in range(8):
                response = self._call("batch_get_item", RequestItems={table: {"Keys": keys}})
                for item in response.get("Responses", {}).get(table, []):
                    alert = codec.alert_from(from_item(item))
                    found[alert.message_id] = alert
                keys = response.get("UnprocessedKeys", {}).get(table, {}).get("Keys", [])
                if not keys:
                    break
                time.sleep(self._rng.uniform(0, 0.05 * 2 ** attempt))
            if keys:
                raise StoreError(f"DynamoDB: {len(keys)} alerts stayed unprocessed by BatchGetItem")
        return [found[i] for i in message_ids if i in found]

    def inbox(self, query: InboxQuery) -> Page:
        index, hash_name = _INBOX_INDEX[query.index]
        hash_value = {"thing": query.thing, "unreviewed": query.line, "line": query.line,
                      "line_label": f"{query.line}#{query.label}"}[query.index]
        key_request: dict[str, Any] = {
            "TableName": self.names["alerts"], "IndexName": index, "ScanIndexForward": False,
            "KeyConditionExpression": "#h = :h AND #sk BETWEEN :lo AND :hi",
            "ExpressionAttributeNames": {"#h": hash_name, "#sk": "sk"},
            "ExpressionAttributeValues": {":h": {"S": str(hash_value)}, ":lo": {"S": query.lower}, ":hi": {
                "S": timestamps.iso(query.until) + "~" if query.until else "~"}},
        }
        request = {**key_request, "ExpressionAttributeNames": dict(key_request["ExpressionAttributeNames"]),
                   "ExpressionAttributeValues": dict(key_request["ExpressionAttributeValues"])}
        filters = _inbox_filters(query, request["ExpressionAttributeValues"], request["ExpressionAttributeNames"])
        if filters:
            request["FilterExpression"] = " AND ".join(filters)
        if query.cursor is not None:
            request["ExclusiveStartKey"] = _start_key(hash_name, str(hash_value), decode_cursor(query.cursor))
        items: list[AlertSummary] = []
        scanned = 0
        position_key: str | None = None  # the last index entry examined; None once the index is exhausted
        while True:
            request["Limit"] = min(200, query.scan_budget - scanned)
            response = self._call("query", **request)
            scanned += int(response.get("ScannedCount", 0))
            rows = [from_item(item) for item in response.get("Items", [])]
            last = response.get("LastEvaluatedKey")
            position_key = str(from_item(last)["sk"]) if last else None
            for taken, row in enumerate(rows, start=1):
                summary = codec.summary_from(row)
                if query.matches(summary):
                    items.append(summary)
                    if len(items) == query.limit:
                        if taken < len(rows) or last:
                            position_key = str(row["sk"])
                        break
            if position_key is None or len(items) == query.limit or scanned >= query.scan_budget:
                break
            request["ExclusiveStartKey"] = last
        if position_key is not None and len(items) == query.limit:
            # A full page ending exactly at the end of a response: is anything older there at all?
            probe = {**key_request, "Limit": 1,
                     "ExclusiveStartKey": _start_key(hash_name, str(hash_value), position_key)}
            if not self._call("query", **probe).get("Items"):
                position_key = None
        return Page(tuple(items), encode_cursor(position_key) if position_key else None, scanned)

    # ------------------------------------------------------------ reviews

    def add_review(self, alert_id: str, reviewer: str, action: str, label: str | None = None, *,
                   expected_count: int | None = None, time: datetime | None = None) -> Review:
        response = self._call("get_item", TableName=self.names["alerts"], Key={"message_id": {"S": alert_id}},
                              ConsistentRead=True)
        if "Item" not in response:
            raise NotFoundError(f"alert {alert_id!r} is not in the store")
        alert = codec.alert_from(from_item(response["Item"]))
        reviews = self.reviews(alert_id)
        if expected_count is not None and expected_count != len(reviews):
            raise ReviewConflictError(f"alert {alert_id} has {len(reviews)} reviews, the reviewer saw "
                                      f"{expected_count}: reload it")
        review = next_review(alert, reviews, reviewer, action, label, uuid.uuid4().hex,
                             timestamps.iso(time or timestamps.now()))
        state = current_state([*reviews, review])
        names = {"#review_count": "review_count", "#review_verdict": "review_verdict", "#review_label": "review_label",
                 "#unreviewed_line": "unreviewed_line"}
        sets = ["#review_count = :count"]
        removes = []
        values: dict[str, Any] = {":count": {"N": str(state.count)}, ":before": {"N": str(len(reviews))}}
        for name, value in (("review_verdict", state.verdict), ("review_label", state.label)):
            if value is None:
                removes.append(f"#{name}")
            else:
                sets.append(f"#{name} = :{name}")
                values[f":{name}"] = {"S": value}
        if state.reviewed:
            removes.append("#unreviewed_line")
        else:
            sets.append("#unreviewed_line = :line")
            values[":line"] = {"S": alert.origin.line}
        update = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
        try:
            self.client.transact_write_items(TransactItems=[
                {"Put": {"TableName": self.names["reviews"], "Item": to_item(codec.review_row(review)),
                         "ConditionExpression": "attribute_not_exists(#a)",
                         "ExpressionAttributeNames": {"#a": "alert_id"}}},
                {"Update": {"TableName": self.names["alerts"], "Key": {"message_id": {"S": alert_id}},
                            "UpdateExpression": update, "ConditionExpression": "#review_count = :before",
                            "ExpressionAttributeNames": names, "ExpressionAttributeValues": values}},
            ])
        except ClientError as exc:
            if _code(exc) == "TransactionCanceledException":
                raise ReviewConflictError(f"alert {alert_id} was reviewed concurrently; reload it") from exc
            raise StoreError(f"DynamoDB: review of {alert_id} not stored: {exc}") from exc
        return review

    def reviews(self, alert_id: str) -> list[Review]:
        rows = self._pages("query", TableName=self.names["reviews"], KeyConditionExpression="#a = :a",
                           ExpressionAttributeNames={"#a": "alert_id"},
                           ExpressionAttributeValues={":a": {"S": alert_id}}, ConsistentRead=True)
        return [codec.review_from(row) for row in rows]

    def export_reviews(self, since: datetime | None = None, until: datetime | None = None) -> Iterator[Review]:
        hi = timestamps.iso(until) + "~" if until is not None else "~"
        if since is None:
            # The whole log: a scan, sorted (reviews are written by people: thousands a day, not millions).
            everything = sorted(self._pages("scan", TableName=self.names["reviews"]), key=lambda r: str(r["sk"]))
            yield from (codec.review_from(row) for row in everything if str(row["sk"]) < hi)
            return
        for month in _months(since, until or timestamps.now()):
            rows = self._pages("query", TableName=self.names["reviews"], IndexName="by_month",
                               KeyConditionExpression="#m = :m AND #sk BETWEEN :lo AND :hi",
                               ExpressionAttributeNames={"#m": "month", "#sk": "sk"},
                               ExpressionAttributeValues={":m": {"S": month}, ":lo": {"S": timestamps.iso(since)},
                                                          ":hi": {"S": hi}})
            yield from (codec.review_from(row) for row in rows)

    def review_stats(self, since: datetime, line: str | None = None) -> ReviewStats:
        return stats_from_reviews(timestamps.iso(since), self.export_reviews(since), line)

    # ------------------------------------------------------------ decisions and runs

    def record_decision(self, decision: Decision) -> None:
        self._call("put_item", TableName=self.names["decisions"], Item=to_item(codec.decision_row(decision)),
                   ConditionExpression="attribute_not_exists(#sk)", ExpressionAttributeNames={"#sk": "sk"})

    def decisions(self, scope: str | None = None, since: datetime | None = None, limit: int = 50) -> list[Decision]:
        lo = timestamps.iso(since) if since is not None else LOWEST_KEY
        found: list[Decision] = []
        if scope is not None:
            for row in self._pages("query", TableName=self.names["decisions"], ScanIndexForward=False,
                                   KeyConditionExpression="#s = :s AND #sk >= :lo",
                                   ExpressionAttributeNames={"#s": "scope", "#sk": "sk"},
                                   ExpressionAttributeValues={":s": {"S": scope}, ":lo": {"S": lo}}):
                found.append(codec.decision_from(row))
                if len(found) >= limit:
                    break
            return found
        start = since or timestamps.now() - timedelta(days=31 * _DEFAULT_DECISION_MONTHS)
        for month in reversed(_months(start, timestamps.now())):
            for row in self._pages("query", TableName=self.names["decisions"], IndexName="by_month",
                                   ScanIndexForward=False, KeyConditionExpression="#m = :m AND #sk >= :lo",
                                   ExpressionAttributeNames={"#m": "month", "#sk": "sk"},
                                   ExpressionAttributeValues={":m": {"S": month}, ":lo": {"S": lo}}):
                found.append(codec.decision_from(row))
                if len(found) >= limit:
                    return found
        return found

    def put_run(self, run: Run) -> None:
        self._call("put_item", TableName=self.names["runs"], Item=to_item(codec.run_row(run)))

    def runs(self, scope: str, since: datetime | None = None) -> list[Run]:
        lo = timestamps.iso(since) if since is not None else LOWEST_KEY
        rows = self._pages("query", TableName=self.names["runs"], KeyConditionExpression="#s = :s AND #sk >= :lo",
                           ExpressionAttributeNames={"#s": "scope", "#sk": "sk"},
                           ExpressionAttributeValues={":s": {"S": scope}, ":lo": {"S": lo}})
        return [codec.run_from(row) for row in rows]


def _inbox_filters(query: InboxQuery, values: dict[str, Any], names: dict[str, str]) -> list[str]:
    """FilterExpression terms for the query's conditions its index does not serve."""
    filters: list[str] = []

    def equal(attribute: str, value: str) -> None:
        names[f"#{attribute}"] = attribute
        values[f":{attribute}"] = {"S": value}
        filters.append(f"#{attribute} = :{attribute}")

    if query.index == "thing" and query.line is not None:
        equal("line", query.line)
    if query.label is not None and query.index in ("thing", "unreviewed"):
        equal("label", query.label)
    if query.status is not None:
        equal("status", query.status)
    if query.model_version is not None:
        equal("model_version", query.model_version)
    if query.score_min is not None or query.score_max is not None:
        names["#score"] = "score"
    if query.score_min is not None:
        values[":score_min"] = _attribute(float(query.score_min))
        filters.append("#score >= :score_min")
    if query.score_max is not None:
        values[":score_max"] = _attribute(float(query.score_max))
        filters.append("#score <= :score_max")
    if query.reviewed is not None and query.index != "unreviewed":
        names["#rv"] = "review_verdict"
        filters.append("attribute_exists(#rv)" if query.reviewed else "attribute_not_exists(#rv)")
    return filters


def _start_key(hash_name: str, hash_value: str, sk: str) -> dict[str, Any]:
    """ExclusiveStartKey of an alerts index at a sort key, which carries the table key after '#'."""
    return {hash_name: {"S": str(hash_value)}, "sk": {"S": sk}, "message_id": {"S": sk.split("#", 1)[1]}}


def _months(since: datetime, until: datetime) -> list[str]:
    """Every "YYYY-MM" from since's month to until's month, in order."""
    months = []
    year, month = since.year, since.month
    end = (until.year, until.month)
    while (year, month) <= end:
        months.append(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return months


if TYPE_CHECKING:

    def _implements_store(store: DynamoStore) -> Store:
        return store  # mypy proves DynamoStore satisfies the Store protocol
