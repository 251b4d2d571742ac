"""Temporary AWS credentials for the device: from the AWS IoT credentials provider or the Greengrass Token Exchange
Service, cached and refreshed before they expire; no secret ever reaches a log line or an error message.

* ``IotCredentialsSource``: a plain install. The device's X.509 certificate over mutual TLS buys
  credentials for the IAM role behind a role alias: ``GET https://<credentials endpoint>/role-aliases/
  <alias>/credentials`` with ``x-amzn-iot-thingname: <thing>`` (IoT checks the thing is attached to
  the certificate, and the role's policy may then use ``${credentials-iot:ThingName}``); the answer
  is ``{"credentials": {"accessKeyId", "secretAccessKey", "sessionToken", "expiration"}}``.
* ``ContainerCredentialsSource``: under Greengrass. The Token Exchange Service (a component that
  depends on ``aws.greengrass.TokenExchangeService`` gets it) sets ``AWS_CONTAINER_CREDENTIALS_FULL_URI``
  (a loopback HTTP server) and ``AWS_CONTAINER_AUTHORIZATION_TOKEN`` (sent as ``Authorization``); the
  answer is the container-credentials shape ``{"AccessKeyId", "SecretAccessKey", "Token", "Expiration"}``.
  TES itself asks the IoT credentials provider with the nucleus's role alias.
* ``EnvironmentCredentialsSource``: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
  for a development box or an S3-compatible store; they do not expire.

Plain ``http.client`` rather than awscrt's providers: its x509 provider always dials port 443, so
no loopback stand-in could check it, and its errors do not say which endpoint answered what.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import os
import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

from qcsight_edge.clock import Clock, SystemClock, iso_utc
from qcsight_edge.errors import CredentialsError

log = logging.getLogger(__name__)

FULL_URI_ENV = "AWS_CONTAINER_CREDENTIALS_FULL_URI"
TOKEN_ENV = "AWS_CONTAINER_AUTHORIZATION_TOKEN"
TOKEN_FILE_ENV = "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"
# The most of an answer read: credentials are about 1.5 KB; an endpoint sending more is not one.
_MAX_ANSWER = 64 * 1024


@dataclass(frozen=True, repr=False)
class Credentials:
    """One set of AWS credentials; ``expiration`` in epoch seconds (None: they do not expire).

    ``repr``/``str`` show the access key id and expiry only, so a stray log call cannot leak the secret.
    """

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None
    expiration: float | None = None

    def __repr__(self) -> str:
        expires = "never" if self.expiration is None else iso_utc(self.expiration)
        return f"Credentials(access_key_id={self.access_key_id!r}, secret=***, expires={expires})"

    __str__ = __repr__


class CredentialsSource(Protocol):
    """Fetches a fresh set of credentials (one network round trip); raises CredentialsError."""

    name: str

    def fetch(self) -> Credentials: ...


def _parse_time(value: Any, where: str) -> float:
    if not isinstance(value, str):
        raise CredentialsError(f"{where}: the answer's expiration is not a timestamp")
    try:
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise CredentialsError(f"{where}: the answer's expiration {value!r} is not an ISO 8601 time") from exc
    if stamp.tzinfo is None:
        raise CredentialsError(f"{where}: the answer's expiration {value!r} has no time zone")
    return stamp.timestamp()


def _field(data: Mapping[str, Any], name: str, where: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise CredentialsError(f"{where}: the answer has no {name}")
    return value


def _get(connection: http.client.HTTPConnection, path: str, headers: Mapping[str, str],
         where: str) -> dict[str, Any]:
    """One GET; the decoded JSON object of a 200 answer, CredentialsError (status and the service's message) else."""
    try:
        connection.request("GET", path, headers=dict(headers))
        response = connection.getresponse()
        body = response.read(_MAX_ANSWER + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise CredentialsError(f"{where}: {type(exc).__name__}: {exc}") from exc
    finally:
        connection.close()
    if len(body) > _MAX_ANSWER:
        raise CredentialsError(f"{where}: answered more than {_MAX_ANSWER} bytes; not a credentials endpoint")
    if response.status != 200:
        # The services answer errors as {"message": "..."}; nothing in an error answer is a secret.
        try:
            message = json.loads(body).get("message", "")
        except (ValueError, AttributeError):
            message = ""
        detail = f": {str(message)[:200]}" if message else ""
        raise CredentialsError(f"{where}: HTTP {response.status} {response.reason}{detail}")
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise CredentialsError(f"{where}: the answer is not JSON") from exc
    if not isinstance(data, dict):
        raise CredentialsError(f"{where}: the answer is not a JSON object")
    return data


class IotCredentialsSource:
    """The AWS IoT credentials provider: the device certificate buys the role alias's credentials.

    Args:
        endpoint: the account's credentials endpoint (``aws iot describe-endpoint --endpoint-type
            iot:CredentialProvider``), a host name; sent as SNI, which IoT requires.
        role_alias: the role alias the certificate's IoT policy may ``iot:AssumeRoleWithCertificate``.
        thing_name: sent as ``x-amzn-iot-thingname``; must be attached to the certificate.
        cert, key, ca: PEM files: the device certificate and key, the CA of the endpoint (AmazonRootCA1).
        port: 443 for AWS.
        timeout_s: connect and read, each.
    """

    name = "iot"

    def __init__(self, endpoint: str, role_alias: str, thing_name: str, cert: Path, key: Path, ca: Path | None,
                 port: int = 443, timeout_s: float = 10.0) -> None:
        self.endpoint = endpoint
        self.role_alias = role_alias
        self.thing_name = thing_name
        self.port = port
        self.timeout_s = timeout_s
        self._cert, self._key, self._ca = cert, key, ca
        self._context: ssl.SSLContext | None = None
        self.where = f"IoT credentials provider https://{endpoint}:{port}/role-aliases/{role_alias}"

    def _tls(self) -> ssl.SSLContext:
        if self._context is None:
            context = ssl.create_default_context(cafile=str(self._ca) if self._ca else None)
            try:
                context.load_cert_chain(str(self._cert), str(self._key))
            except (OSError, ssl.SSLError) as exc:
                raise CredentialsError(f"{self.where}: cannot load the device certificate {self._cert} and key "
                                       f"{self._key}: {exc}") from exc
            self._context = context
        return self._context

    def fetch(self) -> Credentials:
        connection = http.client.HTTPSConnection(self.endpoint, self.port, timeout=self.timeout_s,
                                                 context=self._tls())
        path = f"/role-aliases/{quote(self.role_alias, safe='')}/credentials"
        data = _get(connection, path, {"x-amzn-iot-thingname": self.thing_name, "Accept": "application/json"},
                    self.where)
        inner = data.get("credentials")
        if not isinstance(inner, dict):
            raise CredentialsError(f"{self.where}: the answer has no credentials object")
        return Credentials(access_key_id=_field(inner, "accessKeyId", self.where),
                           secret_access_key=_field(inner, "secretAccessKey", self.where),
                           session_token=_field(inner, "sessionToken", self.where),
                           expiration=_parse_time(inner.get("expiration"), self.where))


class ContainerCredentialsSource:
    """The container-credentials contract, as the Greengrass Token Exchange Service serves it.

    Args:
        uri: ``AWS_CONTAINER_CREDENTIALS_FULL_URI``; plain http only to a loopback address (the token
            travels with each request), https anywhere.
        token: ``AWS_CONTAINER_AUTHORIZATION_TOKEN`` (or read from ``token_file`` on each fetch, as
            ``AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`` asks, since the file may be rotated).
        timeout_s: connect and read, each.
    """

    name = "greengrass"

    def __init__(self, uri: str, token: str | None = None, token_file: Path | None = None,
                 timeout_s: float = 5.0) -> None:
        parts = urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CredentialsError(f"{FULL_URI_ENV}={uri!r}: expected an http:// or https:// URL")
        if parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise CredentialsError(f"{FULL_URI_ENV}={uri!r}: plain http is allowed only to a loopback address "
                                   f"(the authorization token would travel in clear)")
        self.uri = uri
        self._parts = parts
        self._token = token
        self._token_file = token_file
        self.timeout_s = timeout_s
        self.where = f"Token Exchange Service {parts.scheme}://{parts.netloc}{parts.path}"

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> ContainerCredentialsSource:
        """From the variables TES sets; CredentialsError naming what is missing."""
        env = os.environ if environ is None else environ
        uri = env.get(FULL_URI_ENV)
        if not uri:
            raise CredentialsError(f"{FULL_URI_ENV} is not set: under Greengrass the component must depend on "
                                   f"aws.greengrass.TokenExchangeService (the nucleus then sets it)")
        token_file = env.get(TOKEN_FILE_ENV)
        token = env.get(TOKEN_ENV)
        if not token and not token_file:
            raise CredentialsError(f"{TOKEN_ENV} (or {TOKEN_FILE_ENV}) is not set beside {FULL_URI_ENV}")
        return cls(uri, token=token, token_file=Path(token_file) if token_file else None)

    def _authorization(self) -> str:
        if self._token_file is not None:
            try:
                return self._token_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise CredentialsError(f"{self.where}: cannot read the token file {self._token_file}: "
                                       f"{exc.strerror or exc}") from exc
        assert self._token is not None
        return self._token

    def fetch(self) -> Credentials:
        parts = self._parts
        port = parts.port or (443 if parts.scheme == "https" else 80)
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            connection = http.client.HTTPSConnection(parts.hostname or "", port, timeout=self.timeout_s)
        else:
            connection = http.client.HTTPConnection(parts.hostname or "", port, timeout=self.timeout_s)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        data = _get(connection, path, {"Authorization": self._authorization(), "Accept": "application/json"},
                    self.where)
        expiration = data.get("Expiration")
        return Credentials(access_key_id=_field(data, "AccessKeyId", self.where),
                           secret_access_key=_field(data, "SecretAccessKey", self.where),
                           session_token=data.get("Token") or None,
                           expiration=None if expiration is None else _parse_time(expiration, self.where))


class EnvironmentCredentialsSource:
    """AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and (optional) AWS_SESSION_TOKEN, read at each fetch."""

    name = "environment"

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ

    def fetch(self) -> Credentials:
        env = os.environ if self._environ is None else self._environ
        key_id, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if not key_id or not secret:
            raise CredentialsError("environment credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set")
        return Credentials(key_id, secret, env.get("AWS_SESSION_TOKEN") or None)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CachedCredentials:
    """Hands out credentials from ``source``, fetching new ones ``refresh_before_s`` before they expire.

    ``invalidate()`` after the store refused them (an expired or revoked token): the next ``get()``
    fetches. Thread-safe: concurrent ``get()`` calls wait for one round trip, while ``expiration`` and
    ``last_error`` (read by status) never wait for the network.

    Args:
        source: where credentials come from.
        refresh_before_s: fetch new credentials this long before the current ones expire (IoT's
            last 15 minutes to 12 hours, 1 hour by default; clocks drift; an upload takes time).
        clock: wall-clock time (``time()``), to compare with the expiration.
    """

    def __init__(self, source: CredentialsSource, refresh_before_s: float = 300.0, clock: Clock | None = None) -> None:
        self.source = source
        self.refresh_before_s = refresh_before_s
        self._clock: Clock = clock or SystemClock()
        self._fetching = threading.Lock()  # held across a fetch: one round trip at a time
        self._lock = threading.Lock()      # held only to read or swap the current credentials
        self._current: Credentials | None = None
        self.fetches = 0
        self.last_error: str | None = None

    def get(self) -> Credentials:
        """Valid credentials (cached or fresh); raises CredentialsError when none can be had."""
        with self._fetching:
            with self._lock:
                current = self._current
            if current is not None and not self._due(current):
                return current
            try:
                fresh = self.source.fetch()
            except CredentialsError as exc:
                self.last_error = str(exc)
                raise
            self.fetches += 1
            self.last_error = None
            with self._lock:
                self._current = fresh
            log.info("AWS credentials from %s (access key %s), valid until %s", self.source.name,
                     fresh.access_key_id, "they are revoked" if fresh.expiration is None else iso_utc(fresh.expiration))
            return fresh

    def _due(self, credentials: Credentials) -> bool:
        expiration = credentials.expiration
        return expiration is not None and self._clock.time() >= expiration - self.refresh_before_s

    def invalidate(self, credentials: Credentials | None = None) -> None:
        """Forget the cached credentials (only if they are still ``credentials``, when given)."""
        with self._lock:
            if credentials is None or self._current is credentials:
                self._current = None

    @property
    def expiration(self) -> float | None:
        with self._lock:
            return None if self._current is None else self._current.expiration
