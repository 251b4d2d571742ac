"""The SageMaker container contract over HTTP: GET /ping, POST /invocations (and GET /execution-parameters).

A small asyncio HTTP/1.1 server around handler.transform(), for the Batch Transform
container (`qcsight batch serve`, what `docker run IMAGE serve` starts) and for tests that
exercise the handler with real image bytes over a real socket.

Slow or hostile clients cannot take the server away from SageMaker:

* a connection costs a coroutine, not a thread, and must deliver its request line and
  headers within header_timeout_s and its body within body_timeout_s (a slowloris client
  is cut off with 408 however steadily it trickles bytes);
* inference slots (max_concurrent threads) are taken only once a whole body has arrived,
  and at most max_concurrent + max_waiting bodies are held in memory at once (503 beyond);
* /ping is answered on the event loop, never waiting for a slot, and even when every
  connection is taken (up to max_connections extra connections may still ask for /ping);
* bad client input is a 4xx with a one-line reason: never a 500, a traceback or a path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus

from qcsight_batch.errors import RequestError
from qcsight_batch.handler import ServedModel, transform
from qcsight_core.checks import check_int, check_number
from qcsight_core.errors import ConfigError, QcsightError

log = logging.getLogger(__name__)

# Variables the SageMaker platform itself puts into an inference container's environment:
# SAGEMAKER_BATCH (=true) for Batch Transform, SAGEMAKER_BIND_TO_PORT and
# SAGEMAKER_SAFE_PORT_RANGE for inference pipelines and multi-container endpoints.
SAGEMAKER_ENV_MARKERS = ("SAGEMAKER_BATCH", "SAGEMAKER_BIND_TO_PORT", "SAGEMAKER_SAFE_PORT_RANGE")
LOOPBACK = "127.0.0.1"
ALL_INTERFACES = "0.0.0.0"
_METHODS = ("GET", "HEAD", "POST")


def in_sagemaker(environ: Mapping[str, str]) -> bool:
    """True when the platform's own variables say SageMaker started this container."""
    return any(environ.get(name) for name in SAGEMAKER_ENV_MARKERS)


def default_host(environ: Mapping[str, str]) -> str:
    """0.0.0.0 inside SageMaker (the platform connects from outside the container), else loopback only."""
    return ALL_INTERFACES if in_sagemaker(environ) else LOOPBACK


@dataclass(frozen=True)
class ServerConfig:
    """Container server settings (SageMaker passes payload, concurrency and port as SAGEMAKER_* variables).

    Attributes:
        host: address to bind; loopback unless the caller asks (default_host() for the container).
        port: port to bind; 0 picks a free one (tests).
        max_payload_mb: the largest request body accepted (Batch Transform's MaxPayloadInMB).
        max_concurrent: inferences run at once (MaxConcurrentTransforms).
        max_waiting: requests whose body is held while they wait for an inference slot.
        max_connections: open connections; as many again may connect only to ask for /ping.
        header_timeout_s: the request line and headers must have arrived this long after the
            first byte of the request.
        body_timeout_s: the body must have arrived this long after the headers.
        idle_timeout_s: a keep-alive connection with no new request is closed after this long.
        slot_timeout_s: how long a request with its body waits for an inference slot before 503.
        max_header_bytes: the largest request line plus headers (431 beyond).
    """

    host: str = LOOPBACK
    port: int = 8080
    max_payload_mb: float = 6.0
    max_concurrent: int = 2
    max_waiting: int = 4
    max_connections: int = 256
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    idle_timeout_s: float = 60.0
    slot_timeout_s: float = 30.0
    max_header_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        check_int("port", self.port, 0, 65535)
        check_number("max_payload_mb", self.max_payload_mb, 0, 100, open_low=True)
        if self.max_concurrent < 1 or self.max_connections < self.max_concurrent:
            raise ConfigError(
                "max_concurrent/max_connections", (self.max_concurrent, self.max_connections),
                "at least 1, with max_connections >= max_concurrent",
            )
        check_int("max_waiting", self.max_waiting, 0)
        for name in ("header_timeout_s", "body_timeout_s", "idle_timeout_s", "slot_timeout_s"):
            check_number(name, getattr(self, name), 0, open_low=True)

    @property
    def max_payload_bytes(self) -> int:
        return int(self.max_payload_mb * 1024 * 1024)


