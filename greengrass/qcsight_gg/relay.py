"""The local nucleus's link to the cloud: PublishToIoTCore messages relayed to an MQTT broker over mutual TLS.

The nucleus owns a device's IoT Core connection; a component's PublishToIoTCore is accepted once
the nucleus spooled it (in memory by default, bounded), and delivered when the connection allows.
This relay does the same against any broker that takes client certificates (IoT Core itself, or
Mosquitto on loopback): a bounded spool, a sender thread that publishes oldest first and keeps a
message until the broker acknowledged it (QoS 1), and reconnection with backoff.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcsight_gg.ipc_server import ModeledError, Published

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerSettings:
    """Where the relay publishes: IoT Core's ATS endpoint (port 8883) or a local broker; PEM files."""

    endpoint: str
    port: int
    cert: Path
    key: Path
    ca: Path
    client_id: str


class MqttRelay:
    """Spools accepted publishes and delivers them to the broker in order.

    Args:
        settings: the broker and the device's certificate.
        max_messages: spool capacity; a publish beyond it is refused (the component keeps it).
        max_bytes: spool capacity in payload bytes (the Java nucleus's default spooler holds 2.5 MB).
        ack_timeout_s: a publish not acknowledged in this time is sent again.
    """

    def __init__(self, settings: BrokerSettings, max_messages: int = 10_000, max_bytes: int = 2_621_440,
                 ack_timeout_s: float = 10.0) -> None:
        self.settings = settings
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._ack_timeout_s = ack_timeout_s
        self._spool: collections.deque[Published] = collections.deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._connection: Any = None
        self.sent = 0

    def start(self) -> MqttRelay:
        from awsiot import mqtt_connection_builder

        s = self.settings
        self._connection = mqtt_connection_builder.mtls_from_path(
            endpoint=s.endpoint, port=s.port, cert_filepath=str(s.cert), pri_key_filepath=str(s.key),
            ca_filepath=str(s.ca), client_id=s.client_id, clean_session=False, keep_alive_secs=30,
            reconnect_min_timeout_secs=1, reconnect_max_timeout_secs=5,
            on_connection_interrupted=lambda *_a, **_k: self._connected.clear(),
            on_connection_resumed=lambda *_a, **_k: self._connected.set())
        for target, name in ((self._connect_loop, "gg-relay-connect"), (self._send_loop, "gg-relay-send")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._spool)

    def submit(self, message: Published) -> None:
        """Spool a message (the IPC server's publish sink).

        Raises:
            ModeledError: the spool is full (ServiceError, as the nucleus answers).
        """
        with self._cond:
            if len(self._spool) >= self._max_messages or self._bytes + len(message.payload) > self._max_bytes:
                raise ModeledError("ServiceError", f"Publish to topic {message.topic} failed: the spool is full "
                                                   f"({len(self._spool)} messages, {self._bytes} bytes)")
            self._spool.append(message)
            self._bytes += len(message.payload)
            self._cond.notify_all()

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout_s)
        if self._connection is not None and self._connected.is_set():
            try:
                self._connection.disconnect().result(timeout_s)
            except Exception as exc:  # closing is best effort
                log.debug("relay disconnect: %r", exc)

    def _connect_loop(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            try:
                self._connection.connect().result(10.0)
            except Exception as exc:
                log.warning("relay: cannot connect to %s:%d (%s); retrying in %.1fs", self.settings.endpoint,
                            self.settings.port, exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            log.info("relay connected to %s:%d as %s", self.settings.endpoint, self.settings.port,
                     self.settings.client_id)
            self._connected.set()
            return  # the CRT reconnects by itself from here on

    def _send_loop(self) -> None:
        from awscrt import mqtt

        while not self._stop.is_set():
            with self._cond:
                while not self._spool and not self._stop.is_set():
                    self._cond.wait(0.5)
                if self._stop.is_set():
                    return
                message = self._spool[0]
            if not self._connected.wait(0.5):
                continue
            qos = mqtt.QoS.AT_LEAST_ONCE if message.qos == "1" else mqtt.QoS.AT_MOST_ONCE
            try:
                future, _ = self._connection.publish(message.topic, message.payload, qos, retain=message.retain)
                future.result(self._ack_timeout_s)
            except Exception as exc:
                log.warning("relay: publish to %s not acknowledged (%r); sending it again", message.topic, exc)
                self._stop.wait(0.2)
                continue
            with self._cond:
                self._spool.popleft()
                self._bytes -= len(message.payload)
                self.sent += 1
