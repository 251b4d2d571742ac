"""The AWS side of image uploads, on loopback, checking what the real services check.

* S3: moto's server with IAM authentication switched on (``/moto-api/reset-auth``): every request
  must carry a SigV4 signature moto recomputes with botocore's signer, from an access key it
  issued, and the caller's IAM policy must allow the action on that object's ARN.
* The credentials behind both providers are real temporary credentials from moto's STS
  (``AssumeRole`` on the images role, as the IoT credentials provider does behind a role alias).
  ``expire()`` ends a session early: moto does not check expiry times, so the stand-ins drop the
  session from moto's STS backend (the server runs in this process) and S3 then refuses its key.
* ``IotCredentialsServer``: HTTPS with a required client certificate from the test CA, the SNI host
  name, ``GET /role-aliases/<alias>/credentials`` and ``x-amzn-iot-thingname`` naming the thing of
  the certificate (its CN); answers ``{"credentials": {...}}`` or 403 ``{"message": ...}``.
* ``TokenExchangeServer``: HTTP on 127.0.0.1, ``GET /2016-11-01/credentialprovider/`` with the
  ``Authorization`` token; answers ``{"AccessKeyId", "SecretAccessKey", "Token", "Expiration"}`` or an
  empty 403, as the nucleus's TES handler does.
* ``ThrottledProxy``: a TCP relay in front of moto that can slow the request bytes to a trickle, so a
  test can kill the agent while an upload is on the wire.
"""

from __future__ import annotations

import json
import secrets
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import boto3

from tests.edge.broker import Pki

ACCOUNT = "123456789012"
REGION = "us-east-1"
BUCKET = "qcsight-images"
ROLE = "qcsight-images-role"
TES_PATH = "/2016-11-01/credentialprovider/"


@dataclass
class MotoAws:
    """moto's server with IAM checks on: the bucket, the images role and the identities of the test's side."""

    url: str
    admin: dict[str, str]          # the cloud side: reads objects back
    sts_caller: dict[str, str]     # what the credentials services assume the role with
    role_arn: str

    def s3(self) -> Any:
        return boto3.client("s3", endpoint_url=self.url, region_name=REGION, **_boto_keys(self.admin))

    def objects(self) -> dict[str, bytes]:
        """Every object in the bucket, by key."""
        client = self.s3()
        keys = [item["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
                for item in page.get("Contents", [])]
        return {key: client.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in keys}


def _boto_keys(keys: dict[str, str]) -> dict[str, str]:
    return {"aws_access_key_id": keys["AccessKeyId"], "aws_secret_access_key": keys["SecretAccessKey"]}


def _images_policy(thing: str, prefixes: tuple[str, ...]) -> str:
    # The device role may write only its own thing's images, as ${credentials-iot:ThingName} scopes it in AWS.
    resources = [f"arn:aws:s3:::{BUCKET}/{prefix}images/{thing}/*" for prefix in prefixes]
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:PutObject", "Resource": resources}]})


@contextmanager
def moto_with_iam(url: str, thing: str, prefixes: tuple[str, ...] = ("", "plant-7/")) -> Iterator[MotoAws]:
    """Set up the bucket, the images role (PutObject under <prefix>images/<thing>/ only) and two users, then switch
    moto's IAM authentication on for every request until the block ends."""
    plain = {"endpoint_url": url, "region_name": REGION, "aws_access_key_id": "setup",
             "aws_secret_access_key": "setup"}
    iam = boto3.client("iam", **plain)
    boto3.client("s3", **plain).create_bucket(Bucket=BUCKET)
    iam.create_user(UserName="cloud")
    iam.put_user_policy(UserName="cloud", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    admin = iam.create_access_key(UserName="cloud")["AccessKey"]
    iam.create_user(UserName="iot-credentials")
    caller = iam.create_access_key(UserName="iot-credentials")["AccessKey"]
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Principal": {
        "AWS": f"arn:aws:iam::{ACCOUNT}:user/iot-credentials"}}]}
    role_arn = iam.create_role(RoleName=ROLE, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    iam.put_role_policy(RoleName=ROLE, PolicyName="images", PolicyDocument=_images_policy(thing, prefixes))
    iam.put_user_policy(UserName="iot-credentials", PolicyName="assume", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                  "Resource": role_arn}]}))
    _reset_auth(url, "0")
    try:
        yield MotoAws(url, admin, caller, role_arn)
    finally:
        _reset_auth(url, "inf")


def _reset_auth(url: str, count: str) -> None:
    # text/plain: as a form (urllib's default type) Flask would swallow the body and moto read nothing.
    request = urllib.request.Request(f"{url}/moto-api/reset-auth", data=count.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request, timeout=10).close()


@dataclass
class Issued:
    access_key_id: str
    secret_access_key: str
    session_token: str
    expiration: datetime


@dataclass
class CredentialsIssuer:
    """Assumes the images role in moto's STS for each credentials request; remembers what it handed out."""

    aws: MotoAws
    lifetime_s: float = 3600.0
    issued: list[Issued] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def issue(self, session: str) -> Issued:
        sts = boto3.client("sts", endpoint_url=self.aws.url, region_name=REGION, **_boto_keys(self.aws.sts_caller))
        creds = sts.assume_role(RoleArn=self.aws.role_arn, RoleSessionName=session)["Credentials"]
        item = Issued(creds["AccessKeyId"], creds["SecretAccessKey"], creds["SessionToken"],
                      datetime.now(timezone.utc) + timedelta(seconds=self.lifetime_s))
        with self._lock:
            self.issued.append(item)
        return item

    def expire(self, access_key_id: str) -> None:
        """The session ends: S3 refuses its key from now on."""
        from moto.sts.models import sts_backends

        backend = sts_backends[ACCOUNT]["aws"]
        backend.assumed_roles = [role for role in backend.assumed_roles if role.access_key_id != access_key_id]

    def expire_all(self) -> None:
        with self._lock:
            keys = [item.access_key_id for item in self.issued]
        for key in keys:
            self.expire(key)

    def secrets(self) -> list[str]:
        with self._lock:
            return [s for item in self.issued for s in (item.secret_access_key, item.session_token)]


