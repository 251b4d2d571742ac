"""`qcsight cloud pipeline upsert | start` and `qcsight cloud endpoint deploy | delete | invoke`: the SageMaker side.

Kept apart from cli.py (the local loop's commands); cli.py adds these parsers and actions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from qcsight_aws.errors import aws_errors
from qcsight_aws.session import boto_session
from qcsight_cloud import endpoint, pipeline
from qcsight_cloud.lambda_policy import PARAM_MANIFEST
from qcsight_core.cli import EXIT_OK
from qcsight_core.errors import ConfigError

_CREDENTIALS_HINT = "configure them (AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) or use --print"


def _aws(p: argparse.ArgumentParser, *, printable: bool = True) -> None:
    p.add_argument("--region", default=None, help="AWS region (default: AWS_REGION / the profile's)")
    if printable:
        p.add_argument("--print", action="store_true", help="print the requests instead of sending them")
    p.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")


def add_parsers(sub: Any) -> None:
    """Add `pipeline` and `endpoint` to `qcsight cloud`'s subcommands."""
    pipe = sub.add_parser("pipeline", help="create/update the SageMaker retraining pipeline, or start a run",
                          description="The retraining pipeline (qcsight_cloud.pipeline): train -> evaluate "
                          "candidate and production on the held-out set -> gate -> register as "
                          "PendingManualApproval. The CDK compute stack deploys the same definition.")
    pipe_sub = pipe.add_subparsers(dest="pipeline_action", metavar="ACTION", required=True)
    upsert = pipe_sub.add_parser("upsert", help="CreatePipeline, or UpdatePipeline when it exists",
                                 description="Build the definition from --inputs and send it.",
                                 epilog=f"--inputs keys: {', '.join(pipeline.REQUIRED_INPUTS)} (required), "
                                 f"{', '.join(pipeline.OPTIONAL_INPUTS)} (optional).")
    upsert.add_argument("--name", required=True, help="the pipeline's name, e.g. qcsight-retrain")
    upsert.add_argument("--inputs", type=Path, required=True, help="JSON object of the definition's inputs")
    upsert.add_argument("--training-request", type=Path,
                        help="the training job: `qcsight train launch ... --dry-run` output or a CreateTrainingJob "
                        "request (overrides inputs' training_request)")
    _aws(upsert)
    start = pipe_sub.add_parser("start", help="StartPipelineExecution with parameters",
                                description="Start a run; parameters are checked against the pipeline's definition.")
    start.add_argument("--name", required=True, help="the pipeline's name")
    start.add_argument("--parameter", "-p", action="append", default=[], metavar="NAME=VALUE",
                       help=f"a pipeline parameter (repeatable): {', '.join(_parameter_names())}")
    _aws(start)

    end = sub.add_parser("endpoint", help="a real-time or serverless endpoint on the Batch Transform container",
                         description="Deploy the scoring container (qcsight batch serve) with a bundle as a "
                         "SageMaker endpoint, delete it, or score one image with it.")
    end_sub = end.add_subparsers(dest="endpoint_action", metavar="ACTION", required=True)
    deploy = end_sub.add_parser("deploy", help="CreateModel, CreateEndpointConfig, CreateEndpoint; wait for InService")
    deploy.add_argument("--name", required=True, help="endpoint name (the model and config take it too)")
    deploy.add_argument("--image-uri", required=True, help="the scoring image (compute stack output ScoringImageUri)")
    deploy.add_argument("--model-data", required=True, help="s3://.../model.tar.gz: the bundle archive")
    deploy.add_argument("--role-arn", default=os.environ.get("QCSIGHT_SAGEMAKER_ROLE_ARN"),
                        help="SageMaker execution role (default $QCSIGHT_SAGEMAKER_ROLE_ARN)")
    deploy.add_argument("--instance-type", default="ml.m5.large", help="real-time instance type (default %(default)s)")
    deploy.add_argument("--instance-count", type=int, default=1, help="instances (default 1)")
    deploy.add_argument("--serverless-memory", type=int, default=None, metavar="MB",
                        help="serverless instead, with this much memory "
                        f"({', '.join(map(str, endpoint.SERVERLESS_MEMORY_MB))})")
    deploy.add_argument("--max-concurrency", type=int, default=5, help="serverless concurrency (default 5)")
    deploy.add_argument("--precision", default="fp32", choices=endpoint.PRECISIONS, help="the bundle's model to serve")
    deploy.add_argument("--timeout", type=float, default=1800, help="seconds to wait for InService (default 1800)")
    deploy.add_argument("--poll", type=float, default=30, help="seconds between status checks (default 30)")
    _aws(deploy)
    remove = end_sub.add_parser("delete", help="delete the endpoint, its config and its model")
    remove.add_argument("--name", required=True, help="endpoint name")
    _aws(remove, printable=False)
    invoke = end_sub.add_parser("invoke", help="score one image with the endpoint; prints the JSON answer")
    invoke.add_argument("--name", required=True, help="endpoint name")
    invoke.add_argument("--image", type=Path, required=True, help="an image file")
    invoke.add_argument("--content-type", default=None, choices=endpoint.CONTENT_TYPES,
                        help="default: from the file's extension (image/jpeg, image/png), else application/x-image")
    _aws(invoke, printable=False)


