"""AWS failures become one qcsight error naming the call, with AWS's code and message (real botocore errors)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qcsight_aws.errors import AwsError, aws_errors, describe
from qcsight_aws.session import boto_session
from qcsight_core.errors import QcsightError

boto3 = pytest.importorskip("boto3")
Stubber = pytest.importorskip("botocore.stub").Stubber


class SubmitError(AwsError):
    """A package's own error type, as batch's submit would pass it."""


def test_a_client_error_names_the_operation_code_and_message() -> None:
    client = boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    with Stubber(client) as stub:
        stub.add_client_error("describe_training_job", "ValidationException", "Requested resource not found.")
        with pytest.raises(SubmitError) as caught, aws_errors("DescribeTrainingJob", SubmitError):
            client.describe_training_job(TrainingJobName="nope")
    assert str(caught.value) == "DescribeTrainingJob failed: ValidationException: Requested resource not found."
    assert describe(caught.value.__cause__) == "ValidationException: Requested resource not found."
    assert isinstance(caught.value, QcsightError)


def test_missing_credentials_say_what_to_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(AwsError, match=r"no AWS credentials found .*; or use --dry-run"):
        boto_session("us-east-1", hint="or use --dry-run")
    client = boto_session("us-east-1", need_credentials=False).client("s3")
    with pytest.raises(AwsError, match=r"ListBuckets: no usable AWS credentials .*AWS_PROFILE"), \
            aws_errors("ListBuckets"):
        client.list_buckets()


def test_other_exceptions_pass_through_untouched() -> None:
    with pytest.raises(KeyError), aws_errors("anything"):
        raise KeyError("not an AWS failure")
