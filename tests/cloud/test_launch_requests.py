"""The launcher's request dicts, checked against botocore's SageMaker service model without any server.

Each request goes through a real boto3 client wrapped in botocore's Stubber: botocore's own
parameter validation (required members, types, minimum lengths) runs as for a real call, and
the Stubber checks that exactly this request was sent. assert_valid adds what only the service
checks (enums, patterns, maximum lengths): a 257-character container argument or a 33-character
tuning job name fails here, not in an account.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from qcsight_aws.s3 import S3Uri
from qcsight_train.launch import cli, job_requests, neo
from qcsight_train.launch.plan import CompilationPlan, TrainingPlan
from tests.helpers.aws import assert_valid

boto3 = pytest.importorskip("boto3")
Stubber = pytest.importorskip("botocore.stub").Stubber

pytestmark = pytest.mark.cloud

REPO_ROOT = Path(__file__).resolve().parents[2]
ROLE = "arn:aws:iam::123456789012:role/SageMakerQcsight"
IMAGE = "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.10.0-gpu-py313"
ARN = "arn:aws:sagemaker:us-east-1:123456789012"
NOW = datetime(2026, 11, 23, 10, 15, 0, tzinfo=timezone.utc)
SOURCE = S3Uri("qc-out", "models/qcsight-train/source/0123456789abcdef/sourcedir.tar.gz")
BASE = ["--role", ROLE, "--data", "s3://qc-data/train/", "--output-s3", "s3://qc-out/models/",
        "--source-dir", str(REPO_ROOT), "--image-uri", IMAGE, "--region", "us-east-1"]


def plan(*flags: str) -> TrainingPlan | CompilationPlan:
    return cli.plan_from_args(cli.build_parser().parse_args([*BASE, *flags]))


def send(method: str, request: dict[str, Any], response: dict[str, Any]) -> None:
    """Call the client method with the request through Stubber: botocore validates it as it would for AWS."""
    client = boto3.client("sagemaker", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    with Stubber(client) as stub:
        stub.add_response(method, response, expected_params=request)
        getattr(client, method)(**request)
        stub.assert_no_pending_responses()


@pytest.mark.parametrize("flags", [
    (),
    ("--instance-type", "ml.g5.12xlarge", "--instance-count", "4", "--processes-per-node", "4", "--spot",
     "--max-run", "7200", "--validation", "s3://qc-data/val/", "--epochs", "30", "--hp", "warmup_epochs=2"),
    ("--spot", "--instance-type", "ml.m5.xlarge", "--job-name", "a" * 38),
])
def test_training_requests_pass_the_service_model(flags: tuple[str, ...]) -> None:
    training = plan(*flags)
    assert isinstance(training, TrainingPlan)
    name = job_requests.training_job_name(training.job.base_job_name, NOW)
    request = job_requests.training_request(training, name, SOURCE)
    assert_valid("CreateTrainingJob", request)
    send("create_training_job", request, {"TrainingJobArn": f"{ARN}:training-job/{name}"})
    assert request["InputDataConfig"][-1]["DataSource"]["S3DataSource"]["S3Uri"] == SOURCE.uri
    if training.job.compute.spot and training.job.checkpoint_s3 is None:
        assert request["CheckpointConfig"]["S3Uri"] == f"s3://qc-out/models/{training.job.base_job_name}/{name}/checkpoints"


@pytest.mark.parametrize("flags", [
    ("--tune", "--batch-sizes", "16,32,64", "--instance-type", "ml.g4dn.xlarge", "--spot",
     "--checkpoint-s3", "s3://qc-out/ckpt/", "--lr", "0.001", "--batch-size", "32", "--epochs", "8"),
    ("--tune", "--job-name", "b" * 38, "--strategy", "Hyperband", "--objective", "validation:loss",
     "--instance-type", "ml.m5.2xlarge", "--instance-count", "2"),
])
def test_tuning_requests_pass_the_service_model(flags: tuple[str, ...]) -> None:
    tuning = plan(*flags)
    assert isinstance(tuning, TrainingPlan) and tuning.tuning is not None
    name = job_requests.tuning_job_name(tuning.job.base_job_name, NOW)
    assert len(name) <= 32 and name.endswith("-261123-101500")
    request = job_requests.tuning_request(tuning, name, SOURCE)
    assert_valid("CreateHyperParameterTuningJob", request)
    send("create_hyper_parameter_tuning_job", request,
         {"HyperParameterTuningJobArn": f"{ARN}:hyper-parameter-tuning-job/{name}"})
    static = request["TrainingJobDefinition"]["StaticHyperParameters"]
    ranges = request["HyperParameterTuningJobConfig"]["ParameterRanges"].values()
    tuned = {r["Name"] for kind in ranges for r in kind}
    assert not tuned & static.keys(), "a tuned hyperparameter must not also be static"
    assert static["sagemaker_submit_directory"] == SOURCE.uri


@pytest.mark.parametrize("target", [("--neo-target", "jetson_xavier"), ("--neo-platform", "LINUX:ARM64:NVIDIA")])
def test_compilation_requests_pass_the_service_model(target: tuple[str, str]) -> None:
    compilation = cli.plan_from_args(cli.build_parser().parse_args(
        ["--role", ROLE, *target, "--img-size", "160", "--model-s3", "s3://qc-out/ts/model.tar.gz",
         "--output-s3", "s3://qc-out/neo", "--region", "us-east-1"]))
    assert isinstance(compilation, CompilationPlan)
    request = neo.build_compilation_request(compilation.spec)
    assert_valid("CreateCompilationJob", request)
    send("create_compilation_job", request, {"CompilationJobArn": f"{ARN}:compilation-job/x"})


def test_the_node_command_fits_one_container_argument() -> None:
    longest = plan("--processes-per-node", "4096")
    assert isinstance(longest, TrainingPlan)
    command = job_requests.node_command(longest.job.compute)
    assert len(command) <= 256 and command.endswith("--processes-per-node 4096")
