"""The retraining pipeline as a SageMaker pipeline definition (plain JSON, version 2020-12-01), and its requests.

Steps::

    Train --> Evaluate --> Gate --> GatePassed? --yes--> Register (PendingManualApproval)
                                               \\--no---> Refused (Fail)

- ``Train``: the CreateTrainingJob request ``qcsight train launch`` builds (multi-GPU through its
  node script and torchrun; ``qcsight_train.launch.job_requests.training_request``), given here as
  JSON (the CDK stack builds it with that function; by hand, ``qcsight train launch --dry-run``
  prints it), with its ``train`` channel on the ``BaseData`` parameter, a ``reviewed`` channel on
  the ``ReviewedManifest`` parameter (the policy function's manifest), instance type and count as
  parameters, and the model written under ``runs/<execution id>/`` of the pipeline bucket.
  The ``reviewed`` channel is the manifest object itself (``S3Prefix``, File mode, on every host):
  SageMaker copies it into /opt/ml/input/data/reviewed/, and training downloads the images its
  lines name by s3:// URI (the execution role reads the images bucket), adding them to the
  training split only (qcsight_core.review_manifest, qcsight_train.data). Not ``ManifestFile``:
  its JSON array names objects under one prefix and carries no labels (a second object would have
  to), and an empty one (no reviews yet) is not a manifest; not ``AugmentedManifestFile``: Pipe
  mode only.
- ``Evaluate``: a processing job on the training image and source tarball running ``qcsight
  evaluate`` on the fixed held-out set (``HoldoutData``) for the candidate and for the production
  model (``ProductionModel``), writing ``candidate/metrics.json`` and ``production/metrics.json``.
- ``Gate``: ``qcsight cloud gate --candidate ... [--production ...] --out decision.json`` (no
  production report for a first model)
  (qcsight_cloud.gate: ``{"passed": bool, "reasons": [...]}``), read back as the property file
  ``GateDecision``.
- ``GatePassed``: ``passed`` is true -> ``Register``: a model package in the group, status
  ``PendingManualApproval``, with the bundle (the training job's model.tar.gz, served by the
  scoring container) and the candidate's metrics as its model quality statistics; else ``Refused``.

qcsight_cloud stays torch-free and independent of qcsight_train: the training request arrives as
data. ``definition(inputs)`` is the hook the CDK stack calls (``stacks/names.py``); ``qcsight
cloud pipeline upsert | start`` sends the same definition with CreatePipeline/UpdatePipeline and
starts executions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from qcsight_aws.jobs import SOURCE_TARBALL
from qcsight_cloud.errors import CloudError
from qcsight_cloud.lambda_policy import PARAM_DECISION_ID, PARAM_LINE, PARAM_MANIFEST, PARAM_RUN_ID
from qcsight_core.errors import ConfigError

log = logging.getLogger(__name__)

VERSION = "2020-12-01"
TRAIN, EVALUATE, GATE, CONDITION, REGISTER, REFUSED = "Train", "Evaluate", "Gate", "GatePassed", "Register", "Refused"
GATE_PROPERTY_FILE = "GateDecision"
PARAM_BASE_DATA, PARAM_HOLDOUT, PARAM_PRODUCTION = "BaseData", "HoldoutData", "ProductionModel"
PARAM_TRAIN_INSTANCE, PARAM_TRAIN_COUNT = "TrainingInstanceType", "TrainingInstanceCount"
# ReviewedManifest's default (a run started by hand): an empty manifest. The reviewed channel is an
# S3Prefix channel, and a training job whose prefix matches no object fails to start, so
# `qcsight cloud pipeline start` puts this empty object when it is missing (ensure_object).
EMPTY_MANIFEST_KEY = "manifests/empty.manifest"
# What a pipeline needs from its deployment (CDK stack or `qcsight cloud pipeline upsert --inputs`).
REQUIRED_INPUTS = ("role_arn", "pipeline_bucket", "model_package_group", "training_request", "scoring_image")
OPTIONAL_INPUTS = ("data_bucket", "images_bucket", "models_bucket", "kms_key_arn", "region", "base_data",
                   "holdout_data", "production_model", "evaluation_instance_type")
PROCESSING = "/opt/ml/processing"
# Each processing command is one ContainerArguments item (at most 256 characters): the paths live in
# the step's environment. The source tarball is the one the training job unpacks (`qcsight train
# launch` stages it), so evaluation runs the code that trained the candidate.
_INSTALL = (f"set -e;cd $(mktemp -d);tar -xzf $CODE/{SOURCE_TARBALL};"
            "pip install -q -r requirements.txt .;")
# A first model has no production bundle to compare with: its evaluation is skipped and the gate is
# called without --production (it then passes the candidate, saying why).
EVALUATE_COMMAND = _INSTALL + ("for m in candidate production;do B=$IN/$m/model.tar.gz;[ -f $B ]||continue;"
                               "qcsight evaluate --bundle $B --data $IN/holdout --output $OUT/$m;done")
GATE_COMMAND = _INSTALL + ("P=$IN/production/metrics.json;[ -f $P ]||P=;qcsight cloud gate --candidate "
                           "$IN/candidate/metrics.json ${P:+--production $P} --out $OUT/decision.json")
# The bundle is served by the scoring container (`qcsight batch serve`): the content types it takes.
CONTENT_TYPES = ["application/x-image", "image/jpeg", "image/png"]
RESPONSE_TYPES = ["application/json", "application/jsonlines"]
TRANSFORM_INSTANCE_TYPES = ["ml.m5.xlarge", "ml.c5.xlarge", "ml.g4dn.xlarge"]
REALTIME_INSTANCE_TYPES = ["ml.m5.large", "ml.m5.xlarge", "ml.c5.xlarge", "ml.g4dn.xlarge"]


def _get(path: str) -> dict[str, str]:
    return {"Get": path}


def _parameter(name: str) -> dict[str, str]:
    return _get(f"Parameters.{name}")


def _join(*values: Any, on: str = "") -> dict[str, Any]:
    return {"Std:Join": {"On": on, "Values": list(values)}}


EXECUTION_ID = _get("Execution.PipelineExecutionId")
MODEL_ARTIFACTS = _get(f"Steps.{TRAIN}.ModelArtifacts.S3ModelArtifacts")


def _output_uri(step: str, output: str) -> dict[str, str]:
    return _get(f"Steps.{step}.ProcessingOutputConfig.Outputs['{output}'].S3Output.S3Uri")


def _inputs(inputs: Mapping[str, str]) -> dict[str, str]:
    missing = [key for key in REQUIRED_INPUTS if not inputs.get(key)]
    if missing:
        raise ConfigError(f"pipeline inputs.{missing[0]}", None,
                          f"required; the inputs are {', '.join(REQUIRED_INPUTS)} (and optionally "
                          f"{', '.join(OPTIONAL_INPUTS)})")
    unknown = sorted(set(inputs) - set(REQUIRED_INPUTS) - set(OPTIONAL_INPUTS))
    if unknown:
        raise ConfigError(f"pipeline inputs.{unknown[0]}", inputs[unknown[0]],
                          f"not an input; known: {', '.join(REQUIRED_INPUTS + OPTIONAL_INPUTS)}")
    return dict(inputs)


def training_request_from(text: str) -> dict[str, Any]:
    """The CreateTrainingJob request in ``text``: the request itself, or `qcsight train launch --dry-run` output."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("pipeline inputs.training_request", text[:80],
                          f"a CreateTrainingJob request as JSON ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("request"), dict):
        data = data["request"]  # the launcher's dry-run: {"dry_run": true, "operation": ..., "request": {...}}
    if not isinstance(data, dict) or "AlgorithmSpecification" not in data or "InputDataConfig" not in data:
        raise ConfigError("pipeline inputs.training_request", text[:80],
                          "a CreateTrainingJob request (AlgorithmSpecification, InputDataConfig, ...), as "
                          "`qcsight train launch --dry-run` prints it")
    return data


