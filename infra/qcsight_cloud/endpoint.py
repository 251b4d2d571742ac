"""A real-time or serverless SageMaker endpoint on the Batch Transform container, for ad-hoc scoring.

The container and its handler are Batch Transform's (``infra/docker/scoring.Dockerfile``: SageMaker
runs ``serve``, which execs ``qcsight batch serve``; GET /ping, POST /invocations on port 8080, the
bundle's model.tar.gz under /opt/ml/model), so an image scored here is scored exactly as in a batch
job and on the device. ``deploy`` sends CreateModel, CreateEndpointConfig and CreateEndpoint and
waits (with a deadline) for InService; ``delete`` removes the three; ``invoke`` sends one image.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from qcsight_aws.errors import JobError, aws_errors
from qcsight_aws.jobs import JobStatus, wait_for_job
from qcsight_aws.s3 import S3Uri
from qcsight_core.errors import ConfigError

log = logging.getLogger(__name__)

ENDPOINT = JobStatus("EndpointStatus", ("InService",), ("Failed", "OutOfService"))
_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
_ROLE = re.compile(r"^arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+$")
_IMAGE = re.compile(r"^[\w.\-]+(:\d+)?/[\w.\-/]+(:[\w.\-]+|@sha256:[0-9a-f]{64})$")
SERVERLESS_MEMORY_MB = (1024, 2048, 3072, 4096, 5120, 6144)
PRECISIONS = ("fp32", "int8")
CONTENT_TYPES = ("application/x-image", "image/jpeg", "image/png")


@dataclass(frozen=True)
class EndpointSpec:
    """One endpoint: its name (the model and endpoint config share it), the image and bundle, and its capacity.

    Attributes:
        serverless_memory_mb: serverless when set (1024-6144 in 1 GB steps), else instance_type x instance_count.
    """

    name: str
    image_uri: str
    model_data: str
    role_arn: str
    instance_type: str = "ml.m5.large"
    instance_count: int = 1
    serverless_memory_mb: int | None = None
    max_concurrency: int = 5
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ConfigError("--name", self.name, "1-63 letters, digits and '-', starting with a letter or digit")
        if not _IMAGE.match(self.image_uri):
            raise ConfigError("--image-uri", self.image_uri, "an ECR image URI, ACCOUNT.dkr.ecr.REGION.amazonaws.com/"
                              "REPO:TAG (the ScoringImageUri output of the compute stack)")
        uri = S3Uri.parse(self.model_data, "--model-data", allowed="s3://bucket/key/model.tar.gz (a bundle archive)")
        if not uri.key.endswith(".tar.gz"):
            raise ConfigError("--model-data", self.model_data, "s3://bucket/key/model.tar.gz (a bundle archive)")
        if not _ROLE.match(self.role_arn):
            raise ConfigError("--role-arn", self.role_arn, "an IAM role ARN SageMaker can assume "
                              "(the compute stack's SageMakerRoleArn output)")
        if self.precision not in PRECISIONS:
            raise ConfigError("--precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        if self.serverless_memory_mb is not None:
            if self.serverless_memory_mb not in SERVERLESS_MEMORY_MB:
                raise ConfigError("--serverless-memory", self.serverless_memory_mb,
                                  f"one of {', '.join(map(str, SERVERLESS_MEMORY_MB))} MB")
            if not 1 <= self.max_concurrency <= 200:
                raise ConfigError("--max-concurrency", self.max_concurrency, "1 to 200")
        elif not self.instance_type.startswith("ml.") or not 1 <= self.instance_count <= 10:
            raise ConfigError("--instance-type/--instance-count", f"{self.instance_type} x {self.instance_count}",
                              "a SageMaker type such as ml.m5.large, 1 to 10 instances")


def model_request(spec: EndpointSpec) -> dict[str, Any]:
    """CreateModel: the scoring container with the bundle (the container reads QCSIGHT_PRECISION)."""
    return {"ModelName": spec.name, "ExecutionRoleArn": spec.role_arn,
            "PrimaryContainer": {"Image": spec.image_uri, "ModelDataUrl": spec.model_data,
                                 "Environment": {"QCSIGHT_PRECISION": spec.precision}},
            "Tags": [{"Key": "qcsight:component", "Value": "endpoint"}]}


def endpoint_config_request(spec: EndpointSpec) -> dict[str, Any]:
    variant: dict[str, Any] = {"VariantName": "AllTraffic", "ModelName": spec.name}
    if spec.serverless_memory_mb is not None:
        variant["ServerlessConfig"] = {"MemorySizeInMB": spec.serverless_memory_mb,
                                       "MaxConcurrency": spec.max_concurrency}
    else:
        variant.update(InstanceType=spec.instance_type, InitialInstanceCount=spec.instance_count,
                       InitialVariantWeight=1.0)
    return {"EndpointConfigName": spec.name, "ProductionVariants": [variant],
            "Tags": [{"Key": "qcsight:component", "Value": "endpoint"}]}


def endpoint_request(spec: EndpointSpec) -> dict[str, Any]:
    return {"EndpointName": spec.name, "EndpointConfigName": spec.name,
            "Tags": [{"Key": "qcsight:component", "Value": "endpoint"}]}


def deploy(client: Any, spec: EndpointSpec, *, timeout_s: float, poll_s: float = 30.0,
           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Create the model, the endpoint config and the endpoint; wait until InService or timeout_s.

    Raises:
        AwsError: a call was refused (named, with AWS's reason).
        JobError: the endpoint failed (with its FailureReason) or is not InService by the deadline.
    """
    with aws_errors("CreateModel"):
        client.create_model(**model_request(spec))
    with aws_errors("CreateEndpointConfig"):
        client.create_endpoint_config(**endpoint_config_request(spec))
    with aws_errors("CreateEndpoint"):
        arn = client.create_endpoint(**endpoint_request(spec))["EndpointArn"]
    log.info("CreateEndpoint: %s created; waiting up to %.0f s for InService", spec.name, timeout_s)

    def describe() -> Mapping[str, Any]:
        with aws_errors("DescribeEndpoint"):
            response: Mapping[str, Any] = client.describe_endpoint(EndpointName=spec.name)
        return response

    wait_for_job(describe, ENDPOINT, timeout_s, poll_s, clock=clock, sleep=sleep,
                 hint=f" (`qcsight cloud endpoint delete --name {spec.name}` removes it)")
    return {"endpoint": spec.name, "arn": arn, "status": "InService"}


