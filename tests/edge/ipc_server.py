"""A local stand-in for the Greengrass nucleus IPC server, for driving the unmodified awsiotsdk client.

The nucleus serves Greengrass IPC as AWS event-stream RPC on a Unix domain socket. This module
speaks that protocol from first principles (it never imports awscrt/awsiot, so the SDK cannot
agree with itself) and checks what the nucleus checks:

* framing: prelude (total length, headers length, CRC32 of the first 8 bytes), typed headers,
  payload, CRC32 of the whole message; both CRCs are verified on receipt;
* the connection handshake: the first message is CONNECT on stream 0 with ``:version`` 0.1.0 and
  a JSON payload ``{"authToken": ...}`` that must equal the SVCUID this server was given; anything
  else gets a CONNECT_ACK without CONNECTION_ACCEPTED and the socket is closed, as the nucleus does;
* streams: every message carries ``:message-type``, ``:message-flags`` and ``:stream-id`` (int32);
  a new stream id must be the previous one plus one and carry an ``operation`` header; requests
  carry ``:content-type: application/json`` and the request shape's ``service-model-type``;
* operations: PublishToIoTCore (topicName, qos "0"/"1" and payload required; the topic must match
  the component's mqttproxy allow-list or the answer is ``UnauthorizedError``; IoT Core's topic
  and payload limits apply), GetConfiguration, SubscribeToConfigurationUpdate,
  SubscribeToValidateConfigurationUpdates and SendConfigurationValidityReport (the report's
  deploymentId must match a validation this server asked for). Unknown operations get the
  server's "Unsupported Operation" error.

Responses follow the Java event-stream server the nucleus uses: ``:content-type`` and
``service-model-type`` headers, TERMINATE_STREAM on the response of a non-streaming operation and
on every error, modelled errors as APPLICATION_ERROR with ``{"message", "_service", "_message",
"_errorCode"}``. Tests push configuration changes and proposed deployments with
:meth:`IpcServer.set_configuration` and :meth:`IpcServer.propose_configuration`.

Anything a well-behaved client should never send is also appended to :attr:`IpcServer.violations`,
so a test can assert that the client spoke the protocol correctly, not only that it got answers.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import json
import logging
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# --- event-stream framing ------------------------------------------------------------------------

PRELUDE_LEN = 12
MAX_MESSAGE_LEN = 16 * 1024 * 1024  # aws-c-event-stream's limits
MAX_HEADERS_LEN = 128 * 1024

BOOL_TRUE, BOOL_FALSE, BYTE, INT16, INT32, INT64, BYTE_BUF, STRING, TIMESTAMP, UUID = range(10)
_FIXED = {BYTE: (1, ">b"), INT16: (2, ">h"), INT32: (4, ">i"), INT64: (8, ">q"), TIMESTAMP: (8, ">q")}


class FramingError(Exception):
    """Bytes on the socket are not a well-formed event-stream message."""


@dataclass(frozen=True)
class Header:
    name: str
    type: int
    value: Any


@dataclass(frozen=True)
class Message:
    headers: tuple[Header, ...]
    payload: bytes

    def get(self, name: str, kind: int | None = None) -> Any:
        """The value of the first header called name (of type kind when given), else None."""
        for header in self.headers:
            if header.name == name and (kind is None or header.type == kind):
                return header.value
        return None


def encode_headers(headers: Iterable[Header]) -> bytes:
    out = bytearray()
    for header in headers:
        name = header.name.encode("utf-8")
        if not 0 < len(name) < 128:
            raise FramingError(f"header name {header.name!r} must be 1-127 bytes")
        out += struct.pack(">B", len(name)) + name + struct.pack(">B", header.type)
        if header.type in (BOOL_TRUE, BOOL_FALSE):
            continue
        if header.type in _FIXED:
            out += struct.pack(_FIXED[header.type][1], header.value)
        elif header.type in (BYTE_BUF, STRING):
            raw = header.value.encode("utf-8") if header.type == STRING else bytes(header.value)
            out += struct.pack(">H", len(raw)) + raw
        elif header.type == UUID:
            raw = bytes(header.value)
            if len(raw) != 16:
                raise FramingError("a UUID header value is 16 bytes")
            out += raw
        else:
            raise FramingError(f"unknown header type {header.type}")
    return bytes(out)


def decode_headers(raw: bytes) -> tuple[Header, ...]:
    headers: list[Header] = []
    pos = 0
    try:
        while pos < len(raw):
            name_len = raw[pos]
            name = raw[pos + 1:pos + 1 + name_len].decode("utf-8")
            if name_len == 0 or len(name.encode("utf-8")) != name_len:
                raise FramingError("truncated header name")
            pos += 1 + name_len
            kind = raw[pos]
            pos += 1
            value: Any
            if kind == BOOL_TRUE:
                value = True
            elif kind == BOOL_FALSE:
                value = False
            elif kind in _FIXED:
                size, fmt = _FIXED[kind]
                if pos + size > len(raw):
                    raise FramingError(f"truncated value of header {name!r}")
                (value,) = struct.unpack(fmt, raw[pos:pos + size])
                pos += size
            elif kind in (BYTE_BUF, STRING):
                (size,) = struct.unpack(">H", raw[pos:pos + 2])
                if pos + 2 + size > len(raw):
                    raise FramingError(f"truncated value of header {name!r}")
                data = raw[pos + 2:pos + 2 + size]
                value = data.decode("utf-8") if kind == STRING else data
                pos += 2 + size
            elif kind == UUID:
                if pos + 16 > len(raw):
                    raise FramingError(f"truncated value of header {name!r}")
                value = raw[pos:pos + 16]
                pos += 16
            else:
                raise FramingError(f"header {name!r} has unknown type {kind}")
            headers.append(Header(name, kind, value))
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise FramingError(f"malformed headers: {exc}") from exc
    return tuple(headers)


def encode_message(headers: Sequence[Header], payload: bytes = b"") -> bytes:
    raw_headers = encode_headers(headers)
    total = PRELUDE_LEN + len(raw_headers) + len(payload) + 4
    prelude = struct.pack(">II", total, len(raw_headers))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + raw_headers + payload
    return body + struct.pack(">I", zlib.crc32(body))


def decode_message(data: bytes) -> Message:
    """Decode one complete message, verifying both CRCs and the lengths."""
    if len(data) < PRELUDE_LEN + 4:
        raise FramingError(f"message of {len(data)} bytes is shorter than prelude + CRC")
    total, headers_len, prelude_crc = struct.unpack(">III", data[:PRELUDE_LEN])
    if zlib.crc32(data[:8]) != prelude_crc:
        raise FramingError("prelude CRC32 mismatch")
    if total != len(data):
        raise FramingError(f"prelude says {total} bytes, message has {len(data)}")
    if headers_len > MAX_HEADERS_LEN or PRELUDE_LEN + headers_len + 4 > total:
        raise FramingError(f"headers length {headers_len} does not fit the message")
    (message_crc,) = struct.unpack(">I", data[-4:])
    if zlib.crc32(data[:-4]) != message_crc:
        raise FramingError("message CRC32 mismatch")
    headers = decode_headers(data[PRELUDE_LEN:PRELUDE_LEN + headers_len])
    return Message(headers, data[PRELUDE_LEN + headers_len:-4])


# --- event-stream RPC ----------------------------------------------------------------------------

APPLICATION_MESSAGE, APPLICATION_ERROR, PING, PING_RESPONSE = 0, 1, 2, 3
CONNECT, CONNECT_ACK, PROTOCOL_ERROR, INTERNAL_ERROR = 4, 5, 6, 7
CONNECTION_ACCEPTED, TERMINATE_STREAM = 0x1, 0x2
RPC_VERSION = "0.1.0"
JSON = "application/json"
SERVICE = "aws.greengrass#GreengrassCoreIPC"

PUBLISH = "aws.greengrass#PublishToIoTCore"
GET_CONFIGURATION = "aws.greengrass#GetConfiguration"
SUBSCRIBE_CONFIGURATION = "aws.greengrass#SubscribeToConfigurationUpdate"
SUBSCRIBE_VALIDATION = "aws.greengrass#SubscribeToValidateConfigurationUpdates"
SEND_VALIDITY_REPORT = "aws.greengrass#SendConfigurationValidityReport"

# IoT Core's message broker limits, which the nucleus's MQTT client enforces before spooling.
MAX_TOPIC_BYTES = 256
MAX_TOPIC_SLASHES = 7
MAX_PAYLOAD_BYTES = 128 * 1024


@dataclass(frozen=True)
class Operation:
    request: str
    response: str
    stream_event: str | None = None  # model of the events a subscription streams back

    @property
    def streaming(self) -> bool:
        return self.stream_event is not None


OPERATIONS: dict[str, Operation] = {
    PUBLISH: Operation("aws.greengrass#PublishToIoTCoreRequest", "aws.greengrass#PublishToIoTCoreResponse"),
    GET_CONFIGURATION: Operation("aws.greengrass#GetConfigurationRequest", "aws.greengrass#GetConfigurationResponse"),
    SUBSCRIBE_CONFIGURATION: Operation(
        "aws.greengrass#SubscribeToConfigurationUpdateRequest",
        "aws.greengrass#SubscribeToConfigurationUpdateResponse",
        "aws.greengrass#ConfigurationUpdateEvents",
    ),
    SUBSCRIBE_VALIDATION: Operation(
        "aws.greengrass#SubscribeToValidateConfigurationUpdatesRequest",
        "aws.greengrass#SubscribeToValidateConfigurationUpdatesResponse",
        "aws.greengrass#ValidateConfigurationUpdateEvents",
    ),
    SEND_VALIDITY_REPORT: Operation(
        "aws.greengrass#SendConfigurationValidityReportRequest",
        "aws.greengrass#SendConfigurationValidityReportResponse",
    ),
}


class ModeledError(Exception):
    """An error the service model declares (sent as APPLICATION_ERROR with its shape name)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def payload(self) -> dict[str, Any]:
        # The Java server serialises the error shape plus these framework fields.
        return {"message": self.message, "_service": SERVICE, "_message": self.message, "_errorCode": self.code}


