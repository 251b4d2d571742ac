"""The ingestion Lambda function behind the IoT rules, and the rules' SQL.

Each rule (one per message kind, ``RULE_SQL[kind]``, SQL version ``RULE_SQL_VERSION``) invokes the
function with one event per MQTT message::

    {"payload": "<the payload bytes, base64>",      # encode(*, 'base64'): the exact bytes sent
     "clientid": "cam-7",                           # clientid(): the identity (see below)
     "principal": "3f2a...c9",                      # principal(): the certificate id, kept for audit
     "topic": "qcsight/cam-7/alerts",               # topic()
     "received_ms": 1767225600123}                  # timestamp(): when IoT Core received it

The payload travels base64-encoded so the function validates exactly the bytes the device sent
(``SELECT *`` would let IoT re-serialise the JSON and merge the rule's fields into the device's).
The identity is ``clientid()``: the CDK stack's IoT policy lets a certificate connect only as
``client/${iot:Connection.Thing.ThingName}`` with the certificate attached to that thing, so the
client id *is* the thing name. Never the payload's ``thing`` field.

Environment: ``QCSIGHT_STORE`` (``dynamodb:<table prefix>``), ``QCSIGHT_FLEET`` (a fleet file path
or inline JSON; lines name IoT thing groups), optional ``QCSIGHT_RETENTION_DAYS``. A store failure
raises, so Lambda retries the asynchronous invocation and then hands it to the dead-letter queue;
a retried message that was stored before the failure counts as a duplicate, never twice.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from qcsight_cloud import timestamps
from qcsight_cloud.emf import outcome_document, window_document
from qcsight_cloud.fleet import CachedFleet, FleetSettings, resolve
from qcsight_cloud.ingest import STORED, Dropped, Incoming, Ingestor
from qcsight_cloud.records import Window
from qcsight_cloud.store import StoreSettings, open_store
from qcsight_core import topics
from qcsight_core.errors import ConfigError

RULE_SQL_VERSION = "2016-03-23"


def rule_sql(kind: str) -> str:
    """The IoT rule SQL routing one message kind (metrics, alerts, status) of every thing to this function."""
    if kind not in topics.KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(topics.KINDS)}")
    return ("SELECT encode(*, 'base64') AS payload, clientid() AS clientid, principal() AS principal, "
            f"topic() AS topic, timestamp() AS received_ms FROM '{topics.ROOT}/+/{kind}'")


RULE_SQL = {kind: rule_sql(kind) for kind in topics.KINDS}

Emit = Callable[[Mapping[str, Any]], None]


def parse_event(event: Any) -> Incoming | Dropped:
    """The message in a rule event, or a ``bad_event`` drop naming what is wrong with the event."""
    if not isinstance(event, Mapping):
        return Dropped("?", "?", "bad_event", f"event is a {type(event).__name__}, not an object")
    identity = event.get("clientid")
    topic = event.get("topic")
    shown_identity = identity if isinstance(identity, str) and identity else "?"
    shown_topic = topic if isinstance(topic, str) and topic else "?"
    problems = []
    if not isinstance(identity, str) or not identity:
        problems.append("clientid missing")
    if not isinstance(topic, str) or not topic:
        problems.append("topic missing")
    received_ms = event.get("received_ms")
    if isinstance(received_ms, bool) or not isinstance(received_ms, int):
        problems.append("received_ms is not an integer")
    payload = b""
    if not isinstance(event.get("payload"), str):
        problems.append("payload missing")
    else:
        try:
            payload = base64.b64decode(event["payload"], validate=True)
        except (binascii.Error, ValueError):
            problems.append("payload is not base64")
    if problems:
        return Dropped(shown_identity, shown_topic, "bad_event", "; ".join(problems))
    assert isinstance(received_ms, int)
    received = timestamps.iso(datetime.fromtimestamp(received_ms / 1000, timezone.utc))
    principal = event.get("principal")
    return Incoming(shown_identity, shown_topic, payload, received, principal if isinstance(principal, str) else None)


def handle(event: Any, ingestor: Ingestor, emit: Emit) -> dict[str, Any]:
    """Ingest one rule event; emit its EMF documents; return what became of it."""
    parsed = parse_event(event)
    if isinstance(parsed, Dropped):
        outcome = ingestor.drop(parsed)
        emit(outcome_document(outcome, timestamps.iso(timestamps.now())))
    else:
        outcome = ingestor.ingest(parsed)
        emit(outcome_document(outcome, parsed.received))
        if outcome.status == STORED and isinstance(outcome.record, Window):
            emit(window_document(outcome.record))
    return {"status": outcome.status, "message_id": outcome.message_id, "reason": outcome.reason}


def emit_stdout(document: Mapping[str, Any]) -> None:
    # EMF is read from the function's log stream line by line; the logging module would prefix the
    # JSON with level and request id, which CloudWatch then cannot parse as EMF.
    sys.stdout.write(json.dumps(document, separators=(",", ":")) + "\n")
    sys.stdout.flush()


@dataclass(frozen=True)
class _App:
    ingestor: Ingestor


@functools.cache
def _app() -> _App:
    """Built on the first invocation of a container (not at import) and reused by the next ones."""
    import boto3

    url = os.environ.get("QCSIGHT_STORE")
    if not url:
        raise ConfigError("QCSIGHT_STORE", url, "the function's store, dynamodb:<table prefix>")
    retention = os.environ.get("QCSIGHT_RETENTION_DAYS", "90")
    if not retention.isdigit():
        raise ConfigError("QCSIGHT_RETENTION_DAYS", retention, "a whole number of days")
    store = open_store(StoreSettings(url, int(retention)))
    fleet_source = os.environ.get("QCSIGHT_FLEET", "{}")
    fleet_settings = (FleetSettings.from_mapping(json.loads(fleet_source)) if fleet_source.lstrip().startswith("{")
                      else FleetSettings.from_file(fleet_source))
    iot = boto3.client("iot")
    fleet = CachedFleet(lambda: resolve(fleet_settings, iot))
    return _App(Ingestor(store, fleet.line_of))


def handler(event: Any, context: Any) -> dict[str, Any]:
    """The Lambda entry point (``qcsight_cloud.lambda_ingest.handler``)."""
    return handle(event, _app().ingestor, emit_stdout)
