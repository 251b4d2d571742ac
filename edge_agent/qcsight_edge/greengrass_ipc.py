"""Greengrass IPC: the session (reconnected when lost), the publisher, the configuration and component updates.

Under Greengrass the nucleus already holds the device's IoT Core connection; the agent talks to it
over IPC on a Unix socket instead of opening a second MQTT connection. The nucleus tells a
component where the socket is and who it is through two environment variables,
``AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT`` and ``SVCUID``; :func:`connect_ipc` reads
them and connects the unmodified awsiotsdk client.

:class:`IpcLink` keeps the agent connected: when the nucleus drops the connection it opens a new
session, re-subscribes whoever asked (:meth:`IpcLink.on_reconnect`), and when the nucleus stays
unreachable past a limit it says so (``on_give_up``), so the agent exits non-zero and the nucleus
restarts it instead of the device going quiet. :class:`IpcPublisher` puts ``PublishToIoTCore``
behind the same :class:`Publisher` interface as the MQTT transports. :class:`GreengrassConfig`
reads the component configuration, follows its updates and answers the nucleus's validation of a
proposed deployment; :class:`ComponentUpdates` defers a component update while a part is in flight.

Both nuclei are served. Greengrass nucleus lite implements neither configuration validation nor
component-update deferral: a refused subscription is logged and the agent validates each update
on receipt instead (a bad one is refused, naming the field, and the running configuration
stays). Lite's error replies carry their text in ``_message`` (aws-greengrass-lite
``modules/ggipcd/src/ipc_server.c``, ``send_stream_error``), a field awsiotsdk does not read;
:class:`ErrorTexts` recovers it, so an error never reads as a bare ``ServiceError``.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from awscrt.exceptions import AwsCrtError
from awscrt.io import ClientBootstrap, DefaultHostResolver, EventLoopGroup, SocketDomain, SocketOptions
from awsiot.eventstreamrpc import (
    AccessDeniedError,
    Connection,
    ConnectionClosedError,
    EventStreamError,
    LifecycleHandler,
    MessageAmendment,
    StreamClosedError,
)
from awsiot.greengrasscoreipc.client import GreengrassCoreIPCClient
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
from awsiot.greengrasscoreipc.model import (
    QOS,
    ConfigurationValidityReport,
    ConfigurationValidityStatus,
    DeferComponentUpdateRequest,
    GetConfigurationRequest,
    InvalidArgumentsError,
    PublishToIoTCoreRequest,
    SendConfigurationValidityReportRequest,
    ServiceError,
    UnauthorizedError,
)

from qcsight_core.errors import ConfigError
from qcsight_edge.clock import Backoff
from qcsight_edge.errors import GreengrassError, NotConnectedError, PublishError

log = logging.getLogger(__name__)

SOCKET_ENV = "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT"
TOKEN_ENV = "SVCUID"
# The nucleus keeps the recipe's IPC authorisation policies inside the component configuration;
# they are Greengrass's, not settings of the agent, and the agent's validator refuses unknown keys.
NUCLEUS_KEYS = ("accessControl",)
_QOS = {0: QOS.AT_MOST_ONCE, 1: QOS.AT_LEAST_ONCE}


def agent_settings(configuration: Mapping[str, Any]) -> dict[str, Any]:
    """The component configuration without the keys the nucleus owns (accessControl)."""
    return {key: value for key, value in configuration.items() if key not in NUCLEUS_KEYS}


class ErrorTexts(logging.Filter):
    """The text of IPC error replies that awsiotsdk's error shapes drop, by the operation that got them.

    awsiotsdk builds a modelled error from the reply's ``message`` field; Greengrass nucleus lite
    sends ``_message`` only. The SDK logs every reply it receives at DEBUG on
    ``awsiot.eventstreamrpc`` with the operation as the first argument; this filter reads the error
    replies there (public ``logging`` API only), keeps their text keyed weakly by operation, and
    lets through only the records the logger would have emitted anyway.
    """

    LOGGER = "awsiot.eventstreamrpc"
    _installed: ErrorTexts | None = None
    _install_lock = threading.Lock()

    def __init__(self, floor: int) -> None:
        super().__init__()
        self._floor = floor
        self._lock = threading.Lock()
        self._texts: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()

    @classmethod
    def install(cls) -> ErrorTexts:
        """Attach the filter once per process (the logger is shared); returns it."""
        with cls._install_lock:
            if cls._installed is None:
                logger = logging.getLogger(cls.LOGGER)
                texts = cls(logger.getEffectiveLevel())
                logger.addFilter(texts)
                logger.setLevel(logging.DEBUG)
                cls._installed = texts
            return cls._installed

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and args[2] == "APPLICATION_ERROR":
            text = _error_text(args[4])
            if text:
                try:
                    with self._lock:
                        self._texts[args[0]] = text
                except TypeError:  # an operation that cannot be referenced weakly: nothing to key by
                    pass
        return record.levelno >= self._floor

    def text(self, operation: Any) -> str | None:
        try:
            with self._lock:
                return self._texts.get(operation)
        except TypeError:
            return None


def _error_text(payload: Any) -> str:
    try:
        body = json.loads(bytes(payload))
    except (TypeError, ValueError):
        return ""
    if not isinstance(body, dict):
        return ""
    return str(body.get("message") or body.get("_message") or "")


def _reason(exc: BaseException, operation: Any = None) -> str:
    """An error's text: the SDK's ``message``, else the nucleus's ``_message``, else its type."""
    message = getattr(exc, "message", None)
    if message:
        return str(message)
    texts = ErrorTexts._installed
    recovered = texts.text(operation) if texts is not None and operation is not None else None
    if recovered:
        return recovered
    return str(exc) or type(exc).__name__


