"""The DynamoDB tables of the cloud store, as qcsight_cloud.tables defines them (keys, indexes, TTL).

The store's code and the deployed tables read the one definition, ``qcsight_cloud.tables.TABLES``,
so a key or an index cannot differ between them. The table names are what the functions' store
URL resolves to: ``dynamodb:<fleet>`` opens ``<fleet>-<table>`` (``qcsight_cloud.tables.table_name``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qcsight_cloud.tables import TABLES, table_name


@dataclass(frozen=True)
class Attribute:
    name: str
    kind: str  # "S" or "N"


@dataclass(frozen=True)
class Index:
    """A global secondary index: keys and projection (ALL, or INCLUDE of non_key attributes)."""

    name: str
    partition_key: Attribute
    sort_key: Attribute | None
    projection: str
    non_key: tuple[str, ...]


@dataclass(frozen=True)
class TableSpec:
    """One table of the store: keys, optional TTL attribute and indexes."""

    key: str
    partition_key: Attribute
    sort_key: Attribute | None
    ttl_attribute: str | None
    indexes: tuple[Index, ...]


def _schema(key_schema: list[dict[str, str]], types: dict[str, str]) -> tuple[Attribute, Attribute | None]:
    by_role = {k["KeyType"]: Attribute(k["AttributeName"], types[k["AttributeName"]]) for k in key_schema}
    return by_role["HASH"], by_role.get("RANGE")


def _spec(key: str, table: dict[str, Any]) -> TableSpec:
    types = {a["AttributeName"]: a["AttributeType"] for a in table["AttributeDefinitions"]}
    partition, sort = _schema(table["KeySchema"], types)
    indexes = []
    for gsi in table["GlobalSecondaryIndexes"]:
        index_partition, index_sort = _schema(gsi["KeySchema"], types)
        projection = gsi["Projection"]
        indexes.append(Index(gsi["IndexName"], index_partition, index_sort, projection["ProjectionType"],
                             tuple(projection.get("NonKeyAttributes", ()))))
    return TableSpec(key, partition, sort, table["TimeToLiveAttribute"], tuple(indexes))


def table_specs() -> tuple[TableSpec, ...]:
    """The tables to create, in qcsight_cloud.tables.TABLES order."""
    return tuple(_spec(key, table) for key, table in TABLES.items())


def deployed_name(fleet: str, key: str) -> str:
    """The table's name: what ``dynamodb:<fleet>`` resolves to in qcsight_cloud.dynamodb_store."""
    return table_name(fleet, key)


def store_url(fleet: str) -> str:
    """The store URL the functions and the review app open (QCSIGHT_STORE)."""
    return f"dynamodb:{fleet}"