class Issuer(Protocol):
    """Mints one set of credentials per request of a credentials service."""

    def issue(self, session: str) -> Issued: ...


@dataclass
class LocalIssuer:
    """Random credentials that nothing checks: for the credential services' own tests (no S3 involved)."""

    lifetime_s: float = 3600.0
    issued: list[Issued] = field(default_factory=list)

    def issue(self, session: str) -> Issued:
        item = Issued("ASIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30), secrets.token_urlsafe(60),
                      datetime.now(timezone.utc) + timedelta(seconds=self.lifetime_s))
        self.issued.append(item)
        return item


def _iso(stamp: datetime) -> str:
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 run on its own thread; requests seen are recorded."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], context: ssl.SSLContext | None = None) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        if context is not None:
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = int(self.httpd.server_address[1])
        self.requests: list[dict[str, Any]] = []
        self.httpd.owner = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> _Server:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _JsonHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def answer(self, status: int, body: dict[str, Any] | None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class IotCredentialsServer(_Server):
    """The AWS IoT credentials provider for one role alias, over mutual TLS with the test CA."""

    def __init__(self, pki: Pki, issuer: Issuer, role_alias: str, host: str = "localhost") -> None:
        self.issuer = issuer
        self.role_alias = role_alias
        self.host = host
        self.sni: list[str | None] = []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.server_cert, pki.server_key)
        context.verify_mode = ssl.CERT_REQUIRED  # no certificate, no credentials
        context.load_verify_locations(pki.ca)
        context.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)  # type: ignore[assignment]
        super().__init__(_IotHandler, context)


class _IotHandler(_JsonHandler):
    def do_GET(self) -> None:
        server: IotCredentialsServer = self.server.owner  # type: ignore[attr-defined]
        cert = self.connection.getpeercert()  # type: ignore[attr-defined]
        subject = dict(item[0] for item in cert.get("subject", ())) if cert else {}
        thing_header = self.headers.get("x-amzn-iot-thingname")
        server.requests.append({"path": self.path, "thing": thing_header, "cn": subject.get("commonName")})
        if server.sni[-1:] != [server.host]:
            self.answer(403, {"message": "Certificate is invalid on this endpoint"})
        elif self.path != f"/role-aliases/{server.role_alias}/credentials":
            self.answer(403, {"message": "Role alias does not exist or the certificate may not assume it"})
        elif thing_header is None or thing_header != subject.get("commonName"):
            # Real IoT: the thing named must be attached to the certificate presented.
            self.answer(403, {"message": "Thing name is not attached to the certificate"})
        else:
            issued = server.issuer.issue(f"iot-{thing_header}")
            self.answer(200, {"credentials": {"accessKeyId": issued.access_key_id,
                                              "secretAccessKey": issued.secret_access_key,
                                              "sessionToken": issued.session_token,
                                              "expiration": _iso(issued.expiration)}})


class TokenExchangeServer(_Server):
    """Greengrass's Token Exchange Service: the container-credentials contract on loopback HTTP."""

    def __init__(self, issuer: Issuer, token: str) -> None:
        self.issuer = issuer
        self.token = token
        super().__init__(_TesHandler)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}{TES_PATH}"


class _TesHandler(_JsonHandler):
    def do_GET(self) -> None:
        server: TokenExchangeServer = self.server.owner  # type: ignore[attr-defined]
        authorization = self.headers.get("Authorization")
        server.requests.append({"path": self.path, "authorized": authorization == server.token})
        if self.path != TES_PATH:
            self.answer(400, None)
        elif authorization != server.token:
            self.answer(403, None)
        else:
            issued = server.issuer.issue("tes")
            self.answer(200, {"AccessKeyId": issued.access_key_id, "SecretAccessKey": issued.secret_access_key,
                              "Token": issued.session_token, "Expiration": _iso(issued.expiration)})


class ThrottledProxy:
    """A TCP relay on 127.0.0.1 to ``target``; while ``slow`` is set, client bytes go through at ``rate`` bytes/s.

    ``cut_mid_request`` counts connections the client closed (or died on) after sending request bytes
    the server had not answered yet: the proof that a kill happened mid-upload.
    """

    def __init__(self, target_port: int, rate: int = 20_000) -> None:
        self.target_port = target_port
        self.rate = rate
        self.slow = threading.Event()
        self.bytes_up = 0
        self.cut_mid_request = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
        sent_in_request = [0]  # request bytes relayed since the server last answered

        def down() -> None:
            try:
                while data := upstream.recv(65536):
                    sent_in_request[0] = 0
                    client.sendall(data)
            except OSError:
                pass
            finally:
                _close(client)

        threading.Thread(target=down, daemon=True).start()
        try:
            while True:
                data = client.recv(1024 if self.slow.is_set() else 65536)
                if not data:
                    break
                if self.slow.is_set():
                    time.sleep(len(data) / self.rate)
                upstream.sendall(data)
                with self._lock:
                    self.bytes_up += len(data)
                sent_in_request[0] += len(data)
        except OSError:
            pass
        finally:
            if sent_in_request[0]:
                with self._lock:
                    self.cut_mid_request += 1
            _close(upstream)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()


def _close(sock: socket.socket) -> None:
    with suppress(OSError):
        sock.close()
