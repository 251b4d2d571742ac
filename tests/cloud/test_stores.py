"""What each store implementation guarantees beyond the shared contract: SQLite's indexes and append-only
reviews, the DynamoDB table definitions, and DynamoDB's handling of two writers on one device."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from qcsight_cloud.ingest import Ingestor
from qcsight_cloud.sqlite_store import SqliteStore
from qcsight_cloud.store import InboxQuery, Store, StoreSettings
from qcsight_cloud.tables import ALERT_SUMMARY_ATTRIBUTES, TABLES, create_table_request
from qcsight_core.errors import ConfigError
from tests.cloud import builders
from tests.cloud.builders import T0


@pytest.mark.parametrize("query", [
    InboxQuery(line="l"), InboxQuery(thing="t"), InboxQuery(line="l", label="crack"),
    InboxQuery(line="l", reviewed=False), InboxQuery(line="l", reviewed=False, label="crack", score_min=0.5),
], ids=["line", "thing", "line_label", "unreviewed", "unreviewed+filters"])
def test_every_inbox_page_is_an_index_range_in_sort_order(tmp_path: Path, query: InboxQuery) -> None:
    plan = SqliteStore(tmp_path / "s.sqlite").explain_inbox(query)
    assert f"USING INDEX alerts_{'by_' if query.index != 'unreviewed' else ''}{query.index}" in plan
    assert "sk<?" in plan.replace(" ", "") or "sk>?" in plan.replace(" ", ""), plan
    assert "TEMP B-TREE" not in plan, "no sort: the index order is the page order"


def test_sqlite_refuses_to_change_or_delete_a_review(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite")
    message = builders.alert("cam-a", 1, T0)
    Ingestor(store).ingest(builders.incoming(message))
    store.add_review(message["message_id"], "ann", "confirm")
    db = sqlite3.connect(tmp_path / "s.sqlite")
    for statement in ("UPDATE reviews SET label = 'spot'", "DELETE FROM reviews"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute(statement)
    db.close()


@pytest.mark.parametrize(("url", "kind", "target"), [
    ("sqlite:cloud.sqlite", "sqlite", "cloud.sqlite"), ("sqlite:///var/qc/c.sqlite", "sqlite", "/var/qc/c.sqlite"),
    ("dynamodb:qcsight-prod", "dynamodb", "qcsight-prod"), ("dynamodb://qcsight", "dynamodb", "qcsight"),
])
def test_store_urls(url: str, kind: str, target: str) -> None:
    settings = StoreSettings(url)
    assert (settings.kind, settings.target) == (kind, target)


@pytest.mark.parametrize("url", ["postgres://x", "sqlite:", "dynamodb:", "cloud.sqlite"])
def test_a_bad_store_url_is_named(url: str) -> None:
    with pytest.raises(ConfigError, match="sqlite:PATH"):
        StoreSettings(url)


# ---------------------------------------------------------------- DynamoDB


def test_the_table_definitions_are_valid_create_table_requests() -> None:
    """What the CDK stack builds from TABLES, checked against botocore's DynamoDB model and DynamoDB's limits."""
    import boto3
    from botocore.stub import Stubber

    client = boto3.client("dynamodb", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    included = 0
    with Stubber(client) as stub:
        for table, spec in TABLES.items():
            request = create_table_request("qcsight", table)
            stub.add_response("create_table", {}, request)
            client.create_table(**request)
            defined = {a["AttributeName"] for a in spec["AttributeDefinitions"]}
            keyed = {k["AttributeName"] for k in spec["KeySchema"]}
            for index in spec["GlobalSecondaryIndexes"]:
                keyed |= {k["AttributeName"] for k in index["KeySchema"]}
                included += len(index["Projection"].get("NonKeyAttributes", []))
            assert defined == keyed, f"{table}: DynamoDB refuses attribute definitions no key uses"
            assert len(spec["GlobalSecondaryIndexes"]) <= 20
        stub.assert_no_pending_responses()
    assert included <= 100, "DynamoDB allows 100 projected non-key attributes over a table's indexes"
    assert "thumbnail" not in ALERT_SUMMARY_ATTRIBUTES


class _CompetingWriter:
    """Delegates to the real client; before the first transaction it lets another store write to the same
    device, as a second Lambda invocation would, so the first one's conditional write must fail and retry."""

    def __init__(self, client: Any, compete: Any) -> None:
        self._client = client
        self._compete = compete
        self.transactions = 0

    def transact_write_items(self, **request: Any) -> Any:
        self.transactions += 1
        if self._compete is not None:
            compete, self._compete = self._compete, None
            compete()
        return self._client.transact_write_items(**request)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


@pytest.mark.cloud
def test_two_writers_on_one_device_never_lose_a_count(dynamo_store: Store) -> None:
    from qcsight_cloud.dynamodb_store import DynamoStore

    assert isinstance(dynamo_store, DynamoStore)
    first = builders.status("race-cam", 1, T0)
    second = builders.status("race-cam", 2, T0, state="paused")
    other = Ingestor(dynamo_store)
    client = _CompetingWriter(dynamo_store.client, lambda: other.ingest(builders.incoming(second)))
    racing = Ingestor(DynamoStore(client, dynamo_store.prefix))
    assert racing.ingest(builders.incoming(first)).status == "stored"
    assert client.transactions == 2, "the first attempt lost the race and was retried"
    device = dynamo_store.device("race-cam")
    assert device is not None
    assert (device.received, device.min_seq, device.max_seq, device.state) == (2, 1, 2, "paused")


def test_a_store_file_from_before_box_and_overlay_gains_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    SqliteStore(path).close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE alerts DROP COLUMN box")
    db.execute("ALTER TABLE alerts DROP COLUMN overlay")
    db.close()
    store = SqliteStore(path)
    message = builders.alert("cam-1", 1, T0)
    message["box"] = {"x0": 0.1, "y0": 0.1, "x1": 0.2, "y1": 0.2}
    Ingestor(store, lambda thing: "line-1").ingest_batch([builders.incoming(message)])
    stored = store.get_alert(message["message_id"])
    assert stored is not None and stored.box == message["box"] and stored.overlay is None
    store.close()
