"""S3 PUTs signed on the device (awscrt's SigV4), against moto's S3 with IAM authentication on: a good signature
stores the object, a wrong secret is refused and retried after a credentials refresh, an expired session is
refused and replaced, a key outside the role's policy is refused for good; the signature matches botocore's
signer; the uploader backs off on a failing target, dead-letters permanent refusals and goes on."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials

from qcsight_edge.credentials import CachedCredentials, Credentials, IotCredentialsSource
from qcsight_edge.errors import UploadError
from qcsight_edge.s3 import FolderTarget, S3Target
from qcsight_edge.uploader import ImageUploader, UploaderSettings
from qcsight_edge.uploadqueue import UploadQueue
from tests.edge.aws_peers import BUCKET, REGION, CredentialsIssuer, IotCredentialsServer, MotoAws, moto_with_iam
from tests.edge.broker import Pki
from tests.helpers.aws import moto_server
from tests.helpers.wait import eventually

THING = "line1-cam1"
KEY = f"images/{THING}/2024-05-01/0123abcd.jpg"
DATA = bytes(random.Random(0).getrandbits(8) for _ in range(50_000))
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture(scope="module")
def aws() -> Iterator[MotoAws]:
    with moto_server() as url, moto_with_iam(url, THING) as aws:
        yield aws


class FixedSource:
    """Credentials as given (right or wrong), counting fetches: the credentials service is not under test here."""

    name = "fixed"

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials
        self.fetched = 0

    def fetch(self) -> Credentials:
        self.fetched += 1
        return self.credentials


def issued(aws: MotoAws) -> Credentials:
    item = CredentialsIssuer(aws).issue("test")
    return Credentials(item.access_key_id, item.secret_access_key, item.session_token,
                       item.expiration.timestamp())


def target(aws: MotoAws, source: object, **kw: object) -> S3Target:
    return S3Target(BUCKET, REGION, CachedCredentials(source), endpoint=aws.url,  # type: ignore[arg-type]
                    path_style=True, timeout_s=10.0, **kw)  # type: ignore[arg-type]


def test_a_signed_put_stores_the_object_and_a_wrong_secret_is_refused_then_retried_after_a_refresh(
        aws: MotoAws) -> None:
    good = issued(aws)
    wrong = FixedSource(Credentials(good.access_key_id, "not-the-secret", good.session_token, good.expiration))
    s3 = target(aws, wrong)
    with pytest.raises(UploadError) as caught:
        s3.put(KEY, DATA, SHA)
    assert caught.value.code == "SignatureDoesNotMatch" and not caught.value.permanent, caught.value
    assert wrong.fetched == 2  # refused, dropped, fetched again, refused again: retried later, not dead-lettered
    assert "not-the-secret" not in str(caught.value) and good.session_token not in str(caught.value)
    assert KEY not in aws.objects()
    wrong.credentials = good  # the credentials service answers right again
    s3.put(KEY, DATA, SHA)
    assert aws.objects()[KEY] == DATA


def test_an_expired_session_is_refused_and_replaced_by_fresh_credentials_from_the_iot_provider(
        aws: MotoAws, pki: Pki) -> None:
    issuer = CredentialsIssuer(aws)
    ident = pki.identity(THING)
    with IotCredentialsServer(pki, issuer, "qcsight-images") as server:
        source = IotCredentialsSource("localhost", "qcsight-images", THING, ident.cert, ident.key, pki.ca,
                                      port=server.port)
        s3 = target(aws, source)
        s3.put(KEY.replace(".jpg", "-1.jpg"), DATA, SHA)
        issuer.expire_all()  # the session ends before its stated expiration (revoked, or the clock was off)
        s3.put(KEY.replace(".jpg", "-2.jpg"), DATA, SHA)
    assert len(server.requests) == 2  # the refusal made the uploader fetch new credentials once
    assert {KEY.replace(".jpg", "-1.jpg"), KEY.replace(".jpg", "-2.jpg")} <= set(aws.objects())


def test_a_key_outside_the_roles_policy_is_refused_for_good(aws: MotoAws) -> None:
    s3 = target(aws, FixedSource(issued(aws)))
    with pytest.raises(UploadError) as caught:
        s3.put("images/another-thing/2024-05-01/x.jpg", DATA, SHA)
    assert caught.value.permanent and caught.value.code == "AccessDenied", caught.value


def test_the_signature_is_the_one_botocore_computes_for_the_same_request(aws: MotoAws) -> None:
    creds = Credentials("ASIAEXAMPLE", "secret/with+chars", "session-token", None)
    key = "site a/ü+x~/images/line1-cam1/2024-05-01/a b.jpg"
    signing_time = datetime(2024, 5, 1, 12, 30, 45, tzinfo=timezone.utc)
    s3 = S3Target(BUCKET, REGION, CachedCredentials(FixedSource(creds)), endpoint="http://127.0.0.1:9000",
                  path_style=True, now=lambda: signing_time)
    headers = s3.signed_headers(key, DATA, SHA, creds)
    assert headers["X-Amz-Date"] == "20240501T123045Z" and headers["x-amz-content-sha256"] == SHA
    request = AWSRequest(method="PUT", url=f"http://127.0.0.1:9000{s3.path(key)}", data=DATA,
                         headers={k: v for k, v in headers.items() if k != "Authorization"})
    request.context["timestamp"] = headers["X-Amz-Date"]
    signer = S3SigV4Auth(BotoCredentials(creds.access_key_id, creds.secret_access_key, creds.session_token), "s3",
                         REGION)
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    assert headers["Authorization"].endswith(f"Signature={expected}")
    # And moto, checking with the same signer, takes such a key from credentials it issued.
    allowed = f"images/{THING}/2024-05-01/a b+ü~.jpg"
    target(aws, FixedSource(issued(aws))).put(allowed, DATA, SHA)
    assert aws.objects()[allowed] == DATA


def test_the_uploader_backs_off_on_a_failing_target_dead_letters_a_refusal_and_goes_on(
        aws: MotoAws, tmp_path: Path) -> None:
    # A refusal for good (outside the role's policy) must not hold up the next image.
    queue = UploadQueue(tmp_path / "uploads.db")
    s3 = target(aws, FixedSource(issued(aws)))
    denied = ImageUploader(queue, s3, "another-thing", settings=UploaderSettings(0.01, 0.05, 0.05))
    denied.submit("a1", 1_714_566_645.0, DATA)
    allowed = ImageUploader(queue, s3, THING, settings=UploaderSettings(0.01, 0.05, 0.05))
    queued = allowed.submit("a2", 1_714_566_645.0, DATA)
    assert denied.step() == 0.0 and allowed.step() == 0.0
    assert [(item.alert_id, item.kind) for item in queue.lost()] == [("a1", "refused")]
    assert "AccessDenied" in queue.lost()[0].reason
    assert aws.objects()[queued.uri.removeprefix(f"s3://{BUCKET}/")] == DATA
    queue.close()

    # A folder target whose folder cannot be made (a file is in the way): retried with backoff until it can.
    blocker = tmp_path / "share"
    blocker.write_text("not a folder")
    folder = ImageUploader(UploadQueue(tmp_path / "folder.db"), FolderTarget(blocker / "bucket"), THING,
                           settings=UploaderSettings(0.01, 0.05, 0.05), rng=random.Random(0))
    queued = folder.submit("a3", 1_714_566_645.0, DATA)
    folder.start()
    try:
        eventually(lambda: folder.stats()["failed_attempts"] >= 3, 10.0)
        assert folder.stats()["backlog"] == 1 and "Not a directory" in folder.stats()["last_error"]
        blocker.unlink()
        eventually(lambda: folder.stats()["uploaded"] == 1, 10.0)
    finally:
        folder.stop(2.0)
        folder.close()
    written = Path(queued.uri.removeprefix("file://"))
    assert written == blocker / "bucket" / f"images/{THING}/2024-05-01/a3.jpg" and written.read_bytes() == DATA
    assert hashlib.sha256(written.read_bytes()).hexdigest() == queued.sha256
