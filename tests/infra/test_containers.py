"""The container entry points run the way the platform runs them, and the Dockerfiles say what the code expects.

No container daemon here: the scoring image's `serve` script is run as SageMaker runs it (the same
environment variables, port and command), with /opt/ml/model swapped for SM_MODEL_DIR, and the
CDK-staged build context is checked to hold everything the Dockerfile copies and to install.
"""

from __future__ import annotations

import ast
import contextlib
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from qcsight_core.bundle import Bundle
from tests.helpers.wait import eventually
from tests.infra.conftest import INFRA, REPO, Assembly

DOCKER = INFRA / "docker"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _request(port: int, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        # A server refusing a body by its Content-Length (413) may answer and close before the client has
        # written it all; its answer is already in the socket's buffer, as an HTTP client reads it.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.fixture
def serving(tiny_bundle: Bundle, tmp_path: Path) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    port = _free_port()
    env = {**os.environ, "SAGEMAKER_BIND_TO_PORT": str(port), "SM_MODEL_DIR": str(tiny_bundle.path),
           "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": "2", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # `docker run IMAGE serve`: the image's CMD is `serve`, found on PATH; here the same script from the repo.
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(["sh", str(DOCKER / "serve")], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        eventually(lambda: process.poll() is not None or _ping(port), timeout_s=60,
                   message=lambda: (tmp_path / "serve.log").read_text()[-2000:])
        assert process.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
        yield port, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        log.close()


def _ping(port: int) -> bool:
    try:
        return _request(port, "GET", "/ping")[0] == 200
    except OSError:
        return False


def test_serve_answers_the_sagemaker_contract_on_its_port(serving: tuple[int, subprocess.Popen[str]]) -> None:
    port, process = serving
    ok, jpeg = cv2.imencode(".jpg", np.random.default_rng(3).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    assert ok
    status, body = _request(port, "POST", "/invocations", jpeg.tobytes(),
                            {"Content-Type": "image/jpeg", "Accept": "application/jsonlines"})
    assert status == 200, body
    rows = [json.loads(line) for line in body.decode().splitlines()]
    assert len(rows) == 1 and rows[0]["verdict"] in ("good", "defect", "uncertain") and rows[0]["model"]
    status, body = _request(port, "GET", "/execution-parameters")
    assert status == 200 and json.loads(body) == {"MaxConcurrentTransforms": 2, "BatchStrategy": "SINGLE_RECORD",
                                                  "MaxPayloadInMB": 1}
    status, _ = _request(port, "POST", "/invocations", b"\0" * (1024 * 1024 + 1), {"Content-Type": "image/jpeg"})
    assert status == 413  # SAGEMAKER_MAX_PAYLOAD_IN_MB reached the server
    # SageMaker stops a container with SIGTERM; `exec` in the script makes the server the process that gets it.
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0


def test_scoring_dockerfile_matches_the_contract() -> None:
    steps = _instructions(DOCKER / "scoring.Dockerfile")
    from stacks import names

    assert ("CMD", '["serve"]') in steps and ("EXPOSE", str(names.SCORING_PORT)) in steps
    assert not any(kind == "ENTRYPOINT" for kind, _ in steps)  # SageMaker passes `serve` as the command
    assert ("COPY", "--chmod=0755 infra/docker/serve /usr/local/bin/serve") in steps
    user = [args for kind, args in steps if kind == "USER"]
    assert user and user[-1].isdigit() and user[-1] != "0"
    script = (DOCKER / "serve").read_text()
    assert f"exec {shlex.join(names.SCORING_SERVE_COMMAND)} \"$@\"" in script
    assert os.access(DOCKER / "serve", os.X_OK)


def test_review_dockerfile_runs_the_review_command() -> None:
    from stacks import names

    steps = _instructions(DOCKER / "review.Dockerfile")
    assert ("CMD", json.dumps(list(names.REVIEW_SERVE_COMMAND))) in steps
    assert ("EXPOSE", str(names.REVIEW_PORT)) in steps


def _copy_sources(dockerfile: Path) -> list[str]:
    sources = []
    for kind, args in _instructions(dockerfile):
        if kind == "COPY":
            parts = [part for part in args.split() if not part.startswith("--")]
            sources += parts[:-1]
    return sources


def _imported_qcsight_packages(package: str) -> set[str]:
    """package and every qcsight_* package its modules import, followed through those packages' own imports."""
    found, pending = set(), [package]
    while pending:
        name = pending.pop()
        found.add(name)
        (folder,) = [path for path in REPO.glob(f"*/{name}") if (path / "__init__.py").is_file()]
        for source in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(source.read_text())):
                modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                           else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                           else [])
                pending += {m.split(".")[0] for m in modules if m.startswith("qcsight_")} - found - set(pending)
    return found


def test_staged_scoring_context_holds_what_the_dockerfile_copies_and_installs(assembly: Assembly,
                                                                              tmp_path: Path) -> None:
    context = assembly.asset_dir("compute", "dockerImages", "scoring.Dockerfile")
    for source in _copy_sources(DOCKER / "scoring.Dockerfile"):
        assert (context / source).exists(), f"the Dockerfile copies {source}, which CDK did not stage"
    staged = {path.relative_to(context).parts[0] for path in context.iterdir()}
    assert staged <= {"pyproject.toml", "README.md", "edge_agent", "batch", "infra"}, staged
    assert not (context / "training").exists() and not list(context.rglob("__pycache__"))
    # The image's `pip install .[batch]`, without the network: build the wheel from what the
    # Dockerfile copies out of the staged context into /build, and nothing else.
    build = tmp_path / "build"
    for source in _copy_sources(DOCKER / "scoring.Dockerfile"):
        copy = shutil.copytree if (context / source).is_dir() else shutil.copy2
        (build / source).parent.mkdir(parents=True, exist_ok=True)
        copy(context / source, build / source)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                             "-w", str(tmp_path), str(build)], capture_output=True, text=True, timeout=300,
                            check=False, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    import zipfile

    (wheel,) = tmp_path.glob("qcsight-*.whl")
    names_in_wheel = zipfile.ZipFile(wheel).namelist()
    assert any(name.startswith("qcsight_batch/server.py") for name in names_in_wheel)
    # Every package batch scoring imports is installed (qcsight_aws came with the shared S3 helpers).
    for package in _imported_qcsight_packages("qcsight_batch"):
        assert f"{package}/__init__.py" in names_in_wheel, f"the image lacks {package}, which qcsight_batch imports"
    entry_points = next(n for n in names_in_wheel if n.endswith("entry_points.txt"))
    assert "qcsight = qcsight_core.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_review_serve_as_the_container_runs_it(tmp_path: Path) -> None:
    pytest.importorskip("qcsight_review", reason="qcsight_review is not in this tree yet (the review issue)")
    from stacks import names

    port = _free_port()
    command = [c if c != str(names.REVIEW_PORT) else str(port) for c in names.REVIEW_SERVE_COMMAND]
    command = [str(Path(sys.executable).parent / command[0]), *command[1:]]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        eventually(lambda: process.poll() is not None or _health(port), timeout_s=60)
        assert process.poll() is None
    finally:
        process.kill()
        process.wait(10)


def _health(port: int) -> bool:
    from stacks import names

    try:
        return _request(port, "GET", names.REVIEW_HEALTH_PATH)[0] == 200
    except OSError:
        return False
