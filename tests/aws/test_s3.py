"""One S3 URI parser, and downloading a prefix: resumable, never a partial file, nothing outside the target."""

from __future__ import annotations

from pathlib import Path

import pytest

from qcsight_aws.errors import AwsError
from qcsight_aws.s3 import S3Object, S3Uri, download_objects, download_prefix, list_objects, upload_file
from qcsight_core.errors import ConfigError


def test_parse_splits_bucket_and_key() -> None:
    assert S3Uri.parse("s3://qc-data/tiles/train/") == S3Uri("qc-data", "tiles/train/")
    assert S3Uri.parse("s3://qc-data") == S3Uri("qc-data", "")
    assert str(S3Uri("qc-data", "tiles/train/")) == "s3://qc-data/tiles/train/"
    assert S3Uri("qc-data").uri == "s3://qc-data"


@pytest.mark.parametrize("text", ["/local/tiles", "checkpoints/", "s3://", "s3:///key", "s3://ab/key",
                                  "s3://Bad_Bucket/key", "https://qc-data.s3.amazonaws.com/key"])
def test_parse_refuses_what_is_not_an_s3_uri_naming_the_field(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        S3Uri.parse(text, "--data")
    assert caught.value.field == "--data" and "bucket: 3-63 lowercase" in caught.value.allowed


def test_legacy_bucket_names_only_when_asked() -> None:
    assert S3Uri.parse("s3://Old_Bucket/x.csv", legacy_bucket=True) == S3Uri("Old_Bucket", "x.csv")
    with pytest.raises(ConfigError, match="a tarball"):
        S3Uri.parse("s3://Old_Bucket/x.csv", "--model-s3", allowed="a tarball")


def test_prefix_and_join_normalise_slashes() -> None:
    out = S3Uri.parse("s3://qc-out/qcsight/models/")
    assert out.prefix == "qcsight/models/" and S3Uri("qc-out").prefix == ""
    assert out.join().uri == "s3://qc-out/qcsight/models"
    assert out.join("job-1/", "/output", "model.tar.gz").uri == "s3://qc-out/qcsight/models/job-1/output/model.tar.gz"


@pytest.mark.cloud
def test_download_prefix_fetches_once_and_keeps_keys_below_the_prefix(aws_endpoint: str, tmp_path: Path) -> None:
    boto3 = pytest.importorskip("boto3")
    client = boto3.client("s3")
    client.create_bucket(Bucket="line7")
    for key, body in (("v1/good/a.png", b"a"), ("v1/crack/b.png", b"bb"), ("v1/", b""), ("v10/other.png", b"x")):
        client.put_object(Bucket="line7", Key=key, Body=body)
    target = tmp_path / "cache"
    assert download_prefix(client, S3Uri.parse("s3://line7/v1"), target) == 2  # not v10/, not the folder marker
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == [
        "crack/b.png", "good/a.png"]
    assert download_prefix(client, S3Uri.parse("s3://line7/v1/"), target) == 0  # same sizes: nothing fetched
    (target / "good" / "a.png").write_bytes(b"changed")
    assert download_prefix(client, S3Uri.parse("s3://line7/v1/"), target) == 1
    assert (target / "good" / "a.png").read_bytes() == b"a"
    assert not list(target.rglob("*.part"))
    assert [o.key for o in list_objects(client, S3Uri("line7", "v1/"))] == ["v1/", "v1/crack/b.png", "v1/good/a.png"]


@pytest.mark.cloud
def test_a_missing_bucket_and_an_escaping_key_are_named(aws_endpoint: str, tmp_path: Path) -> None:
    boto3 = pytest.importorskip("boto3")
    client = boto3.client("s3")
    with pytest.raises(AwsError, match=r"listing s3://no-such-bucket/v1/ failed: NoSuchBucket"):
        download_prefix(client, S3Uri("no-such-bucket", "v1/"), tmp_path)
    with pytest.raises(AwsError, match="escapes the download folder"):
        download_objects(client, "line7", [S3Object("v1/../../etc/x", 1, "")], "v1/", tmp_path / "cache")
    with pytest.raises(AwsError, match=r"upload of a\.txt to s3://no-such-bucket/a\.txt failed: .*NoSuchBucket"):
        (tmp_path / "a.txt").write_text("a")
        upload_file(client, tmp_path / "a.txt", S3Uri("no-such-bucket", "a.txt"))
