"""SageMaker Batch Transform jobs for a bundle: the model, the transform job, and an EventBridge Scheduler schedule.

Requests are built as plain dicts from frozen specs, so --dry-run prints exactly what would
be sent and tests assert on it; boto3 clients are made by the caller (lazily: boto3 is the
cloud extra) and injected. A recurring run is an EventBridge Scheduler schedule whose
universal target calls sagemaker:CreateTransformJob with the same request, the job name and
output path made unique per run with the scheduler's context attributes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qcsight_aws.errors import AwsError, aws_errors
from qcsight_aws.s3 import S3Uri
from qcsight_batch.errors import SubmitError
from qcsight_core.checks import check_choice, check_int
from qcsight_core.errors import ConfigError

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
SPLIT_TYPES = ("None", "Line", "RecordIO", "TFRecord")
ASSEMBLE_TYPES = ("None", "Line")
BATCH_STRATEGIES = ("SingleRecord", "MultiRecord")
INPUT_KINDS = ("S3Prefix", "ManifestFile")
SCHEDULE_PREFIXES = ("cron(", "rate(", "at(")
TRANSFORM_TARGET_ARN = "arn:aws:scheduler:::aws-sdk:sagemaker:createTransformJob"
EXECUTION_ID = "<aws.scheduler.execution-id>"  # 16 characters, unique per invocation
SCHEDULED_TIME = "<aws.scheduler.scheduled-time>"
_EXECUTION_ID_LENGTH = 16


def _check_name(field_name: str, value: str, max_length: int = 63) -> None:
    if len(value) > max_length or not NAME_PATTERN.match(value):
        raise ConfigError(field_name, value, f"letters, digits and single hyphens, at most {max_length} characters")


def _check_s3(field_name: str, value: str) -> None:
    S3Uri.parse(value, field_name, allowed="an s3://bucket/key URI", legacy_bucket=True)


@dataclass(frozen=True)
class TransformJobSpec:
    """One Batch Transform job (or the template of a scheduled one).

    Attributes:
        job_name: the job's name; for a schedule, the prefix of every run's name.
        model_name: the SageMaker model; reused when it exists with the same image and data.
        image_uri: the qcsight batch container image (ECR).
        model_data: s3:// URI of the bundle as model.tar.gz.
        role_arn: the execution role SageMaker assumes for the model.
        input_uri: s3:// prefix of the images, or of a manifest when input_kind is ManifestFile.
        output_uri: s3:// prefix for the results.
        content_type: the type each record is sent as (image/jpeg, application/x-image, ...).
        accept: application/json or application/jsonlines.
        split_type: how input files are split into records; None sends each file whole (images).
        assemble_with: how results are joined in the output file; Line puts one result per line.
        batch_strategy: SingleRecord (one image per request) or MultiRecord.
        instance_type: e.g. ml.m5.xlarge or ml.c6i.2xlarge.
        instance_count: instances working on the input in parallel.
        max_concurrent: requests in flight per instance; 0 lets SageMaker ask the container.
        max_payload_mb: the largest request, 1 to 100 MB.
        precision: fp32 or int8, passed to the container as QCSIGHT_PRECISION.
        bad_records: error_row (an undecodable image gets a row with verdict "error", as the
            local scorer writes one, and the job goes on) or reject (it is answered 400, which
            fails the whole job); the job's QCSIGHT_BAD_RECORDS.
        environment: extra container environment.
    """

    job_name: str
    model_name: str
    image_uri: str
    model_data: str
    role_arn: str
    input_uri: str
    output_uri: str
    input_kind: str = "S3Prefix"
    content_type: str = "application/x-image"
    accept: str = "application/jsonlines"
    split_type: str = "None"
    assemble_with: str = "Line"
    batch_strategy: str = "SingleRecord"
    instance_type: str = "ml.m5.xlarge"
    instance_count: int = 1
    max_concurrent: int = 0
    max_payload_mb: int = 6
    precision: str = "fp32"
    bad_records: str = "error_row"
    environment: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_name("job_name", self.job_name)
        _check_name("model_name", self.model_name)
        _check_s3("model_data", self.model_data)
        _check_s3("input", self.input_uri)
        _check_s3("output", self.output_uri)
        if not self.image_uri:
            raise ConfigError("image_uri", self.image_uri, "the container image URI (ECR)")
        if not self.role_arn.startswith("arn:"):
            raise ConfigError("role_arn", self.role_arn, "an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)")
        check_choice("input_kind", self.input_kind, INPUT_KINDS)
        check_choice("split_type", self.split_type, SPLIT_TYPES)
        check_choice("assemble_with", self.assemble_with, ASSEMBLE_TYPES)
        check_choice("batch_strategy", self.batch_strategy, BATCH_STRATEGIES)
        check_choice("accept", self.accept, ("application/json", "application/jsonlines"))
        check_choice("precision", self.precision, ("fp32", "int8", "auto"))
        check_choice("bad_records", self.bad_records, ("error_row", "reject"))
        if not self.instance_type.startswith("ml."):
            raise ConfigError("instance_type", self.instance_type, "a SageMaker instance type such as ml.m5.xlarge")
        check_int("instance_count", self.instance_count, 1, 100)
        check_int("max_concurrent", self.max_concurrent, 0, 100)  # 0: let SageMaker decide
        check_int("max_payload_mb", self.max_payload_mb, 1, 100)


@dataclass(frozen=True)
class ScheduleSpec:
    """A recurring run: an EventBridge Scheduler schedule that starts the transform job.

    Attributes:
        name: the schedule's name.
        expression: cron(...), rate(...) or at(...), as EventBridge Scheduler reads it.
        role_arn: the role the scheduler assumes; it needs sagemaker:CreateTransformJob and
            iam:PassRole on the model's execution role.
        timezone: the time zone the expression is read in.
        group: the schedule group.
    """

    name: str
    expression: str
    role_arn: str
    timezone: str = "UTC"
    group: str = "default"

    def __post_init__(self) -> None:
        if not re.match(r"^[0-9a-zA-Z\-_.]{1,64}$", self.name):
            raise ConfigError("schedule_name", self.name, "1 to 64 letters, digits, '-', '_' or '.'")
        if not self.expression.startswith(SCHEDULE_PREFIXES) or not self.expression.endswith(")"):
            raise ConfigError("schedule", self.expression, "cron(...), rate(...) or at(...)")
        if not self.role_arn.startswith("arn:"):
            raise ConfigError("schedule_role_arn", self.role_arn, "an IAM role ARN the scheduler can assume")


def default_model_name(image_uri: str, model_data: str) -> str:
    """A name fixed by the image and the model data, so that submitting again reuses the model."""
    return "qcsight-" + hashlib.sha256(f"{image_uri}\n{model_data}".encode()).hexdigest()[:16]


def model_request(spec: TransformJobSpec) -> dict[str, Any]:
    """CreateModel parameters."""
    return {
        "ModelName": spec.model_name,
        "ExecutionRoleArn": spec.role_arn,
        "PrimaryContainer": {
            "Image": spec.image_uri,
            "ModelDataUrl": spec.model_data,
            "Environment": {"QCSIGHT_PRECISION": spec.precision, **dict(spec.environment)},
        },
        "Tags": [{"Key": "qcsight:component", "Value": "batch"}],
    }


def transform_request(
    spec: TransformJobSpec, job_name: str | None = None, output_uri: str | None = None
) -> dict[str, Any]:
    """CreateTransformJob parameters (job_name/output_uri override the spec's for scheduled runs)."""
    request: dict[str, Any] = {
        "TransformJobName": job_name or spec.job_name,
        "ModelName": spec.model_name,
        "MaxPayloadInMB": spec.max_payload_mb,
        "BatchStrategy": spec.batch_strategy,
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": spec.input_kind, "S3Uri": spec.input_uri}},
            "ContentType": spec.content_type,
            "SplitType": spec.split_type,
        },
        "TransformOutput": {
            "S3OutputPath": output_uri or spec.output_uri,
            "Accept": spec.accept,
            "AssembleWith": spec.assemble_with,
        },
        "TransformResources": {"InstanceType": spec.instance_type, "InstanceCount": spec.instance_count},
        # On the job, not the model: the same model behind a real-time endpoint keeps answering 400.
        "Environment": {"QCSIGHT_BAD_RECORDS": spec.bad_records},
        "Tags": [{"Key": "qcsight:component", "Value": "batch"}],
    }
    if spec.max_concurrent:
        request["MaxConcurrentTransforms"] = spec.max_concurrent
    return request


