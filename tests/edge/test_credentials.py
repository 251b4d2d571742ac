"""Device credentials: the IoT credentials provider over mutual TLS and the Greengrass Token Exchange Service,
each against a loopback stand-in that checks what the real one checks; cached and refreshed before expiry;
no secret in an error message or a repr."""

from __future__ import annotations

from pathlib import Path

import pytest

from qcsight_edge.clock import ManualClock
from qcsight_edge.credentials import (
    CachedCredentials,
    ContainerCredentialsSource,
    Credentials,
    EnvironmentCredentialsSource,
    IotCredentialsSource,
)
from qcsight_edge.errors import CredentialsError
from tests.edge.aws_peers import TES_PATH, IotCredentialsServer, LocalIssuer, TokenExchangeServer
from tests.edge.broker import Pki

THING = "line1-cam1"
ALIAS = "qcsight-images"


def iot_source(pki: Pki, server: IotCredentialsServer, thing: str = THING, cert_of: str = THING,
               alias: str = ALIAS) -> IotCredentialsSource:
    ident = pki.identity(cert_of)
    return IotCredentialsSource("localhost", alias, thing, ident.cert, ident.key, pki.ca, port=server.port,
                                timeout_s=5.0)


def test_iot_credentials_provider_gives_the_role_credentials_to_the_certificate_of_the_named_thing(pki: Pki) -> None:
    issuer = LocalIssuer()
    with IotCredentialsServer(pki, issuer, ALIAS) as server:
        creds = iot_source(pki, server).fetch()
    issued = issuer.issued[0]
    assert (creds.access_key_id, creds.secret_access_key, creds.session_token) == (
        issued.access_key_id, issued.secret_access_key, issued.session_token)
    assert creds.expiration == pytest.approx(issued.expiration.timestamp(), abs=1.0)
    assert server.requests == [{"path": f"/role-aliases/{ALIAS}/credentials", "thing": THING, "cn": THING}]
    assert server.sni == ["localhost"]  # IoT requires the endpoint's name in SNI


@pytest.mark.parametrize(("thing", "cert_of", "alias", "expected"), [
    (THING, "line2-cam9", ALIAS, "HTTP 403 Forbidden: Thing name is not attached to the certificate"),
    (THING, THING, "another-alias", "HTTP 403 Forbidden: Role alias does not exist"),
])
def test_iot_credentials_provider_refusals_are_named(pki: Pki, thing: str, cert_of: str, alias: str,
                                                     expected: str) -> None:
    with IotCredentialsServer(pki, LocalIssuer(), ALIAS) as server, \
            pytest.raises(CredentialsError, match=expected) as caught:
        iot_source(pki, server, thing, cert_of, alias).fetch()
    assert f"https://localhost:{server.port}/role-aliases/{alias}" in str(caught.value)


def test_iot_credentials_provider_refuses_a_certificate_of_another_ca(pki: Pki) -> None:
    rogue = pki.rogue_identity(THING)
    with IotCredentialsServer(pki, LocalIssuer(), ALIAS) as server:
        source = IotCredentialsSource("localhost", ALIAS, THING, rogue.cert, rogue.key, pki.ca, port=server.port,
                                      timeout_s=5.0)
        with pytest.raises(CredentialsError, match="IoT credentials provider"):
            source.fetch()
        assert server.requests == []  # refused in the handshake, before any request


def test_token_exchange_service_needs_the_components_token(tmp_path: Path) -> None:
    issuer = LocalIssuer()
    with TokenExchangeServer(issuer, token="svc-token-123") as server:
        creds = ContainerCredentialsSource.from_environment({
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": server.uri, "AWS_CONTAINER_AUTHORIZATION_TOKEN": "svc-token-123",
        }).fetch()
        assert creds.secret_access_key == issuer.issued[0].secret_access_key
        assert creds.session_token == issuer.issued[0].session_token
        with pytest.raises(CredentialsError, match="HTTP 403") as caught:
            ContainerCredentialsSource(server.uri, token="stolen").fetch()
        assert "stolen" not in str(caught.value)
        # AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE: read at each fetch, since it may be rotated.
        token_file = tmp_path / "token"
        token_file.write_text("svc-token-123\n")
        assert ContainerCredentialsSource(server.uri, token_file=token_file).fetch().access_key_id
    assert [r["authorized"] for r in server.requests] == [True, False, True]
    assert {r["path"] for r in server.requests} == {TES_PATH}


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, "AWS_CONTAINER_CREDENTIALS_FULL_URI is not set: under Greengrass the component must depend on "
         "aws.greengrass.TokenExchangeService"),
    ({"AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://127.0.0.1:1/x"}, "AWS_CONTAINER_AUTHORIZATION_TOKEN"),
    ({"AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://10.1.2.3/creds", "AWS_CONTAINER_AUTHORIZATION_TOKEN": "t"},
     "plain http is allowed only to a loopback address"),
])
def test_token_exchange_service_settings_are_checked(environ: dict[str, str], expected: str) -> None:
    with pytest.raises(CredentialsError, match=expected):
        ContainerCredentialsSource.from_environment(environ)


class CountingSource:
    name = "counting"

    def __init__(self, clock: ManualClock, lifetime_s: float) -> None:
        self.clock = clock
        self.lifetime_s = lifetime_s
        self.fetched = 0

    def fetch(self) -> Credentials:
        self.fetched += 1
        return Credentials(f"AKID{self.fetched}", f"secret-{self.fetched}", "token",
                           self.clock.time() + self.lifetime_s)


def test_credentials_are_refreshed_before_they_expire_and_after_a_refusal() -> None:
    clock = ManualClock()
    source = CountingSource(clock, lifetime_s=3600)
    cache = CachedCredentials(source, refresh_before_s=300, clock=clock)
    first = cache.get()
    clock.advance(3600 - 301)
    assert cache.get() is first and source.fetched == 1  # still more than 5 minutes left
    clock.advance(2)
    second = cache.get()
    assert second.access_key_id == "AKID2"  # 4 min 59 s left: refreshed before they expire
    cache.invalidate(first)
    assert cache.get() is second  # a refusal of credentials already replaced changes nothing
    cache.invalidate(second)
    assert cache.get().access_key_id == "AKID3"


def test_no_secret_in_a_repr_or_a_refusal(pki: Pki) -> None:
    creds = Credentials("ASIAEXAMPLE", "wJalrXUtnFEMI/K7MDENG", "FQoGZXIvYXdzE", 1_700_000_000.0)
    assert "wJalr" not in repr(creds) and "FQoG" not in str(creds) and "ASIAEXAMPLE" in repr(creds)
    with pytest.raises(CredentialsError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set"):
        EnvironmentCredentialsSource({"AWS_ACCESS_KEY_ID": "x"}).fetch()
