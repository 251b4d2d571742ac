"""The Greengrass nucleus's IPC server, for the unmodified awsiotsdk client: the protocol ``run-local`` speaks.

The nucleus serves Greengrass IPC as AWS event-stream RPC on a Unix domain socket. This module
speaks that protocol from first principles (it never imports awscrt/awsiot, so the SDK cannot
agree with itself) and checks what the nucleus checks:

* framing: prelude (total length, headers length, CRC32 of the first 8 bytes), typed headers,
  payload, CRC32 of the whole message; both CRCs are verified on receipt;
* the connection handshake: the first message is CONNECT on stream 0 with ``:version`` 0.1.0 and
  a JSON payload ``{"authToken": ...}`` that must be the SVCUID of a component this server was
  given; anything else is refused and the socket closed, as the nucleus does;
* streams: every message carries ``:message-type``, ``:message-flags`` and ``:stream-id`` (int32);
  a new stream id must be the previous one plus one and carry an ``operation`` header; requests
  carry ``:content-type: application/json`` and the request shape's ``service-model-type``;
* operations: PublishToIoTCore (topicName, qos "0"/"1" and payload required; the topic must match
  the calling component's mqttproxy allow-list or the answer is ``UnauthorizedError``; IoT Core's
  topic and payload limits apply), GetConfiguration, SubscribeToConfigurationUpdate,
  SubscribeToValidateConfigurationUpdates, SendConfigurationValidityReport (the report's
  deploymentId must match a validation this server asked for), SubscribeToComponentUpdates and
  DeferComponentUpdate; a caller may register more (the local nucleus adds the Greengrass CLI's
  CreateLocalDeployment and GetLocalDeploymentStatus). Unknown operations get the server's
  "Unsupported Operation" error.

Two flavours, because our components must work on both nuclei:

* ``classic`` follows the Java nucleus's event-stream server: modelled errors are
  APPLICATION_ERROR with ``{"message", "_service", "_message", "_errorCode"}``, and every
  operation above is served.
* ``lite`` follows Greengrass nucleus lite (aws-greengrass-lite ``modules/ggipcd/src/ipc_server.c``,
  ``send_stream_error``): error payloads carry only ``{"_message", "_errorCode"}`` (no
  ``message``, which is the field awsiotsdk reads), a refused CONNECT closes the socket without a
  CONNECT_ACK (``handle_conn_init`` returns an error), and the operations Lite does not implement
  (configuration validation, component updates and deferral; see the developer guide's "Greengrass
  feature compatibility" table) are refused with a ServiceError.

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

CLASSIC, LITE = "classic", "lite"
FLAVORS = (CLASSIC, LITE)

PUBLISH = "aws.greengrass#PublishToIoTCore"
GET_CONFIGURATION = "aws.greengrass#GetConfiguration"
SUBSCRIBE_CONFIGURATION = "aws.greengrass#SubscribeToConfigurationUpdate"
SUBSCRIBE_VALIDATION = "aws.greengrass#SubscribeToValidateConfigurationUpdates"
SEND_VALIDITY_REPORT = "aws.greengrass#SendConfigurationValidityReport"
SUBSCRIBE_COMPONENT_UPDATES = "aws.greengrass#SubscribeToComponentUpdates"
DEFER_COMPONENT_UPDATE = "aws.greengrass#DeferComponentUpdate"
CREATE_LOCAL_DEPLOYMENT = "aws.greengrass#CreateLocalDeployment"
GET_LOCAL_DEPLOYMENT_STATUS = "aws.greengrass#GetLocalDeploymentStatus"

# What Greengrass nucleus lite does not serve (developer guide, "Greengrass feature compatibility").
LITE_UNSUPPORTED = frozenset({SUBSCRIBE_VALIDATION, SEND_VALIDITY_REPORT, SUBSCRIBE_COMPONENT_UPDATES,
                              DEFER_COMPONENT_UPDATE})

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


def _op(name: str, stream_event: str | None = None) -> Operation:
    return Operation(f"{name}Request", f"{name}Response", stream_event)


OPERATIONS: dict[str, Operation] = {
    PUBLISH: _op(PUBLISH),
    GET_CONFIGURATION: _op(GET_CONFIGURATION),
    SUBSCRIBE_CONFIGURATION: _op(SUBSCRIBE_CONFIGURATION, "aws.greengrass#ConfigurationUpdateEvents"),
    SUBSCRIBE_VALIDATION: _op(SUBSCRIBE_VALIDATION, "aws.greengrass#ValidateConfigurationUpdateEvents"),
    SEND_VALIDITY_REPORT: _op(SEND_VALIDITY_REPORT),
    SUBSCRIBE_COMPONENT_UPDATES: _op(SUBSCRIBE_COMPONENT_UPDATES, "aws.greengrass#ComponentUpdatePolicyEvents"),
    DEFER_COMPONENT_UPDATE: _op(DEFER_COMPONENT_UPDATE),
    CREATE_LOCAL_DEPLOYMENT: _op(CREATE_LOCAL_DEPLOYMENT),
    GET_LOCAL_DEPLOYMENT_STATUS: _op(GET_LOCAL_DEPLOYMENT_STATUS),
}


class ModeledError(Exception):
    """An error the service model declares (sent as APPLICATION_ERROR with its shape name)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def payload(self, flavor: str = CLASSIC) -> dict[str, Any]:
        if flavor == LITE:
            return {"_message": self.message, "_errorCode": self.code}
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


