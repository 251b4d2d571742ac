"""A real Mosquitto broker on loopback, the local stand-in for AWS IoT Core in the edge tests.

Like IoT Core it takes only TLS connections with a client certificate signed by its CA, uses
the certificate's common name as the identity (IoT Core scopes policies by
``${iot:Connection.Thing.ThingName}``), and lets each thing publish only under
``qcsight/<thing>/``. A ``cloud`` identity may read every device topic: it plays the IoT rules
that route metrics and alerts. Certificates are generated with ``cryptography`` per test
session; nothing here needs the network or ``/work/shared``.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLOUD = "cloud"
REQUIRE_ENV = "QCSIGHT_REQUIRE_BROKER"


def find_mosquitto() -> str | None:
    """The mosquitto binary; Debian installs it in /usr/sbin, which a non-root PATH may lack."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def _die_with_parent() -> None:
    """In the child before exec: Linux sends it SIGKILL if the test process dies without a teardown."""
    with contextlib.suppress(Exception):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Identity:
    """A client certificate and key on disk; the certificate's CN is the MQTT identity."""

    name: str
    cert: Path
    key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    # P-256 keys: generated in milliseconds, accepted by s2n (the CRT) and OpenSSL (mosquitto).
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None, signer: ec.EllipticCurvePrivateKey,
          *, ca: bool, extensions: Iterable[tuple[Any, bool]] = ()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(signer, hashes.SHA256())


