"""Direct MQTT transports to AWS IoT Core (or any broker taking client certificates): MQTT5 and MQTT 3.1.1.

Both implement :class:`qcsight_edge.publisher.Publisher` on the AWS IoT Device SDK v2 (awscrt):
``publish`` returns a future that completes on PUBACK. A disconnect fails every publish still
waiting for its PUBACK with :class:`NotConnectedError`, and a publish issued while offline fails
at once: the durable outbox, not the SDK's memory, is where a message waits for the network.
The SDK reconnects on its own with exponential backoff (with jitter for MQTT5); nothing raised in
an SDK callback ever reaches the SDK's event-loop thread.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from awscrt import mqtt, mqtt5
from awsiot import mqtt5_client_builder, mqtt_connection_builder

from qcsight_core.errors import ConfigError
from qcsight_edge.clock import Backoff
from qcsight_edge.config import MqttSettings
from qcsight_edge.errors import NotConnectedError, PublishError, PublishRejectedError

if TYPE_CHECKING:
    from qcsight_edge.publisher import Publisher

log = logging.getLogger(__name__)

# PUBACK codes that mean "stored by the broker". NO_MATCHING_SUBSCRIBERS is a success in MQTT5.
_PUBACK_OK = (mqtt5.PubackReasonCode.SUCCESS, mqtt5.PubackReasonCode.NO_MATCHING_SUBSCRIBERS)
# PUBACK codes that the same message will get again on every retry: it goes to the dead letters.
_PUBACK_PERMANENT = (mqtt5.PubackReasonCode.NOT_AUTHORIZED, mqtt5.PubackReasonCode.TOPIC_NAME_INVALID,
                     mqtt5.PubackReasonCode.PAYLOAD_FORMAT_INVALID)

_F = TypeVar("_F", bound=Callable[..., None])


def make_publisher(settings: MqttSettings) -> Mqtt5Publisher | Mqtt311Publisher:
    """The transport that ``settings.protocol`` names."""
    if settings.protocol == "mqtt311":
        return Mqtt311Publisher(settings)
    return Mqtt5Publisher(settings)


def _guarded(method: _F) -> _F:
    """Log and swallow anything a callback raises: an exception must never unwind into the SDK's thread."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            method(*args, **kwargs)
        except Exception:
            log.exception("MQTT callback %s failed", method.__name__)

    return wrapper  # type: ignore[return-value]


class _Transport:
    """What both protocols share: connection state, the futures awaiting PUBACK, and their settlement.

    A future is settled by whoever removes it from ``_pending`` under the lock (its PUBACK, a
    disconnect, or close), so a late PUBACK after a disconnect can never settle it twice.
    """

    protocol = ""

    def __init__(self, settings: MqttSettings) -> None:
        settings.check_files()
        self.settings = settings
        self._lock = threading.Lock()
        self._pending: set[Future[None]] = set()
        self._connected = threading.Event()
        self._closing = False
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set() and not self._closing

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._pending)

    def _where(self) -> str:
        s = self.settings
        return f"{s.endpoint}:{s.port} as {s.mqtt_client_id} ({self.protocol})"

    def _wait_connected(self, timeout_s: float) -> None:
        if not self._connected.wait(timeout_s):
            raise NotConnectedError(
                f"MQTT: not connected to {self._where()} after {timeout_s:g}s"
                f" (last error: {self.last_error or 'none yet'}); still retrying in the background")

    def _admit(self, topic: str) -> tuple[Future[None], bool]:
        """A new future for one publish, and whether it may be sent (else it has already failed)."""
        future: Future[None] = Future()
        if not self.connected:
            future.set_exception(NotConnectedError(f"MQTT: offline ({self._where()}); {topic} not sent"))
            return future, False
        with self._lock:
            if len(self._pending) >= self.settings.max_in_flight:
                future.set_exception(PublishError(
                    f"MQTT: {len(self._pending)} publishes already await PUBACK"
                    f" (max_in_flight={self.settings.max_in_flight}); {topic} not sent"))
                return future, False
            self._pending.add(future)
        return future, True

    def _settle(self, future: Future[None], error: BaseException | None) -> None:
        with self._lock:
            if future not in self._pending:
                return  # already failed by a disconnect or close
            self._pending.discard(future)
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    def _fail_all(self, reason: str) -> None:
        with self._lock:
            stranded = list(self._pending)
            self._pending.clear()
        for future in stranded:
            future.set_exception(NotConnectedError(f"MQTT: {reason} before PUBACK ({self._where()})"))
        if stranded:
            log.info("MQTT: %d publishes awaiting PUBACK failed (%s); they stay in the outbox", len(stranded), reason)


