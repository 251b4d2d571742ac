"""Who is asking: signed session cookies (local users), the load balancer's signed OIDC header, CSRF, login limits.

One switch (``ReviewSettings.auth``): ``local`` signs users in with a password and keeps them in a
signed, HttpOnly, SameSite=Strict session cookie; ``alb-oidc`` trusts nothing but the
``x-amzn-oidc-data`` JWT the AWS load balancer signs (ES256) after Cognito signed the user in, verified
against the load balancer's public key for its region and key id, the expected issuer and the expiry.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from itsdangerous import BadSignature, URLSafeTimedSerializer

from qcsight_review.errors import AuthError
from qcsight_review.users import ENGINEER, OPERATOR, User

log = logging.getLogger(__name__)

SESSION_COOKIE = "qcsight_session"
CSRF_COOKIE = "qcsight_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
OIDC_HEADER = "x-amzn-oidc-data"
# The public keys an ALB signs x-amzn-oidc-data with (AWS docs, "Authenticate users using an Application Load
# Balancer"); GovCloud regions use another host, which is why the template is a setting.
ALB_KEY_URL = "https://public-keys.auth.elb.{region}.amazonaws.com/{kid}"
_KID = re.compile(r"^[A-Za-z0-9-]{1,128}$")


# ---------------------------------------------------------------- sessions (local users)


@dataclass(frozen=True)
class Session:
    user: User
    csrf: str
    issued: float


class SessionCodec:
    """Signs and reads session cookies (itsdangerous, HMAC-SHA1 over a timestamped payload)."""

    def __init__(self, secret: bytes, max_age_s: int) -> None:
        self._serializer = URLSafeTimedSerializer(secret, salt="qcsight-review-session")
        self.max_age_s = max_age_s

    def issue(self, user: User) -> tuple[str, Session]:
        session = Session(user, secrets.token_urlsafe(32), time.time())
        value = self._serializer.dumps({"u": user.name, "r": user.role, "c": session.csrf})
        return value, session

    def read(self, value: str) -> Session:
        try:
            data, issued = self._serializer.loads(value, max_age=self.max_age_s, return_timestamp=True)
        except BadSignature as exc:  # SignatureExpired is a BadSignature
            raise AuthError(f"session cookie refused: {type(exc).__name__}") from exc
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("u", "r", "c")):
            raise AuthError("session cookie refused: malformed payload")
        if data["r"] not in (OPERATOR, ENGINEER):
            raise AuthError(f"session cookie refused: unknown role {data['r']!r}")
        return Session(User(data["u"], data["r"]), data["c"], issued.timestamp())


def csrf_matches(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


# ---------------------------------------------------------------- login rate limit


class LoginLimiter:
    """At most ``attempts`` failed logins per user name and per client address within ``window_s``.

    Bounded: it remembers at most ``max_keys`` names/addresses (the least recently failed go first), so a
    flood of invented names cannot grow it without limit.
    """

    def __init__(self, attempts: int = 5, window_s: float = 300.0, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.attempts, self.window_s, self.max_keys, self.clock = attempts, window_s, max_keys, clock
        self._failures: OrderedDict[str, list[float]] = OrderedDict()
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> list[float]:
        times = [t for t in self._failures.get(key, []) if now - t < self.window_s]
        if times:
            self._failures[key] = times
        else:
            self._failures.pop(key, None)
        return times

    def retry_after(self, *keys: str) -> float:
        """Seconds until another attempt is allowed for all keys (0: allowed now)."""
        now = self.clock()
        with self._lock:
            waits = [times[0] + self.window_s - now for key in keys
                     if len(times := self._recent(key, now)) >= self.attempts]
        return max(waits, default=0.0)

    def failed(self, *keys: str) -> None:
        now = self.clock()
        with self._lock:
            for key in keys:
                self._failures.setdefault(key, []).append(now)
                self._failures.move_to_end(key)
                del self._failures[key][:-self.attempts]
            while len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)

    def succeeded(self, name_key: str) -> None:
        with self._lock:
            self._failures.pop(name_key, None)


# ---------------------------------------------------------------- the load balancer's OIDC header


@dataclass(frozen=True)
class OidcSettings:
    """How to verify x-amzn-oidc-data.

    Attributes:
        issuer: the expected ``iss`` (the Cognito user pool's provider URL).
        region: the load balancer's region (picks the key endpoint).
        key_url: the key endpoint template ({region}, {kid}).
        signer: when set, the load balancer ARN the header's ``signer`` must equal.
        engineers: user names (or e-mails) given the engineer role when the token carries no groups.
        leeway_s: clock skew allowed on the expiry.
    """

    issuer: str
    region: str
    key_url: str = ALB_KEY_URL
    signer: str | None = None
    engineers: tuple[str, ...] = ()
    leeway_s: float = 60.0
    fetch_timeout_s: float = 5.0


def _b64decode(part: str) -> bytes:
    # The ALB pads its base64url segments with '=', which strict JWT libraries refuse; accept both.
    stripped = part.rstrip("=")
    try:
        return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError) as exc:
        raise AuthError("oidc header refused: a segment is not base64url") from exc


def _json_segment(part: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64decode(part))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AuthError(f"oidc header refused: the {what} is not JSON") from exc
    if not isinstance(value, dict):
        raise AuthError(f"oidc header refused: the {what} is not a JSON object")
    return value


KeyFetcher = Callable[[str], bytes]


def http_key_fetcher(timeout_s: float) -> KeyFetcher:
    def fetch(url: str) -> bytes:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                body: bytes = response.read(16_384)
                return body
        except (urllib.error.URLError, OSError) as exc:
            raise AuthError(f"oidc header refused: cannot fetch the load balancer key {url}: {exc}") from exc

    return fetch


class AlbOidcVerifier:
    """Verifies the load balancer's identity header; public keys are fetched once per key id and cached."""

    MAX_KEYS = 32

    def __init__(self, settings: OidcSettings, fetch: KeyFetcher | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.fetch = fetch or http_key_fetcher(settings.fetch_timeout_s)
        self.clock = clock
        self._keys: OrderedDict[str, ec.EllipticCurvePublicKey] = OrderedDict()
        self._lock = threading.Lock()
        self.fetches = 0

    def _key(self, kid: str) -> ec.EllipticCurvePublicKey:
        with self._lock:
            key = self._keys.get(kid)
        if key is not None:
            return key
        url = self.settings.key_url.format(region=self.settings.region, kid=kid)
        pem = self.fetch(url)
        self.fetches += 1
        try:
            loaded = serialization.load_pem_public_key(pem)
        except ValueError as exc:
            raise AuthError(f"oidc header refused: {url} did not return a PEM public key") from exc
        if not isinstance(loaded, ec.EllipticCurvePublicKey) or loaded.curve.name != "secp256r1":
            raise AuthError(f"oidc header refused: {url} is not a P-256 key")
        with self._lock:
            self._keys[kid] = loaded
            while len(self._keys) > self.MAX_KEYS:
                self._keys.popitem(last=False)
        return loaded

    def verify(self, token: str) -> User:
        parts = token.strip().split(".")
        if len(parts) != 3:
            raise AuthError("oidc header refused: not a JWT (header.payload.signature)")
        header, claims = _json_segment(parts[0], "header"), _json_segment(parts[1], "payload")
        if header.get("alg") != "ES256":
            raise AuthError(f"oidc header refused: alg {header.get('alg')!r}, expected ES256")
        kid = header.get("kid")
        if not isinstance(kid, str) or not _KID.match(kid):
            raise AuthError("oidc header refused: no valid key id (kid)")
        self._check_signature(self._key(kid), parts)
        issuer = header.get("iss", claims.get("iss"))
        if issuer != self.settings.issuer:
            raise AuthError(f"oidc header refused: issuer {issuer!r}, expected {self.settings.issuer!r}")
        if self.settings.signer is not None and header.get("signer") != self.settings.signer:
            raise AuthError(f"oidc header refused: signer {header.get('signer')!r} is not this load balancer")
        expiry = header.get("exp", claims.get("exp"))
        if isinstance(expiry, bool) or not isinstance(expiry, (int, float)):
            raise AuthError("oidc header refused: no expiry (exp)")
        if self.clock() > float(expiry) + self.settings.leeway_s:
            raise AuthError("oidc header refused: expired")
        return self._user(claims)

    @staticmethod
    def _check_signature(key: ec.EllipticCurvePublicKey, parts: list[str]) -> None:
        raw = _b64decode(parts[2])
        # JWS ES256 signs as r||s, 32 bytes each; DER is what cryptography verifies.
        signature = raw if len(raw) != 64 else encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                                                    int.from_bytes(raw[32:], "big"))
        try:
            key.verify(signature, f"{parts[0]}.{parts[1]}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError) as exc:
            raise AuthError("oidc header refused: bad signature") from exc

    def _user(self, claims: Mapping[str, Any]) -> User:
        name = next((claims[k] for k in ("username", "cognito:username", "email", "sub")
                     if isinstance(claims.get(k), str) and claims[k]), None)
        if name is None:
            raise AuthError("oidc header refused: no username, email or sub claim")
        groups = claims.get("cognito:groups", [])
        groups = [groups] if isinstance(groups, str) else groups if isinstance(groups, list) else []
        engineer = ENGINEER in groups or name in self.settings.engineers or claims.get("email") in \
            self.settings.engineers
        return User(name, ENGINEER if engineer else OPERATOR)