class IpcLifecycle(LifecycleHandler):  # type: ignore[misc]  # awsiotsdk ships no type hints
    """Tracks whether the IPC connection is up; the SDK calls it from its event-loop thread.

    Args:
        on_lost: called (on the SDK's thread; it must not block) when an established connection drops.
    """

    def __init__(self, on_lost: Callable[[], None] | None = None) -> None:
        super().__init__()
        self._up = threading.Event()
        self._on_lost = on_lost

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    def on_connect(self) -> None:
        self._up.set()

    def on_disconnect(self, reason: Exception | None) -> None:
        was_up = self._up.is_set()
        self._up.clear()
        if reason is not None:
            log.warning("Greengrass IPC connection lost: %r", reason)
        if was_up and self._on_lost is not None:
            try:
                self._on_lost()
            except Exception:  # nothing may escape into the SDK's thread
                log.exception("reporting the lost IPC connection")

    def on_error(self, error: Exception) -> bool:
        log.error("Greengrass IPC connection error, closing: %r", error)
        return True


@dataclass(frozen=True)
class IpcSession:
    """A connected IPC client and the state of its connection.

    Attributes:
        client: the V2 client (subscriptions: it runs their callbacks on its own executor thread).
        raw: the V1 client it wraps (single requests: the operation object names its error reply).
        lifecycle: whether the connection is up.
    """

    client: GreengrassCoreIPCClientV2
    lifecycle: IpcLifecycle
    raw: GreengrassCoreIPCClient

    @property
    def current(self) -> IpcSession:
        return self

    @property
    def connected(self) -> bool:
        return self.lifecycle.connected

    def close(self, timeout_s: float) -> None:
        try:
            self.client.close(executor_wait=False).result(timeout_s)
        except Exception as exc:  # closing is best effort; the cause is logged, never raised
            log.warning("closing the Greengrass IPC connection: %r", exc)


class SessionSource(Protocol):
    """Where the IPC session in use comes from: a fixed session, or an :class:`IpcLink` that replaces it."""

    @property
    def current(self) -> IpcSession | None: ...


