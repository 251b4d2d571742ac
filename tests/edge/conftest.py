"""Edge fixtures: a real Mosquitto broker with TLS client certificates and per-thing ACLs.

Broker tests skip when mosquitto is not installed, unless QCSIGHT_REQUIRE_BROKER=1 (CI sets it),
in which case they fail: a CI run must never pass by skipping the broker.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.edge.broker import REQUIRE_ENV, Broker, MqttSubscriber, Pki, find_mosquitto, subscriber

# The image-upload and credentials tests check the device's own SigV4 signing and uploads against AWS's code as the
# peer (botocore's signer, moto's S3 with IAM checks, the credential endpoints of tests/edge/aws_peers.py). The
# device-only venv (`make test-device`: the edge extra, no boto3) cannot hold that peer, so there they are left out;
# the full suite (`make test`, whose venv has the dev extra) runs them.
AWS_PEER_TESTS = ["test_agent_uploads.py", "test_credentials.py", "test_s3_upload.py"]
collect_ignore = [] if all(importlib.util.find_spec(m) for m in ("boto3", "moto")) else AWS_PEER_TESTS


@pytest.fixture(scope="session")
def mosquitto_bin() -> str:
    binary = find_mosquitto()
    if binary is None:
        message = "mosquitto is not installed (apt-get install mosquitto)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{message}, and {REQUIRE_ENV}=1 requires the broker tests to run")
        pytest.skip(message)
    return binary


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost and client certificates on demand."""
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker(mosquitto_bin: str, pki: Pki, tmp_path: Path) -> Iterator[Broker]:
    """A fresh mosquitto on a free loopback port; always killed at teardown."""
    instance = Broker(mosquitto_bin, pki, tmp_path / "broker")
    try:
        instance.start()
        yield instance
    finally:
        instance.kill()


@pytest.fixture
def cloud(broker: Broker) -> Iterator[MqttSubscriber]:
    """The cloud side: subscribed to every device topic (qcsight/+/#) as the 'cloud' identity."""
    with subscriber(broker) as sub:
        yield sub


@pytest.fixture
def mqtt_settings(broker: Broker) -> Callable[..., Any]:
    """Build MqttSettings for a thing on the test broker; reconnect delays short so outages heal fast."""
    from qcsight_edge.mqtt import MqttSettings

    def build(thing: str = "thing-a", protocol: str = "mqtt5", **overrides: Any) -> MqttSettings:
        ident = broker.pki.identity(thing)
        values: dict[str, Any] = {
            "endpoint": broker.host, "port": broker.port, "thing_name": thing, "cert": ident.cert,
            "key": ident.key, "ca": broker.pki.ca, "protocol": protocol, "connect_timeout_s": 3.0,
            "ack_timeout_s": 5, "min_reconnect_delay_s": 0.05, "max_reconnect_delay_s": 0.5,
            "iot_core_limits": False,
        }
        values.update(overrides)
        return MqttSettings(**values)

    return build