class _BadRequest(Exception):
    """The request could not be deserialised; the Java server answers InternalServerError."""


def _rpc_headers(message_type: int, flags: int, stream_id: int) -> list[Header]:
    return [Header(":message-type", INT32, message_type), Header(":message-flags", INT32, flags),
            Header(":stream-id", INT32, stream_id)]


def topic_pattern(resource: str) -> re.Pattern[str]:
    """Compile one mqttproxy resource: ``*`` matches any characters, ``+`` one level, a final ``#`` the rest."""
    levels = resource.split("/")
    parts: list[str] = []
    for i, level in enumerate(levels):
        if level == "#" and i == len(levels) - 1:
            parts.append("#")
        elif level == "+":
            parts.append("[^/]*")
        else:
            parts.append(".*".join(re.escape(piece) for piece in level.split("*")))
    regex = "/".join(parts)
    regex = regex[:-2] + "(/.*)?" if regex.endswith("/#") else regex.replace("#", ".*")
    return re.compile(f"^{regex}$", re.DOTALL)


def _changed_paths(old: Any, new: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Key paths of the nodes that differ, as the nucleus reports one event per changed node."""
    if isinstance(old, dict) and isinstance(new, dict):
        paths: list[tuple[str, ...]] = []
        for key in sorted(set(old) | set(new)):
            if key not in old or key not in new:
                paths.append((*path, key))
            else:
                paths.extend(_changed_paths(old[key], new[key], (*path, key)))
        return paths
    return [] if old == new else [path]


def _find_node(config: Any, key_path: Sequence[str]) -> Any:
    node = config
    for key in key_path:
        if not isinstance(node, dict) or key not in node:
            raise KeyError(key)
        node = node[key]
    return node


# --- records a test inspects ---------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectAttempt:
    auth_token: str | None
    version: str | None
    accepted: bool


@dataclass(frozen=True)
class Request:
    operation: str
    stream_id: int
    body: dict[str, Any]


@dataclass(frozen=True)
class Published:
    topic: str
    qos: str
    payload: bytes
    retain: bool


@dataclass
class _Subscription:
    connection: _Connection
    stream_id: int
    component: str
    key_path: tuple[str, ...]


@dataclass
class _PendingValidation:
    done: threading.Event = field(default_factory=threading.Event)
    report: dict[str, Any] | None = None


# --- the server ----------------------------------------------------------------------------------


class IpcServer:
    """A nucleus IPC stand-in serving one component on a Unix socket, in background threads.

    Args:
        svcuid: the auth token the component must present (the SVCUID the nucleus gives it).
        component: the component name the token authenticates as.
        configuration: the component's configuration (what GetConfiguration serves).
        publish_allow: mqttproxy PublishToIoTCore resources from the component's accessControl,
            with recipe variables already resolved.
        socket_path: where to listen; a fresh short path under the temp dir when None (Unix
            socket paths are limited to about 107 bytes, too short for pytest's tmp_path).
        io_timeout_s: socket poll interval; also bounds how long stop() waits for each thread.
    """

    def __init__(self, svcuid: str, component: str, configuration: Mapping[str, Any],
                 publish_allow: Iterable[str] = (), socket_path: str | Path | None = None,
                 io_timeout_s: float = 0.1) -> None:
        self.svcuid = svcuid
        self.component = component
        self._own_dir: str | None = None
        if socket_path is None:
            self._own_dir = tempfile.mkdtemp(prefix="qcs-gg-")
            socket_path = os.path.join(self._own_dir, "ipc.socket")
        self.socket_path = str(socket_path)
        self._io_timeout_s = io_timeout_s
        self._lock = threading.Condition()
        self._configs: dict[str, dict[str, Any]] = {component: copy.deepcopy(dict(configuration))}
        self._allow = [topic_pattern(r) for r in publish_allow]
        self._published: deque[Published] = deque(maxlen=10_000)
        self._requests: deque[Request] = deque(maxlen=10_000)
        self._connects: deque[ConnectAttempt] = deque(maxlen=1_000)
        self._violations: deque[str] = deque(maxlen=1_000)
        self._config_subs: list[_Subscription] = []
        self._validators: dict[str, _Subscription] = {}
        self._pending: dict[tuple[str, str], _PendingValidation] = {}
        self._connections: list[_Connection] = []
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # lifecycle ----------------------------------------------------------------------------------

    def start(self) -> IpcServer:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        listener.listen(8)
        listener.settimeout(self._io_timeout_s)
        self._listener = listener
        self._accept_thread = threading.Thread(target=self._accept_loop, name="ipc-stand-in-accept", daemon=True)
        self._accept_thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping.set()
        deadline = time.monotonic() + timeout_s
        if self._accept_thread is not None:
            self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            conn.close()
        for conn in connections:
            conn.thread.join(max(0.0, deadline - time.monotonic()))
        alive = [c.thread.name for c in connections if c.thread.is_alive()]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
        if alive:
            raise RuntimeError(f"IPC stand-in threads still running after {timeout_s}s: {alive}")

    def __enter__(self) -> IpcServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # what a test reads --------------------------------------------------------------------------

    @property
    def published(self) -> list[Published]:
        with self._lock:
            return list(self._published)

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    @property
    def connect_attempts(self) -> list[ConnectAttempt]:
        with self._lock:
            return list(self._connects)

    @property
    def violations(self) -> list[str]:
        with self._lock:
            return list(self._violations)

    def configuration(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._configs[self.component])

    def wait_until(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Block until condition() holds (checked whenever the server's state changes)."""
        with self._lock:
            if not self._lock.wait_for(condition, timeout_s):
                raise TimeoutError(f"IPC stand-in: {what} did not happen within {timeout_s}s")

    def wait_for_subscriptions(self, timeout_s: float = 5.0, validation: bool = True) -> None:
        """Wait until the component subscribed to configuration updates (and to validation)."""
        self.wait_until(lambda: any(s.component == self.component for s in self._config_subs)
                        and (not validation or self.component in self._validators), timeout_s,
                        "the configuration subscriptions")

    # what a test drives -------------------------------------------------------------------------

    def set_configuration(self, configuration: Mapping[str, Any]) -> int:
        """Replace the configuration (as a deployment does) and notify subscribers; returns events sent."""
        with self._lock:
            old = self._configs[self.component]
            new = copy.deepcopy(dict(configuration))
            self._configs[self.component] = new
            changed = _changed_paths(old, new)
            targets = [s for s in self._config_subs if s.component == self.component]
        sent = 0
        for path in changed:
            for sub in targets:
                if path[:len(sub.key_path)] == sub.key_path:
                    event = {"configurationUpdateEvent": {"componentName": self.component, "keyPath": list(path)}}
                    if sub.connection.send_event(sub.stream_id, SUBSCRIBE_CONFIGURATION, event):
                        sent += 1
        return sent

    def propose_configuration(self, configuration: Mapping[str, Any], deployment_id: str,
                              timeout_s: float = 5.0) -> dict[str, Any]:
        """Ask the component to validate a deployment's configuration, as the nucleus does; returns its report.

        Raises:
            LookupError: the component has not subscribed to validation (the nucleus would skip it).
            TimeoutError: no SendConfigurationValidityReport for this deployment within timeout_s.
        """
        pending = _PendingValidation()
        key = (self.component, deployment_id)
        with self._lock:
            sub = self._validators.get(self.component)
            if sub is None:
                raise LookupError(f"{self.component} has not subscribed to configuration validation")
            self._pending[key] = pending
        event = {"validateConfigurationUpdateEvent": {"configuration": copy.deepcopy(dict(configuration)),
                                                      "deploymentId": deployment_id}}
        try:
            if not sub.connection.send_event(sub.stream_id, SUBSCRIBE_VALIDATION, event):
                raise ConnectionError("validation subscriber's connection is closed")
            if not pending.done.wait(timeout_s):
                raise TimeoutError(f"no validity report for deployment {deployment_id} within {timeout_s}s")
        finally:
            with self._lock:
                self._pending.pop(key, None)
        assert pending.report is not None
        return pending.report

    # internals ----------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn = _Connection(self, sock)
            with self._lock:
                self._connections.append(conn)
            conn.thread.start()

    def _violation(self, text: str) -> None:
        log.warning("IPC stand-in: protocol violation: %s", text)
        with self._lock:
            self._violations.append(text)
            self._lock.notify_all()

    def _record(self, item: Any, into: deque[Any]) -> None:
        with self._lock:
            into.append(item)
            self._lock.notify_all()

    def _authenticate(self, message: Message) -> bool:
        version = message.get(":version", STRING)
        token: str | None = None
        try:
            body = json.loads(message.payload)
            token = body.get("authToken") if isinstance(body, dict) else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            self._violation("CONNECT payload is not JSON")
        accepted = version == RPC_VERSION and isinstance(token, str) and bool(token) and token == self.svcuid
        self._record(ConnectAttempt(token, version, accepted), self._connects)
        return accepted

    def _subscription_closed(self, conn: _Connection, stream_id: int) -> None:
        with self._lock:
            self._config_subs = [s for s in self._config_subs
                                 if not (s.connection is conn and s.stream_id == stream_id)]
            for component, sub in list(self._validators.items()):
                if sub.connection is conn and sub.stream_id == stream_id:
                    del self._validators[component]
            self._lock.notify_all()

    def _connection_closed(self, conn: _Connection) -> None:
        with self._lock:
            self._config_subs = [s for s in self._config_subs if s.connection is not conn]
            self._validators = {k: s for k, s in self._validators.items() if s.connection is not conn}
            self._lock.notify_all()

    # operation handlers: return the response body or raise ModeledError / _BadRequest ------------

    def handle(self, conn: _Connection, operation: str, stream_id: int, body: dict[str, Any]) -> dict[str, Any]:
        self._record(Request(operation, stream_id, body), self._requests)
        if operation == PUBLISH:
            return self._publish(body)
        if operation == GET_CONFIGURATION:
            return self._get_configuration(conn, body)
        if operation == SUBSCRIBE_CONFIGURATION:
            return self._subscribe_configuration(conn, stream_id, body)
        if operation == SUBSCRIBE_VALIDATION:
            return {}
        if operation == SEND_VALIDITY_REPORT:
            return self._validity_report(body)
        raise AssertionError(f"no handler for {operation}")

    def after_response(self, conn: _Connection, operation: str, stream_id: int, body: dict[str, Any]) -> None:
        """Register subscriptions only once their response is on the wire, as the nucleus does."""
        with self._lock:
            if operation == SUBSCRIBE_CONFIGURATION:
                key_path = tuple(body.get("keyPath") or ())
                component = body.get("componentName") or conn.component or ""
                self._config_subs.append(_Subscription(conn, stream_id, component, key_path))
            elif operation == SUBSCRIBE_VALIDATION and conn.component is not None:
                # The nucleus keeps the first validator a component registers (computeIfAbsent).
                self._validators.setdefault(conn.component, _Subscription(conn, stream_id, conn.component, ()))
            self._lock.notify_all()

    def _publish(self, body: dict[str, Any]) -> dict[str, Any]:
        topic = body.get("topicName")
        if topic is None:
            raise ModeledError("InvalidArgumentsError", "Topic is required")
        if not isinstance(topic, str):
            raise _BadRequest("topicName is not a string")
        if not any(p.match(topic) for p in self._allow):
            raise ModeledError("UnauthorizedError", "Not Authorized")
        if "payload" not in body or body["payload"] is None:
            raise ModeledError("InvalidArgumentsError", "Payload is required")
        try:
            payload = base64.b64decode(body["payload"], validate=True)
        except (binascii.Error, TypeError, ValueError) as exc:
            raise _BadRequest(f"payload is not base64: {exc}") from exc
        qos = body.get("qos")
        if qos is None:
            raise ModeledError("InvalidArgumentsError", "QoS is required")
        if qos not in ("0", "1"):
            raise ModeledError("InvalidArgumentsError", f"Invalid QoS value: {qos}")
        problem = None
        if "+" in topic or "#" in topic:
            problem = "topic must not contain MQTT wildcards"
        elif len(topic.encode("utf-8")) > MAX_TOPIC_BYTES or topic.count("/") > MAX_TOPIC_SLASHES:
            problem = f"topic exceeds {MAX_TOPIC_BYTES} bytes or {MAX_TOPIC_SLASHES} forward slashes"
        elif len(payload) > MAX_PAYLOAD_BYTES:
            problem = f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}"
        if problem:
            raise ModeledError("ServiceError", f"Publish to topic {topic} failed: {problem}")
        self._record(Published(topic, qos, payload, bool(body.get("retain", False))), self._published)
        return {}

    def _config_of(self, body: dict[str, Any], own: str | None) -> tuple[str, dict[str, Any]]:
        name = body.get("componentName") or own
        with self._lock:
            config = self._configs.get(name or "")
        if config is None or name is None:
            raise ModeledError("ResourceNotFoundError", "Key not found")
        return name, config

    def _key_path(self, body: dict[str, Any]) -> list[str]:
        key_path = body.get("keyPath") or []
        if not isinstance(key_path, list) or not all(isinstance(k, str) for k in key_path):
            raise _BadRequest("keyPath is not a list of strings")
        return key_path

    def _get_configuration(self, conn: _Connection, body: dict[str, Any]) -> dict[str, Any]:
        name, config = self._config_of(body, conn.component)
        key_path = self._key_path(body)
        with self._lock:
            try:
                node = copy.deepcopy(_find_node(config, key_path))
            except KeyError:
                raise ModeledError("ResourceNotFoundError", "Key not found") from None
        # A leaf comes back as {leafName: value}, a container as the object itself.
        value = node if isinstance(node, dict) else {key_path[-1]: node}
        return {"componentName": name, "value": value}

    def _subscribe_configuration(self, conn: _Connection, stream_id: int, body: dict[str, Any]) -> dict[str, Any]:
        _, config = self._config_of(body, conn.component)
        with self._lock:
            try:
                _find_node(config, self._key_path(body))
            except KeyError:
                raise ModeledError("ResourceNotFoundError", "Key not found") from None
        return {}

    def _validity_report(self, body: dict[str, Any]) -> dict[str, Any]:
        report = body.get("configurationValidityReport")
        if not isinstance(report, dict):
            raise _BadRequest("configurationValidityReport is missing")
        deployment_id = report.get("deploymentId")
        if deployment_id is None:
            raise ModeledError("InvalidArgumentsError",
                               "Cannot accept configuration validity report, the deployment ID provided was null")
        if report.get("status") not in ("ACCEPTED", "REJECTED"):
            self._violation(f"validity report status {report.get('status')!r} is not ACCEPTED or REJECTED")
        with self._lock:
            pending = self._pending.pop((self.component, deployment_id), None)
        if pending is None:
            raise ModeledError("InvalidArgumentsError", "Validation request either timed out or was never made")
        pending.report = dict(report)
        pending.done.set()
        return {}


class _Connection:
    """One client connection: its reader thread, handshake state and open streams."""

    def __init__(self, server: IpcServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.sock.settimeout(server._io_timeout_s)
        self.component: str | None = None
        self.thread = threading.Thread(target=self._run, name=f"ipc-stand-in-conn-{id(self):x}", daemon=True)
        self._send_lock = threading.Lock()
        self._handshake = False
        self._latest_stream = 0
        self._open: dict[int, str] = {}  # stream id -> operation, while the stream is open
        self._closed = threading.Event()

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    # I/O ----------------------------------------------------------------------------------------

    def _recv_exact(self, n: int) -> bytes | None:
        chunks = bytearray()
        while len(chunks) < n:
            if self._closed.is_set() or self.server._stopping.is_set():
                return None
            try:
                chunk = self.sock.recv(n - len(chunks))
            except TimeoutError:
                continue
            except OSError:
                return None
            if not chunk:
                if chunks:
                    self.server._violation(f"connection closed mid-message after {len(chunks)} of {n} bytes")
                return None
            chunks += chunk
        return bytes(chunks)

    def _read(self) -> Message | None:
        prelude = self._recv_exact(PRELUDE_LEN)
        if prelude is None:
            return None
        total, headers_len, prelude_crc = struct.unpack(">III", prelude)
        if zlib.crc32(prelude[:8]) != prelude_crc:
            raise FramingError("prelude CRC32 mismatch")
        if not PRELUDE_LEN + 4 <= total <= MAX_MESSAGE_LEN or headers_len > MAX_HEADERS_LEN:
            raise FramingError(f"message length {total} / headers length {headers_len} out of bounds")
        rest = self._recv_exact(total - PRELUDE_LEN)
        if rest is None:
            return None
        return decode_message(prelude + rest)

    def _send(self, message_type: int, flags: int, stream_id: int, headers: Sequence[Header] = (),
              payload: bytes = b"") -> bool:
        data = encode_message([*headers, *_rpc_headers(message_type, flags, stream_id)], payload)
        with self._send_lock:
            if self._closed.is_set():
                return False
            try:
                self.sock.sendall(data)
            except OSError:
                return False
            if flags & TERMINATE_STREAM and stream_id:
                self._open.pop(stream_id, None)
        return True

    def send_event(self, stream_id: int, operation: str, body: dict[str, Any]) -> bool:
        model = OPERATIONS[operation].stream_event
        assert model is not None
        if stream_id not in self._open:
            return False
        headers = [Header(":content-type", STRING, JSON), Header("service-model-type", STRING, model)]
        return self._send(APPLICATION_MESSAGE, 0, stream_id, headers, json.dumps(body).encode())

    def _send_error(self, stream_id: int, error: ModeledError) -> None:
        headers = [Header(":content-type", STRING, JSON),
                   Header("service-model-type", STRING, f"aws.greengrass#{error.code}")]
        self._send(APPLICATION_ERROR, TERMINATE_STREAM, stream_id, headers, json.dumps(error.payload()).encode())

    def _protocol_error(self, text: str) -> None:
        self.server._violation(text)
        self._send(PROTOCOL_ERROR, 0, 0, [Header(":content-type", STRING, JSON)],
                   json.dumps({"message": text}).encode())
        self.close()

    # protocol -----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._closed.is_set():
                try:
                    message = self._read()
                except FramingError as exc:
                    self._protocol_error(f"framing: {exc}")
                    break
                if message is None:
                    break
                self._dispatch(message)
        finally:
            self._closed.set()
            with contextlib.suppress(OSError):
                self.sock.close()
            self.server._connection_closed(self)

    def _dispatch(self, message: Message) -> None:
        message_type = message.get(":message-type", INT32)
        flags = message.get(":message-flags", INT32)
        stream_id = message.get(":stream-id", INT32)
        if message_type is None or flags is None or stream_id is None:
            self._protocol_error("message lacks an int32 :message-type, :message-flags or :stream-id header")
            return
        if not self._handshake:
            if message_type != CONNECT or stream_id != 0:
                self._protocol_error(f"message type {message_type} on stream {stream_id} before CONNECT")
                return
            self._handshake = True
            if self.server._authenticate(message):
                self.component = self.server.component
                self._send(CONNECT_ACK, CONNECTION_ACCEPTED, 0)
            else:
                self._send(CONNECT_ACK, 0, 0)
                self.close()
            return
        if stream_id == 0:
            self._protocol_message(message_type, message)
        else:
            self._stream_message(message_type, flags, stream_id, message)

    def _protocol_message(self, message_type: int, message: Message) -> None:
        if message_type == PING:
            echoed = [h for h in message.headers if not h.name.startswith(":")]
            self._send(PING_RESPONSE, 0, 0, echoed, message.payload)
        elif message_type == CONNECT:
            self._protocol_error("second CONNECT on one connection")
        elif message_type != PING_RESPONSE:
            self._protocol_error(f"message type {message_type} is not valid on stream 0")

    def _stream_message(self, message_type: int, flags: int, stream_id: int, message: Message) -> None:
        if message_type not in (APPLICATION_MESSAGE, APPLICATION_ERROR):
            self._protocol_error(f"message type {message_type} sent on stream {stream_id}")
            return
        if stream_id <= self._latest_stream:
            operation = self._open.get(stream_id)
            if flags & TERMINATE_STREAM:
                # The client closing a subscription (or acknowledging a closed stream).
                if operation is not None:
                    self._open.pop(stream_id, None)
                    self.server._subscription_closed(self, stream_id)
            elif operation is None:
                self._protocol_error(f"message on stream {stream_id}, which is not open")
            else:
                self.server._violation(f"unexpected client stream event on {operation} stream {stream_id}")
            return
        if stream_id != self._latest_stream + 1:
            self._protocol_error(f"new stream id {stream_id} does not follow {self._latest_stream}")
            return
        operation = message.get("operation", STRING)
        if not operation:
            self._protocol_error(f"new stream {stream_id} has no operation header")
            return
        self._latest_stream = stream_id
        if flags & TERMINATE_STREAM:
            return  # a request with the terminate flag is ignored by the Java server
        self._open[stream_id] = operation
        self._request(operation, stream_id, message)

    def _request(self, operation: str, stream_id: int, message: Message) -> None:
        spec = OPERATIONS.get(operation)
        if spec is None:
            self.server._violation(f"unknown operation {operation!r}")
            body = {"error": "Unsupported Operation", "message": f"{operation} is an unsupported operation."}
            self._send(APPLICATION_ERROR, TERMINATE_STREAM, stream_id, [Header(":content-type", STRING, JSON)],
                       json.dumps(body).encode())
            return
        try:
            content_type = message.get(":content-type", STRING)
            model = message.get("service-model-type", STRING)
            if content_type != JSON:
                raise _BadRequest(f":content-type is {content_type!r}, not {JSON}")
            if model != spec.request:
                raise _BadRequest(f"service-model-type is {model!r}, not {spec.request}")
            try:
                body = json.loads(message.payload or b"{}")
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise _BadRequest(f"request is not JSON: {exc}") from exc
            if not isinstance(body, dict):
                raise _BadRequest("request is not a JSON object")
            response = self.server.handle(self, operation, stream_id, body)
        except ModeledError as error:
            self._send_error(stream_id, error)
            return
        except _BadRequest as exc:
            self.server._violation(f"{operation}: {exc}")
            self._send(APPLICATION_ERROR, TERMINATE_STREAM, stream_id,
                       [Header(":content-type", STRING, "text/plain")], b"InternalServerError")
            return
        headers = [Header(":content-type", STRING, JSON), Header("service-model-type", STRING, spec.response)]
        flags = 0 if spec.streaming else TERMINATE_STREAM
        if self._send(APPLICATION_MESSAGE, flags, stream_id, headers, json.dumps(response).encode()):
            self.server.after_response(self, operation, stream_id, body)
