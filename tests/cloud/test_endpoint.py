"""`qcsight cloud endpoint`: the Batch Transform container as a real-time or serverless endpoint (moto, Stubber)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from qcsight_aws.errors import AwsError, JobError
from qcsight_cloud import endpoint
from qcsight_cloud.endpoint import EndpointSpec
from qcsight_core import cli as qcsight_cli
from qcsight_core.errors import ConfigError
from tests.cloud.conftest import moto_client
from tests.helpers.aws import FAKE_ENV, assert_valid

IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/cdk-hnb659fds-container-assets:0123abcd"
ROLE = "arn:aws:iam::123456789012:role/qcsight-sagemaker-execution"
MODEL = "s3://qcsight-models-123456789012-eu-west-1/batch/current/model.tar.gz"


def spec(**overrides: Any) -> EndpointSpec:
    return EndpointSpec(**{"name": "qcsight-adhoc", "image_uri": IMAGE, "model_data": MODEL, "role_arn": ROLE,
                           **overrides})


@pytest.mark.parametrize("serverless", [None, 2048])
def test_requests_are_valid_for_the_service(serverless: int | None) -> None:
    s = spec(serverless_memory_mb=serverless)
    assert_valid("CreateModel", endpoint.model_request(s))
    config = endpoint.endpoint_config_request(s)
    assert_valid("CreateEndpointConfig", config)
    assert_valid("CreateEndpoint", endpoint.endpoint_request(s))
    [variant] = config["ProductionVariants"]
    assert ("ServerlessConfig" in variant) == (serverless is not None)
    assert ("InstanceType" in variant) == (serverless is None)
    container = endpoint.model_request(s)["PrimaryContainer"]
    assert container == {"Image": IMAGE, "ModelDataUrl": MODEL, "Environment": {"QCSIGHT_PRECISION": "fp32"}}


@pytest.mark.parametrize(("overrides", "field"), [
    ({"model_data": "https://bucket/model.tar.gz"}, "--model-data"),
    ({"model_data": "s3://bucket/model.onnx"}, "--model-data"),
    ({"role_arn": "qcsight-role"}, "--role-arn"),
    ({"image_uri": "scoring:latest"}, "--image-uri"),
    ({"name": "bad_name"}, "--name"),
    ({"serverless_memory_mb": 1500}, "--serverless-memory"),
    ({"instance_type": "m5.large"}, "--instance-type"),
])
def test_bad_options_name_the_flag(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        spec(**overrides)


@pytest.mark.cloud
def test_deploy_and_delete_against_moto(moto_endpoint: str) -> None:
    client = moto_client("sagemaker", moto_endpoint)
    result = endpoint.deploy(client, spec(), timeout_s=30, poll_s=1)
    assert result["status"] == "InService"
    described = client.describe_endpoint(EndpointName="qcsight-adhoc")
    assert described["EndpointConfigName"] == "qcsight-adhoc"
    model = client.describe_model(ModelName="qcsight-adhoc")
    assert model["PrimaryContainer"]["ModelDataUrl"] == MODEL
    assert endpoint.delete(client, "qcsight-adhoc") == ["endpoint", "endpoint config", "model"]
    assert endpoint.delete(client, "qcsight-adhoc") == [], "deleting again finds nothing and says so"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _stubbed_deploy(statuses: list[dict[str, Any]]) -> tuple[Any, Any]:
    import boto3
    from botocore.stub import Stubber

    client = boto3.client("sagemaker", region_name="eu-west-1", aws_access_key_id="k", aws_secret_access_key="s")
    stub = Stubber(client)
    s = spec()
    arn = "arn:aws:sagemaker:eu-west-1:123456789012:endpoint/qcsight-adhoc"
    stub.add_response("create_model", {"ModelArn": arn.replace("endpoint/", "model/")}, endpoint.model_request(s))
    stub.add_response("create_endpoint_config", {"EndpointConfigArn": arn.replace("endpoint/", "endpoint-config/")},
                      endpoint.endpoint_config_request(s))
    stub.add_response("create_endpoint", {"EndpointArn": arn}, endpoint.endpoint_request(s))
    for status in statuses:
        stub.add_response("describe_endpoint", {
            "EndpointName": "qcsight-adhoc", "EndpointArn": arn, "EndpointConfigName": "qcsight-adhoc",
            "CreationTime": "2026-03-02T08:00:00Z", "LastModifiedTime": "2026-03-02T08:00:00Z", **status},
            {"EndpointName": "qcsight-adhoc"})
    return client, stub


def test_deploy_waits_for_in_service_and_reports_a_failure_or_the_deadline() -> None:
    clock = FakeClock()
    client, stub = _stubbed_deploy([{"EndpointStatus": "Creating"}, {"EndpointStatus": "Creating"},
                                    {"EndpointStatus": "InService"}])
    with stub:
        assert endpoint.deploy(client, spec(), timeout_s=600, poll_s=30, clock=clock, sleep=clock.sleep)["status"] == \
            "InService"
        stub.assert_no_pending_responses()
    assert clock.now == 60

    client, stub = _stubbed_deploy([{"EndpointStatus": "Failed", "FailureReason": "model.tar.gz: no qcsight bundle"}])
    with stub, pytest.raises(JobError, match=r"Failed: model\.tar\.gz: no qcsight bundle"):
        endpoint.deploy(client, spec(), timeout_s=600, poll_s=30, clock=clock, sleep=clock.sleep)

    clock = FakeClock()
    client, stub = _stubbed_deploy([{"EndpointStatus": "Creating"}] * 3)
    with stub, pytest.raises(JobError, match=r"still Creating after 60 s.*endpoint delete --name qcsight-adhoc"):
        endpoint.deploy(client, spec(), timeout_s=60, poll_s=30, clock=clock, sleep=clock.sleep)


def test_invoke_sends_the_image_and_returns_the_containers_json() -> None:
    import boto3
    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    runtime = boto3.client("sagemaker-runtime", region_name="eu-west-1", aws_access_key_id="k",
                           aws_secret_access_key="s")
    answer = json.dumps({"label": "crack", "status": "defect", "score": 0.93}).encode()
    with Stubber(runtime) as stub:
        stub.add_response("invoke_endpoint", {"Body": StreamingBody(io.BytesIO(answer), len(answer)),
                                              "ContentType": "application/json"},
                          {"EndpointName": "qcsight-adhoc", "Body": b"\xff\xd8jpeg", "ContentType": "image/jpeg",
                           "Accept": "application/json"})
        assert endpoint.invoke(runtime, "qcsight-adhoc", b"\xff\xd8jpeg", "image/jpeg")["label"] == "crack"
        stub.add_client_error("invoke_endpoint", "ValidationError", "Endpoint qcsight-adhoc of account x not found.")
        with pytest.raises(AwsError, match="InvokeEndpoint failed: ValidationError: Endpoint qcsight-adhoc"):
            endpoint.invoke(runtime, "qcsight-adhoc", b"\xff\xd8jpeg", "image/jpeg")
    with pytest.raises(ConfigError, match="--content-type"):
        endpoint.invoke(runtime, "qcsight-adhoc", b"x", "text/plain")


def test_the_command_line_says_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("QCSIGHT_SAGEMAKER_ROLE_ARN", raising=False)
    deploy = ["cloud", "endpoint", "deploy", "--name", "qcsight-adhoc", "--image-uri", IMAGE, "--model-data", MODEL]
    assert qcsight_cli.main(deploy) == 1
    assert "--role-arn" in capsys.readouterr().err

    # No credentials anywhere: refused before any call, with what to do.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert qcsight_cli.main([*deploy, "--role-arn", ROLE, "--region", "eu-west-1"]) == 1
    assert "no AWS credentials" in capsys.readouterr().err

    # Credentials but no region.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, FAKE_ENV[key])
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    assert qcsight_cli.main(["cloud", "endpoint", "delete", "--name", "qcsight-adhoc"]) == 1
    assert "--region" in capsys.readouterr().err

    # --print shows the three requests without credentials or a region being used.
    assert qcsight_cli.main([*deploy, "--role-arn", ROLE, "--serverless-memory", "2048", "--print"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["CreateEndpointConfig"]["ProductionVariants"][0]["ServerlessConfig"]["MemorySizeInMB"] == 2048
