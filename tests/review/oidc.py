"""A stand-in for the ALB's signing side: an ES256 key, its PEM served on loopback by key id, and signed headers.

The app fetches the key exactly as from https://public-keys.auth.elb.<region>.amazonaws.com/<kid>
(the key URL template points here), and verifies what the load balancer signs: header fields alg,
kid, signer, iss, client, exp; base64url segments padded with '=' as the ALB pads them.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

ISSUER = "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_TEST"
SIGNER = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:loadbalancer/app/qcsight-review/0123456789abcdef"


def _segment(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")  # padded, as the ALB sends it


@dataclass
class AlbKeys:
    kid: str = "9b2f3e84-1c1d-4c6e-9a55-3f4f6a0b1c2d"
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    requests: list[str] = field(default_factory=list)
    url: str = ""

    def pem(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)

    def token(self, claims: dict[str, Any] | None = None, *, issuer: str = ISSUER, expires_in: float = 60,
              alg: str = "ES256", key: ec.EllipticCurvePrivateKey | None = None, kid: str | None = None) -> str:
        header = {"alg": alg, "kid": kid or self.kid, "signer": SIGNER, "iss": issuer, "client": "client-id",
                  "exp": int(time.time() + expires_in)}
        body = {"sub": "3f1c", "username": "ana", "email": "ana@example.com", "exp": int(time.time() + expires_in),
                "iss": issuer, **(claims or {})}
        signing_input = f"{_segment(json.dumps(header).encode())}.{_segment(json.dumps(body).encode())}"
        der = (key or self.key).sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{_segment(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


@contextmanager
def key_server(keys: AlbKeys) -> Iterator[AlbKeys]:
    """Serves GET /<kid> with the PEM (404 for any other id), as the ELB key endpoint does."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            keys.requests.append(self.path)
            if self.path == f"/{keys.kid}":
                body = keys.pem()
                self.send_response(200)
            else:
                body = b"not found"
                self.send_response(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    keys.url = f"http://127.0.0.1:{server.server_address[1]}/{{kid}}"
    try:
        yield keys
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
