"""Image sources: a folder serves only its own files; S3 presigns (SigV4) only an upload that exists; SNS bursts."""

from __future__ import annotations

from pathlib import Path

import boto3
from botocore.config import Config
from botocore.stub import Stubber

from qcsight_review.images import FolderImages, S3Images, s3_client
from qcsight_review.notify import Burst, SnsNotifier


def test_a_folder_serves_its_own_files_only(tmp_path: Path) -> None:
    root = tmp_path / "images"
    (root / "cam-1").mkdir(parents=True)
    (root / "cam-1" / "a.jpg").write_bytes(b"jpeg")
    (root / "b.jpg").write_bytes(b"jpeg")
    (tmp_path / "secret.txt").write_text("no")
    images = FolderImages(root)
    found = images.locate((root / "cam-1" / "a.jpg").as_uri())
    assert found is not None and found.path == (root / "cam-1" / "a.jpg").resolve()
    assert images.locate("s3://bucket/cam-1/a.jpg") is not None, "an S3 key mirrored into the folder"
    assert images.locate("b.jpg") is not None, "a bare name in the device's local store"
    for ref in ((tmp_path / "secret.txt").as_uri(), "s3://bucket/../secret.txt", "../secret.txt",
                "file:///etc/passwd", "http://example.com/a.jpg", (root / "missing.jpg").as_uri()):
        assert images.locate(ref) is None, ref


def _client(service: str) -> object:
    return boto3.client(service, region_name="eu-west-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing", config=Config(retries={"max_attempts": 1}))


def test_s3_presigns_an_uploaded_image_and_reports_a_missing_one() -> None:
    client = s3_client(region_name="eu-west-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    images = S3Images(client, "qcsight-images")
    with Stubber(client) as stub:
        stub.add_response("head_object", {"ContentLength": 4}, {"Bucket": "qcsight-images",
                                                                 "Key": "devices/cam-1/2026-11-30/a.jpg"})
        stub.add_client_error("head_object", service_error_code="404", http_status_code=404,
                              expected_params={"Bucket": "qcsight-images", "Key": "devices/cam-1/2026-11-30/b.jpg"})
        found = images.locate("s3://qcsight-images/devices/cam-1/2026-11-30/a.jpg")
        assert images.locate("s3://qcsight-images/devices/cam-1/2026-11-30/b.jpg") is None
        stub.assert_no_pending_responses()
    assert found is not None and found.uri == "s3://qcsight-images/devices/cam-1/2026-11-30/a.jpg"
    assert found.url is not None and "X-Amz-Signature=" in found.url and "X-Amz-Expires=300" in found.url
    assert images.locate("s3://another-bucket/devices/a.jpg") is None, "only the configured bucket"


def test_a_burst_is_published_to_the_sns_topic() -> None:
    client = _client("sns")
    topic = "arn:aws:sns:eu-west-1:123456789012:qcsight-alerts"
    burst = Burst("line-1", 21, 600, "2026-11-30T22:00:00.000Z", "https://review.example.com/inbox?line=line-1")
    with Stubber(client) as stub:
        stub.add_response("publish", {"MessageId": "1"}, {"TopicArn": topic, "Subject": "qcsight defect burst on "
                                                          "line-1", "Message": burst.text()})
        SnsNotifier(client, topic).notify(burst)
        stub.assert_no_pending_responses()
    assert "https://review.example.com/inbox?line=line-1" in burst.text()