def connect_ipc(timeout_s: float, environ: Mapping[str, str] | None = None,
                on_lost: Callable[[], None] | None = None) -> IpcSession:
    """Connect to the Greengrass nucleus with the socket path and token it gave this component.

    Args:
        timeout_s: how long to wait for the nucleus to accept the connection.
        environ: where to read the two variables; os.environ when None.
        on_lost: called when the connection, once up, drops.

    Raises:
        GreengrassError: the variables are missing (not running under Greengrass), the socket
            cannot be reached, the nucleus refused the token, or it did not answer in time.
    """
    ErrorTexts.install()
    env = os.environ if environ is None else environ
    socket_path, token = env.get(SOCKET_ENV, ""), env.get(TOKEN_ENV, "")
    missing = [name for name, value in ((SOCKET_ENV, socket_path), (TOKEN_ENV, token)) if not value]
    if missing:
        raise GreengrassError(
            f"not running under Greengrass: {' and '.join(missing)} not set (the nucleus sets them for "
            "the components it runs); outside Greengrass use the mqtt transport")
    lifecycle = IpcLifecycle(on_lost)
    # Built like awsiot.greengrasscoreipc.connect(), which cannot close a connection that timed out.
    elg = EventLoopGroup(num_threads=1)
    bootstrap = ClientBootstrap(elg, DefaultHostResolver(elg))
    options = SocketOptions()
    options.domain = SocketDomain.Local
    connection = Connection(host_name=socket_path, port=0, bootstrap=bootstrap, socket_options=options,
                            connect_message_amender=MessageAmendment.create_static_authtoken_amender(token))
    refused = (f"the Greengrass nucleus at {socket_path} refused the IPC connection: {TOKEN_ENV} is not a token "
               "it issued (was this component started by this nucleus?)")
    try:
        connection.connect(lifecycle).result(timeout_s)
    except concurrent.futures.TimeoutError:
        connection.close()
        raise GreengrassError(f"the Greengrass nucleus at {socket_path} did not accept the IPC connection "
                              f"within {timeout_s}s") from None
    except AccessDeniedError as exc:
        raise GreengrassError(refused) from exc
    except AwsCrtError as exc:
        # The nucleus hangs up right after a refusing CONNECT_ACK (the Java nucleus) or instead of
        # one (nucleus lite); when the hang-up is seen first the SDK reports the closed socket.
        if exc.name == "AWS_IO_SOCKET_CLOSED":
            raise GreengrassError(refused) from exc
        raise GreengrassError(f"cannot reach the Greengrass nucleus IPC socket {socket_path}: {_reason(exc)}") from exc
    except (RuntimeError, OSError) as exc:  # awscrt raises RuntimeError at once for a path that does not exist
        raise GreengrassError(f"cannot reach the Greengrass nucleus IPC socket {socket_path}: {exc}") from exc
    raw = GreengrassCoreIPCClient(connection)
    return IpcSession(GreengrassCoreIPCClientV2(client=raw), lifecycle, raw)


# -------------------------------------------------------------------- staying connected


@dataclass(frozen=True)
class ReconnectPolicy:
    """How the agent keeps its IPC session.

    Attributes:
        give_up_after_s: the nucleus unreachable this long ends the agent (non-zero exit) so that
            the nucleus, once back, restarts it with a fresh token.
        initial_delay_s: first wait between reconnection attempts; doubles up to max_delay_s.
        max_delay_s: the longest wait between attempts.
        check_s: how often the link is checked when no loss was reported.
    """

    give_up_after_s: float = 60.0
    initial_delay_s: float = 0.2
    max_delay_s: float = 5.0
    check_s: float = 1.0


