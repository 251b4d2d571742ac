"""Every name the stacks share with code they do not own, in one place for the lead to align at merge.

The CDK app deploys code from other packages (qcsight_cloud's Lambda handlers and pipeline,
qcsight_review's web app, qcsight_batch's container server). It refers to that code only
through the constants below: handler entry points, the environment variables each function reads,
the metric names the dashboard draws, and the commands the containers run. Tests hold each of
them to the code it names (tests/infra/test_stacks.py, test_packaging.py).
"""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------- Lambda entry points (qcsight_cloud)


@dataclass(frozen=True)
class FunctionSpec:
    """One Lambda function: its handler entry point and what it is for."""

    key: str
    handler: str
    description: str
    memory_mb: int
    timeout_s: int
    reserved_concurrency: int


INGEST = FunctionSpec(
    "ingest", "qcsight_cloud.lambda_ingest.handler",
    "qcsight: validate, de-duplicate and store device metrics, alerts and status from the IoT rules",
    memory_mb=512, timeout_s=30, reserved_concurrency=20,
)
POLICY = FunctionSpec(
    "policy", "qcsight_cloud.lambda_policy.handler",
    "qcsight: evaluate the retraining policy over the fleet's metrics and start the pipeline when it fires",
    memory_mb=1024, timeout_s=300, reserved_concurrency=1,  # one run at a time is a policy guardrail
)
DEPLOY = FunctionSpec(
    "deploy", "qcsight_cloud.lambda_deploy.handler",
    "qcsight: on model approval publish the model component, deploy it to the canary group, promote or roll back",
    memory_mb=1024, timeout_s=900, reserved_concurrency=1,  # deployments are serialised
)
FUNCTIONS = (INGEST, POLICY, DEPLOY)

# What the functions' handlers reach, every import followed (lazy ones inside functions too), copied into the
# Lambda package as (source root relative to the repository, package path below it). The deploy function
# builds and publishes the model component (qcsight_gg), parses S3 URIs (qcsight_aws) and applies Neo's
# version policy (qcsight_train.launch.neo): only that subpackage of qcsight_train ships, with its parent's
# __init__, because the rest of qcsight_train imports torch. tests/infra/test_packaging.py runs each
# handler's code paths from the synthesized package alone.
LAMBDA_PACKAGES = (("edge_agent", "qcsight_core"), ("infra", "qcsight_cloud"), ("infra", "qcsight_aws"),
                   ("greengrass", "qcsight_gg"), ("training", "qcsight_train/launch"))
# Files read at run time, copied to the same path inside the package: qcsight_gg.build_model reads the model
# component's recipe template and offer script from a source tree, and the deploy function passes it the
# package's root (qcsight_cloud.lambda_deploy.component_source).
LAMBDA_DATA = ("greengrass/recipes/com.qcsight.Model.yaml", "greengrass/scripts/offer_model.sh")
# Third-party distributions installed into the Lambda package for the Lambda platform, each pinned to the
# version installed where the app is synthesized (the one the tests ran against). boto3 is in the Lambda
# runtime already. qcsight_gg's recipes and templates are YAML (PyYAML) and a recipe is checked against its
# JSON Schema before it is published (jsonschema, with its dependencies: rpds-py is compiled, so no copy of
# the build machine's packages would do; typing-extensions is needed below Python 3.13 only). Never torch.
LAMBDA_REQUIREMENTS: tuple[str, ...] = ("PyYAML", "jsonschema", "jsonschema-specifications", "referencing",
                                        "rpds-py", "attrs")
LAMBDA_PYTHON = "3.14"

# ---------------------------------------------------------------- environment the stacks set


