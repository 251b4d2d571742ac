"""Greengrass IPC: the publisher (PublishToIoTCore) and the component-configuration source.

Under Greengrass the nucleus already holds the device's IoT Core connection; the agent talks to it
over IPC on a Unix socket instead of opening a second MQTT connection. The nucleus tells a
component where the socket is and who it is through two environment variables,
``AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT`` and ``SVCUID``; :func:`connect_ipc` reads
them and connects the unmodified awsiotsdk client.

:class:`IpcPublisher` puts ``publish_to_iot_core`` behind the same :class:`Publisher` interface as
the MQTT transports. :class:`GreengrassConfig` reads the component configuration, follows its
updates and answers the nucleus's validation of a proposed deployment, so a bad configuration is
refused before it is applied, with a message naming the field.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

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
    InvalidArgumentsError,
    ServiceError,
    UnauthorizedError,
)

from qcsight_core.errors import ConfigError
from qcsight_edge.errors import EdgeError, NotConnectedError, PublishError

log = logging.getLogger(__name__)

SOCKET_ENV = "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT"
TOKEN_ENV = "SVCUID"
# The nucleus keeps the recipe's IPC authorisation policies inside the component configuration;
# they are Greengrass's, not settings of the agent, and the agent's validator refuses unknown keys.
NUCLEUS_KEYS = ("accessControl",)
_QOS = {0: QOS.AT_MOST_ONCE, 1: QOS.AT_LEAST_ONCE}


class GreengrassError(EdgeError):
    """The Greengrass nucleus cannot be reached over IPC, or refused a request."""


def agent_settings(configuration: Mapping[str, Any]) -> dict[str, Any]:
    """The component configuration without the keys the nucleus owns (accessControl)."""
    return {key: value for key, value in configuration.items() if key not in NUCLEUS_KEYS}


def _reason(exc: BaseException) -> str:
    """The SDK's modelled errors carry their text in .message and leave str() empty."""
    message = getattr(exc, "message", None)
    return str(message) if message else (str(exc) or type(exc).__name__)


class IpcLifecycle(LifecycleHandler):  # type: ignore[misc]  # awsiotsdk ships no type hints
    """Tracks whether the IPC connection is up; the SDK calls it from its event-loop thread."""

    def __init__(self) -> None:
        super().__init__()
        self._up = threading.Event()

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    def on_connect(self) -> None:
        self._up.set()

    def on_disconnect(self, reason: Exception | None) -> None:
        self._up.clear()
        if reason is not None:
            log.warning("Greengrass IPC connection lost: %r", reason)

    def on_error(self, error: Exception) -> bool:
        log.error("Greengrass IPC connection error, closing: %r", error)
        return True


@dataclass(frozen=True)
class IpcSession:
    """A connected IPC client and the state of its connection."""

    client: GreengrassCoreIPCClientV2
    lifecycle: IpcLifecycle

    def close(self, timeout_s: float) -> None:
        try:
            self.client.close(executor_wait=False).result(timeout_s)
        except Exception as exc:  # closing is best effort; the cause is logged, never raised
            log.warning("closing the Greengrass IPC connection: %r", exc)


def connect_ipc(timeout_s: float, environ: Mapping[str, str] | None = None) -> IpcSession:
    """Connect to the Greengrass nucleus with the socket path and token it gave this component.

    Args:
        timeout_s: how long to wait for the nucleus to accept the connection.
        environ: where to read the two variables; os.environ when None.

    Raises:
        GreengrassError: the variables are missing (not running under Greengrass), the socket
            cannot be reached, the nucleus refused the token, or it did not answer in time.
    """
    env = os.environ if environ is None else environ
    socket_path, token = env.get(SOCKET_ENV, ""), env.get(TOKEN_ENV, "")
    missing = [name for name, value in ((SOCKET_ENV, socket_path), (TOKEN_ENV, token)) if not value]
    if missing:
        raise GreengrassError(
            f"not running under Greengrass: {' and '.join(missing)} not set (the nucleus sets them for "
            "the components it runs); outside Greengrass use the mqtt transport")
    lifecycle = IpcLifecycle()
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
        # The nucleus hangs up right after a refusing CONNECT_ACK; when the hang-up is seen first
        # the SDK reports the closed socket instead of the refusal.
        if exc.name == "AWS_IO_SOCKET_CLOSED":
            raise GreengrassError(refused) from exc
        raise GreengrassError(f"cannot reach the Greengrass nucleus IPC socket {socket_path}: {_reason(exc)}") from exc
    except (RuntimeError, OSError) as exc:  # awscrt raises RuntimeError at once for a path that does not exist
        raise GreengrassError(f"cannot reach the Greengrass nucleus IPC socket {socket_path}: {exc}") from exc
    return IpcSession(GreengrassCoreIPCClientV2(client=GreengrassCoreIPCClient(connection)), lifecycle)


