"""`qcsight batch submit`: the SageMaker and EventBridge Scheduler requests, sent to a moto server on loopback."""

from __future__ import annotations

import json

import boto3
import pytest
from botocore.exceptions import ClientError

from qcsight_batch.cli import main as batch_main
from qcsight_batch.errors import SubmitError
from qcsight_batch.submit import (
    EXECUTION_ID,
    SCHEDULED_TIME,
    TRANSFORM_TARGET_ARN,
    ScheduleSpec,
    TransformJobSpec,
    default_model_name,
    ensure_model,
    plan,
    submit,
)
from qcsight_core.errors import ConfigError

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/qcsight-batch:0.1"
ROLE = "arn:aws:iam::123456789012:role/qcsight-sagemaker"
SCHEDULER_ROLE = "arn:aws:iam::123456789012:role/qcsight-scheduler"
BASE_ARGS = [
    "submit", "--model-data", "s3://models/line-7/model.tar.gz", "--image-uri", IMAGE, "--role-arn", ROLE,
    "--input", "s3://line-7/incoming/", "--output", "s3://line-7/scores/",
]


def _spec(**overrides: object) -> TransformJobSpec:
    values: dict[str, object] = dict(
        job_name="line7-nightly", model_name="qcsight-line7", image_uri=IMAGE,
        model_data="s3://models/line-7/model.tar.gz", role_arn=ROLE, input_uri="s3://line-7/incoming/",
        output_uri="s3://line-7/scores/", instance_type="ml.c6i.xlarge", instance_count=2, max_concurrent=4,
        max_payload_mb=8,
    )
    values.update(overrides)
    return TransformJobSpec(**values)  # type: ignore[arg-type]


def test_transform_job_as_moto_received_it(aws_endpoint: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = batch_main([*BASE_ARGS, "--job-name", "line7-20240601", "--instance-type", "ml.c6i.xlarge",
                       "--instance-count", "2", "--max-concurrent", "4", "--max-payload-mb", "8", "--int8"],
                      prog="qcsight batch")
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    sagemaker = boto3.client("sagemaker")
    model_name = default_model_name(IMAGE, "s3://models/line-7/model.tar.gz")
    model = sagemaker.describe_model(ModelName=model_name)
    assert model["ModelArn"] == result["model"]
    assert model["PrimaryContainer"]["Image"] == IMAGE
    assert model["PrimaryContainer"]["ModelDataUrl"] == "s3://models/line-7/model.tar.gz"
    assert model["PrimaryContainer"]["Environment"] == {"QCSIGHT_PRECISION": "int8"}
    assert model["ExecutionRoleArn"] == ROLE

    job = sagemaker.describe_transform_job(TransformJobName="line7-20240601")
    assert job["TransformJobArn"] == result["transform_job"]
    assert job["ModelName"] == model_name
    assert job["MaxConcurrentTransforms"] == 4 and job["MaxPayloadInMB"] == 8
    assert job["BatchStrategy"] == "SingleRecord"
    assert job["TransformInput"] == {
        "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": "s3://line-7/incoming/"}},
        "ContentType": "application/x-image",
        "SplitType": "None",
    }
    assert job["TransformOutput"] == {
        "S3OutputPath": "s3://line-7/scores/", "Accept": "application/jsonlines", "AssembleWith": "Line",
    }
    assert job["TransformResources"] == {"InstanceType": "ml.c6i.xlarge", "InstanceCount": 2}
    # one corrupt image must not fail the job: the container answers it 200 with an error row
    assert job["Environment"] == {"QCSIGHT_BAD_RECORDS": "error_row"}


def test_second_submit_reuses_the_model_and_refuses_a_conflicting_one(aws_endpoint: str) -> None:
    sagemaker = boto3.client("sagemaker")
    first = submit(_spec(job_name="run-1"), sagemaker)
    second = submit(_spec(job_name="run-2"), sagemaker)
    assert first["model"] == second["model"]
    assert sagemaker.describe_transform_job(TransformJobName="run-2")["ModelName"] == "qcsight-line7"
    with pytest.raises(SubmitError, match="already exists with image"):
        ensure_model(sagemaker, _spec(model_data="s3://models/line-7/other.tar.gz"))