def publish_resources(access_control: Mapping[str, Any] | None, thing_name: str) -> list[str]:
    """The PublishToIoTCore resources a component's accessControl grants, with ``{iot:thingName}`` resolved.

    Both nuclei resolve that variable inside authorisation policies (and only there among the
    configuration: neither interpolates the rest of it by default).
    """
    policies = (access_control or {}).get("aws.greengrass.ipc.mqttproxy") or {}
    resources: list[str] = []
    for policy in policies.values() if isinstance(policies, Mapping) else ():
        if not isinstance(policy, Mapping):
            continue
        operations = policy.get("operations") or []
        if PUBLISH in operations or "*" in operations:
            resources += [str(r).replace("{iot:thingName}", thing_name) for r in policy.get("resources") or []]
    return resources


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
    component: str | None = None


@dataclass(frozen=True)
class Request:
    operation: str
    stream_id: int
    body: dict[str, Any]
    component: str | None = None


@dataclass(frozen=True)
class Published:
    topic: str
    qos: str
    payload: bytes
    retain: bool
    component: str | None = None


@dataclass(frozen=True)
class Deferral:
    component: str
    deployment_id: str
    recheck_after_ms: int
    message: str | None


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


@dataclass
class _Component:
    name: str
    svcuid: str
    configuration: dict[str, Any]
    allow: list[re.Pattern[str]]


# An extra operation: (server, calling component, request body) -> response body; raise ModeledError to refuse.
Handler = Callable[["IpcServer", str, dict[str, Any]], dict[str, Any]]
# Where an accepted PublishToIoTCore goes (the local nucleus's relay); raise ModeledError to refuse.
PublishSink = Callable[[Published], None]


# --- the server ----------------------------------------------------------------------------------