class Mqtt5Publisher(_Transport):
    """MQTT5 over mutual TLS with ``awsiot.mqtt5_client_builder.mtls_from_path``.

    A PUBACK with a failure reason code (NOT_AUTHORIZED when the policy forbids the topic) fails
    the future with :class:`PublishRejectedError`.
    """

    protocol = "mqtt5"

    def __init__(self, settings: MqttSettings) -> None:
        super().__init__(settings)
        self._stopped = threading.Event()
        self._started = False
        s = settings
        flow = (mqtt5.ExtendedValidationAndFlowControlOptions.AWS_IOT_CORE_DEFAULTS if s.iot_core_limits
                else mqtt5.ExtendedValidationAndFlowControlOptions.NONE)
        try:
            self._client = mqtt5_client_builder.mtls_from_path(
                endpoint=s.endpoint,
                port=s.port,
                cert_filepath=str(s.cert),
                pri_key_filepath=str(s.key),
                ca_filepath=str(s.ca),
                client_id=s.mqtt_client_id,
                keep_alive_interval_sec=s.keep_alive_s,
                # The outbox keeps what is unsent; a clean session keeps no second copy in the broker.
                session_behavior=mqtt5.ClientSessionBehaviorType.CLEAN,
                offline_queue_behavior=mqtt5.ClientOperationQueueBehaviorType.FAIL_ALL_ON_DISCONNECT,
                retry_jitter_mode=mqtt5.ExponentialBackoffJitterMode.FULL,
                min_reconnect_delay_ms=int(s.min_reconnect_delay_s * 1000),
                max_reconnect_delay_ms=int(s.max_reconnect_delay_s * 1000),
                min_connected_time_to_reset_reconnect_delay_ms=30_000,
                connack_timeout_ms=int(s.connect_timeout_s * 1000),
                ping_timeout_ms=min(int(s.connect_timeout_s * 1000), s.keep_alive_s * 500),
                ack_timeout_sec=s.ack_timeout_s,
                extended_validation_and_flow_control_options=flow,
                on_lifecycle_connection_success=self._on_connection_success,
                on_lifecycle_connection_failure=self._on_connection_failure,
                on_lifecycle_disconnection=self._on_disconnection,
                on_lifecycle_stopped=self._on_stopped,
            )
        except Exception as exc:  # the CRT raises its own error types for unusable PEM content
            raise ConfigError("mqtt.cert/mqtt.key", f"{s.cert}, {s.key}",
                              f"a PEM certificate and its matching private key ({exc})") from exc

    def connect(self, timeout_s: float) -> None:
        """Start the client and wait for CONNACK.

        Raises:
            NotConnectedError: not connected within ``timeout_s``; the client keeps retrying
                with backoff, so a later publish may succeed without calling connect again.
        """
        if not self._started:
            self._started = True
            self._stopped.clear()
            self._client.start()
        self._wait_connected(timeout_s)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> Future[None]:
        future, admitted = self._admit(topic)
        if not admitted:
            return future
        try:
            packet = mqtt5.PublishPacket(topic=topic, payload=payload, qos=mqtt5.QoS(qos))
            crt_future = self._client.publish(packet)
        except Exception as exc:
            self._settle(future, PublishError(f"MQTT5: publish to {topic} could not be queued: {exc}"))
            return future
        crt_future.add_done_callback(functools.partial(self._on_puback, future, topic, qos))
        return future

    @_guarded
    def _on_puback(self, future: Future[None], topic: str, qos: int, crt_future: Future[Any]) -> None:
        exc = crt_future.exception()
        error: BaseException | None = None
        if exc is not None and "VALIDATION" in str(getattr(exc, "name", "")):
            # The client refused to send it (larger than the broker's maximum packet size, a bad
            # topic): sending it again cannot succeed.
            error = PublishRejectedError(topic, f"refused by the MQTT5 client: {exc}", permanent=True)
        elif exc is not None:
            kind = PublishError if self.connected else NotConnectedError
            error = kind(f"MQTT5: publish to {topic} failed: {exc}")
        elif qos > 0:
            puback = crt_future.result().puback
            code = getattr(puback, "reason_code", None)
            if code not in _PUBACK_OK:
                name = getattr(code, "name", str(code))
                detail = f"{name} ({puback.reason_string})" if getattr(puback, "reason_string", None) else name
                error = PublishRejectedError(topic, f"PUBACK {detail}", permanent=code in _PUBACK_PERMANENT)
        self._settle(future, error)

    @_guarded
    def _on_connection_success(self, data: mqtt5.LifecycleConnectSuccessData) -> None:
        self.last_error = None
        self._connected.set()
        log.info("MQTT5: connected to %s", self._where())

    @_guarded
    def _on_connection_failure(self, data: mqtt5.LifecycleConnectFailureData) -> None:
        reason = str(data.exception) if data.exception is not None else "unknown"
        code = getattr(data.connack_packet, "reason_code", None)
        if code is not None:
            reason = f"CONNACK {getattr(code, 'name', code)}; {reason}"
        if reason != self.last_error:
            log.warning("MQTT5: connecting to %s failed: %s (retrying with backoff)", self._where(), reason)
        self.last_error = reason

    @_guarded
    def _on_disconnection(self, data: mqtt5.LifecycleDisconnectData) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        reason = str(data.exception) if data.exception is not None else "disconnected"
        self.last_error = reason
        if was_connected:
            log.warning("MQTT5: lost connection to %s: %s", self._where(), reason)
        self._fail_all("connection lost")

    @_guarded
    def _on_stopped(self, data: mqtt5.LifecycleStoppedData) -> None:
        self._connected.clear()
        self._stopped.set()

    def close(self, timeout_s: float) -> None:
        self._closing = True
        if self._started:
            self._client.stop()
            if not self._stopped.wait(timeout_s):
                log.warning("MQTT5: client did not stop within %gs", timeout_s)
            self._started = False
        self._connected.clear()
        self._fail_all("closed")
        self._closing = False