def _parameter_names() -> list[str]:
    from qcsight_cloud.lambda_policy import PIPELINE_PARAMETERS

    return [*PIPELINE_PARAMETERS, pipeline.PARAM_BASE_DATA, pipeline.PARAM_HOLDOUT, pipeline.PARAM_PRODUCTION,
            pipeline.PARAM_TRAIN_INSTANCE, pipeline.PARAM_TRAIN_COUNT]


def _client(args: argparse.Namespace, service: str) -> Any:
    session = boto_session(args.region, need_credentials=True, hint=_CREDENTIALS_HINT)
    if not session.region_name:
        raise ConfigError("--region", None, "a region: --region eu-west-1, or set AWS_REGION")
    return session.client(service)


def _print(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(what, str(path), f"a readable file ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(what, str(path), f"JSON ({exc})") from None


def run_pipeline(args: argparse.Namespace) -> int:
    if args.pipeline_action == "upsert":
        inputs = _read_json(args.inputs, "--inputs")
        if not isinstance(inputs, dict) or not all(isinstance(v, str) for v in inputs.values()):
            raise ConfigError("--inputs", str(args.inputs), "a JSON object of strings")
        if args.training_request is not None:
            try:
                inputs["training_request"] = args.training_request.read_text()
            except OSError as exc:
                raise ConfigError("--training-request", str(args.training_request), str(exc)) from None
        body = pipeline.definition(inputs)
        if args.print:
            _print(pipeline.upsert_request(args.name, inputs["role_arn"], body, "(description)"))
            return EXIT_OK
        client = _client(args, "sagemaker")
        with aws_errors("CreatePipeline/UpdatePipeline"):
            arn = pipeline.upsert(client, args.name, inputs["role_arn"], body, uuid.uuid4().hex)
        _print({"pipeline": args.name, "arn": arn, "steps": [s["Name"] for s in body["Steps"]]})
        return EXIT_OK
    parameters = {}
    for item in args.parameter:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError("--parameter", item, "NAME=VALUE")
        parameters[name] = value
    request = pipeline.start_request(args.name, parameters, uuid.uuid4().hex, "qcsight cloud pipeline start")
    if args.print:
        pipeline.check_parameters(parameters, tuple(_parameter_names()))
        _print(request)
        return EXIT_OK
    client = _client(args, "sagemaker")
    with aws_errors("DescribePipeline"):
        described = client.describe_pipeline(PipelineName=args.name)
    body = json.loads(described["PipelineDefinition"])
    pipeline.check_parameters(parameters, pipeline.declared_parameters(body))
    default_manifest = pipeline.default_value(body, PARAM_MANIFEST)
    if PARAM_MANIFEST not in parameters and isinstance(default_manifest, str):
        with aws_errors(f"HeadObject/PutObject of {default_manifest}"):  # the reviewed channel needs an object
            pipeline.ensure_object(_client(args, "s3"), default_manifest)
    with aws_errors("StartPipelineExecution"):
        arn = client.start_pipeline_execution(**request)["PipelineExecutionArn"]
    _print({"pipeline": args.name, "execution": arn})
    return EXIT_OK


def run_endpoint(args: argparse.Namespace) -> int:
    if args.endpoint_action == "deploy":
        if not args.role_arn:
            raise ConfigError("--role-arn", None, "the SageMaker execution role (or set QCSIGHT_SAGEMAKER_ROLE_ARN)")
        spec = endpoint.EndpointSpec(args.name, args.image_uri, args.model_data, args.role_arn, args.instance_type,
                                     args.instance_count, args.serverless_memory, args.max_concurrency, args.precision)
        if args.print:
            _print({"CreateModel": endpoint.model_request(spec),
                    "CreateEndpointConfig": endpoint.endpoint_config_request(spec),
                    "CreateEndpoint": endpoint.endpoint_request(spec)})
            return EXIT_OK
        _print(endpoint.deploy(_client(args, "sagemaker"), spec, timeout_s=args.timeout, poll_s=args.poll))
        return EXIT_OK
    if args.endpoint_action == "delete":
        deleted = endpoint.delete(_client(args, "sagemaker"), args.name)
        _print({"endpoint": args.name, "deleted": deleted})
        return EXIT_OK
    try:
        body = args.image.read_bytes()
    except OSError as exc:
        raise ConfigError("--image", str(args.image), f"a readable image file ({exc.strerror or exc})") from None
    content_type = args.content_type or {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}.get(
        args.image.suffix.lower(), "application/x-image")
    _print(endpoint.invoke(_client(args, "sagemaker-runtime"), args.name, body, content_type))
    return EXIT_OK


ACTIONS = {"pipeline": run_pipeline, "endpoint": run_endpoint}