class IpcPublisher:
    """Publisher over Greengrass IPC ``PublishToIoTCore``; the nucleus forwards to IoT Core.

    A publish's future succeeds when the nucleus accepted the message: it then owns delivery (its
    spooler holds messages while the device is offline), so the outbox may delete it. Authorisation
    is the nucleus's: the component recipe's accessControl lists the topics it may publish to.

    Args:
        client: a connected GreengrassCoreIPCClientV2 (see :func:`connect_ipc`).
        lifecycle: the connection's state tracker; when None the link counts as up until close().
    """

    def __init__(self, client: GreengrassCoreIPCClientV2, lifecycle: IpcLifecycle | None = None) -> None:
        self._client = client
        self._lifecycle = lifecycle
        self._closed = False

    @classmethod
    def from_session(cls, session: IpcSession) -> IpcPublisher:
        return cls(session.client, session.lifecycle)

    @property
    def connected(self) -> bool:
        return not self._closed and (self._lifecycle is None or self._lifecycle.connected)

    def connect(self, timeout_s: float) -> None:
        """The IPC client connects when it is built; this only checks the link is still up.

        Raises:
            NotConnectedError: the publisher was closed or the nucleus dropped the connection;
                reconnecting takes a new session (connect_ipc).
        """
        if not self.connected:
            raise NotConnectedError("the Greengrass IPC connection is closed; open a new session with connect_ipc")

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> Future[None]:
        done: Future[None] = Future()
        if qos not in _QOS:
            done.set_exception(PublishError(f"cannot publish to {topic!r} with QoS {qos}: IoT Core takes 0 or 1"))
            return done
        if not self.connected:
            done.set_exception(NotConnectedError(f"cannot publish to {topic!r}: the Greengrass IPC connection "
                                                 "is closed"))
            return done
        try:
            sdk_future = self._client.publish_to_iot_core_async(topic_name=topic, qos=_QOS[qos], payload=payload)
        except Exception as exc:  # the SDK raises synchronously when the connection is gone
            done.set_exception(_publish_error(topic, exc))
            return done
        sdk_future.add_done_callback(lambda f: _settle(f, done, topic))
        return done

    def close(self, timeout_s: float) -> None:
        """Stop publishing; the IPC connection itself belongs to the session that opened it."""
        self._closed = True


def _settle(sdk_future: Future[Any], done: Future[None], topic: str) -> None:
    # Runs on the SDK's event-loop thread: nothing may escape.
    try:
        exc = sdk_future.exception()
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(_publish_error(topic, exc))
    except Exception as unexpected:
        log.exception("settling the publish to %s", topic)
        if not done.done():
            done.set_exception(PublishError(f"publish to {topic!r} failed: {unexpected!r}"))


def _publish_error(topic: str, exc: BaseException) -> PublishError:
    if isinstance(exc, UnauthorizedError):
        return PublishError(
            f"Greengrass refused to publish to {topic!r} ({_reason(exc)}): the component recipe's accessControl "
            "must allow aws.greengrass#PublishToIoTCore on this topic under aws.greengrass.ipc.mqttproxy")
    if isinstance(exc, InvalidArgumentsError):
        return PublishError(f"Greengrass rejected the publish to {topic!r} as invalid: {_reason(exc)}")
    if isinstance(exc, ServiceError):
        return PublishError(f"Greengrass could not publish to {topic!r}: {_reason(exc)}")
    if isinstance(exc, (ConnectionClosedError, StreamClosedError, EventStreamError, AwsCrtError)):
        return NotConnectedError(f"cannot publish to {topic!r}: Greengrass IPC connection lost ({_reason(exc)})")
    return PublishError(f"publish to {topic!r} over Greengrass IPC failed: {type(exc).__name__}: {_reason(exc)}")