class Mqtt311Publisher(_Transport):
    """MQTT 3.1.1 over mutual TLS with ``awsiot.mqtt_connection_builder.mtls_from_path``.

    MQTT 3.1.1 has no PUBACK reason codes: a broker that refuses a topic either acknowledges and
    drops it (Mosquitto) or closes the connection (IoT Core), so a refused publish shows up as a
    silent loss or a :class:`NotConnectedError`, never as PublishRejectedError. Prefer MQTT5.

    The SDK reconnects on its own only after a connection that once succeeded; while the first
    connection has not succeeded this class retries it with exponential backoff and full jitter.
    """

    protocol = "mqtt311"

    def __init__(self, settings: MqttSettings, *, rng: random.Random | None = None) -> None:
        super().__init__(settings)
        self._attempting = False
        self._retry: threading.Timer | None = None
        self._backoff = Backoff(settings.min_reconnect_delay_s, settings.max_reconnect_delay_s, rng or random.Random(),
                                full_jitter=True)
        s = settings
        try:
            self._conn = mqtt_connection_builder.mtls_from_path(
                endpoint=s.endpoint,
                port=s.port,
                cert_filepath=str(s.cert),
                pri_key_filepath=str(s.key),
                ca_filepath=str(s.ca),
                client_id=s.mqtt_client_id,
                clean_session=True,
                keep_alive_secs=s.keep_alive_s,
                ping_timeout_ms=min(int(s.connect_timeout_s * 1000), s.keep_alive_s * 500),
                protocol_operation_timeout_ms=s.ack_timeout_s * 1000,
                tcp_connect_timeout_ms=int(s.connect_timeout_s * 1000),
                reconnect_min_timeout_secs=max(1, round(s.min_reconnect_delay_s)),
                reconnect_max_timeout_secs=max(1, round(s.max_reconnect_delay_s)),
                on_connection_interrupted=self._on_interrupted,
                on_connection_resumed=self._on_resumed,
                on_connection_success=self._on_success,
                on_connection_failure=self._on_failure,
            )
        except Exception as exc:
            raise ConfigError("mqtt.cert/mqtt.key", f"{s.cert}, {s.key}",
                              f"a PEM certificate and its matching private key ({exc})") from exc

    def connect(self, timeout_s: float) -> None:
        """Connect, and keep retrying the first connection in the background until it succeeds.

        Raises:
            NotConnectedError: not connected within ``timeout_s`` (retries go on).
        """
        self._closing = False
        with self._lock:
            start = not self._attempting and not self._connected.is_set()
            self._attempting = self._attempting or start
        if start:
            self._attempt()
        self._wait_connected(timeout_s)

    def _attempt(self) -> None:
        try:
            self._conn.connect().add_done_callback(self._on_connect_done)
        except Exception as exc:
            self._schedule_retry(str(exc))

    @_guarded
    def _on_connect_done(self, crt_future: Future[Any]) -> None:
        exc = crt_future.exception()
        if exc is None:
            with self._lock:
                self._attempting = False
            self._backoff.reset()
            return
        self._schedule_retry(str(exc))

    def _schedule_retry(self, reason: str) -> None:
        if reason != self.last_error:
            log.warning("MQTT 3.1.1: connecting to %s failed: %s (retrying with backoff)", self._where(), reason)
        self.last_error = reason
        with self._lock:
            if self._closing:
                self._attempting = False
                return
            delay = self._backoff.next()
            self._retry = threading.Timer(delay, self._retry_now)
            self._retry.daemon = True
            self._retry.start()

    @_guarded
    def _retry_now(self) -> None:
        if not self._closing:
            self._attempt()

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> Future[None]:
        future, admitted = self._admit(topic)
        if not admitted:
            return future
        try:
            crt_future, _packet_id = self._conn.publish(topic, payload, mqtt.QoS(qos))
        except Exception as exc:
            self._settle(future, PublishError(f"MQTT 3.1.1: publish to {topic} could not be queued: {exc}"))
            return future
        crt_future.add_done_callback(functools.partial(self._on_puback, future, topic))
        return future

    @_guarded
    def _on_puback(self, future: Future[None], topic: str, crt_future: Future[Any]) -> None:
        exc = crt_future.exception()
        error: BaseException | None = None
        if exc is not None:
            kind = PublishError if self.connected else NotConnectedError
            error = kind(f"MQTT 3.1.1: publish to {topic} failed: {exc}")
        self._settle(future, error)

    @_guarded
    def _on_success(self, connection: mqtt.Connection, callback_data: Any) -> None:
        self.last_error = None
        self._connected.set()
        log.info("MQTT 3.1.1: connected to %s", self._where())

    @_guarded
    def _on_failure(self, connection: mqtt.Connection, callback_data: Any) -> None:
        self.last_error = str(getattr(callback_data, "error", "connection failed"))

    @_guarded
    def _on_interrupted(self, connection: mqtt.Connection, error: Exception, **kwargs: Any) -> None:
        self._connected.clear()
        self.last_error = str(error)
        log.warning("MQTT 3.1.1: lost connection to %s: %s (the SDK reconnects)", self._where(), error)
        self._fail_all("connection lost")

    @_guarded
    def _on_resumed(self, connection: mqtt.Connection, return_code: Any, session_present: bool, **kwargs: Any) -> None:
        if int(return_code) == 0:
            self._connected.set()

    def close(self, timeout_s: float) -> None:
        with self._lock:
            self._closing = True
            retry, self._retry = self._retry, None
        if retry is not None:
            retry.cancel()
        self._connected.clear()
        try:
            self._conn.disconnect().result(timeout_s)
        except Exception as exc:  # not connected, or the disconnect did not finish in time
            log.debug("MQTT 3.1.1: disconnect: %s", exc)
        self._fail_all("closed")
        with self._lock:
            self._attempting = False


if TYPE_CHECKING:

    def _implements_publisher(transport: Mqtt5Publisher | Mqtt311Publisher) -> Publisher:
        return transport  # mypy proves both classes satisfy the Publisher protocol