class IpcLink:
    """The agent's IPC connection: a new session whenever the nucleus drops it, until a limit.

    Args:
        connect: opens a session; receives the callback to call when that session drops
            (``lambda on_lost: connect_ipc(timeout, on_lost=on_lost)``).
        policy: the backoff and the limit.
        on_give_up: called once, with the reason, when the nucleus stayed unreachable for
            policy.give_up_after_s; the caller stops the agent and exits non-zero.
    """

    def __init__(self, connect: Callable[[Callable[[], None]], IpcSession], policy: ReconnectPolicy,
                 on_give_up: Callable[[str], None]) -> None:
        self._connect = connect
        self.policy = policy
        self._on_give_up = on_give_up
        self._lock = threading.Lock()
        self._session: IpcSession | None = None
        self._listeners: list[Callable[[IpcSession], None]] = []
        self._lost = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.reconnects = 0
        self.gave_up: str | None = None

    def start(self) -> IpcSession:
        """Open the first session (raising GreengrassError as connect_ipc does) and start watching it."""
        session = self._connect(self._lost.set)
        with self._lock:
            self._session = session
        self._thread = threading.Thread(target=self._watch, name="qcsight-ipc-link", daemon=True)
        self._thread.start()
        return session

    @property
    def current(self) -> IpcSession | None:
        with self._lock:
            return self._session

    @property
    def connected(self) -> bool:
        session = self.current
        return session is not None and session.connected

    def on_reconnect(self, listener: Callable[[IpcSession], None]) -> None:
        """Call listener with each new session (subscriptions are per session and must be made again)."""
        with self._lock:
            self._listeners.append(listener)

    def close(self, timeout_s: float = 2.0) -> None:
        self._closed.set()
        self._lost.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._lock:
            session, self._session = self._session, None
        if session is not None:
            session.close(timeout_s)

    def _watch(self) -> None:
        while not self._closed.is_set():
            self._lost.wait(self.policy.check_s)
            self._lost.clear()
            if self._closed.is_set():
                return
            session = self.current
            if session is not None and session.connected:
                continue
            if not self._reconnect(session):
                return

    def _reconnect(self, old: IpcSession | None) -> bool:
        """Open a new session; False when the link is closed or the limit was reached."""
        started = time.monotonic()
        backoff = Backoff(self.policy.initial_delay_s, self.policy.max_delay_s)
        log.warning("Greengrass IPC connection down: reconnecting (giving up after %.0fs)",
                    self.policy.give_up_after_s)
        if old is not None:
            old.close(1.0)
        while not self._closed.is_set():
            try:
                session = self._connect(self._lost.set)
            except GreengrassError as exc:
                down = time.monotonic() - started
                if down >= self.policy.give_up_after_s:
                    self.gave_up = (f"the Greengrass nucleus IPC was unreachable for {down:.0f}s "
                                    f"(limit {self.policy.give_up_after_s:g}s): {exc}")
                    log.error("%s; exiting so that the nucleus restarts the agent", self.gave_up)
                    try:
                        self._on_give_up(self.gave_up)
                    except Exception:
                        log.exception("stopping the agent after the IPC limit")
                    return False
                delay = backoff.next()
                log.info("Greengrass IPC reconnection failed (%s); retrying in %.1fs", exc, delay)
                self._closed.wait(min(delay, max(0.0, self.policy.give_up_after_s - down)))
                continue
            with self._lock:
                self._session = session
                listeners = list(self._listeners)
            self.reconnects += 1
            log.info("Greengrass IPC reconnected after %.1fs (new session)", time.monotonic() - started)
            for listener in listeners:
                try:
                    listener(session)
                except Exception:  # one listener failing must not stop the others or the watcher
                    log.exception("re-establishing state on the new IPC session")
            return True
        return False


# -------------------------------------------------------------------- publishing


class IpcPublisher:
    """Publisher over Greengrass IPC ``PublishToIoTCore``; the nucleus forwards to IoT Core.

    A publish's future succeeds when the nucleus accepted the message: it then owns delivery (its
    spooler holds messages while the device is offline), so the outbox may delete it. Authorisation
    is the nucleus's: the component recipe's accessControl lists the topics it may publish to.

    Args:
        source: the session to publish on: an :class:`IpcSession`, or an :class:`IpcLink` whose
            current session is used for each publish (so publishing resumes after a reconnect).
    """

    def __init__(self, source: SessionSource) -> None:
        self._source = source
        self._closed = False

    @classmethod
    def from_session(cls, session: SessionSource) -> IpcPublisher:
        return cls(session)

    @property
    def connected(self) -> bool:
        session = self._source.current
        return not self._closed and session is not None and session.connected

    def connect(self, timeout_s: float) -> None:
        """The IPC client connects when it is built; this only checks the link is up.

        Raises:
            NotConnectedError: the publisher was closed or the nucleus dropped the connection (an
                :class:`IpcLink` reconnects by itself).
        """
        if not self.connected:
            raise NotConnectedError("the Greengrass IPC connection is down")

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> Future[None]:
        done: Future[None] = Future()
        if qos not in _QOS:
            done.set_exception(PublishError(f"cannot publish to {topic!r} with QoS {qos}: IoT Core takes 0 or 1"))
            return done
        session = self._source.current
        if self._closed or session is None or not session.connected:
            done.set_exception(NotConnectedError(f"cannot publish to {topic!r}: the Greengrass IPC connection "
                                                 "is down"))
            return done
        operation: Any = None
        try:
            operation = session.raw.new_publish_to_iot_core()
            operation.activate(PublishToIoTCoreRequest(topic_name=topic, qos=_QOS[qos], payload=payload))
            response = operation.get_response()
        except Exception as exc:  # the SDK raises synchronously when the connection is gone
            done.set_exception(_publish_error(topic, exc, operation))
            return done
        response.add_done_callback(lambda f: _settle(f, done, topic, operation))
        return done

    def close(self, timeout_s: float) -> None:
        """Stop publishing; the IPC connection itself belongs to the session that opened it."""
        self._closed = True