def _channel(name: str, uri: Any) -> dict[str, Any]:
    return {"ChannelName": name, "InputMode": "File", "DataSource": {"S3DataSource": {
        "S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}}}


def _code_uri(request: Mapping[str, Any]) -> str:
    for channel in request["InputDataConfig"]:
        if channel["ChannelName"] == "code":
            uri: str = channel["DataSource"]["S3DataSource"]["S3Uri"]
            return uri
    raise ConfigError("pipeline inputs.training_request", "InputDataConfig",
                      "a 'code' channel with the source tarball (as qcsight train launch builds it)")


def _train_step(inputs: Mapping[str, str], request: Mapping[str, Any]) -> dict[str, Any]:
    arguments = {key: value for key, value in request.items() if key != "TrainingJobName"}
    channels = [c for c in request["InputDataConfig"] if c["ChannelName"] not in ("train", "reviewed")]
    arguments["InputDataConfig"] = [_channel("train", _parameter(PARAM_BASE_DATA)),
                                    _channel("reviewed", _parameter(PARAM_MANIFEST)), *channels]
    arguments["RoleArn"] = inputs["role_arn"]
    arguments["ResourceConfig"] = {**request["ResourceConfig"], "InstanceType": _parameter(PARAM_TRAIN_INSTANCE),
                                   "InstanceCount": _parameter(PARAM_TRAIN_COUNT)}
    output: dict[str, Any] = {"S3OutputPath": _join(f"s3://{inputs['pipeline_bucket']}/runs/", EXECUTION_ID, "/model"),
                              "CompressionType": "GZIP"}
    if inputs.get("kms_key_arn"):
        output["KmsKeyId"] = inputs["kms_key_arn"]
    arguments["OutputDataConfig"] = output
    if "CheckpointConfig" in arguments:  # a spot job checkpoints per execution
        arguments["CheckpointConfig"] = {**arguments["CheckpointConfig"], "S3Uri": _join(
            f"s3://{inputs['pipeline_bucket']}/runs/", EXECUTION_ID, "/checkpoints")}
    return {"Name": TRAIN, "Type": "Training", "Arguments": arguments}


def _processing_input(name: str, uri: Any) -> dict[str, Any]:
    return {"InputName": name, "AppManaged": False, "S3Input": {
        "S3Uri": uri, "LocalPath": f"{PROCESSING}/input/{name}", "S3DataType": "S3Prefix", "S3InputMode": "File",
        "S3DataDistributionType": "FullyReplicated"}}


def _processing_step(name: str, inputs: Mapping[str, str], image: str, command: str,
                     step_inputs: list[dict[str, Any]], output: str) -> dict[str, Any]:
    output_config: dict[str, Any] = {"Outputs": [{"OutputName": output, "AppManaged": False, "S3Output": {
        "S3Uri": _join(f"s3://{inputs['pipeline_bucket']}/runs/", EXECUTION_ID, f"/{output}"),
        "LocalPath": f"{PROCESSING}/{output}", "S3UploadMode": "EndOfJob"}}]}
    cluster: dict[str, Any] = {"InstanceType": inputs.get("evaluation_instance_type") or "ml.m5.xlarge",
                               "InstanceCount": 1, "VolumeSizeInGB": 30}
    if inputs.get("kms_key_arn"):
        output_config["KmsKeyId"] = inputs["kms_key_arn"]
    return {"Name": name, "Type": "Processing", "Arguments": {
        "ProcessingResources": {"ClusterConfig": cluster},
        "AppSpecification": {"ImageUri": image, "ContainerEntrypoint": ["/bin/bash", "-c"],
                             "ContainerArguments": [command]},
        "Environment": {"CODE": f"{PROCESSING}/input/code", "IN": f"{PROCESSING}/input",
                        "OUT": f"{PROCESSING}/{output}", "PYTHONUNBUFFERED": "1"},
        "RoleArn": inputs["role_arn"],
        "ProcessingInputs": step_inputs,
        "ProcessingOutputConfig": output_config,
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
    }}


def _register_step(inputs: Mapping[str, str]) -> dict[str, Any]:
    metrics = _join(_output_uri(EVALUATE, "evaluation"), "/candidate/metrics.json")
    return {"Name": REGISTER, "Type": "RegisterModel", "Arguments": {
        "ModelPackageGroupName": inputs["model_package_group"],
        "ModelPackageDescription": _join("qcsight candidate of run ", _parameter(PARAM_RUN_ID), " for line ",
                                         _parameter(PARAM_LINE), "; passed the gate against production"),
        "ModelApprovalStatus": "PendingManualApproval",
        "InferenceSpecification": {
            "Containers": [{"Image": inputs["scoring_image"], "ModelDataUrl": MODEL_ARTIFACTS}],
            "SupportedContentTypes": CONTENT_TYPES, "SupportedResponseMIMETypes": RESPONSE_TYPES,
            "SupportedTransformInstanceTypes": TRANSFORM_INSTANCE_TYPES,
            "SupportedRealtimeInferenceInstanceTypes": REALTIME_INSTANCE_TYPES,
        },
        "ModelMetrics": {"ModelQuality": {"Statistics": {"ContentType": "application/json", "S3Uri": metrics}}},
        "CustomerMetadataProperties": {
            "line": _parameter(PARAM_LINE), "run_id": _parameter(PARAM_RUN_ID),
            "decision_id": _parameter(PARAM_DECISION_ID), "pipeline_execution": EXECUTION_ID,
            "gate_decision": _join(_output_uri(GATE, "gate"), "/decision.json"),
        },
    }}


def definition(inputs: Mapping[str, str]) -> dict[str, Any]:
    """The pipeline definition for one deployment.

    Args:
        inputs: REQUIRED_INPUTS (role ARN, pipeline bucket, model package group, the training request
            as JSON, the scoring image) and optionally OPTIONAL_INPUTS (the defaults of the data
            parameters, the KMS key, the evaluation instance type).

    Raises:
        ConfigError: an input is missing, unknown or not what it should be (named).
    """
    given = _inputs(inputs)
    request = training_request_from(given["training_request"])
    data_bucket = given.get("data_bucket") or given["pipeline_bucket"]
    models_bucket = given.get("models_bucket") or given["pipeline_bucket"]
    image = request["AlgorithmSpecification"]["TrainingImage"]
    code = _code_uri(request)
    resources = request["ResourceConfig"]
    parameters = [
        {"Name": PARAM_LINE, "Type": "String", "DefaultValue": "manual"},
        {"Name": PARAM_RUN_ID, "Type": "String", "DefaultValue": "manual"},
        {"Name": PARAM_DECISION_ID, "Type": "String", "DefaultValue": "none"},
        {"Name": PARAM_MANIFEST, "Type": "String",
         "DefaultValue": f"s3://{given['pipeline_bucket']}/{EMPTY_MANIFEST_KEY}"},
        {"Name": PARAM_BASE_DATA, "Type": "String", "DefaultValue": given.get("base_data") or f"s3://{data_bucket}/train/"},
        {"Name": PARAM_HOLDOUT, "Type": "String",
         "DefaultValue": given.get("holdout_data") or f"s3://{data_bucket}/holdout/"},
        {"Name": PARAM_PRODUCTION, "Type": "String",
         "DefaultValue": given.get("production_model") or f"s3://{models_bucket}/batch/current/model.tar.gz"},
        {"Name": PARAM_TRAIN_INSTANCE, "Type": "String", "DefaultValue": resources["InstanceType"]},
        {"Name": PARAM_TRAIN_COUNT, "Type": "Integer", "DefaultValue": int(resources["InstanceCount"])},
    ]
    evaluate = _processing_step(EVALUATE, given, image, EVALUATE_COMMAND, [
        _processing_input("code", code), _processing_input("candidate", MODEL_ARTIFACTS),
        _processing_input("production", _parameter(PARAM_PRODUCTION)),
        _processing_input("holdout", _parameter(PARAM_HOLDOUT))], "evaluation")
    gate = _processing_step(GATE, given, image, GATE_COMMAND, [
        _processing_input("code", code),
        _processing_input("candidate", _join(_output_uri(EVALUATE, "evaluation"), "/candidate")),
        _processing_input("production", _join(_output_uri(EVALUATE, "evaluation"), "/production"))], "gate")
    gate["PropertyFiles"] = [{"PropertyFileName": GATE_PROPERTY_FILE, "OutputName": "gate",
                              "FilePath": "decision.json"}]
    condition = {"Name": CONDITION, "Type": "Condition", "Arguments": {
        "Conditions": [{"Type": "Equals", "LeftValue": {"Std:JsonGet": {
            "PropertyFile": _get(f"Steps.{GATE}.PropertyFiles.{GATE_PROPERTY_FILE}"), "Path": "passed"}},
            "RightValue": True}],
        "IfSteps": [_register_step(given)],
        "ElseSteps": [{"Name": REFUSED, "Type": "Fail", "Arguments": {"ErrorMessage": _join(
            "the candidate is worse than production; the gate's reasons are in ", _output_uri(GATE, "gate"),
            "/decision.json")}}],
    }}
    return {"Version": VERSION, "Metadata": {}, "Parameters": parameters,
            "Steps": [_train_step(given, request), evaluate, gate, condition]}


# ---------------------------------------------------------------- CreatePipeline / UpdatePipeline / Start


def upsert_request(name: str, role_arn: str, body: Mapping[str, Any], description: str) -> dict[str, Any]:
    """The UpdatePipeline request (CreatePipeline adds a ClientRequestToken) for a definition."""
    return {"PipelineName": name, "PipelineDefinition": json.dumps(body, sort_keys=True),
            "PipelineDescription": description[:3072], "RoleArn": role_arn}


def upsert(client: Any, name: str, role_arn: str, body: Mapping[str, Any], token: str,
           description: str = "qcsight retraining: train -> evaluate vs production -> gate -> register") -> str:
    """Update the pipeline if it exists, else create it; returns its ARN."""
    from botocore.exceptions import ClientError

    request = upsert_request(name, role_arn, body, description)
    try:
        client.describe_pipeline(PipelineName=name)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("ResourceNotFound", "ValidationException"):
            raise
        arn: str = client.create_pipeline(**request, ClientRequestToken=token)["PipelineArn"]
        log.info("CreatePipeline: created %s", name)
        return arn
    arn = client.update_pipeline(**request)["PipelineArn"]
    log.info("UpdatePipeline: updated %s", name)
    return arn


def start_request(name: str, parameters: Mapping[str, str], token: str, description: str) -> dict[str, Any]:
    request: dict[str, Any] = {"PipelineName": name, "ClientRequestToken": token,
                               "PipelineExecutionDescription": description[:3072]}
    if parameters:
        request["PipelineParameters"] = [{"Name": k, "Value": v} for k, v in parameters.items()]
    return request


def declared_parameters(body: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(p["Name"] for p in body.get("Parameters", []))


def default_value(body: Mapping[str, Any], name: str) -> Any:
    """A declared parameter's default (None when it is not declared or has none)."""
    return next((p.get("DefaultValue") for p in body.get("Parameters", []) if p["Name"] == name), None)


def ensure_object(s3: Any, uri: str, body: bytes = b"") -> bool:
    """Put ``body`` at ``uri`` unless an object is there; returns whether it was put."""
    from botocore.exceptions import ClientError

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        s3.head_object(Bucket=bucket, Key=key)
        return False
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchKey", "NotFound"):
            raise
    s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/x-ndjson")
    log.info("put the empty reviewed-image manifest %s (the default of %s)", uri, PARAM_MANIFEST)
    return True


def check_parameters(parameters: Mapping[str, str], known: tuple[str, ...]) -> None:
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise CloudError(f"pipeline parameter {unknown[0]!r} is not declared; the pipeline takes "
                         f"{', '.join(known)}")
