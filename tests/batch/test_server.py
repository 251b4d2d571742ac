"""The container contract over real HTTP on loopback: /ping, /invocations with real JPEG/PNG bytes, error statuses."""

from __future__ import annotations

import base64
import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from qcsight_batch.handler import load_model
from qcsight_batch.server import InferenceServer, ServerConfig
from qcsight_core.bundle import Bundle
from tests.batch.conftest import BRIGHT, DARK


def _image_bytes(value: int, ext: str) -> bytes:
    rng = np.random.default_rng(value)
    pixels = np.clip(value + rng.integers(-8, 9, (96, 128, 3)), 0, 255).astype(np.uint8)
    ok, data = cv2.imencode(ext, pixels)
    assert ok
    return data.tobytes()


@pytest.fixture
def server(bundle: Bundle) -> Iterator[InferenceServer]:
    config = ServerConfig(host="127.0.0.1", port=0, max_payload_mb=0.05, max_concurrent=2, request_timeout_s=10)
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
