"""The local ingestion process: an MQTT5 subscriber on the loopback broker feeding the Ingestor.

Identity locally is the broker's job: Mosquitto runs with ``use_identity_as_username`` (the client
certificate's CN becomes the username, and the CN is the thing name) and an ACL
``pattern write qcsight/%u/#``, so a thing can publish only under its own ``qcsight/<thing>/``.
A message on ``qcsight/cam-7/alerts`` therefore *was* sent by cam-7, and the subscriber takes the
topic's thing as the identity; a publish to another thing's topic never reaches it (MQTT5 answers
the publisher with PUBACK NOT_AUTHORIZED). What the ACL cannot see, a payload claiming another
thing, the Ingestor drops (``payload_thing_mismatch``).

Nothing is lost on a crash: the subscriber takes manual control of each QoS 1 acknowledgement and
sends the PUBACK only after the batch holding the message was committed; the broker keeps the
session (``session_expiry_s``) and redelivers what was not acknowledged.

The queue between the SDK's thread and the writer is bounded. MQTT5 flow control keeps it short
(the CONNECT's Receive Maximum caps the unacknowledged messages the broker sends), but a resumed
session can bring its unacknowledged messages again on top of new ones (Mosquitto 2.0.11 did in
tests/cloud/test_subscriber.py), so the queue holds twice the Receive Maximum plus a batch; if it
is still full, the SDK's callback waits for the writer (up to ``queue_wait_s``: a store that keeps
failing), and only then leaves the message unacknowledged for the broker to send again after
the next reconnect. Never is a message acknowledged that was not stored.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from awscrt import mqtt5
from awsiot import mqtt5_client_builder

from qcsight_cloud import timestamps
from qcsight_cloud.errors import StoreError, SubscriberError
from qcsight_cloud.ingest import DROPPED, DUPLICATE, STORED, Incoming, Ingestor
from qcsight_core import topics
from qcsight_core.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubscriberSettings:
    """How the cloud process reaches the broker, and how it batches.

    Attributes:
        endpoint, port: the broker.
        cert, key, ca: the subscriber's client certificate (its CN must be allowed to read
            ``qcsight/+/#``), key, and the CA that signed the broker.
        client_id: MQTT client id; the broker keeps the session under it.
        topic_filter: what to ingest.
        receive_maximum: unacknowledged messages in flight to the subscriber (= queue capacity).
        batch_size, batch_wait_s: a batch is stored (one transaction) when it is full or its first
            message has waited this long.
        session_expiry_s: how long the broker keeps the session (and queues QoS 1 messages) while
            the subscriber is away.
        connect_timeout_s, keep_alive_s: connection timing.
        retry_max_s: the longest wait between attempts at a batch the store refused.
        queue_wait_s: how long the SDK's callback may wait for room in a full queue.
    """

    endpoint: str
    port: int
    cert: Path
    key: Path
    ca: Path
    client_id: str = "qcsight-cloud"
    topic_filter: str = f"{topics.ROOT}/+/+"
    receive_maximum: int = 200
    batch_size: int = 100
    batch_wait_s: float = 0.05
    session_expiry_s: int = 7 * 86400
    connect_timeout_s: float = 10.0
    keep_alive_s: int = 60
    retry_max_s: float = 10.0
    queue_wait_s: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.endpoint, str) or not self.endpoint or "://" in self.endpoint:
            raise ConfigError("subscriber.endpoint", self.endpoint, "a host name or address without scheme")
        _int("subscriber.port", self.port, 1, 65535)
        for name in ("cert", "key", "ca"):
            value = getattr(self, name)
            if not isinstance(value, (str, Path)) or not str(value):
                raise ConfigError(f"subscriber.{name}", value, "a path to a PEM file")
            object.__setattr__(self, name, Path(value))
            if not Path(value).is_file():
                raise ConfigError(f"subscriber.{name}", str(value), "an existing PEM file")
        if not isinstance(self.client_id, str) or not 1 <= len(self.client_id) <= 128:
            raise ConfigError("subscriber.client_id", self.client_id, "1-128 characters")
        _int("subscriber.receive_maximum", self.receive_maximum, 1, 65535)
        _int("subscriber.batch_size", self.batch_size, 1, 10_000)
        _int("subscriber.session_expiry_s", self.session_expiry_s, 0, 2**32 - 1)
        _int("subscriber.keep_alive_s", self.keep_alive_s, 5, 1200)
        for name, low, high in (("batch_wait_s", 0.0, 10.0), ("connect_timeout_s", 0.1, 300.0),
                                ("retry_max_s", 0.01, 3600.0), ("queue_wait_s", 0.0, 60.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ConfigError(f"subscriber.{name}", value, f"a number from {low:g} to {high:g}")


def _int(field_name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(field_name, value, f"an integer from {low} to {high}")


@dataclass
class SubscriberStats:
    """What the subscriber did so far (read under no lock: approximate while it runs)."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    dropped: int = 0
    acknowledged: int = 0
    batches: int = 0
    store_failures: int = 0
    left_unacknowledged: int = 0  # arrived with the queue full for queue_wait_s: the broker sends it again
    lost_qos0: int = 0  # QoS 0 messages that arrived with the queue full (at most once: gone)
    by_status: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Received:
    incoming: Incoming
    ack: Any  # the SDK's acknowledgement handle (QoS 1), or None


