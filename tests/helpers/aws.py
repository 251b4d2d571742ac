"""AWS without an account: a moto server on loopback, and requests checked against botocore's service models.

Code under test builds its requests with boto3 exactly as against AWS; AWS_ENDPOINT_URL points
them here, moto keeps what was created so tests can assert on the requests actually sent, and
assert_valid checks a request the way the service's front end would.
"""

from __future__ import annotations

import functools
import re
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytest

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "SAGEMAKER_VALIDATE_ROLE": "false",
    "SAGEMAKER_TELEMETRY_OPT_OUT": "true",
}


# Loopback needs no proxy. urlopen's default opener reads the proxy variables once, on first use:
# if that first use falls in a test that points them at a dead proxy, every later call would fail.
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def reset_moto(url: str) -> None:
    """moto keeps its backends per process, not per server: empty them so each test starts from a new account."""
    _LOOPBACK.open(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=10).close()


@contextmanager
def moto_server() -> Iterator[str]:
    """Start a moto server on 127.0.0.1 (free port); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    reset_moto(url)
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
def aws_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Fake credentials plus AWS_ENDPOINT_URL pointing every client at a fresh moto server."""
    for key, value in FAKE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with moto_server() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        yield url


# --------------------------------------------------------------------------- service-model validation


def _problems(shape: Any, value: Any, path: str) -> Iterator[str]:
    kind = shape.type_name
    meta = shape.metadata
    if kind == "structure":
        if not isinstance(value, dict):
            yield f"{path}: expected an object"
            return
        for name in shape.required_members:
            if name not in value:
                yield f"{path}.{name}: required but missing"
        for name, item in value.items():
            if name not in shape.members:
                yield f"{path}.{name}: not a member of {shape.name}"
            else:
                yield from _problems(shape.members[name], item, f"{path}.{name}")
    elif kind == "list":
        if not isinstance(value, list):
            yield f"{path}: expected a list"
            return
        if not meta.get("min", 0) <= len(value) <= meta.get("max", 10**9):
            yield f"{path}: {len(value)} items outside [{meta.get('min')}, {meta.get('max')}]"
        for i, item in enumerate(value):
            yield from _problems(shape.member, item, f"{path}[{i}]")
    elif kind == "map":
        if not meta.get("min", 0) <= len(value) <= meta.get("max", 10**9):
            yield f"{path}: {len(value)} entries outside [{meta.get('min')}, {meta.get('max')}]"
        for key, item in value.items():
            yield from _problems(shape.key, key, f"{path}<key {key}>")
            yield from _problems(shape.value, item, f"{path}.{key}")
    elif kind == "string":
        if not isinstance(value, str):
            yield f"{path}: expected a string, got {value!r}"
            return
        if shape.enum and value not in shape.enum:
            yield f"{path}: {value!r} not in enum {shape.name}"
        if "pattern" in meta and not _fullmatch(meta["pattern"], value):
            yield f"{path}: {value!r} does not match {meta['pattern']}"
        if not meta.get("min", 0) <= len(value) <= meta.get("max", 10**9):
            yield f"{path}: length {len(value)} outside [{meta.get('min')}, {meta.get('max')}]"
    elif kind in ("integer", "long"):
        if not isinstance(value, int) or not meta.get("min", -(10**18)) <= value <= meta.get("max", 10**18):
            yield f"{path}: {value!r} is not an integer within [{meta.get('min')}, {meta.get('max')}]"
    elif kind == "boolean" and not isinstance(value, bool):
        yield f"{path}: expected true/false, got {value!r}"


@functools.cache
def _service_model(service: str) -> Any:
    """Loading a service model costs about a second (SageMaker's is large); the tests ask for few, often."""
    import botocore.session

    return botocore.session.get_session().get_service_model(service)


def _fullmatch(pattern: str, value: str) -> bool:
    """The service's pattern check. Some SageMaker patterns use Unicode classes (\\p{L}) that `re` lacks;
    `regex` (installed with cfn-lint, the infra extra) has them."""
    try:
        return re.fullmatch(pattern, value, flags=re.DOTALL) is not None
    except re.error:
        import regex

        return regex.fullmatch(pattern, value, flags=regex.DOTALL) is not None


def assert_valid(operation: str, request: Mapping[str, Any], service: str = "sagemaker") -> None:
    """Check a request body the way the service's API front end would, from botocore's service model.

    botocore's own client-side validation (and so Stubber) checks required members, types and
    minimum lengths; this also checks what only the service checks: enums, patterns, maxima.
    """
    model = _service_model(service).operation_model(operation)
    problems = list(_problems(model.input_shape, dict(request), operation))
    assert not problems, "\n".join(problems)
