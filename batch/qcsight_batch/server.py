"""The SageMaker container contract over HTTP: GET /ping, POST /invocations (and GET /execution-parameters).

A small threaded HTTP/1.1 server around handler.transform(), for the Batch Transform
container (`qcsight batch serve`, what `docker run IMAGE serve` starts) and for tests that
exercise the handler with real image bytes over a real socket. Connections and concurrent
inferences are both bounded; a request that cannot get a slot in time is answered 503.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from qcsight_batch.errors import PayloadTooLargeError, RequestError
from qcsight_batch.handler import LoadedModel, transform
from qcsight_core.errors import ConfigError, QcsightError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """Container server settings (SageMaker passes the first three as SAGEMAKER_* variables).

    Attributes:
        host: address to bind; SageMaker expects 0.0.0.0.
        port: port to bind; 0 picks a free one (tests).
        max_payload_mb: the largest request body accepted (Batch Transform's MaxPayloadInMB).
        max_concurrent: inferences run at once (MaxConcurrentTransforms).
        max_connections: open connections served at once (keep-alive connections hold one).
        request_timeout_s: idle or slow sockets are closed after this long.
        slot_timeout_s: how long a request waits for an inference slot before 503.
    """

    host: str = "0.0.0.0"
    port: int = 8080
    max_payload_mb: float = 6.0
    max_concurrent: int = 2
    max_connections: int = 32
    request_timeout_s: float = 60.0
    slot_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("port", self.port, "0 to 65535")
        if not 0 < self.max_payload_mb <= 100:
            raise ConfigError("max_payload_mb", self.max_payload_mb, "more than 0 and at most 100")
        if self.max_concurrent < 1 or self.max_connections < self.max_concurrent:
            raise ConfigError(
                "max_concurrent/max_connections", (self.max_concurrent, self.max_connections),
                "at least 1, with max_connections >= max_concurrent",
            )

    @property
    def max_payload_bytes(self) -> int:
        return int(self.max_payload_mb * 1024 * 1024)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _BoundedServer

    def setup(self) -> None:
        super().setup()
        # Idle keep-alive connections and slow senders give their connection slot back.
        self.connection.settimeout(self.server.config.request_timeout_s)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, close: bool = False) -> None:
        if close:
            self.close_connection = True
        body = json.dumps({"error": message, "status": status}).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/ping":
            self._send(HTTPStatus.OK, b"{}")
        elif path == "/execution-parameters":
            config = self.server.config
            params = {
                "MaxConcurrentTransforms": config.max_concurrent,
                "BatchStrategy": "SINGLE_RECORD",
                "MaxPayloadInMB": max(1, int(config.max_payload_mb)),
            }
            self._send(HTTPStatus.OK, json.dumps(params).encode("utf-8"))
        elif path == "/invocations":
            self._error(HTTPStatus.METHOD_NOT_ALLOWED, "use POST for /invocations")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such path {path}; the container serves /ping and /invocations")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path != "/invocations":
            self._error(HTTPStatus.NOT_FOUND, f"no such path {path}; POST to /invocations", close=True)
            return
        try:
            body = self._read_body()
        except RequestError as exc:
            # The unread body would be taken for the next request: drop the connection.
            self._error(exc.status, str(exc), close=True)
            return
        if not self.server.inference_slots.acquire(timeout=self.server.config.slot_timeout_s):
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, "all inference slots are busy; retry later")
            return
        try:
            response, response_type = transform(
                self.server.model, body, self.headers.get("Content-Type"), self.headers.get("Accept")
            )
        except RequestError as exc:
            self._error(exc.status, str(exc))
            return
        except QcsightError as exc:
            log.exception("inference failed")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc))
            return
        except Exception:  # the server boundary: answer 500 and keep serving
            log.exception("unexpected error in /invocations")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the container log")
            return
        finally:
            self.server.inference_slots.release()
        self._send(HTTPStatus.OK, response, response_type)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise RequestError("chunked request bodies are not supported; send Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            error = RequestError("a Content-Length header is required")
            error.status = HTTPStatus.LENGTH_REQUIRED
            raise error
        try:
            length = int(raw)
        except ValueError as exc:
            raise RequestError(f"Content-Length {raw!r} is not a number") from exc
        if length < 0:
            raise RequestError(f"Content-Length {length} is negative")
        limit = self.server.config.max_payload_bytes
        if length > limit:
            raise PayloadTooLargeError(f"request body of {length} bytes exceeds the {limit}-byte limit")
        body = self.rfile.read(length)
        if len(body) != length:
            raise RequestError(f"request body ended after {len(body)} of {length} bytes")
        return body


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most max_connections of them."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, config: ServerConfig, model: LoadedModel) -> None:
        self.config = config
        self.model = model
        self.inference_slots = threading.BoundedSemaphore(config.max_concurrent)
        self._connection_slots = threading.BoundedSemaphore(config.max_connections)
        super().__init__((config.host, config.port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._connection_slots.acquire(timeout=self.config.slot_timeout_s):
            log.warning("refusing %s: %d connections already open", client_address, self.config.max_connections)
            with contextlib.suppress(OSError):
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_slots.release()


class InferenceServer:
    """The container's HTTP server; start() runs it on a thread, serve_forever() on the caller's."""

    def __init__(self, model: LoadedModel, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self._server = _BoundedServer(self.config, model)
        self._thread: threading.Thread | None = None
        self._serving = threading.Event()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"

    def serve_forever(self) -> None:
        log.info("serving %s %s on %s", self._server.model.info.name, self._server.model.info.version, self.url)
        self._serving.set()
        try:
            self._server.serve_forever(poll_interval=0.2)
        finally:
            self._serving.clear()

    def start(self) -> InferenceServer:
        self._thread = threading.Thread(target=self.serve_forever, name="qcsight-inference-server", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, close the socket and wait (bounded) for the serving thread.

        Safe to call from a signal handler's helper thread while serve_forever() runs on the main one.
        """
        if self._serving.is_set():
            self._server.shutdown()  # returns once serve_forever's loop has seen the request (one poll)
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._server.server_close()

    def __enter__(self) -> InferenceServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