def _guarded(method: Callable[..., None]) -> Callable[..., None]:
    """Log anything a callback raises: an exception must never unwind into the SDK's event-loop thread."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            method(*args, **kwargs)
        except Exception:
            log.exception("MQTT callback %s failed", method.__name__)

    return wrapper


def identity_of(topic: str) -> str:
    """The thing whose topic this is: the identity, since the broker's ACL binds a thing to its topics."""
    parts = topic.split("/")
    return parts[1] if len(parts) >= 2 and parts[0] == topics.ROOT and parts[1] else "?"


class Subscriber:
    """Subscribes, batches what arrives, stores each batch, then acknowledges it."""

    def __init__(self, settings: SubscriberSettings, ingestor: Ingestor,
                 clock: Callable[[], str] = lambda: timestamps.iso(timestamps.now())) -> None:
        self.settings = settings
        self.ingestor = ingestor
        self.stats = SubscriberStats()
        self._clock = clock
        self._queue: queue.Queue[_Received] = queue.Queue(maxsize=2 * settings.receive_maximum + settings.batch_size)
        self._connected = threading.Event()
        self._stopped = threading.Event()
        self._stop = threading.Event()
        self._subscribed = False
        self._writer: threading.Thread | None = None
        self.last_error: str | None = None
        s = settings
        try:
            self._client = mqtt5_client_builder.mtls_from_path(
                endpoint=s.endpoint, port=s.port, cert_filepath=str(s.cert), pri_key_filepath=str(s.key),
                ca_filepath=str(s.ca), client_id=s.client_id, keep_alive_interval_sec=s.keep_alive_s,
                session_behavior=mqtt5.ClientSessionBehaviorType.REJOIN_ALWAYS,
                session_expiry_interval_sec=s.session_expiry_s, receive_maximum=s.receive_maximum,
                connack_timeout_ms=int(s.connect_timeout_s * 1000), min_reconnect_delay_ms=100,
                max_reconnect_delay_ms=5000,
                extended_validation_and_flow_control_options=mqtt5.ExtendedValidationAndFlowControlOptions.NONE,
                on_publish_received=self._on_publish,
                on_lifecycle_connection_success=self._on_connected,
                on_lifecycle_connection_failure=self._on_failure,
                on_lifecycle_disconnection=self._on_disconnected,
                on_lifecycle_stopped=self._on_stopped,
            )
        except Exception as exc:  # the CRT raises its own types for unusable PEM files
            raise ConfigError("subscriber.cert/subscriber.key", f"{s.cert}, {s.key}",
                              f"a PEM certificate and its matching private key ({exc})") from exc

    # ------------------------------------------------------------ SDK thread

    @_guarded
    def _on_publish(self, data: mqtt5.PublishReceivedData) -> None:
        packet = data.publish_packet
        incoming = Incoming(identity_of(packet.topic), packet.topic, bytes(packet.payload or b""), self._clock())
        qos1 = packet.qos == mqtt5.QoS.AT_LEAST_ONCE and data.acquire_publish_acknowledgement_control is not None
        ack = data.acquire_publish_acknowledgement_control() if qos1 else None
        try:
            # Waiting here holds up the SDK's event loop, but only while the writer is storing a batch
            # (it never waits for this thread), or the store is failing, which queue_wait_s bounds.
            self._queue.put(_Received(incoming, ack), timeout=self.settings.queue_wait_s)
        except queue.Full:
            if ack is None:
                self.stats.lost_qos0 += 1
            else:
                self.stats.left_unacknowledged += 1
            log.error("ingest queue full for %gs: %s from %s left %s", self.settings.queue_wait_s, packet.topic,
                      incoming.identity, "unacknowledged (redelivered after a reconnect)" if ack else "(QoS 0: lost)")
            return
        self.stats.received += 1

    @_guarded
    def _on_connected(self, data: mqtt5.LifecycleConnectSuccessData) -> None:
        self.last_error = None
        self._connected.set()
        present = bool(getattr(data.connack_packet, "session_present", False))
        log.info("subscriber connected to %s:%d as %s (session %s)", self.settings.endpoint, self.settings.port,
                 self.settings.client_id, "resumed" if present else "new")
        if self._subscribed and not present:
            # The broker lost our session (e.g. restarted without persistence): subscribe again.
            self._client.subscribe(self._subscribe_packet())

    @_guarded
    def _on_failure(self, data: mqtt5.LifecycleConnectFailureData) -> None:
        reason = str(data.exception) if data.exception is not None else "unknown"
        if reason != self.last_error:
            log.warning("subscriber: connecting to %s:%d failed: %s (retrying)", self.settings.endpoint,
                        self.settings.port, reason)
        self.last_error = reason

    @_guarded
    def _on_disconnected(self, data: mqtt5.LifecycleDisconnectData) -> None:
        self._connected.clear()
        self.last_error = str(data.exception) if data.exception is not None else "disconnected"

    @_guarded
    def _on_stopped(self, data: mqtt5.LifecycleStoppedData) -> None:
        self._connected.clear()
        self._stopped.set()

    # ------------------------------------------------------------ lifecycle

    def _subscribe_packet(self) -> mqtt5.SubscribePacket:
        return mqtt5.SubscribePacket(subscriptions=[
            mqtt5.Subscription(topic_filter=self.settings.topic_filter, qos=mqtt5.QoS.AT_LEAST_ONCE)])

    def start(self, timeout_s: float | None = None) -> None:
        """Connect, subscribe (waiting for the SUBACK) and start the writer.

        Raises:
            SubscriberError: not connected or the subscription refused within the timeout.
        """
        timeout = self.settings.connect_timeout_s if timeout_s is None else timeout_s
        self._stop.clear()
        self._writer = threading.Thread(target=self._write_loop, name="qcsight-ingest-writer", daemon=True)
        self._writer.start()
        self._client.start()
        if not self._connected.wait(timeout):
            self.stop(timeout_s=2.0)
            raise SubscriberError(f"subscriber: not connected to {self.settings.endpoint}:{self.settings.port} "
                                  f"within {timeout:g}s (last error: {self.last_error or 'none'})")
        try:
            suback = self._client.subscribe(self._subscribe_packet()).result(timeout)
        except Exception as exc:
            self.stop(timeout_s=2.0)
            raise SubscriberError(f"subscriber: subscribing to {self.settings.topic_filter} failed: {exc}") from exc
        codes = list(getattr(suback, "reason_codes", []))
        if not codes or int(codes[0]) > int(mqtt5.SubackReasonCode.GRANTED_QOS_2):
            self.stop(timeout_s=2.0)
            raise SubscriberError(f"subscriber: {self.settings.topic_filter} refused by the broker: {codes}")
        self._subscribed = True
        log.info("subscriber: ingesting %s", self.settings.topic_filter)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Store what was received (acknowledging it), then disconnect; the session stays with the broker."""
        self._stop.set()
        if self._writer is not None:
            self._writer.join(timeout_s)
            if self._writer.is_alive():
                log.warning("subscriber: writer did not finish within %gs; unacknowledged messages are "
                            "redelivered next time", timeout_s)
        self._client.stop()
        if not self._stopped.wait(timeout_s):
            log.warning("subscriber: MQTT client did not stop within %gs", timeout_s)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # ------------------------------------------------------------ writer thread

    def _write_loop(self) -> None:
        while not (self._stop.is_set() and self._queue.empty()):
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.settings.batch_wait_s
            while len(batch) < self.settings.batch_size:
                left = deadline - time.monotonic()
                try:
                    batch.append(self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait())
                except queue.Empty:
                    break
            self._store(batch)

    def _store(self, batch: list[_Received]) -> None:
        delay = 0.1
        while True:
            try:
                outcomes = self.ingestor.ingest_batch([item.incoming for item in batch])
                break
            except StoreError as exc:
                self.stats.store_failures += 1
                log.error("subscriber: a batch of %d messages was not stored (%s); retrying in %.1fs", len(batch),
                          exc, delay)
                if self._stop.wait(delay):
                    log.warning("subscriber: stopping with %d unstored messages; the broker redelivers them",
                                len(batch))
                    return
                delay = min(delay * 2, self.settings.retry_max_s)
            except Exception:  # a bug must not end the writer silently with messages unacknowledged
                log.exception("subscriber: ingesting a batch failed; its messages stay unacknowledged")
                return
        self.stats.batches += 1
        for outcome in outcomes:
            self.stats.by_status[outcome.status] = self.stats.by_status.get(outcome.status, 0) + 1
            self.stats.stored += outcome.status == STORED
            self.stats.duplicates += outcome.status == DUPLICATE
            self.stats.dropped += outcome.status == DROPPED
        for item in batch:
            if item.ack is None:
                continue
            try:
                self._client.invoke_publish_acknowledgement(item.ack)
                self.stats.acknowledged += 1
            except Exception as exc:  # the connection dropped since: the broker redelivers it
                log.info("subscriber: acknowledging a stored message failed (%s); it will come again as a "
                         "duplicate", exc)
