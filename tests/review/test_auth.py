"""Auth units: users and their hashes, signed sessions, the sign-in limiter, the load balancer's OIDC header."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.testclient import TestClient

from qcsight_review.app import create_app
from qcsight_review.auth import AlbOidcVerifier, LoginLimiter, OidcSettings, SessionCodec
from qcsight_review.errors import AuthError, UserError
from qcsight_review.images import FolderImages
from qcsight_review.settings import ALB_OIDC, ReviewSettings
from qcsight_review.users import ENGINEER, OPERATOR, User, UserStore
from tests.review.conftest import Env
from tests.review.oidc import ISSUER, SIGNER, AlbKeys, key_server


def test_users_are_stored_as_bcrypt_hashes_and_verified(tmp_path: Path) -> None:
    users = UserStore(tmp_path / "users.sqlite", rounds=4)
    users.add("ana", OPERATOR, "a long enough secret")
    assert users.verify("ana", "a long enough secret") == User("ana", OPERATOR)
    assert users.verify("ana", "a long enough secreT") is None
    assert users.verify("nobody", "a long enough secret") is None
    stored = sqlite3.connect(tmp_path / "users.sqlite").execute("SELECT hash FROM users").fetchone()[0]
    assert bytes(stored).startswith(b"$2b$04$") and b"secret" not in bytes(stored)
    with pytest.raises(UserError, match="exists"):
        users.add("ana", ENGINEER, "another long secret")
    users.add("ana", ENGINEER, "another long secret", replace=True)
    assert users.verify("ana", "another long secret") == User("ana", ENGINEER)
    with pytest.raises(UserError, match="password"):
        users.add("bob", OPERATOR, "short")
    with pytest.raises(UserError, match="password"):
        users.add("bob", OPERATOR, "é" * 40)  # 80 bytes: bcrypt would ignore the tail
    with pytest.raises(UserError, match="role"):
        users.add("bob", "admin", "a long enough secret")
    with pytest.raises(UserError, match="user name"):
        users.add("../bob", OPERATOR, "a long enough secret")
    users.close()


def test_sessions_are_signed_and_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = SessionCodec(b"k" * 32, max_age_s=3600)
    value, session = codec.issue(User("ana", OPERATOR))
    assert codec.read(value).user == User("ana", OPERATOR)
    assert codec.read(value).csrf == session.csrf
    with pytest.raises(AuthError):
        SessionCodec(b"x" * 32, max_age_s=3600).read(value)  # another key
    payload, stamp, signature = value.split(".")
    with pytest.raises(AuthError):
        codec.read(f"{payload}.{stamp}.{signature[:-2]}AA")
    import itsdangerous.timed

    later = itsdangerous.timed.time.time() + 3601
    monkeypatch.setattr(itsdangerous.timed.time, "time", lambda: later)
    with pytest.raises(AuthError, match="SignatureExpired"):
        codec.read(value)


def test_the_limiter_counts_failures_per_key_within_its_window() -> None:
    now = [0.0]
    limiter = LoginLimiter(attempts=3, window_s=60, max_keys=4, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.retry_after("user:ana", "ip:1") == 0
        limiter.failed("user:ana", "ip:1")
    assert limiter.retry_after("user:ana") == pytest.approx(60)
    assert limiter.retry_after("user:bob", "ip:1") == pytest.approx(60), "the address is limited too"
    assert limiter.retry_after("user:bob", "ip:2") == 0
    now[0] = 61
    assert limiter.retry_after("user:ana", "ip:1") == 0
    for i in range(10):
        limiter.failed(f"user:{i}")
    assert len(limiter._failures) <= 4, "bounded memory"


@pytest.fixture
def alb() -> Iterator[AlbKeys]:
    with key_server(AlbKeys()) as keys:
        yield keys


def _verifier(keys: AlbKeys, **overrides: object) -> AlbOidcVerifier:
    settings = OidcSettings(issuer=ISSUER, region="eu-west-1", key_url=keys.url, signer=SIGNER,
                            engineers=("eng@example.com",))
    return AlbOidcVerifier(OidcSettings(**{**settings.__dict__, **overrides}))  # type: ignore[arg-type]


def test_the_alb_header_is_verified_and_its_key_fetched_once(alb: AlbKeys) -> None:
    verifier = _verifier(alb)
    assert verifier.verify(alb.token()) == User("ana", OPERATOR)
    assert verifier.verify(alb.token({"username": "eve", "cognito:groups": ["engineer"]})) == User("eve", ENGINEER)
    assert verifier.verify(alb.token({"username": "zed", "email": "eng@example.com"})).role == ENGINEER
    assert alb.requests == [f"/{alb.kid}"], "the key is cached by key id"


@pytest.mark.parametrize("case", ["other_key", "issuer", "expired", "alg", "unknown_kid", "bad_kid", "tampered",
                                  "signer", "garbage"])
def test_a_forged_or_stale_alb_header_is_refused(alb: AlbKeys, case: str) -> None:
    verifier = _verifier(alb)
    token = {
        "other_key": lambda: alb.token(key=ec.generate_private_key(ec.SECP256R1())),
        "issuer": lambda: alb.token(issuer="https://evil.example.com"),
        "expired": lambda: alb.token(expires_in=-600),
        "alg": lambda: alb.token(alg="HS256"),
        "unknown_kid": lambda: alb.token(kid="0000-1111"),
        "bad_kid": lambda: alb.token(kid="../../etc/passwd"),
        "tampered": lambda: alb.token().replace(alb.token().split(".")[1],
                                                alb.token({"username": "eng"}).split(".")[1]),
        "signer": lambda: alb.token(),
        "garbage": lambda: "not.a.jwt",
    }[case]()
    if case == "signer":
        verifier = _verifier(alb, signer="arn:aws:elasticloadbalancing:eu-west-1:123456789012:loadbalancer/app/x/1")
    with pytest.raises(AuthError, match="oidc header refused"):
        verifier.verify(token)


def test_behind_the_load_balancer_only_a_verified_header_gets_in(alb: AlbKeys, env: Env, tmp_path: Path) -> None:
    settings = ReviewSettings(auth=ALB_OIDC, oidc=OidcSettings(ISSUER, "eu-west-1", key_url=alb.url))
    app = create_app(settings, env.store, FolderImages(env.seeded.images), verifier=AlbOidcVerifier(settings.oidc))
    client = TestClient(app, base_url="https://review.example.com")
    assert client.get("/inbox").status_code == 401
    assert client.get("/inbox", headers={"x-amzn-oidc-data": alb.token(expires_in=-600)}).status_code == 401
    assert client.get("/login", follow_redirects=False).status_code == 303, "no password sign-in behind the ALB"
    page = client.get("/inbox", headers={"x-amzn-oidc-data": alb.token()})
    assert page.status_code == 200 and "ana (operator)" in page.text
    assert "strict-transport-security" in page.headers
    assert client.get("/fleet", headers={"x-amzn-oidc-data": alb.token()}).status_code == 403
    # Forms still need the CSRF token (double submit: the cookie the page set, echoed by the form).
    token = page.text.split('name="csrf-token" content="')[1].split('"')[0]
    alert_id = env.seeded.alert_ids[0]
    headers = {"x-amzn-oidc-data": alb.token()}
    assert client.post(f"/alerts/{alert_id}/review", data={"action": "confirm"}, headers=headers).status_code == 403
    response = client.post(f"/alerts/{alert_id}/review", data={"action": "confirm", "csrf_token": token},
                           headers=headers)
    assert response.status_code == 200 and [r.reviewer for r in env.store.reviews(alert_id)] == ["ana"]
