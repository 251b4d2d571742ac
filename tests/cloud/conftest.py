"""Cloud fixtures: the store under its two implementations, and the edge tests' real Mosquitto broker."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qcsight_cloud.sqlite_store import SqliteStore
from qcsight_cloud.store import Store
from tests.edge.conftest import broker, mosquitto_bin, pki  # noqa: F401  (the edge tests' broker fixtures)
from tests.helpers.aws import FAKE_ENV, moto_server


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """One moto server for the session's DynamoDB tests (starting one and creating the tables costs ~2 s)."""
    pytest.importorskip("moto.server")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in FAKE_ENV.items():
            patch.setenv(key, value)
        patch.delenv("AWS_PROFILE", raising=False)
        with moto_server() as url:
            patch.setenv("AWS_ENDPOINT_URL", url)
            yield url


@pytest.fixture(scope="session")
def dynamo_store(moto_endpoint: str) -> Iterator[Store]:
    from qcsight_cloud.dynamodb_store import DynamoStore

    store = DynamoStore.from_environment("qcsight-test")
    store.create_tables()
    yield store
    store.close()


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