def schedule_request(spec: TransformJobSpec, schedule: ScheduleSpec) -> dict[str, Any]:
    """CreateSchedule parameters: a universal target that sends CreateTransformJob on each run.

    A transform job name must be unique, so each run is named job_name-<execution id> and
    writes under output/<scheduled time>/; EventBridge Scheduler fills both in per run.
    """
    limit = 63 - 1 - _EXECUTION_ID_LENGTH
    if len(spec.job_name) > limit:
        raise ConfigError("job_name", spec.job_name, f"at most {limit} characters for a schedule (a run id is added)")
    output = spec.output_uri.rstrip("/") + f"/{SCHEDULED_TIME}/"
    job = transform_request(spec, job_name=f"{spec.job_name}-{EXECUTION_ID}", output_uri=output)
    return {
        "Name": schedule.name,
        "GroupName": schedule.group,
        "ScheduleExpression": schedule.expression,
        "ScheduleExpressionTimezone": schedule.timezone,
        "FlexibleTimeWindow": {"Mode": "OFF"},
        "State": "ENABLED",
        "Description": f"qcsight batch scoring of {spec.input_uri} with model {spec.model_name}",
        "Target": {
            "Arn": TRANSFORM_TARGET_ARN,
            "RoleArn": schedule.role_arn,
            "Input": json.dumps(job, sort_keys=True),
            "RetryPolicy": {"MaximumRetryAttempts": 2, "MaximumEventAgeInSeconds": 3600},
        },
    }