class Pki:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost, and client certificates on demand."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._ca_key = _key()
        self._ca_cert = _cert("qcsight test CA", self._ca_key, None, self._ca_key, ca=True, extensions=[
            (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                           key_encipherment=False, data_encipherment=False, key_agreement=False,
                           encipher_only=False, decipher_only=False), True)])
        self.ca = folder / "ca.pem"
        self.ca.write_bytes(self._ca_cert.public_bytes(serialization.Encoding.PEM))
        server_key = _key()
        loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
        san = x509.SubjectAlternativeName([x509.DNSName("localhost"), loopback])
        server = _cert("localhost", server_key, self._ca_cert.subject, self._ca_key, ca=False, extensions=[
            (san, False), (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
        self.server_cert = folder / "server.pem"
        self.server_key = folder / "server.key"
        self.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
        _write_key(server_key, self.server_key)
        self._identities: dict[str, Identity] = {}
        self._lock = threading.Lock()

    def identity(self, name: str, *, signer: ec.EllipticCurvePrivateKey | None = None) -> Identity:
        """A client certificate with CN=name signed by the CA (or, for a rogue test, by ``signer``)."""
        with self._lock:
            if signer is None and name in self._identities:
                return self._identities[name]
            key = _key()
            issuer = self._ca_cert.subject if signer is None else None
            cert = _cert(name, key, issuer, signer or self._ca_key, ca=False, extensions=[
                (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)])
            stem = name if signer is None else f"{name}.rogue"
            identity = Identity(name, self.folder / f"{stem}.pem", self.folder / f"{stem}.key")
            identity.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            _write_key(key, identity.key)
            if signer is None:
                self._identities[name] = identity
            return identity

    def rogue_identity(self, name: str) -> Identity:
        """A certificate for ``name`` signed by a CA the broker does not trust."""
        return self.identity(name, signer=_key())


# ---------------------------------------------------------------- broker


ACL = f"""\
# The cloud side (IoT rules in AWS) reads every device topic.
user {CLOUD}
topic read qcsight/+/#

# Every thing may use only its own topics: %u is the certificate CN (use_identity_as_username).
pattern readwrite qcsight/%u/#
"""


class BrokerError(RuntimeError):
    """The test broker did not start or stop as asked."""


class Broker:
    """One mosquitto process with a TLS listener on a fixed loopback port.

    ``stop()`` and ``start()`` keep the port, so clients see an outage and reconnect to the same
    address. Persistence is on so a subscriber's session (the cloud rule) survives the restart,
    as IoT rules keep receiving while devices reconnect.
    """

    def __init__(self, binary: str, pki: Pki, folder: Path, port: int | None = None) -> None:
        self.binary = binary
        self.pki = pki
        self.folder = folder
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.log = folder / "mosquitto.log"
        self.config = folder / "mosquitto.conf"
        self._proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "data").mkdir(exist_ok=True)
        (folder / "acl").write_text(ACL)
        self.config.write_text(self._config_text())

    def _config_text(self) -> str:
        # mosquitto started as root drops to the user named here; naming the current user keeps
        # it able to read the keys we wrote (as a non-root user the setting has no effect).
        user = pwd.getpwuid(os.getuid()).pw_name
        return "\n".join([
            f"user {user}",
            "per_listener_settings false",
            "allow_anonymous false",
            f"acl_file {self.folder / 'acl'}",
            "persistence true",
            f"persistence_location {self.folder / 'data'}/",
            "autosave_interval 0",
            "max_queued_messages 100000",
            "max_inflight_messages 100",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            f"listener {self.port} {self.host}",
            f"cafile {self.pki.ca}",
            f"certfile {self.pki.server_cert}",
            f"keyfile {self.pki.server_key}",
            "require_certificate true",
            "use_identity_as_username true",
            "",
        ])

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 5.0) -> None:
        """Start mosquitto and wait until the listener accepts TCP connections."""
        if self.running:
            return
        self._proc = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise BrokerError(f"mosquitto exited with {self._proc.returncode}: {err.strip()} {self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.2):
                return
            time.sleep(0.02)
        self.kill()
        raise BrokerError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout_s}s {self.log_tail()}")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Graceful stop (SIGTERM: mosquitto saves its sessions); kill if it does not exit in time."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        if proc.stderr:
            proc.stderr.close()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL, for teardown: never leaves a broker behind."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        if proc.stderr:
            proc.stderr.close()
        self._proc = None

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down for ``down_s``, start again on the same port."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\nmosquitto.log:\n" + "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def settings_json(self, thing: str, protocol: str = "mqtt5") -> str:
        """Connection settings for a subprocess publisher, as JSON."""
        ident = self.pki.identity(thing)
        return json.dumps({"endpoint": self.host, "port": self.port, "thing_name": thing, "cert": str(ident.cert),
                           "key": str(ident.key), "ca": str(self.pki.ca), "protocol": protocol})


# ---------------------------------------------------------------- the cloud side


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes


class MqttSubscriber:
    """A persistent-session subscriber that keeps what arrives (bounded), playing the cloud side.

    It uses MQTT 3.1.1 with ``clean_session=False``: Mosquitto restores such a session from its
    persistence file after a restart and queues QoS 1 messages for it while it reconnects, so,
    like an IoT rule, it misses nothing published during a broker outage. (Mosquitto 2.0.11 does
    not restore MQTT5 sessions across a restart: the CONNACK after it says session present = 0.)
    """

    def __init__(self, broker: Broker, identity: Identity, topic_filter: str, *, limit: int = 100_000) -> None:
        from awscrt import mqtt
        from awsiot import mqtt_connection_builder

        self._mqtt = mqtt
        self.topic_filter = topic_filter
        self._limit = limit
        self._cond = threading.Condition()
        self._messages: list[Received] = []
        self._connected = threading.Event()
        self.overflow = False
        self.connection = mqtt_connection_builder.mtls_from_path(
            endpoint=broker.host, port=broker.port, cert_filepath=str(identity.cert),
            pri_key_filepath=str(identity.key), ca_filepath=str(broker.pki.ca), client_id=identity.name,
            clean_session=False, keep_alive_secs=30, reconnect_min_timeout_secs=1, reconnect_max_timeout_secs=1,
            on_connection_interrupted=lambda *_a, **_k: self._connected.clear(),
            on_connection_resumed=lambda *_a, **_k: self._connected.set(),
        )

    def start(self, timeout_s: float = 5.0) -> MqttSubscriber:
        self.connection.connect().result(timeout_s)
        self._connected.set()
        future, _ = self.connection.subscribe(self.topic_filter, self._mqtt.QoS.AT_LEAST_ONCE,
                                              callback=self._on_message)
        granted = future.result(timeout_s)
        if granted.get("qos") is None:
            raise BrokerError(f"subscribe to {self.topic_filter} refused: {granted}")
        return self

    def _on_message(self, topic: str, payload: bytes, **_kwargs: Any) -> None:
        try:
            with self._cond:
                if len(self._messages) >= self._limit:
                    self.overflow = True
                    return
                self._messages.append(Received(topic, bytes(payload)))
                self._cond.notify_all()
        except Exception:  # never let an exception into the CRT's thread
            self.overflow = True

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def messages(self) -> list[Received]:
        with self._cond:
            return list(self._messages)

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout_s: float) -> list[Received]:
        """Wait until predicate(messages so far) holds; returns the messages either way."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(self._messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.2))
            return list(self._messages)

    def wait_count(self, count: int, timeout_s: float) -> list[Received]:
        return self.wait_for(lambda msgs: len(msgs) >= count, timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        with contextlib.suppress(Exception):
            self.connection.disconnect().result(timeout_s)


@contextlib.contextmanager
def subscriber(broker: Broker, topic_filter: str = "qcsight/+/#", name: str = CLOUD) -> Iterator[MqttSubscriber]:
    sub = MqttSubscriber(broker, broker.pki.identity(name), topic_filter).start()
    try:
        yield sub
    finally:
        sub.close()


# ---------------------------------------------------------------- device messages the tests send


def device_message(kind: str, thing: str, seq: int, *, outbox: dict[str, int] | None = None) -> dict[str, Any]:
    """A valid ``qcsight.*/1`` message of ``kind`` (metrics, alerts or status) built with qcsight_core."""
    from qcsight_core import messages

    model = {"name": "tile", "version": "3"}
    if kind == "metrics":
        return {
            **messages.envelope(messages.METRICS, thing, seq),
            "window": {"start": "2026-01-01T00:00:00Z", "end": "2026-01-01T00:01:00Z", "seconds": 60},
            "model": model,
            "counts": {"frames": 10, "good": 8, "defect": 1, "uncertain": 1, "dropped": 0, "errors": 0},
            "by_class": {"good": 8, "crack": 1, "spot": 1},
            "defect_rate": 0.1,
            "confidence": {"p05": 0.5, "p50": 0.9, "p95": 0.99},
            "latency_ms": {"p50": 5.0, "p95": 7.5, "p99": 9.0},
            "input": {"brightness": 120.5, "contrast": 30.1, "sharpness": 250.0},
            "drift": {"confidence_psi": 0.01},
        }
    if kind == "alerts":
        return {
            **messages.envelope(messages.ALERT, thing, seq),
            "alert_id": f"alert-{seq}", "frame_id": f"frame-{seq}", "model": model,
            "verdict": {"status": "defect", "label": "crack", "score": 0.9, "confidence": 0.8,
                        "scores": {"good": 0.1, "crack": 0.8, "spot": 0.1}},
            "thumbnail": {"format": "jpeg", "width": 64, "height": 48, "data": "AAAA"},
            "image_ref": f"file:///var/qcsight/images/frame-{seq}.jpg",
        }
    if kind == "status":
        return {**messages.envelope(messages.STATUS, thing, seq), "event": "heartbeat", "state": "running",
                "uptime_s": float(seq), "outbox": outbox or {"depth": 0, "bytes": 0, "evicted": 0}}
    raise ValueError(f"unknown kind {kind!r}")


def encoded(kind: str, thing: str, seq: int) -> tuple[str, str, bytes]:
    """(topic, message_id, payload) of a valid device message."""
    from qcsight_core import messages, topics

    message = device_message(kind, thing, seq)
    return topics.topic(thing, kind), str(message["message_id"]), messages.encode(message)