def _settle(sdk_future: Future[Any], done: Future[None], topic: str, operation: Any) -> None:
    # Runs on the SDK's event-loop thread: nothing may escape.
    try:
        exc = sdk_future.exception()
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(_publish_error(topic, exc, operation))
    except Exception as unexpected:
        log.exception("settling the publish to %s", topic)
        if not done.done():
            done.set_exception(PublishError(f"publish to {topic!r} failed: {unexpected!r}"))


def _publish_error(topic: str, exc: BaseException, operation: Any = None) -> PublishError:
    reason = _reason(exc, operation)
    if isinstance(exc, UnauthorizedError):
        return PublishError(
            f"Greengrass refused to publish to {topic!r} ({reason}): the component recipe's accessControl "
            "must allow aws.greengrass#PublishToIoTCore on this topic under aws.greengrass.ipc.mqttproxy")
    if isinstance(exc, InvalidArgumentsError):
        return PublishError(f"Greengrass rejected the publish to {topic!r} as invalid: {reason}")
    if isinstance(exc, ServiceError):
        return PublishError(f"Greengrass could not publish to {topic!r}: {reason}")
    if isinstance(exc, (ConnectionClosedError, StreamClosedError, EventStreamError, AwsCrtError)):
        return NotConnectedError(f"cannot publish to {topic!r}: Greengrass IPC connection lost ({reason})")
    return PublishError(f"publish to {topic!r} over Greengrass IPC failed: {type(exc).__name__}: {reason}")


# -------------------------------------------------------------------- requests and subscriptions


def _request(source: SessionSource, what: str, new_operation: Callable[[GreengrassCoreIPCClient], Any],
             request: Any, timeout_s: float) -> Any:
    """One request/response round trip on the current session.

    Raises:
        GreengrassError: no session, the nucleus refused (with its text), or no answer in time.
    """
    session = source.current
    if session is None or not session.connected:
        raise GreengrassError(f"cannot {what}: the Greengrass IPC connection is down")
    operation: Any = None
    try:
        operation = new_operation(session.raw)
        operation.activate(request)
        return operation.get_response().result(timeout_s)
    except concurrent.futures.TimeoutError:
        raise GreengrassError(f"Greengrass did not answer ({what}) within {timeout_s}s") from None
    except Exception as exc:
        raise GreengrassError(f"cannot {what} over IPC: {_reason(exc, operation)}") from exc


@dataclass
class _Subscription:
    what: str
    start: Callable[[GreengrassCoreIPCClientV2], Callable[..., tuple[Future[Any], Any]]]
    on_event: Callable[[Any], None]
    request: dict[str, Any]
    operation: Any = None


class _Subscriptions:
    """Subscriptions kept across sessions: made again on each new session."""

    def __init__(self, source: SessionSource, timeout_s: float) -> None:
        self._source = source
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._subs: list[_Subscription] = []

    def add(self, sub: _Subscription) -> None:
        """Subscribe now and keep the subscription for later sessions.

        Raises:
            GreengrassError: the nucleus refused (with its text) or did not confirm in time.
        """
        self._open(sub, self._source.current)
        with self._lock:
            self._subs.append(sub)

    def reopen(self, session: IpcSession) -> None:
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            try:
                self._open(sub, session)
            except GreengrassError as exc:
                log.error("re-subscribing to %s on the new IPC session: %s", sub.what, exc)

    def close(self) -> None:
        with self._lock:
            subs, self._subs = self._subs, []
        for sub in subs:
            if sub.operation is None:
                continue
            try:
                sub.operation.close().result(self._timeout_s)
            except Exception as exc:  # best effort; the stream may already be closed
                log.debug("closing a Greengrass IPC subscription: %r", exc)

    def _open(self, sub: _Subscription, session: IpcSession | None) -> None:
        if session is None or not session.connected:
            raise GreengrassError(f"cannot subscribe to {sub.what}: the Greengrass IPC connection is down")
        what = sub.what
        operation: Any = None
        try:
            response, operation = sub.start(session.client)(
                on_stream_event=lambda event: _guarded(what, sub.on_event, event),
                on_stream_error=lambda error: _stream_error(what, error),
                on_stream_closed=lambda: log.info("Greengrass closed the %s stream", what),
                **sub.request)
            response.result(self._timeout_s)
        except concurrent.futures.TimeoutError:
            raise GreengrassError(f"Greengrass did not confirm the subscription to {what} within "
                                  f"{self._timeout_s}s") from None
        except Exception as exc:
            raise GreengrassError(f"cannot subscribe to {what} over IPC: {_reason(exc, operation)}") from exc
        sub.operation = operation