def plan(spec: TransformJobSpec, schedule: ScheduleSpec | None = None) -> dict[str, dict[str, Any]]:
    """Every request a submit would send, by API operation name (what --dry-run prints)."""
    requests = {"CreateModel": model_request(spec)}
    if schedule is None:
        requests["CreateTransformJob"] = transform_request(spec)
    else:
        requests["CreateSchedule"] = schedule_request(spec, schedule)
    return requests


def _call(operation: str, function: Any, **kwargs: Any) -> dict[str, Any]:
    """One request; AWS's refusal as a SubmitError naming the operation ('CreateModel failed: Code: Message')."""
    try:
        with aws_errors(operation):
            response: dict[str, Any] = function(**kwargs)
            return response
    except AwsError as exc:
        raise SubmitError(str(exc)) from exc.__cause__


def ensure_model(sagemaker: Any, spec: TransformJobSpec) -> str:
    """The model's ARN, creating the model unless one of that name already serves the same image and data."""
    from botocore.exceptions import ClientError

    try:
        existing = sagemaker.describe_model(ModelName=spec.model_name)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("ValidationException", "ResourceNotFound"):
            raise SubmitError(f"DescribeModel {spec.model_name} failed: {exc}") from exc
        existing = None
    if existing is not None:
        container = existing.get("PrimaryContainer", {})
        if container.get("Image") != spec.image_uri or container.get("ModelDataUrl") != spec.model_data:
            raise SubmitError(
                f"model {spec.model_name} already exists with image {container.get('Image')} and data "
                f"{container.get('ModelDataUrl')}; pass another --model-name"
            )
        log.info("reusing model %s", spec.model_name)
        return str(existing["ModelArn"])
    response = _call("CreateModel", sagemaker.create_model, **model_request(spec))
    log.info("created model %s", spec.model_name)
    return str(response["ModelArn"])


def submit(
    spec: TransformJobSpec, sagemaker: Any, schedule: ScheduleSpec | None = None, scheduler: Any = None
) -> dict[str, str]:
    """Create (or reuse) the model, then start the job now or create the schedule that starts it.

    Returns the ARNs created, by kind: model, and transform_job or schedule.
    """
    result = {"model": ensure_model(sagemaker, spec)}
    if schedule is None:
        response = _call("CreateTransformJob", sagemaker.create_transform_job, **transform_request(spec))
        result["transform_job"] = str(response["TransformJobArn"])
        log.info("started transform job %s", spec.job_name)
    else:
        if scheduler is None:
            raise SubmitError("a schedule needs an EventBridge Scheduler client")
        response = _call("CreateSchedule", scheduler.create_schedule, **schedule_request(spec, schedule))
        result["schedule"] = str(response["ScheduleArn"])
        log.info("created schedule %s (%s)", schedule.name, schedule.expression)
    return result