class Env:
    """Environment variable names the functions and the review container read (each handler's docstring)."""

    # Every function and the review app: the store (``dynamodb:<table prefix>``, qcsight_cloud.store).
    STORE = "QCSIGHT_STORE"
    # Ingest and policy: the fleet's lines as inline JSON naming thing groups (qcsight_cloud.fleet).
    FLEET = "QCSIGHT_FLEET"
    # Ingest: days before metrics windows and status events expire (DynamoDB TTL).
    RETENTION_DAYS = "QCSIGHT_RETENTION_DAYS"
    # Policy (qcsight_cloud.lambda_policy): the pipeline it starts and its settings.
    PIPELINE_NAME = "QCSIGHT_PIPELINE_NAME"
    POLICY = "QCSIGHT_POLICY"
    MANIFEST_PREFIX = "QCSIGHT_MANIFEST_PREFIX"
    # Deploy (qcsight_cloud.lambda_deploy): the approval -> canary -> soak -> fleet or rollback rollout. Its
    # state is in the store; the scheduled ticks read the two groups' members from IoT.
    CANARY_GROUP_ARN = "QCSIGHT_CANARY_THING_GROUP_ARN"
    FLEET_GROUP_ARN = "QCSIGHT_FLEET_THING_GROUP_ARN"
    COMPONENT_BUCKET = "QCSIGHT_COMPONENT_BUCKET"
    COMPONENT_PREFIX = "QCSIGHT_COMPONENT_ARTIFACT_PREFIX"
    SOAK = "QCSIGHT_SOAK"
    NEO_TARGET = "QCSIGHT_NEO_TARGET"
    NEO_ROLE_ARN = "QCSIGHT_NEO_ROLE_ARN"
    NEO_OUTPUT = "QCSIGHT_NEO_OUTPUT"
    # The review container (qcsight_review).
    IMAGES_BUCKET = "QCSIGHT_IMAGES_BUCKET"
    REVIEW_AUTH = "QCSIGHT_REVIEW_AUTH"
    REVIEW_OIDC_ISSUER = "QCSIGHT_REVIEW_OIDC_ISSUER"
    REVIEW_REGION = "QCSIGHT_REVIEW_AWS_REGION"


# Which variables each function reads: the compute stack sets exactly these (a test holds it to that).
FUNCTION_ENV: dict[str, tuple[str, ...]] = {
    "ingest": (Env.STORE, Env.FLEET, Env.RETENTION_DAYS),
    "policy": (Env.STORE, Env.FLEET, Env.PIPELINE_NAME, Env.POLICY, Env.MANIFEST_PREFIX),
    "deploy": (Env.STORE, Env.CANARY_GROUP_ARN, Env.FLEET_GROUP_ARN, Env.COMPONENT_BUCKET, Env.COMPONENT_PREFIX,
               Env.SOAK, Env.NEO_TARGET, Env.NEO_ROLE_ARN, Env.NEO_OUTPUT),
}

# ---------------------------------------------------------------- metrics the dashboard and alarms read

# The names qcsight_cloud.emf writes (window_document: per line and per device) and the policy function's
# silent-device count (lambda_policy.silent_document); tests/infra/test_stacks.py checks them against both.
METRICS_NAMESPACE = "qcsight"
METRIC_DEFECT_RATE = "DefectRate"
METRIC_CONFIDENCE_PSI = "ConfidencePSI"
METRIC_BRIGHTNESS_PSI = "BrightnessPSI"
METRIC_SILENT_DEVICES = "SilentDevices"
METRIC_LATENCY_P95 = "LatencyP95"
METRIC_DIMENSION_LINE = "Line"

# ---------------------------------------------------------------- S3 layout shared with the device and the gg build

# Greengrass component artifacts: `qcsight gg` uploads under s3://<models bucket>/<this>/<component>/<version>/.
COMPONENT_ARTIFACT_PREFIX = "components"
# Full-resolution alert images: each device uploads under s3://<images bucket>/<this>/<thing name>/.
DEVICE_IMAGE_PREFIX = "devices"
# The model Batch Transform scores with (put there by hand or a release step: the deploy function does not yet
# copy a promoted model here).
BATCH_MODEL_KEY = "batch/current/model.tar.gz"
# Neo's compiled models, in the pipeline bucket (the SageMaker role, which Neo assumes, writes there).
NEO_OUTPUT_PREFIX = "neo/"

# ---------------------------------------------------------------- containers

# SageMaker runs `docker run IMAGE serve`; the image's `serve` script execs this.
SCORING_SERVE_COMMAND = ("qcsight", "batch", "serve")
SCORING_PORT = 8080
# The review web app (qcsight_review). Its port is the ALB target's.
REVIEW_SERVE_COMMAND = ("qcsight", "review", "serve", "--host", "0.0.0.0", "--port", "8000")
REVIEW_PORT = 8000
REVIEW_HEALTH_PATH = "/healthz"
# Where the pipeline definition comes from: a callable taking a PipelineInputs mapping (role ARN,
# buckets, image URIs, model package group) and returning the definition as a dict.
PIPELINE_DEFINITION_HOOK = "qcsight_cloud.pipeline:definition"