class GreengrassConfig:
    """The component configuration, read and followed over IPC, with proposed updates validated.

    Args:
        source: the session (an :class:`IpcSession`, or an :class:`IpcLink`: subscriptions are then
            made again on each new session, and a change missed while disconnected is delivered).
        validate: raises ConfigError naming the field when a configuration is not allowed (the
            agent passes ``AgentConfig.from_dict``); its return value is ignored.
        timeout_s: the limit on each IPC round trip.
    """

    def __init__(self, source: SessionSource, validate: Callable[[dict[str, Any]], object],
                 timeout_s: float = 10.0) -> None:
        self._source = source
        self._validate = validate
        self._timeout_s = timeout_s
        self._subs = _Subscriptions(source, timeout_s)
        self._lock = threading.Lock()
        self._last_delivered: dict[str, Any] | None = None
        self._on_update: Callable[[dict[str, Any]], None] | None = None
        self._on_refused: Callable[[str], None] | None = None
        self.validates_proposals = False
        if isinstance(source, IpcLink):
            source.on_reconnect(self._reconnected)

    def get(self) -> dict[str, Any]:
        """The component configuration, without the nucleus's accessControl policies.

        Raises:
            GreengrassError: the nucleus refused or did not answer within timeout_s.
        """
        response = _request(self._source, "read the component configuration",
                            lambda raw: raw.new_get_configuration(), GetConfigurationRequest(key_path=[]),
                            self._timeout_s)
        value = response.value
        if not isinstance(value, dict):
            raise GreengrassError(f"Greengrass returned a component configuration that is not an object: {value!r}")
        return agent_settings(value)

    def subscribe(self, on_update: Callable[[dict[str, Any]], None], validate_proposals: bool = True,
                  on_refused: Callable[[str], None] | None = None) -> None:
        """Follow configuration changes, and (where the nucleus offers it) validate proposed deployments.

        on_update receives the whole new configuration after each change that passes validate; a
        change that fails it is logged (naming the field) and not delivered. One deployment can
        change several keys and the nucleus sends one event per key, so on_update is called only
        when the configuration differs from the last one delivered. Callbacks run on the SDK's
        executor thread; an exception from on_update is logged and the subscription continues.

        A nucleus without configuration validation (Greengrass nucleus lite) refuses that
        subscription: it is logged with the nucleus's reason, and updates are validated on receipt;
        on_refused then receives the reason of each refused update (the agent reports it in status).

        Raises:
            GreengrassError: the nucleus refused the update subscription or did not answer within timeout_s.
        """
        self._on_update = on_update
        self._on_refused = on_refused
        with self._lock:
            if self._last_delivered is None:
                try:
                    self._last_delivered = self.get()
                except GreengrassError as exc:
                    log.debug("configuration not read before subscribing: %s", exc)
        self._subs.add(_Subscription("configuration updates", lambda c: c.subscribe_to_configuration_update_async,
                                     lambda event: self._on_event(event, on_update), {"key_path": []}))
        if not validate_proposals:
            return
        try:
            self._subs.add(_Subscription("configuration validation",
                                         lambda c: c.subscribe_to_validate_configuration_updates_async,
                                         self._on_validate, {}))
        except GreengrassError as exc:
            log.info("this nucleus does not validate proposed configurations (%s); each configuration update "
                     "is validated when it arrives instead, and a bad one is refused", exc)
            self.validates_proposals = False
        else:
            self.validates_proposals = True

    def close(self) -> None:
        """Close the subscriptions.

        Call it before closing the session: once the session's executor is shut down the SDK can
        no longer deliver the stream-closed callbacks.
        """
        self._subs.close()

    def _reconnected(self, session: IpcSession) -> None:
        self._subs.reopen(session)
        if self._on_update is not None:
            self._deliver("while the IPC connection was down", self._on_update)

    def _on_event(self, event: Any, on_update: Callable[[dict[str, Any]], None]) -> None:
        changed = getattr(event.configuration_update_event, "key_path", None)
        self._deliver(f"key {changed}", on_update)

    def _deliver(self, changed: str, on_update: Callable[[dict[str, Any]], None]) -> None:
        config = self.get()
        try:
            self._validate(config)
        except ConfigError as exc:
            log.error("ignoring the configuration update (%s): %s", changed, exc)
            if self._on_refused is not None:
                self._on_refused(str(exc))
            return
        with self._lock:
            if config == self._last_delivered:
                return
            self._last_delivered = config
        log.info("component configuration changed (%s)", changed)
        on_update(config)

    def _on_validate(self, event: Any) -> None:
        proposal = event.validate_configuration_update_event
        deployment_id, configuration = proposal.deployment_id, proposal.configuration
        status, message = ConfigurationValidityStatus.ACCEPTED, None
        try:
            self._validate(agent_settings(configuration or {}))
        except ConfigError as exc:
            status, message = ConfigurationValidityStatus.REJECTED, str(exc)
        except Exception as exc:  # a validator bug must not let an unchecked configuration through
            log.exception("the configuration validator failed on deployment %s", deployment_id)
            status, message = ConfigurationValidityStatus.REJECTED, f"configuration validator failed: {exc!r}"
        log.log(logging.INFO if message is None else logging.WARNING, "deployment %s: configuration %s%s",
                deployment_id, status, f": {message}" if message else "")
        report = ConfigurationValidityReport(status=status, deployment_id=deployment_id, message=message)
        try:
            _request(self._source, f"report the validity of deployment {deployment_id}",
                     lambda raw: raw.new_send_configuration_validity_report(),
                     SendConfigurationValidityReportRequest(configuration_validity_report=report), self._timeout_s)
        except GreengrassError as exc:
            log.error("%s", exc)