def test_schedule_starts_the_same_job_with_a_name_per_run(aws_endpoint: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = batch_main([*BASE_ARGS, "--job-name", "line7-nightly", "--schedule", "cron(0 2 * * ? *)",
                       "--schedule-role-arn", SCHEDULER_ROLE, "--timezone", "Europe/Berlin"], prog="qcsight batch")
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    schedule = boto3.client("scheduler").get_schedule(Name="line7-nightly")
    assert schedule["Arn"] == result["schedule"]
    assert schedule["ScheduleExpression"] == "cron(0 2 * * ? *)"
    assert schedule["ScheduleExpressionTimezone"] == "Europe/Berlin"
    assert schedule["FlexibleTimeWindow"] == {"Mode": "OFF"}
    target = schedule["Target"]
    assert target["Arn"] == TRANSFORM_TARGET_ARN and target["RoleArn"] == SCHEDULER_ROLE
    job = json.loads(target["Input"])
    assert job["TransformJobName"] == f"line7-nightly-{EXECUTION_ID}"
    assert job["TransformOutput"]["S3OutputPath"] == f"s3://line-7/scores/{SCHEDULED_TIME}/"
    assert job["ModelName"] == default_model_name(IMAGE, "s3://models/line-7/model.tar.gz")
    with pytest.raises(ClientError, match="Could not find transform job"):
        boto3.client("sagemaker").describe_transform_job(TransformJobName="line7-nightly")


def test_dry_run_prints_and_sends_nothing(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: a call would fail
    code = batch_main([*BASE_ARGS, "--job-name", "dry", "--split-type", "Line", "--content-type",
                       "application/json", "--accept", "application/json", "--dry-run"], prog="qcsight batch")
    assert code == 0
    requests = json.loads(capsys.readouterr().out)
    assert set(requests) == {"CreateModel", "CreateTransformJob"}
    assert requests["CreateTransformJob"]["TransformInput"]["SplitType"] == "Line"
    assert requests["CreateTransformJob"]["TransformOutput"]["Accept"] == "application/json"
    assert "MaxConcurrentTransforms" not in requests["CreateTransformJob"]


def test_requests_match_botocore_service_models() -> None:
    """Every request the planner builds passes botocore's own parameter validation."""
    from botocore.stub import Stubber

    spec = _spec()
    schedule = ScheduleSpec("line7-nightly", "rate(1 day)", SCHEDULER_ROLE)
    sagemaker = boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    scheduler = boto3.client("scheduler", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    requests = {**plan(spec), **plan(spec, schedule)}
    with Stubber(sagemaker) as sm_stub, Stubber(scheduler) as sched_stub:
        sm_stub.add_response("create_model", {"ModelArn": "arn:aws:sagemaker:us-east-1:1:model/m"},
                             requests["CreateModel"])
        sm_stub.add_response("create_transform_job", {"TransformJobArn": "arn:aws:sagemaker:us-east-1:1:t/j"},
                             requests["CreateTransformJob"])
        sched_stub.add_response("create_schedule", {"ScheduleArn": "arn:aws:scheduler:us-east-1:1:schedule/s"},
                                requests["CreateSchedule"])
        sagemaker.create_model(**requests["CreateModel"])
        sagemaker.create_transform_job(**requests["CreateTransformJob"])
        scheduler.create_schedule(**requests["CreateSchedule"])
        sm_stub.assert_no_pending_responses()
        sched_stub.assert_no_pending_responses()


@pytest.mark.parametrize(("overrides", "field"), [
    ({"job_name": "bad_name!"}, "job_name"),
    ({"input_uri": "/local/path"}, "input"),
    ({"split_type": "Lines"}, "split_type"),
    ({"assemble_with": "Newline"}, "assemble_with"),
    ({"max_payload_mb": 0}, "max_payload_mb"),
    ({"instance_type": "m5.xlarge"}, "instance_type"),
])
def test_bad_values_are_named(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        _spec(**overrides)


def test_schedule_validation() -> None:
    with pytest.raises(ConfigError, match="schedule"):
        ScheduleSpec("nightly", "every day at 2", SCHEDULER_ROLE)
    with pytest.raises(ConfigError, match="job_name"):
        plan(_spec(job_name="x" * 50), ScheduleSpec("nightly", "rate(1 day)", SCHEDULER_ROLE))


def test_schedule_without_role_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    from qcsight_core.cli import main as qcsight_main

    assert qcsight_main(["batch", *BASE_ARGS, "--schedule", "rate(1 day)", "--dry-run"]) == 1
    assert "--schedule-role-arn" in capsys.readouterr().err