class GreengrassConfig:
    """The component configuration, read and followed over IPC, with proposed updates validated.

    Args:
        client: a connected GreengrassCoreIPCClientV2.
        validate: raises ConfigError naming the field when a configuration is not allowed (the
            agent passes ``AgentConfig.from_dict``); its return value is ignored.
        timeout_s: the limit on each IPC round trip.
    """

    def __init__(self, client: GreengrassCoreIPCClientV2, validate: Callable[[dict[str, Any]], object],
                 timeout_s: float = 10.0) -> None:
        self._client = client
        self._validate = validate
        self._timeout_s = timeout_s
        self._operations: list[Any] = []
        self._lock = threading.Lock()
        self._last_delivered: dict[str, Any] | None = None

    def get(self) -> dict[str, Any]:
        """The component configuration, without the nucleus's accessControl policies.

        Raises:
            GreengrassError: the nucleus refused or did not answer within timeout_s.
        """
        try:
            response = self._client.get_configuration_async(key_path=[]).result(self._timeout_s)
        except concurrent.futures.TimeoutError:
            raise GreengrassError(f"Greengrass did not return the component configuration within "
                                  f"{self._timeout_s}s") from None
        except Exception as exc:
            raise GreengrassError(f"cannot read the component configuration over IPC: {_reason(exc)}") from exc
        value = response.value
        if not isinstance(value, dict):
            raise GreengrassError(f"Greengrass returned a component configuration that is not an object: {value!r}")
        return agent_settings(value)

    def subscribe(self, on_update: Callable[[dict[str, Any]], None], validate_proposals: bool = True) -> None:
        """Follow configuration changes, and (by default) answer the validation of proposed deployments.

        on_update receives the whole new configuration after each change that passes validate; a
        change that fails it is logged (naming the field) and not delivered. One deployment can
        change several keys and the nucleus sends one event per key, so on_update is called only
        when the configuration differs from the last one delivered. Callbacks run on the SDK's
        executor thread; an exception from on_update is logged and the subscription continues.

        Raises:
            GreengrassError: the nucleus refused a subscription or did not answer within timeout_s.
        """
        self._subscribe("configuration updates", self._client.subscribe_to_configuration_update_async,
                        lambda event: self._on_update(event, on_update), key_path=[])
        if validate_proposals:
            self._subscribe("configuration validation", self._client.subscribe_to_validate_configuration_updates_async,
                            self._on_validate)

    def close(self) -> None:
        """Close the subscriptions.

        Call it before closing the session: once the session's executor is shut down the SDK can
        no longer deliver the stream-closed callbacks.
        """
        with self._lock:
            operations, self._operations = self._operations, []
        for operation in operations:
            try:
                operation.close().result(self._timeout_s)
            except Exception as exc:  # best effort; the stream may already be closed
                log.debug("closing a Greengrass IPC subscription: %r", exc)

    def _subscribe(self, what: str, start: Callable[..., tuple[Future[Any], Any]],
                   on_event: Callable[[Any], None], **request: Any) -> None:
        try:
            response, operation = start(on_stream_event=lambda event: _guarded(what, on_event, event),
                                        on_stream_error=lambda error: _stream_error(what, error),
                                        on_stream_closed=lambda: log.warning("Greengrass closed the %s stream", what),
                                        **request)
            response.result(self._timeout_s)
        except concurrent.futures.TimeoutError:
            raise GreengrassError(f"Greengrass did not confirm the subscription to {what} within "
                                  f"{self._timeout_s}s") from None
        except Exception as exc:
            raise GreengrassError(f"cannot subscribe to {what} over IPC: {_reason(exc)}") from exc
        with self._lock:
            self._operations.append(operation)

    def _on_update(self, event: Any, on_update: Callable[[dict[str, Any]], None]) -> None:
        changed = getattr(event.configuration_update_event, "key_path", None)
        config = self.get()
        try:
            self._validate(config)
        except ConfigError as exc:
            log.error("ignoring the configuration update (key %s): %s", changed, exc)
            return
        with self._lock:
            if config == self._last_delivered:
                return
            self._last_delivered = config
        log.info("component configuration changed (key %s)", changed)
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
            self._client.send_configuration_validity_report_async(
                configuration_validity_report=report).result(self._timeout_s)
        except Exception as exc:
            log.error("could not send the validity report for deployment %s: %s", deployment_id, _reason(exc))


def _guarded(what: str, handler: Callable[[Any], None], event: Any) -> None:
    # The SDK prints and re-raises callback exceptions on its executor thread; log them here instead.
    try:
        handler(event)
    except Exception:
        log.exception("handling a Greengrass %s event", what)


def _stream_error(what: str, error: Exception) -> bool:
    log.error("Greengrass %s stream error: %s", what, _reason(error))
    return False  # keep the subscription open; one bad event must not end it
