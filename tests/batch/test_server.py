"""The container contract over real HTTP on loopback: /ping, /invocations with real JPEG/PNG bytes, error
statuses, and clients that are slow, malformed or send pixel bombs."""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from qcsight_batch.cli import get_args_parser
from qcsight_batch.handler import RequestPolicy, load_model
from qcsight_batch.server import SAGEMAKER_ENV_MARKERS, InferenceServer, ServerConfig, default_host
from qcsight_core.bundle import Bundle
from tests.batch.conftest import BRIGHT, DARK
from tests.helpers import bombs


def _image_bytes(value: int, ext: str) -> bytes:
    rng = np.random.default_rng(value)
    pixels = np.clip(value + rng.integers(-8, 9, (96, 128, 3)), 0, 255).astype(np.uint8)
    ok, data = cv2.imencode(ext, pixels)
    assert ok
    return data.tobytes()


@pytest.fixture
def server(bundle: Bundle) -> Iterator[InferenceServer]:
    config = ServerConfig(host="127.0.0.1", port=0, max_payload_mb=0.05, max_concurrent=2)
    with InferenceServer(load_model(str(bundle.path)), config) as running:
        yield running


def _request(server: InferenceServer, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    host, port = server.address
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def test_ping(server: InferenceServer) -> None:
    status, _, _ = _request(server, "GET", "/ping")
    assert status == 200


@pytest.mark.parametrize(("ext", "content_type", "value", "verdict"), [
    (".jpg", "image/jpeg", BRIGHT, "defect"),
    (".png", "image/png", DARK, "good"),
    (".jpg", "application/x-image", DARK, "good"),
])
def test_invocations_with_real_image_bytes(server: InferenceServer, ext: str, content_type: str, value: int,
                                           verdict: str) -> None:
    status, headers, body = _request(server, "POST", "/invocations", _image_bytes(value, ext),
                                     {"Content-Type": content_type, "Accept": "application/json"})
    assert status == 200 and headers["content-type"] == "application/json"
    (result,) = json.loads(body)
    assert result["verdict"] == verdict and result["model_version"] == "1"


def test_json_batch_answered_as_jsonlines(server: InferenceServer) -> None:
    payload = json.dumps([base64.b64encode(_image_bytes(v, ".jpg")).decode() for v in (DARK, BRIGHT)]).encode()
    status, headers, body = _request(server, "POST", "/invocations", payload,
                                     {"Content-Type": "application/json", "Accept": "application/jsonlines"})
    assert status == 200 and headers["content-type"] == "application/jsonlines"
    assert [json.loads(line)["verdict"] for line in body.splitlines()] == ["good", "defect"]


def test_error_statuses(server: InferenceServer) -> None:
    jpeg = _image_bytes(BRIGHT, ".jpg")
    status, _, body = _request(server, "POST", "/invocations", b"a,b\n", {"Content-Type": "text/csv"})
    assert status == 415 and "text/csv" in json.loads(body)["error"]
    status, _, body = _request(server, "POST", "/invocations", b"plain text, not a picture",
                               {"Content-Type": "image/jpeg"})
    assert status == 400 and "not a decodable image" in json.loads(body)["error"]
    status, _, _ = _request(server, "POST", "/invocations", jpeg[: len(jpeg) // 2], {"Content-Type": "image/jpeg"})
    assert status == 400
    status, _, _ = _request(server, "POST", "/invocations", jpeg, {"Content-Type": "image/jpeg", "Accept": "text/csv"})
    assert status == 406
    status, _, body = _request(server, "POST", "/invocations", b"\xff" * 60_000, {"Content-Type": "image/jpeg"})
    assert status == 413 and "limit" in json.loads(body)["error"]
    assert _request(server, "GET", "/nowhere")[0] == 404
    assert _request(server, "GET", "/invocations")[0] == 405
    assert _request(server, "GET", "/ping")[0] == 200, "the server keeps serving after errors"


def test_keep_alive_and_execution_parameters(server: InferenceServer) -> None:
    host, port = server.address
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        for value, verdict in ((BRIGHT, "defect"), (DARK, "good")):
            connection.request("POST", "/invocations", body=_image_bytes(value, ".png"),
                               headers={"Content-Type": "image/png"})
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read())[0]["verdict"] == verdict
        connection.request("GET", "/execution-parameters")
        response = connection.getresponse()
        params = json.loads(response.read())
    finally:
        connection.close()
    assert params == {"MaxConcurrentTransforms": 2, "BatchStrategy": "SINGLE_RECORD", "MaxPayloadInMB": 1}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_serve_command_runs_the_container_contract(bundle: Bundle, tmp_path: Path) -> None:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "qcsight_core.cli", "batch", "serve", "--model-dir", str(bundle.path),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/ping")
                status = connection.getresponse().status
                connection.close()
                break
            except OSError:
                time.sleep(0.1)
        assert status == 200
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("POST", "/invocations", body=_image_bytes(BRIGHT, ".jpg"),
                           headers={"Content-Type": "image/jpeg"})
        assert json.loads(connection.getresponse().read())[0]["verdict"] == "defect"
        connection.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        assert process.stderr is not None
        process.stderr.close()


# --- slow and hostile clients ---


def _raw(server: InferenceServer, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(server.address, timeout=5)
    if data:
        sock.sendall(data)
    return sock


def _answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


def _trickle(sock: socket.socket, data: bytes, interval_s: float = 0.2) -> None:
    """Send data a byte at a time, as a slowloris client does, until done or the server hangs up."""
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            return
        time.sleep(interval_s)  # the client's pace is the stimulus here, not a wait for the server


@pytest.fixture
def strict_server(bundle: Bundle) -> Iterator[InferenceServer]:
    config = ServerConfig(host="127.0.0.1", port=0, max_payload_mb=6, max_concurrent=1, max_waiting=0,
                          max_connections=2, header_timeout_s=0.5, body_timeout_s=0.5, slot_timeout_s=0.5)
    with InferenceServer(load_model(str(bundle.path)), config) as running:
        yield running


def test_slowloris_clients_are_cut_off_and_ping_is_still_answered(strict_server: InferenceServer) -> None:
    # Every connection taken by clients that trickle their headers and never finish them.
    slow = [_raw(strict_server, b"POST /invocations HTTP/1.1\r\nHost: x\r\n") for _ in range(2)]
    started = time.monotonic()
    assert _request(strict_server, "GET", "/ping")[0] == 200
    assert time.monotonic() - started < 0.4, "/ping waited for a connection slot"
    _trickle(slow[0], b"X-Slow: 1\r\n")  # a byte every 0.2 s: a per-read timeout would never fire
    for sock in slow:
        assert _answer(sock).startswith(b"HTTP/1.1 408 ")
    status, _, body = _request(strict_server, "POST", "/invocations", _image_bytes(BRIGHT, ".jpg"),
                               {"Content-Type": "image/jpeg"})
    assert status == 200 and json.loads(body)[0]["verdict"] == "defect"


def test_a_body_that_never_completes_is_timed_out(strict_server: InferenceServer) -> None:
    sock = _raw(strict_server, b"POST /invocations HTTP/1.1\r\nContent-Type: image/jpeg\r\n"
                b"Content-Length: 1000\r\n\r\n")
    _trickle(sock, b"\x00" * 5)
    assert _answer(sock).startswith(b"HTTP/1.1 408 ")


class _GatedRunner:
    """The real runner, held at a gate so that a test can keep the only inference slot busy."""

    def __init__(self, runner: object, gate: threading.Event) -> None:
        self._runner, self._gate = runner, gate
        self.entered = threading.Event()

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        assert self._gate.wait(10)
        return self._runner.run(batch)  # type: ignore[attr-defined,no-any-return]

    def infer(self, batch: np.ndarray) -> object:
        """What the handler calls since anomaly mode (scores and maps); gated as run is."""
        self.entered.set()
        assert self._gate.wait(10)
        return self._runner.infer(batch)  # type: ignore[attr-defined]


def test_ping_is_answered_while_every_inference_slot_is_busy(bundle: Bundle) -> None:
    gate = threading.Event()
    model = load_model(str(bundle.path))
    runner = _GatedRunner(model.runner, gate)
    model = dataclasses.replace(model, runner=runner)  # type: ignore[arg-type]
    config = ServerConfig(host="127.0.0.1", port=0, max_concurrent=1, max_waiting=1, slot_timeout_s=0.3)
    with InferenceServer(model, config) as server, concurrent.futures.ThreadPoolExecutor(2) as pool:
        busy = pool.submit(_request, server, "POST", "/invocations", _image_bytes(DARK, ".png"),
                           {"Content-Type": "image/png"})
        assert runner.entered.wait(10), "the first request never reached the model"
        assert _request(server, "GET", "/ping")[0] == 200
        assert _request(server, "POST", "/invocations", _image_bytes(DARK, ".png"),
                        {"Content-Type": "image/png"})[0] == 503
        gate.set()
        assert busy.result(timeout=10)[0] == 200


@pytest.mark.parametrize(("raw", "status"), [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /ping HTTP/2.0\r\n\r\n", 400),
    (b"GET /ping HTTP/1.1\r\nX-Name: caf\xc3\xa9\r\n\r\n", 400),
    (b"GET /ping HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /ping HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    (b"PUT /invocations HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
    (b"POST /invocations HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
    (b"POST /invocations HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400),
    (b"POST /invocations HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
    (b"POST /invocations HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
    (b"POST /invocations HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
    (b"POST /invocations HTTP/1.1\r\n\r\n", 411),
])
def test_malformed_requests_get_a_4xx(server: InferenceServer, raw: bytes, status: int) -> None:
    answer = _answer(_raw(server, raw))
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert b"Traceback" not in answer and b".py" not in answer
    assert _request(server, "GET", "/ping")[0] == 200


def test_ninety_bomb_images_are_4xx_or_error_rows_never_500(bundle: Bundle) -> None:
    bomb = base64.b64encode(bombs.png_bomb(20000, 20000)).decode()  # 48 KB each, 400 MB decoded
    body = json.dumps([bomb] * 90).encode()  # 5.8 MB: under the 6 MB Batch Transform default
    config = ServerConfig(host="127.0.0.1", port=0, max_payload_mb=6)
    with InferenceServer(load_model(str(bundle.path)), config) as server:
        status, _, answer = _request(server, "POST", "/invocations", body, {"Content-Type": "application/json"})
        assert status == 413 and b"at most 64" in answer
        status, _, answer = _request(server, "POST", "/invocations", base64.b64decode(bomb),
                                     {"Content-Type": "image/png"})
        assert status == 400 and b"pixel budget" in answer and b"Traceback" not in answer
    rows_model = load_model(str(bundle.path), policy=RequestPolicy(error_rows=True, max_items=100))
    with InferenceServer(rows_model, config) as server:
        status, _, answer = _request(server, "POST", "/invocations", body, {"Content-Type": "application/json"})
    assert status == 200
    assert [row["verdict"] for row in json.loads(answer)] == ["error"] * 90


def test_binds_loopback_unless_sagemaker_runs_the_container(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SAGEMAKER_ENV_MARKERS:
        monkeypatch.delenv(name, raising=False)
    assert ServerConfig().host == "127.0.0.1"
    assert get_args_parser("qcsight batch").parse_args(["serve"]).host == "127.0.0.1"
    assert default_host({"SAGEMAKER_BATCH": "true"}) == "0.0.0.0"
    assert default_host({"SAGEMAKER_BIND_TO_PORT": "8081"}) == "0.0.0.0"
    monkeypatch.setenv("SAGEMAKER_BATCH", "true")
    assert get_args_parser("qcsight batch").parse_args(["serve"]).host == "0.0.0.0"
