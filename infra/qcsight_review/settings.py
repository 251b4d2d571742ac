"""The review app's configuration, read once from flags and the environment the CDK stack sets (stacks.names.Env)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from qcsight_core.errors import ConfigError
from qcsight_review.auth import ALB_KEY_URL, OidcSettings

LOCAL, ALB_OIDC = "local", "alb-oidc"
AUTH_MODES = (LOCAL, ALB_OIDC)
DEFAULT_STORE = "sqlite:qcsight-cloud.sqlite"
DEFAULT_USERS = "qcsight-review-users.sqlite"

# Environment names, as stacks/names.py (Env) sets them for the container.
ENV_AUTH = "QCSIGHT_REVIEW_AUTH"
ENV_OIDC_ISSUER = "QCSIGHT_REVIEW_OIDC_ISSUER"
ENV_REGION = "QCSIGHT_REVIEW_AWS_REGION"
ENV_ALERTS_TABLE = "QCSIGHT_ALERTS_TABLE"
ENV_IMAGES_BUCKET = "QCSIGHT_IMAGES_BUCKET"
ENV_ALERT_TOPIC = "QCSIGHT_ALERT_TOPIC_ARN"
ENV_STORE = "QCSIGHT_STORE"
ENV_SECRET = "QCSIGHT_REVIEW_SECRET"
ENV_ENGINEERS = "QCSIGHT_REVIEW_ENGINEERS"
ENV_KEY_URL = "QCSIGHT_REVIEW_OIDC_KEY_URL"
ENV_SIGNER = "QCSIGHT_REVIEW_ALB_ARN"


@dataclass(frozen=True)
class BurstSettings:
    """A defect burst: more than ``max_alerts`` defect alerts on one line within ``window_s``."""

    max_alerts: int = 20
    window_s: float = 600.0
    check_every_s: float = 60.0
    webhook: str | None = None
    topic_arn: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_alerts, bool) or not isinstance(self.max_alerts, int) or self.max_alerts < 1:
            raise ConfigError("burst.max_alerts", self.max_alerts, "an integer of at least 1")
        if not 1 <= self.window_s <= 86400:
            raise ConfigError("burst.window_s", self.window_s, "seconds from 1 to 86400")
        if not 1 <= self.check_every_s <= 3600:
            raise ConfigError("burst.check_every_s", self.check_every_s, "seconds from 1 to 3600")


@dataclass(frozen=True)
class ReviewSettings:
    """Everything `qcsight review serve` needs.

    Attributes:
        store: the alert store URL (sqlite:PATH or dynamodb:PREFIX).
        auth: ``local`` (users file, password login) or ``alb-oidc`` (the load balancer's signed header).
        users: the local users file.
        secret: the key that signs session cookies (local auth).
        images: a folder, ``s3://BUCKET``, or None (thumbnails only).
        oidc: how to verify the load balancer's header (alb-oidc only).
        good_label: the class a false alarm is labelled with in exports.
        session_hours: how long a local session lasts.
        page_size: alerts per inbox page.
        base_url: the app's public URL, for links in notifications.
        lines: lines the inbox offers (others are reachable by URL); empty: lines of the devices seen.
        burst: defect-burst notifications, or None.
    """

    store: str = DEFAULT_STORE
    auth: str = LOCAL
    users: Path = Path(DEFAULT_USERS)
    secret: bytes = b""
    images: str | None = None
    oidc: OidcSettings | None = None
    good_label: str = "good"
    session_hours: int = 12
    page_size: int = 50
    base_url: str = "http://127.0.0.1:8000"
    burst: BurstSettings | None = None

    def __post_init__(self) -> None:
        if self.auth not in AUTH_MODES:
            raise ConfigError("review.auth", self.auth, f"one of {', '.join(AUTH_MODES)} (${ENV_AUTH})")
        if self.auth == ALB_OIDC and self.oidc is None:
            raise ConfigError("review.oidc", None, f"an issuer (${ENV_OIDC_ISSUER}) and region (${ENV_REGION}) "
                              "for alb-oidc auth")
        if self.auth == LOCAL and len(self.secret) < 32:
            raise ConfigError("review.secret", "<hidden>", "at least 32 bytes to sign session cookies")
        if not 1 <= self.session_hours <= 24 * 7:
            raise ConfigError("review.session_hours", self.session_hours, "hours from 1 to 168")
        if not 1 <= self.page_size <= 200:
            raise ConfigError("review.page_size", self.page_size, "an integer from 1 to 200")

    @property
    def secure_cookies(self) -> bool:
        """Behind the load balancer every request came over HTTPS."""
        return self.auth == ALB_OIDC


def store_from_environment(env: Mapping[str, str]) -> str:
    """$QCSIGHT_STORE, else the DynamoDB prefix of $QCSIGHT_ALERTS_TABLE (PREFIX-alerts), else the local file."""
    if env.get(ENV_STORE):
        return env[ENV_STORE]
    table = env.get(ENV_ALERTS_TABLE, "")
    if table.endswith("-alerts") and len(table) > len("-alerts"):
        return "dynamodb:" + table[: -len("-alerts")]
    return DEFAULT_STORE


def images_from_environment(env: Mapping[str, str]) -> str | None:
    bucket = env.get(ENV_IMAGES_BUCKET)
    return f"s3://{bucket}" if bucket else None


def oidc_from_environment(env: Mapping[str, str]) -> OidcSettings | None:
    issuer, region = env.get(ENV_OIDC_ISSUER), env.get(ENV_REGION) or env.get("AWS_REGION")
    if not issuer or not region:
        return None
    engineers = tuple(n.strip() for n in env.get(ENV_ENGINEERS, "").split(",") if n.strip())
    return OidcSettings(issuer=issuer, region=region, key_url=env.get(ENV_KEY_URL) or ALB_KEY_URL,
                        signer=env.get(ENV_SIGNER) or None, engineers=engineers)


def load_secret(users: Path, env: Mapping[str, str]) -> bytes:
    """$QCSIGHT_REVIEW_SECRET, else a random key kept next to the users file (created 0600 on first start)."""
    if env.get(ENV_SECRET):
        return env[ENV_SECRET].encode("utf-8")
    path = users.with_name(users.name + ".secret")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
    return path.read_text().strip().encode("utf-8")
