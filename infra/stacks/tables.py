"""The DynamoDB tables of the cloud loop's store (alerts, metrics, devices, reviews, decisions, de-duplication).

SWITCH POINT: qcsight_cloud owns the store and will export its table definitions as a constant.
Until it lands, TABLES below is written from the cloud-loop and review issues (#13, #15). When
qcsight_cloud exports them, replace the body of ``table_specs()`` with the import (one line,
marked below) and delete the local constant; the storage stack reads only ``table_specs()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stacks.names import Env


@dataclass(frozen=True)
class Index:
    """A global secondary index (string keys)."""

    name: str
    partition_key: str
    sort_key: str | None = None


@dataclass(frozen=True)
class TableSpec:
    """One table: string keys, optional TTL attribute, indexes, and the env var naming it for the functions."""

    key: str
    partition_key: str
    sort_key: str | None
    env: str
    ttl_attribute: str | None = None
    indexes: tuple[Index, ...] = field(default_factory=tuple)


TABLES = (
    # Alerts by device, newest first (sk = time#alert_id); the inbox per line through by-line.
    TableSpec("alerts", "pk", "sk", Env.ALERTS_TABLE, indexes=(Index("by-line", "line", "sk"),)),
    # Metric windows as a time series per device; old windows expire.
    TableSpec("metrics", "pk", "sk", Env.METRICS_TABLE, ttl_attribute="expires_at",
              indexes=(Index("by-line", "line", "sk"),)),
    # Device status: last seen, model version, outbox depth, errors, per-device seq tracking.
    TableSpec("devices", "pk", None, Env.DEVICES_TABLE, indexes=(Index("by-line", "line", "pk"),)),
    # Append-only reviews (who, when, what, previous label); the current label is derived.
    TableSpec("reviews", "pk", "sk", Env.REVIEWS_TABLE, indexes=(Index("by-reviewer", "reviewer", "sk"),)),
    # Every retraining-policy decision (fire or hold) with the numbers that drove it.
    TableSpec("decisions", "pk", "sk", Env.DECISIONS_TABLE),
    # Message ids already ingested (at-least-once delivery), kept long enough to catch redeliveries.
    TableSpec("dedup", "pk", None, Env.DEDUP_TABLE, ttl_attribute="expires_at"),
)


def table_specs() -> tuple[TableSpec, ...]:
    """The tables to create. SWITCH: `from qcsight_cloud.store.dynamodb import TABLES; return TABLES`."""
    return TABLES
