"""Cloud fixtures: the store under its two implementations, and the edge tests' real Mosquitto broker."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qcsight_cloud.sqlite_store import SqliteStore
from qcsight_cloud.store import Store
from tests.edge.conftest import broker, mosquitto_bin, pki  # noqa: F401  (the edge tests' broker fixtures)
from tests.helpers.aws import FAKE_ENV, moto_server


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """One moto server for the session's DynamoDB tests (starting one and creating the tables costs ~2 s).

    The environment is left alone (clients get the endpoint and fake credentials explicitly), so
    no later test finds AWS_ENDPOINT_URL pointing here; use ``aws_env`` for code that reads it.
    """
    pytest.importorskip("moto.server")
    with moto_server() as url:
        yield url


@pytest.fixture
def aws_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Fake credentials and AWS_ENDPOINT_URL for this test only, pointing at the session's moto server."""
    for key, value in FAKE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    return moto_endpoint


def moto_client(service: str, endpoint: str) -> Any:
    import boto3

    return boto3.client(service, endpoint_url=endpoint, region_name=FAKE_ENV["AWS_REGION"],
                        aws_access_key_id=FAKE_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=FAKE_ENV["AWS_SECRET_ACCESS_KEY"])


@pytest.fixture(scope="session")
def dynamo_session(moto_endpoint: str) -> Iterator[Any]:
    from qcsight_cloud.dynamodb_store import DynamoStore

    store = DynamoStore(moto_client("dynamodb", moto_endpoint), "qcsight-test")
    yield store
    store.close()


def ensure_tables(store: Any) -> Store:
    """Create the tables if they are missing: moto keeps one state per process, and another test's moto
    server (tests/helpers/aws.py) resets all of it when it starts."""
    existing = set(store.client.list_tables()["TableNames"])
    if not set(store.names.values()) <= existing:
        store.create_tables()
    result: Store = store
    return result


@pytest.fixture
def dynamo_store(dynamo_session: Any) -> Store:
    """The session's DynamoDB store, its tables there."""
    return ensure_tables(dynamo_session)


@pytest.fixture(params=["sqlite", pytest.param("dynamodb", marks=pytest.mark.cloud)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The contract suite's store. The DynamoDB tables are shared by the session's tests, so each test
    names its own things and lines with the ``ns`` fixture and reads back only those."""
    if request.param == "dynamodb":
        yield request.getfixturevalue("dynamo_store")
        return
    sqlite = SqliteStore(tmp_path / "store.sqlite")
    yield sqlite
    sqlite.close()


@pytest.fixture
def ns() -> str:
    """A name prefix of this test's own things and lines."""
    return "t" + uuid.uuid4().hex[:8]