def delete(client: Any, name: str) -> list[str]:
    """Delete the endpoint, its config and its model (each that exists); returns what was deleted."""
    from botocore.exceptions import ClientError

    deleted = []
    for operation, kind, key in (("delete_endpoint", "endpoint", "EndpointName"),
                                 ("delete_endpoint_config", "endpoint config", "EndpointConfigName"),
                                 ("delete_model", "model", "ModelName")):
        try:
            getattr(client, operation)(**{key: name})
        except ClientError as exc:
            message = str(exc.response.get("Error", {}).get("Message", ""))
            if "Could not find" in message or "does not exist" in message:
                log.info("%s %s: not there", kind, name)
                continue
            with aws_errors(operation):
                raise
        deleted.append(kind)
    return deleted


def invoke(runtime: Any, name: str, body: bytes, content_type: str, accept: str = "application/json") -> Any:
    """Score one image; returns the container's JSON answer."""
    import json

    if content_type not in CONTENT_TYPES:
        raise ConfigError("--content-type", content_type, f"one of {', '.join(CONTENT_TYPES)}")
    if not body:
        raise ConfigError("--image", "", "a non-empty image file")
    with aws_errors("InvokeEndpoint"):
        response = runtime.invoke_endpoint(EndpointName=name, Body=body, ContentType=content_type, Accept=accept)
    payload = response["Body"].read()
    try:
        return json.loads(payload)
    except ValueError as exc:
        raise JobError(f"InvokeEndpoint: the endpoint answered something that is not JSON: {payload[:200]!r}") from exc