class _HttpError(Exception):
    """A request the server answers with an error status, then closes the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Gone(Exception):
    """The client closed the connection or went quiet between requests."""


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    version: str
    headers: Mapping[str, str]  # names lower-cased

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return connection == "keep-alive"
        return connection != "close"


def _parse_head(head: bytes) -> _Request:
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError as exc:
        raise _HttpError(HTTPStatus.BAD_REQUEST, "request line and headers must be ASCII") from exc
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1].startswith("/"):
        raise _HttpError(HTTPStatus.BAD_REQUEST, f"malformed request line {lines[0][:80]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _HttpError(HTTPStatus.BAD_REQUEST, f"unsupported protocol {version[:20]!r}; speak HTTP/1.1")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _HttpError(HTTPStatus.BAD_REQUEST, f"malformed header line {line[:80]!r}")
        key = name.lower()
        if key == "content-length" and key in headers and headers[key] != value.strip():
            raise _HttpError(HTTPStatus.BAD_REQUEST, "conflicting Content-Length headers")
        headers[key] = value.strip()
    return _Request(method, target.split("?", 1)[0], version, headers)


def _response(status: int, body: bytes, content_type: str, keep_alive: bool, head_only: bool = False) -> bytes:
    phrase = HTTPStatus(status).phrase
    lines = [f"HTTP/1.1 {status} {phrase}", f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    if not keep_alive:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (b"" if head_only else body)


def _error_body(status: int, message: str) -> bytes:
    return json.dumps({"error": message, "status": status}).encode("utf-8")


class InferenceServer:
    """The container's HTTP server; start() runs it on a thread, serve_forever() on the caller's.

    The socket is bound in the constructor, so a bad address fails at once and address/url
    are known before serving starts.
    """

    def __init__(self, model: ServedModel, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self.model = model
        self._socket = socket.create_server((self.config.host, self.config.port), backlog=128)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._started = threading.Event()
        self._finished = threading.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(self.config.max_concurrent,
                                                               thread_name_prefix="qcsight-inference")
        self._slots: asyncio.Semaphore | None = None
        self._connections = 0
        self._ping_only = 0
        self._holding_bodies = 0

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._socket.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{LOOPBACK if host in (ALL_INTERFACES, '') else host}:{port}"

    def serve_forever(self) -> None:
        """Serve until stop() is called (from another thread or a signal handler's helper thread)."""
        log.info("serving %s %s on %s", self.model.info.name, self.model.info.version, self.url)
        try:
            asyncio.run(self._main())
        finally:
            self._finished.set()

    def start(self) -> InferenceServer:
        self._thread = threading.Thread(target=self.serve_forever, name="qcsight-inference-server", daemon=True)
        self._thread.start()
        if not self._started.wait(10.0):
            raise RuntimeError("the inference server did not start within 10 s")
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, close every connection and wait (bounded) for the serving loop to end."""
        loop, stop_event = self._loop, self._stop_event
        if loop is not None and stop_event is not None and not self._finished.is_set():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(stop_event.set)
            self._finished.wait(timeout_s)
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._socket.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> InferenceServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._slots = asyncio.Semaphore(self.config.max_concurrent)
        tasks: set[asyncio.Task[None]] = set()

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                tasks.add(task)
            try:
                await self._connection(reader, writer)
            finally:
                if task is not None:
                    tasks.discard(task)

        server = await asyncio.start_server(accept, sock=self._socket, limit=self.config.max_header_bytes)
        self._started.set()
        try:
            await self._stop_event.wait()
        finally:
            server.close()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------ one connection

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        config = self.config
        ping_only = self._connections >= config.max_connections
        if ping_only and self._ping_only >= config.max_connections:
            writer.close()
            return
        if ping_only:
            self._ping_only += 1
        else:
            self._connections += 1
        try:
            while True:
                try:
                    request = await self._read_head(reader)
                except _Gone:
                    return
                except _HttpError as exc:
                    await self._send(writer, _response(exc.status, _error_body(exc.status, exc.message),
                                                       "application/json", keep_alive=False))
                    return
                if ping_only and request.path != "/ping":
                    await self._send_error(writer, HTTPStatus.SERVICE_UNAVAILABLE,
                                           f"all {config.max_connections} connections are taken; retry later")
                    return
                if not await self._dispatch(request, reader, writer) or ping_only:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            if ping_only:
                self._ping_only -= 1
            else:
                self._connections -= 1
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _read_head(self, reader: asyncio.StreamReader) -> _Request:
        try:
            first = await asyncio.wait_for(reader.readexactly(1), self.config.idle_timeout_s)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
            raise _Gone() from exc
        try:
            rest = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.config.header_timeout_s)
        except asyncio.TimeoutError as exc:
            raise _HttpError(HTTPStatus.REQUEST_TIMEOUT,
                             f"request headers not complete within {self.config.header_timeout_s:g} s") from exc
        except asyncio.LimitOverrunError as exc:
            raise _HttpError(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                             f"request line and headers exceed {self.config.max_header_bytes} bytes") from exc
        except asyncio.IncompleteReadError as exc:
            raise _Gone() from exc
        return _parse_head(first + rest)

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        try:
            await asyncio.wait_for(writer.drain(), self.config.body_timeout_s)
        except asyncio.TimeoutError as exc:
            raise ConnectionError("client did not read the response in time") from exc

    async def _send_error(self, writer: asyncio.StreamWriter, status: int, message: str,
                          keep_alive: bool = False) -> None:
        await self._send(writer, _response(status, _error_body(status, message), "application/json", keep_alive))

    async def _dispatch(self, request: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; True when the connection may serve another."""
        keep = request.keep_alive
        if request.method not in _METHODS:
            await self._send_error(writer, HTTPStatus.METHOD_NOT_ALLOWED,
                                   f"method {request.method[:16]} is not served; use GET or POST")
            return False
        if request.method == "POST" and request.path != "/invocations":
            await self._send_error(writer, HTTPStatus.NOT_FOUND, f"no such path {request.path[:200]}; "
                                   "POST to /invocations")
            return False
        if request.method in ("GET", "HEAD"):
            if "content-length" in request.headers or "transfer-encoding" in request.headers:
                await self._send_error(writer, HTTPStatus.BAD_REQUEST, f"{request.method} takes no body")
                return False
            await self._send(writer, self._get(request, keep))
            return keep
        return await self._invocations(request, reader, writer)

    def _get(self, request: _Request, keep: bool) -> bytes:
        head_only = request.method == "HEAD"
        if request.path == "/ping":
            return _response(HTTPStatus.OK, b"{}", "application/json", keep, head_only)
        if request.path == "/execution-parameters":
            params = {
                "MaxConcurrentTransforms": self.config.max_concurrent,
                "BatchStrategy": "SINGLE_RECORD",
                "MaxPayloadInMB": max(1, int(self.config.max_payload_mb)),
            }
            return _response(HTTPStatus.OK, json.dumps(params).encode("utf-8"), "application/json", keep, head_only)
        if request.path == "/invocations":
            status, message = HTTPStatus.METHOD_NOT_ALLOWED, "use POST for /invocations"
        else:
            status = HTTPStatus.NOT_FOUND
            message = f"no such path {request.path[:200]}; the container serves /ping and /invocations"
        return _response(status, _error_body(status, message), "application/json", keep, head_only)

    def _content_length(self, request: _Request) -> int:
        if "transfer-encoding" in request.headers:
            raise _HttpError(HTTPStatus.LENGTH_REQUIRED,
                             "chunked request bodies are not supported; send Content-Length")
        raw = request.headers.get("content-length")
        if raw is None:
            raise _HttpError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        if not raw.isdigit() or len(raw) > 15:
            raise _HttpError(HTTPStatus.BAD_REQUEST, f"Content-Length {raw[:20]!r} is not a byte count")
        length = int(raw)
        limit = self.config.max_payload_bytes
        if length > limit:
            raise _HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                             f"request body of {length} bytes exceeds the {limit}-byte limit")
        return length

    async def _invocations(self, request: _Request, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> bool:
        config = self.config
        try:
            length = self._content_length(request)
        except _HttpError as exc:
            # The unread body would be taken for the next request: answer and drop the connection.
            await self._send_error(writer, exc.status, exc.message)
            return False
        if self._holding_bodies >= config.max_concurrent + config.max_waiting:
            await self._send_error(writer, HTTPStatus.SERVICE_UNAVAILABLE,
                                   f"{self._holding_bodies} requests are already queued; retry later")
            return False
        self._holding_bodies += 1
        try:
            if request.headers.get("expect", "").lower() == "100-continue":
                await self._send(writer, b"HTTP/1.1 100 Continue\r\n\r\n")
            try:
                body = await asyncio.wait_for(reader.readexactly(length), config.body_timeout_s)
            except asyncio.TimeoutError:
                await self._send_error(writer, HTTPStatus.REQUEST_TIMEOUT,
                                       f"request body not complete within {config.body_timeout_s:g} s")
                return False
            status, payload, content_type = await self._infer(request, body)
        finally:
            self._holding_bodies -= 1
        await self._send(writer, _response(status, payload, content_type, request.keep_alive))
        return request.keep_alive

    async def _infer(self, request: _Request, body: bytes) -> tuple[int, bytes, str]:
        assert self._slots is not None and self._loop is not None
        try:
            await asyncio.wait_for(self._slots.acquire(), self.config.slot_timeout_s)
        except asyncio.TimeoutError:
            status = HTTPStatus.SERVICE_UNAVAILABLE
            return status, _error_body(status, "all inference slots are busy; retry later"), "application/json"
        try:
            response, response_type = await self._loop.run_in_executor(
                self._executor, transform, self.model, body, request.headers.get("content-type"),
                request.headers.get("accept"),
            )
        except RequestError as exc:
            return exc.status, _error_body(exc.status, str(exc)), "application/json"
        except QcsightError as exc:
            log.exception("inference failed")
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            return status, _error_body(status, str(exc)), "application/json"
        except Exception:  # the server boundary: answer 500 and keep serving
            log.exception("unexpected error in /invocations")
            status = HTTPStatus.INTERNAL_SERVER_ERROR
            return status, _error_body(status, "internal error; see the container log"), "application/json"
        finally:
            self._slots.release()
        return HTTPStatus.OK, response, response_type