class ComponentUpdates:
    """Defers a component update (a deployment restarting the agent) while a part is in flight.

    With the deployment's component update policy NOTIFY_COMPONENTS the Java nucleus tells
    subscribers before it stops them; the agent answers DeferComponentUpdate with a recheck time
    while ``busy()`` and with 0 (go ahead) otherwise, so the nucleus waits for the part in flight
    (up to the policy's timeout). Greengrass nucleus lite has no such notice: the subscription is
    refused and logged, and the agent still finishes the part in flight on SIGTERM.

    Args:
        source: the session or link (subscribed again on each new session).
        busy: whether a part is being judged or waits to be.
        recheck_ms: how long to ask the nucleus to wait before asking again.
        timeout_s: the limit on each IPC round trip.
    """

    def __init__(self, source: SessionSource, busy: Callable[[], bool], recheck_ms: int = 1000,
                 timeout_s: float = 10.0) -> None:
        self._source = source
        self._busy = busy
        self._recheck_ms = recheck_ms
        self._timeout_s = timeout_s
        self._subs = _Subscriptions(source, timeout_s)
        self.supported = False
        if isinstance(source, IpcLink):
            source.on_reconnect(self._subs.reopen)

    def subscribe(self) -> bool:
        """Subscribe to component-update notices; False (logged) where the nucleus has none."""
        try:
            self._subs.add(_Subscription("component updates", lambda c: c.subscribe_to_component_updates_async,
                                         self._on_event, {}))
        except GreengrassError as exc:
            log.info("this nucleus does not notify component updates (%s); a part in flight is finished on "
                     "SIGTERM instead", exc)
            self.supported = False
        else:
            self.supported = True
        return self.supported

    def close(self) -> None:
        self._subs.close()

    def _on_event(self, event: Any) -> None:
        pre = getattr(event, "pre_update_event", None)
        if pre is None:
            return
        busy = self._busy()
        recheck = self._recheck_ms if busy else 0
        log.info("deployment %s will update components: %s", pre.deployment_id,
                 f"deferring {recheck} ms (a part is in flight)" if busy else "ready")
        request = DeferComponentUpdateRequest(deployment_id=pre.deployment_id, recheck_after_ms=recheck,
                                              message="finishing the part in flight" if busy else None)
        try:
            _request(self._source, f"answer the update notice of deployment {pre.deployment_id}",
                     lambda raw: raw.new_defer_component_update(), request, self._timeout_s)
        except GreengrassError as exc:
            log.error("%s", exc)


def _guarded(what: str, handler: Callable[[Any], None], event: Any) -> None:
    # The SDK prints and re-raises callback exceptions on its executor thread; log them here instead.
    try:
        handler(event)
    except Exception:
        log.exception("handling a Greengrass %s event", what)


def _stream_error(what: str, error: Exception) -> bool:
    log.error("Greengrass %s stream error: %s", what, _reason(error))
    return False  # keep the subscription open; one bad event must not end it