class IpcServer:
    """A nucleus IPC server on a Unix socket, in background threads, serving one or more components.

    Args:
        svcuid: the auth token of the first component (the SVCUID the nucleus gives it), if any.
        component: the first component's name.
        configuration: the first component's configuration (what GetConfiguration serves).
        publish_allow: mqttproxy PublishToIoTCore resources from the first component's
            accessControl, with recipe variables already resolved.
        socket_path: where to listen; a fresh short path under the temp dir when None (Unix
            socket paths are limited to about 107 bytes, too short for pytest's tmp_path).
        io_timeout_s: socket poll interval; also bounds how long stop() waits for each thread.
        flavor: ``classic`` (the Java nucleus) or ``lite`` (Greengrass nucleus lite).
        on_publish: receives every accepted PublishToIoTCore (the relay to the broker); when None
            messages are only recorded.
        handlers: more operations by name, served to any authenticated component.
    """

    def __init__(self, svcuid: str | None = None, component: str | None = None,
                 configuration: Mapping[str, Any] | None = None, publish_allow: Iterable[str] = (),
                 socket_path: str | Path | None = None, io_timeout_s: float = 0.1, flavor: str = CLASSIC,
                 on_publish: PublishSink | None = None, handlers: Mapping[str, Handler] | None = None) -> None:
        if flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {', '.join(FLAVORS)}, not {flavor!r}")
        self.flavor = flavor
        self._own_dir: str | None = None
        if socket_path is None:
            self._own_dir = tempfile.mkdtemp(prefix="qcs-gg-")
            socket_path = os.path.join(self._own_dir, "ipc.socket")
        self.socket_path = str(socket_path)
        self._io_timeout_s = io_timeout_s
        self._on_publish = on_publish
        self._handlers = dict(handlers or {})
        self._lock = threading.Condition()
        self._components: dict[str, _Component] = {}
        self.component = component or ""
        self._published: deque[Published] = deque(maxlen=10_000)
        self._requests: deque[Request] = deque(maxlen=10_000)
        self._connects: deque[ConnectAttempt] = deque(maxlen=1_000)
        self._violations: deque[str] = deque(maxlen=1_000)
        self._deferrals: deque[Deferral] = deque(maxlen=1_000)
        self._config_subs: list[_Subscription] = []
        self._validators: dict[str, _Subscription] = {}
        self._update_subs: list[_Subscription] = []
        self._pending: dict[tuple[str, str], _PendingValidation] = {}
        self._connections: list[_Connection] = []
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        if component is not None:
            if svcuid is None:
                raise ValueError("a component needs its svcuid")
            self.add_component(component, svcuid, configuration or {}, publish_allow)

    # components ---------------------------------------------------------------------------------

    def add_component(self, name: str, svcuid: str, configuration: Mapping[str, Any],
                      publish_allow: Iterable[str] = ()) -> None:
        """Serve a component: its token, configuration and PublishToIoTCore allow-list (replaces an earlier one)."""
        with self._lock:
            self._components[name] = _Component(name, svcuid, copy.deepcopy(dict(configuration)),
                                                [topic_pattern(r) for r in publish_allow])
            if not self.component:
                self.component = name

    def remove_component(self, name: str) -> None:
        """Forget a component: its token no longer connects and its open connections are closed."""
        with self._lock:
            self._components.pop(name, None)
            connections = [c for c in self._connections if c.component == name]
        for conn in connections:
            conn.close()

    def set_publish_allow(self, name: str, publish_allow: Iterable[str]) -> None:
        with self._lock:
            self._components[name].allow = [topic_pattern(r) for r in publish_allow]

    # lifecycle ----------------------------------------------------------------------------------

    def start(self) -> IpcServer:
        self._stopping.clear()
        Path(self.socket_path).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # a socket file left by a nucleus that died
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.socket_path)
        listener.listen(16)
        listener.settimeout(self._io_timeout_s)
        self._listener = listener
        self._accept_thread = threading.Thread(target=self._accept_loop, name="gg-ipc-accept", daemon=True)
        self._accept_thread.start()
        return self

    def stop(self, timeout_s: float = 5.0, remove_dir: bool = True) -> None:
        """Stop listening and close every connection; start() may be called again (remove_dir=False keeps the path)."""
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
        if remove_dir and self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
        if alive:
            raise RuntimeError(f"IPC server threads still running after {timeout_s}s: {alive}")

    def drop_connections(self) -> int:
        """Close every client connection but keep listening (what clients see when the nucleus's IPC restarts)."""
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            conn.close()
        return len(connections)

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

    @property
    def deferrals(self) -> list[Deferral]:
        with self._lock:
            return list(self._deferrals)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for c in self._connections if c.component is not None)

    def configuration(self, component: str | None = None) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._components[component or self.component].configuration)

    def wait_until(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Block until condition() holds (checked whenever the server's state changes)."""
        with self._lock:
            if not self._lock.wait_for(condition, timeout_s):
                raise TimeoutError(f"IPC server: {what} did not happen within {timeout_s}s")

    def has_subscriptions(self, component: str | None = None, validation: bool = True) -> bool:
        name = component or self.component
        with self._lock:
            return any(s.component == name for s in self._config_subs) and (
                not validation or name in self._validators)

    def wait_for_subscriptions(self, timeout_s: float = 5.0, validation: bool = True,
                               component: str | None = None) -> None:
        """Wait until the component subscribed to configuration updates (and to validation)."""
        name = component or self.component
        self.wait_until(lambda: any(s.component == name for s in self._config_subs)
                        and (not validation or name in self._validators), timeout_s,
                        f"{name}'s configuration subscriptions")

    def validates(self, component: str | None = None) -> bool:
        """Whether the component subscribed to configuration validation."""
        with self._lock:
            return (component or self.component) in self._validators

    def update_subscribers(self) -> list[str]:
        """The components subscribed to component-update notices."""
        with self._lock:
            return sorted({s.component for s in self._update_subs})

    # what a nucleus (or a test) drives ----------------------------------------------------------

    def set_configuration(self, configuration: Mapping[str, Any], component: str | None = None) -> int:
        """Replace a component's configuration (as a deployment does) and notify subscribers; returns events sent."""
        name = component or self.component
        with self._lock:
            old = self._components[name].configuration
            new = copy.deepcopy(dict(configuration))
            self._components[name].configuration = new
            changed = _changed_paths(old, new)
            targets = [s for s in self._config_subs if s.component == name]
        sent = 0
        for path in changed:
            for sub in targets:
                if path[:len(sub.key_path)] == sub.key_path:
                    event = {"configurationUpdateEvent": {"componentName": name, "keyPath": list(path)}}
                    if sub.connection.send_event(sub.stream_id, SUBSCRIBE_CONFIGURATION, event):
                        sent += 1
        return sent

    def propose_configuration(self, configuration: Mapping[str, Any], deployment_id: str,
                              timeout_s: float = 5.0, component: str | None = None) -> dict[str, Any]:
        """Ask the component to validate a deployment's configuration, as the nucleus does; returns its report.

        Raises:
            LookupError: the component has not subscribed to validation (the nucleus would skip it).
            TimeoutError: no SendConfigurationValidityReport for this deployment within timeout_s.
        """
        name = component or self.component
        pending = _PendingValidation()
        key = (name, deployment_id)
        with self._lock:
            sub = self._validators.get(name)
            if sub is None:
                raise LookupError(f"{name} has not subscribed to configuration validation")
            self._pending[key] = pending
        event = {"validateConfigurationUpdateEvent": {"configuration": copy.deepcopy(dict(configuration)),
                                                      "deploymentId": deployment_id}}
        try:
            if not sub.connection.send_event(sub.stream_id, SUBSCRIBE_VALIDATION, event):
                raise ConnectionError(f"{name}'s validation subscription is closed")
            if not pending.done.wait(timeout_s):
                raise TimeoutError(f"no validity report for deployment {deployment_id} within {timeout_s}s")
        finally:
            with self._lock:
                self._pending.pop(key, None)
        assert pending.report is not None
        return pending.report

    def notify_component_update(self, deployment_id: str, post: bool = False) -> int:
        """Send every component-update subscriber a pre- (or post-) update event; returns how many got it."""
        with self._lock:
            subs = list(self._update_subs)
        key, body = (("postUpdateEvent", {"deploymentId": deployment_id}) if post else
                     ("preUpdateEvent", {"deploymentId": deployment_id, "isGgcRestarting": False}))
        return sum(1 for s in subs if s.connection.send_event(s.stream_id, SUBSCRIBE_COMPONENT_UPDATES, {key: body}))

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
        log.warning("IPC server: protocol violation: %s", text)
        with self._lock:
            self._violations.append(text)
            self._lock.notify_all()

    def _record(self, item: Any, into: deque[Any]) -> None:
        with self._lock:
            into.append(item)
            self._lock.notify_all()

    def _authenticate(self, message: Message) -> str | None:
        """The component the CONNECT's token belongs to, or None when it is refused."""
        version = message.get(":version", STRING)
        token: str | None = None
        try:
            body = json.loads(message.payload)
            token = body.get("authToken") if isinstance(body, dict) else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            self._violation("CONNECT payload is not JSON")
        with self._lock:
            owner = next((c.name for c in self._components.values() if token and c.svcuid == token), None)
        accepted = version == RPC_VERSION and isinstance(token, str) and owner is not None
        self._record(ConnectAttempt(token, version, accepted, owner if accepted else None), self._connects)
        return owner if accepted else None

    def _subscription_closed(self, conn: _Connection, stream_id: int) -> None:
        with self._lock:
            def keep(s: _Subscription) -> bool:
                return not (s.connection is conn and s.stream_id == stream_id)

            self._config_subs = [s for s in self._config_subs if keep(s)]
            self._update_subs = [s for s in self._update_subs if keep(s)]
            self._validators = {k: s for k, s in self._validators.items() if keep(s)}
            self._lock.notify_all()

    def _connection_closed(self, conn: _Connection) -> None:
        with self._lock:
            self._config_subs = [s for s in self._config_subs if s.connection is not conn]
            self._update_subs = [s for s in self._update_subs if s.connection is not conn]
            self._validators = {k: s for k, s in self._validators.items() if s.connection is not conn}
            if conn in self._connections:
                self._connections.remove(conn)
            self._lock.notify_all()

    # operation handlers: return the response body or raise ModeledError / _BadRequest ------------

    def handle(self, conn: _Connection, operation: str, stream_id: int, body: dict[str, Any]) -> dict[str, Any]:
        component = conn.component or ""
        self._record(Request(operation, stream_id, body, component), self._requests)
        if self.flavor == LITE and operation in LITE_UNSUPPORTED:
            raise ModeledError("ServiceError", f"Unhandled operation requested: {operation}.")
        if operation == PUBLISH:
            return self._publish(component, body)
        if operation == GET_CONFIGURATION:
            return self._get_configuration(component, body)
        if operation == SUBSCRIBE_CONFIGURATION:
            return self._subscribe_configuration(component, body)
        if operation in (SUBSCRIBE_VALIDATION, SUBSCRIBE_COMPONENT_UPDATES):
            return {}
        if operation == SEND_VALIDITY_REPORT:
            return self._validity_report(component, body)
        if operation == DEFER_COMPONENT_UPDATE:
            return self._defer(component, body)
        handler = self._handlers.get(operation)
        if handler is not None:
            return handler(self, component, body)
        raise ModeledError("ServiceError", f"{operation} is not served by this nucleus")

    def after_response(self, conn: _Connection, operation: str, stream_id: int, body: dict[str, Any]) -> None:
        """Register subscriptions only once their response is on the wire, as the nucleus does."""
        if conn.component is None:
            return
        with self._lock:
            if operation == SUBSCRIBE_CONFIGURATION:
                key_path = tuple(body.get("keyPath") or ())
                component = body.get("componentName") or conn.component
                self._config_subs.append(_Subscription(conn, stream_id, component, key_path))
            elif operation == SUBSCRIBE_VALIDATION:
                # The nucleus keeps the first validator a component registers (computeIfAbsent).
                self._validators.setdefault(conn.component, _Subscription(conn, stream_id, conn.component, ()))
            elif operation == SUBSCRIBE_COMPONENT_UPDATES:
                self._update_subs.append(_Subscription(conn, stream_id, conn.component, ()))
            self._lock.notify_all()

    def _publish(self, component: str, body: dict[str, Any]) -> dict[str, Any]:
        topic = body.get("topicName")
        if topic is None:
            raise ModeledError("InvalidArgumentsError", "Topic is required")
        if not isinstance(topic, str):
            raise _BadRequest("topicName is not a string")
        with self._lock:
            allow = list(self._components[component].allow) if component in self._components else []
        if not any(p.match(topic) for p in allow):
            raise ModeledError("UnauthorizedError", f"Principal {component} is not authorized to perform "
                               f"aws.greengrass.ipc.mqttproxy:aws.greengrass#PublishToIoTCore on resource {topic}")
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
        message = Published(topic, qos, payload, bool(body.get("retain", False)), component)
        if self._on_publish is not None:
            self._on_publish(message)
        self._record(message, self._published)
        return {}

    def _config_of(self, body: dict[str, Any], own: str) -> tuple[str, dict[str, Any]]:
        name = body.get("componentName") or own
        with self._lock:
            entry = self._components.get(name)
        if entry is None:
            raise ModeledError("ResourceNotFoundError", "Key not found")
        return name, entry.configuration

    def _key_path(self, body: dict[str, Any]) -> list[str]:
        key_path = body.get("keyPath") or []
        if not isinstance(key_path, list) or not all(isinstance(k, str) for k in key_path):
            raise _BadRequest("keyPath is not a list of strings")
        return key_path

    def _get_configuration(self, component: str, body: dict[str, Any]) -> dict[str, Any]:
        name, config = self._config_of(body, component)
        key_path = self._key_path(body)
        with self._lock:
            try:
                node = copy.deepcopy(_find_node(config, key_path))
            except KeyError:
                raise ModeledError("ResourceNotFoundError", "Key not found") from None
        # A leaf comes back as {leafName: value}, a container as the object itself.
        value = node if isinstance(node, dict) else {key_path[-1]: node}
        return {"componentName": name, "value": value}

    def _subscribe_configuration(self, component: str, body: dict[str, Any]) -> dict[str, Any]:
        _, config = self._config_of(body, component)
        with self._lock:
            try:
                _find_node(config, self._key_path(body))
            except KeyError:
                raise ModeledError("ResourceNotFoundError", "Key not found") from None
        return {}

    def _validity_report(self, component: str, body: dict[str, Any]) -> dict[str, Any]:
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
            pending = self._pending.pop((component, deployment_id), None)
        if pending is None:
            raise ModeledError("InvalidArgumentsError", "Validation request either timed out or was never made")
        pending.report = dict(report)
        pending.done.set()
        return {}

    def _defer(self, component: str, body: dict[str, Any]) -> dict[str, Any]:
        deployment_id = body.get("deploymentId")
        if not isinstance(deployment_id, str) or not deployment_id:
            raise ModeledError("InvalidArgumentsError", "Deployment ID is required")
        recheck = body.get("recheckAfterMs", 0)
        if isinstance(recheck, bool) or not isinstance(recheck, int) or recheck < 0:
            raise ModeledError("InvalidArgumentsError", f"Invalid recheckAfterMs: {recheck!r}")
        self._record(Deferral(component, deployment_id, recheck, body.get("message")), self._deferrals)
        return {}


class _Connection:
    """One client connection: its reader thread, handshake state and open streams."""

    def __init__(self, server: IpcServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.sock.settimeout(server._io_timeout_s)
        self.component: str | None = None
        self.thread = threading.Thread(target=self._run, name=f"gg-ipc-conn-{id(self):x}", daemon=True)
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
        self._send(APPLICATION_ERROR, TERMINATE_STREAM, stream_id, headers,
                   json.dumps(error.payload(self.server.flavor)).encode())

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
            component = self.server._authenticate(message)
            if component is not None:
                self.component = component
                self._send(CONNECT_ACK, CONNECTION_ACCEPTED, 0)
            else:
                if self.server.flavor == CLASSIC:
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
        except Exception:  # a handler bug: answer like the nucleus does and keep serving
            log.exception("IPC server: %s failed", operation)
            self._send_error(stream_id, ModeledError("ServiceError", f"{operation} failed inside the nucleus"))
            return
        headers = [Header(":content-type", STRING, JSON), Header("service-model-type", STRING, spec.response)]
        flags = 0 if spec.streaming else TERMINATE_STREAM
        if self._send(APPLICATION_MESSAGE, flags, stream_id, headers, json.dumps(response).encode()):
            self.server.after_response(self, operation, stream_id, body)
