"""One signed S3 PUT per image: SigV4 by awscrt's signer, sent over ``http.client``; S3's refusals sorted into
"try again" and "never"; where a folder stands in for the bucket, the same contract on local disk.

The request is signed with the payload's sha256 (``x-amz-content-sha256``), so S3 refuses a body
damaged or cut short on the way, and a single PUT is visible whole or not at all: an object at
the key an alert names means the whole image arrived. No boto3 on the device: awscrt (already
there for MQTT) signs; the body goes out on a plain keep-alive connection whose every wait has a
timeout.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import logging
import os
import socket
import ssl
import threading
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlsplit

from awscrt import auth as crt_auth
from awscrt import http as crt_http

from qcsight_edge.credentials import CachedCredentials, Credentials
from qcsight_edge.errors import CredentialsError, UploadError

log = logging.getLogger(__name__)

# Refusals that new credentials can cure: fetch them and try again (at once, then with backoff).
CREDENTIAL_CODES = frozenset({"ExpiredToken", "InvalidToken", "TokenRefreshRequired", "InvalidAccessKeyId",
                              "SignatureDoesNotMatch", "InvalidClientTokenId"})
# 4xx that a later attempt can pass: the request or the link was at fault, not the object.
TRANSIENT_CODES = frozenset({"RequestTimeout", "RequestTimeTooSkewed", "SlowDown", "Throttling",
                             "ThrottlingException", "TooManyRequests", "OperationAborted", "BadDigest",
                             "XAmzContentSHA256Mismatch", "IncompleteBody", "InternalError", "ServiceUnavailable"})
_TRANSIENT_STATUS = frozenset({408, 409, 429})
_MAX_ERROR_BODY = 64 * 1024


class ImageTarget(Protocol):
    """Where images go: ``uri`` names an object, ``put`` writes it whole (raises UploadError)."""

    kind: str

    def uri(self, key: str) -> str: ...

    def put(self, key: str, data: bytes, sha256_hex: str) -> None: ...

    def abort(self) -> None:
        """Make a ``put`` running on another thread fail now (the agent is stopping)."""

    def close(self) -> None: ...


class S3Target:
    """PUTs objects to one bucket with temporary credentials.

    Args:
        bucket: the bucket name.
        region: its region (SigV4 signs for it).
        credentials: the credentials cache (IoT credentials provider, Token Exchange Service, environment).
        endpoint: a URL to use instead of ``https://s3.<region>.amazonaws.com`` (a VPC endpoint, an
            S3-compatible store, a local stand-in); empty for AWS.
        path_style: ``<endpoint>/<bucket>/<key>`` instead of ``<bucket>.<endpoint>/<key>``.
        ca: a CA bundle for https instead of the system's.
        timeout_s: connect, and each wait for the peer while sending or reading.
        now: the signing time (tests); the system clock otherwise.
    """

    kind = "s3"

    def __init__(self, bucket: str, region: str, credentials: CachedCredentials, *, endpoint: str = "",
                 path_style: bool = False, ca: Path | None = None, timeout_s: float = 60.0,
                 now: Callable[[], datetime] | None = None) -> None:
        self.bucket = bucket
        self.region = region
        self.credentials = credentials
        self.timeout_s = timeout_s
        url = urlsplit(endpoint or f"https://s3.{region}.amazonaws.com")
        if url.scheme not in ("http", "https") or not url.hostname:
            raise UploadError(f"S3 endpoint {endpoint!r}: expected http(s)://host[:port]", permanent=True)
        self._https = url.scheme == "https"
        host = url.hostname if path_style else f"{bucket}.{url.hostname}"
        self._host, self._port = host, url.port or (443 if self._https else 80)
        default_port = self._port == (443 if self._https else 80)
        self._host_header = host if default_port else f"{host}:{self._port}"
        self._base_path = url.path.rstrip("/") + (f"/{bucket}" if path_style else "")
        self._ca = ca
        self._now = now or (lambda: datetime.now(timezone.utc))
        self._lock = threading.Lock()
        self._connection: http.client.HTTPConnection | None = None
        self._context: ssl.SSLContext | None = None
        self._aborted = False

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def path(self, key: str) -> str:
        """The request path of ``key``: each character but unreserved ones and ``/`` percent-encoded, as S3 signs it."""
        return f"{self._base_path}/{quote(key, safe='/~')}"

    # ------------------------------------------------------------ signing

    def signed_headers(self, key: str, data: bytes, sha256_hex: str, credentials: Credentials) -> dict[str, str]:
        """The request headers with SigV4 (X-Amz-Date, x-amz-content-sha256, the session token, Authorization)."""
        # x-amz-checksum-sha256: S3 checks it too and keeps it with the object, where the cloud can compare it
        # with the alert's image_sha256 (HeadObject with checksum mode) without reading the image.
        checksum = base64.b64encode(bytes.fromhex(sha256_hex)).decode("ascii")
        headers = [("Host", self._host_header), ("Content-Length", str(len(data))), ("Content-Type", "image/jpeg"),
                   ("x-amz-checksum-sha256", checksum)]
        request = crt_http.HttpRequest("PUT", self.path(key), crt_http.HttpHeaders(headers))
        provider = crt_auth.AwsCredentialsProvider.new_static(credentials.access_key_id,
                                                              credentials.secret_access_key,
                                                              credentials.session_token)
        config = crt_auth.AwsSigningConfig(
            algorithm=crt_auth.AwsSigningAlgorithm.V4, signature_type=crt_auth.AwsSignatureType.HTTP_REQUEST_HEADERS,
            credentials_provider=provider, region=self.region, service="s3", date=self._now(),
            signed_body_value=sha256_hex,
            signed_body_header_type=crt_auth.AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256,
            # S3 signs the path as sent: no second encoding, no normalisation of '//' or '.'.
            use_double_uri_encode=False, should_normalize_uri_path=False)
        try:
            signed = crt_auth.aws_sign_request(request, config).result(timeout=10.0)
        except Exception as exc:  # awscrt raises its own error types; the message holds no secret
            raise UploadError(f"signing the PUT of {self.uri(key)} failed: {type(exc).__name__}: {exc}") from exc
        return dict(signed.headers)

    # ------------------------------------------------------------ sending

    def put(self, key: str, data: bytes, sha256_hex: str) -> None:
        """Upload one object; returns once S3 answered 200.

        Credentials S3 refuses (expired, revoked, a bad signature) are dropped and fresh ones fetched
        for one more attempt at once; refused again, it is a transient UploadError (retried later).

        Raises:
            UploadError: ``permanent`` for refusals no retry can pass (access denied, no such bucket,
                too large); otherwise transient (network, 5xx, throttling, credentials).
        """
        for attempt in (1, 2):
            try:
                credentials = self.credentials.get()
            except CredentialsError as exc:
                raise UploadError(f"no credentials for {self.uri(key)}: {exc}") from exc
            try:
                self._send(key, data, sha256_hex, credentials)
                return
            except UploadError as exc:
                if exc.code not in CREDENTIAL_CODES:
                    raise
                self.credentials.invalidate(credentials)
                if attempt == 2:
                    raise
                log.info("S3 refused the credentials from %s (%s); fetching new ones", self.credentials.source.name,
                         exc.code)

    def _send(self, key: str, data: bytes, sha256_hex: str, credentials: Credentials) -> None:
        headers = self.signed_headers(key, data, sha256_hex, credentials)
        where = self.uri(key)
        with self._lock:
            reused = self._connection is not None
        try:
            response, body = self._exchange(self.path(key), headers, data)
        except (ConnectionError, http.client.RemoteDisconnected) as exc:
            if not reused:
                raise UploadError(f"PUT {where}: {type(exc).__name__}: {exc or 'connection closed'}") from exc
            # The store closed a kept-alive connection while it sat idle: one more try on a new one.
            try:
                response, body = self._exchange(self.path(key), headers, data)
            except (OSError, http.client.HTTPException) as again:
                raise UploadError(f"PUT {where}: {type(again).__name__}: {again or 'connection closed'}") from again
        except (OSError, http.client.HTTPException) as exc:
            raise UploadError(f"PUT {where}: {type(exc).__name__}: {exc or 'connection closed'}") from exc
        if response.status == 200:
            return
        code, message = _s3_error(body)
        status = response.status
        permanent = (400 <= status < 500 and status not in _TRANSIENT_STATUS and code not in CREDENTIAL_CODES
                     and code not in TRANSIENT_CODES)
        text = f"PUT {where}: HTTP {status} {code or response.reason}" + (f": {message}" if message else "")
        raise UploadError(text, permanent=permanent, code=code or None)

    def _exchange(self, path: str, headers: dict[str, str], data: bytes) -> tuple[http.client.HTTPResponse, bytes]:
        """Send one request on the kept-alive connection (opened if none); the response and up to 64 KiB of body."""
        with self._lock:
            if self._aborted:
                raise ConnectionAbortedError("the agent is stopping")
            connection = self._connection or self._connect()
            self._connection = connection
        try:
            connection.putrequest("PUT", path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers.items():
                connection.putheader(name, value)
            connection.endheaders(data)
            response = connection.getresponse()
            body = response.read(_MAX_ERROR_BODY)
        except BaseException:
            self._drop()
            raise
        if response.status != 200 or response.will_close:
            self._drop()  # an error body may not have been read to its end
        return response, body

    def _connect(self) -> http.client.HTTPConnection:
        if not self._https:
            return http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
        if self._context is None:
            self._context = ssl.create_default_context(cafile=str(self._ca) if self._ca else None)
        return http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout_s, context=self._context)

    def _drop(self) -> None:
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def abort(self) -> None:
        with self._lock:
            self._aborted = True  # no new connection, not even the one retry after a dropped keep-alive
            connection = self._connection
        sock = connection.sock if connection is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._drop()


def _s3_error(body: bytes) -> tuple[str, str]:
    """(Code, Message) of an S3 error document; empty strings when the body is not one.

    The rest of the document is left out on purpose: SignatureDoesNotMatch echoes the string to
    sign and the access key id.
    """
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return "", ""
    code = (root.findtext("Code") or "").strip()
    message = (root.findtext("Message") or "").strip()
    return code[:100], message[:300]


class FolderTarget:
    """A folder standing in for the bucket: ``<root>/<key>``, written under a temporary name, synced, then renamed,
    so a file at the key an alert names is the whole image, as with S3. Files get the process's umask:
    the folder is a destination (a share the cloud side reads), not the device's own store."""

    kind = "folder"

    def __init__(self, root: Path) -> None:
        self.root = root

    def uri(self, key: str) -> str:
        return (self.root / key).absolute().as_uri()

    def put(self, key: str, data: bytes, sha256_hex: str) -> None:
        path = self.root / key
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:  # a full or missing share may come back: retried
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise UploadError(f"write {path}: {exc.strerror or exc}") from exc

    def abort(self) -> None:
        pass  # a local write ends by itself

    def close(self) -> None:
        pass
