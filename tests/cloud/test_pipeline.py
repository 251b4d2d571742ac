"""The retraining pipeline's definition checked step by step against botocore's model; upsert/start via Stubber."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qcsight_aws.s3 import S3Uri
from qcsight_cloud import cli, pipeline
from qcsight_cloud.lambda_policy import PIPELINE_PARAMETERS
from qcsight_core.errors import ConfigError
from tests.cloud.pipeline_check import definition_problems
from tests.helpers.aws import assert_valid

ROLE = "arn:aws:iam::123456789012:role/qcsight-sagemaker-execution"
SCORING = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/cdk-hnb659fds-container-assets:abc123"
KEY = "arn:aws:kms:eu-west-1:123456789012:key/11111111-2222-3333-4444-555555555555"


def launcher_request(instance_type: str = "ml.g5.12xlarge", spot: bool = False) -> dict[str, Any]:
    """The CreateTrainingJob request `qcsight train launch` builds (its own builder, multi-GPU instance)."""
    from qcsight_train.launch.job_requests import training_request
    from qcsight_train.launch.plan import AwsSpec, ComputeSpec, TrainingJobSpec, TrainingPlan

    job = TrainingJobSpec("qcsight-retrain", Path("."), S3Uri("qcsight-pipeline", "runs"), "s3://qcsight-data/train/",
                          None, None, "763104351884.dkr.ecr.eu-west-1.amazonaws.com/pytorch-training:2.10.0-gpu-py313",
                          {"epochs": "10"}, ComputeSpec(instance_type=instance_type, spot=spot,
                                                        max_wait_s=172800 if spot else None))
    return training_request(TrainingPlan(AwsSpec("eu-west-1", ROLE), job), "qcsight-retrain",
                            S3Uri("qcsight-pipeline", "source/"))


def inputs(**overrides: str) -> dict[str, str]:
    return {"role_arn": ROLE, "pipeline_bucket": "qcsight-pipeline", "model_package_group": "qcsight-models",
            "training_request": json.dumps(launcher_request()), "scoring_image": SCORING, "kms_key_arn": KEY,
            "data_bucket": "qcsight-data", "models_bucket": "qcsight-models-bucket", **overrides}


@pytest.mark.parametrize("spot", [False, True])
def test_every_step_is_a_valid_request_for_the_call_sagemaker_makes(spot: bool) -> None:
    body = pipeline.definition(inputs(training_request=json.dumps(launcher_request(spot=spot))))
    assert definition_problems(body) == []
    json.dumps(body)  # the definition is plain JSON


def test_the_checker_refuses_what_sagemaker_would() -> None:
    body = pipeline.definition(inputs())
    broken = copy.deepcopy(body)
    train, evaluate, gate, condition = broken["Steps"]
    evaluate["Arguments"]["AppSpecification"]["ContainerArguments"] = ["x" * 257]
    train["Arguments"]["ResourceConfig"]["VolumeSizeInGB"] = "30"
    gate["Arguments"]["ProcessingInputs"][1]["S3Input"]["S3Uri"] = {"Get": "Parameters.Nope"}
    condition["Arguments"]["IfSteps"][0]["Arguments"]["ModelApprovalStatus"] = "Maybe"
    condition["Arguments"]["Conditions"][0]["LeftValue"]["Std:JsonGet"]["PropertyFile"]["Get"] = \
        "Steps.Gate.PropertyFiles.Other"
    problems = "\n".join(definition_problems(broken))
    for expected in ("ContainerArguments[0]: length 257", "VolumeSizeInGB: '30' is not an integer",
                     "Parameters.Nope is not a declared parameter", "'Maybe' not in enum",
                     "PropertyFiles.Other is not a property file"):
        assert expected in problems, problems
    swapped = copy.deepcopy(body)
    swapped["Steps"][1], swapped["Steps"][2] = swapped["Steps"][2], swapped["Steps"][1]
    assert any("does not name an earlier step" in p for p in definition_problems(swapped))


def test_train_evaluate_gate_register_are_wired_as_the_issue_says() -> None:
    body = pipeline.definition(inputs())
    declared = {p["Name"] for p in body["Parameters"]}
    assert set(PIPELINE_PARAMETERS) <= declared, "what the policy function starts executions with"
    train, evaluate, gate, condition = body["Steps"]
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
                for c in train["Arguments"]["InputDataConfig"]}
    assert channels == {"train": {"Get": "Parameters.BaseData"}, "reviewed": {"Get": "Parameters.ReviewedManifest"},
                        "code": "s3://qcsight-pipeline/source/"}
    launcher = launcher_request()
    assert train["Arguments"]["AlgorithmSpecification"] == launcher["AlgorithmSpecification"], \
        "the launcher's node command: torchrun over every GPU of every node"
    assert train["Arguments"]["HyperParameters"] == {"epochs": "10"}
    # Evaluation scores the candidate and production on the same held-out set; the gate compares the two reports.
    sources = {i["InputName"]: i["S3Input"]["S3Uri"] for i in evaluate["Arguments"]["ProcessingInputs"]}
    assert sources["candidate"] == {"Get": "Steps.Train.ModelArtifacts.S3ModelArtifacts"}
    assert sources["production"] == {"Get": "Parameters.ProductionModel"}
    assert sources["holdout"] == {"Get": "Parameters.HoldoutData"}
    assert "qcsight evaluate" in evaluate["Arguments"]["AppSpecification"]["ContainerArguments"][0]
    command = gate["Arguments"]["AppSpecification"]["ContainerArguments"][0]
    assert "qcsight cloud gate --candidate $IN/candidate/metrics.json ${P:+--production $P} " \
           "--out $OUT/decision.json" in command
    assert gate["PropertyFiles"] == [{"PropertyFileName": "GateDecision", "OutputName": "gate",
                                      "FilePath": "decision.json"}]
    [passed] = condition["Arguments"]["Conditions"]
    assert passed["LeftValue"]["Std:JsonGet"]["Path"] == "passed" and passed["RightValue"] is True
    [register] = condition["Arguments"]["IfSteps"]
    assert register["Arguments"]["ModelApprovalStatus"] == "PendingManualApproval"
    assert register["Arguments"]["InferenceSpecification"]["Containers"] == [
        {"Image": SCORING, "ModelDataUrl": {"Get": "Steps.Train.ModelArtifacts.S3ModelArtifacts"}}]
    assert register["Arguments"]["ModelMetrics"]["ModelQuality"]["Statistics"]["S3Uri"]["Std:Join"]["Values"][-1] == \
        "/candidate/metrics.json"
    [refused] = condition["Arguments"]["ElseSteps"]
    assert refused["Type"] == "Fail"


def test_inputs_are_checked_and_the_launchers_dry_run_is_taken_as_it_is() -> None:
    with pytest.raises(ConfigError, match=r"inputs\.scoring_image"):
        pipeline.definition({k: v for k, v in inputs().items() if k != "scoring_image"})
    with pytest.raises(ConfigError, match=r"inputs\.bucket"):
        pipeline.definition(inputs(bucket="x"))
    with pytest.raises(ConfigError, match="training_request"):
        pipeline.definition(inputs(training_request='{"TrainingJobName": "x"}'))
    dry_run = json.dumps({"dry_run": True, "operation": "CreateTrainingJob", "request": launcher_request()})
    assert pipeline.definition(inputs(training_request=dry_run)) == pipeline.definition(inputs())


# ---------------------------------------------------------------- qcsight cloud pipeline upsert | start


def _sagemaker() -> Any:
    import boto3

    return boto3.client("sagemaker", region_name="eu-west-1", aws_access_key_id="k", aws_secret_access_key="s")


def test_upsert_creates_then_updates_and_start_checks_its_parameters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import boto3
    from botocore.stub import ANY, Stubber

    client = _sagemaker()
    s3 = boto3.client("s3", region_name="eu-west-1", aws_access_key_id="k", aws_secret_access_key="s")
    monkeypatch.setattr("qcsight_cloud.aws_cli._client", lambda args, service: s3 if service == "s3" else client)
    (tmp_path / "inputs.json").write_text(json.dumps(inputs()))
    body = pipeline.definition(inputs())
    expected = {"PipelineName": "qcsight-retrain", "PipelineDefinition": json.dumps(body, sort_keys=True),
                "PipelineDescription": ANY, "RoleArn": ROLE}
    arn = "arn:aws:sagemaker:eu-west-1:123456789012:pipeline/qcsight-retrain"
    with Stubber(client) as stub, Stubber(s3) as s3_stub:
        # A run started by hand takes ReviewedManifest's default: the empty manifest is put the first time.
        empty = {"Bucket": "qcsight-pipeline", "Key": "manifests/empty.manifest"}
        s3_stub.add_client_error("head_object", "404", "Not Found", 404, expected_params=empty)
        s3_stub.add_response("put_object", {}, {**empty, "Body": b"", "ContentType": "application/x-ndjson"})
        stub.add_client_error("describe_pipeline", "ResourceNotFound", "Pipeline does not exist",
                              expected_params={"PipelineName": "qcsight-retrain"})
        stub.add_response("create_pipeline", {"PipelineArn": arn}, {**expected, "ClientRequestToken": ANY})
        stub.add_response("describe_pipeline", {"PipelineArn": arn, "PipelineDefinition": json.dumps(body)},
                          {"PipelineName": "qcsight-retrain"})
        stub.add_response("update_pipeline", {"PipelineArn": arn}, expected)
        stub.add_response("describe_pipeline", {"PipelineArn": arn, "PipelineDefinition": json.dumps(body)},
                          {"PipelineName": "qcsight-retrain"})
        stub.add_response("start_pipeline_execution", {"PipelineExecutionArn": f"{arn}/execution/x1"},
                          {"PipelineName": "qcsight-retrain", "ClientRequestToken": ANY,
                           "PipelineExecutionDescription": ANY,
                           "PipelineParameters": [{"Name": "Line", "Value": "line-1"},
                                                  {"Name": "TrainingInstanceType", "Value": "ml.p4d.24xlarge"}]})
        stub.add_response("describe_pipeline", {"PipelineArn": arn, "PipelineDefinition": json.dumps(body)},
                          {"PipelineName": "qcsight-retrain"})
        upsert = ["pipeline", "upsert", "--name", "qcsight-retrain", "--inputs", str(tmp_path / "inputs.json")]
        assert cli.main(upsert) == 0 and cli.main(upsert) == 0
        assert cli.main(["pipeline", "start", "--name", "qcsight-retrain", "-p", "Line=line-1",
                         "-p", "TrainingInstanceType=ml.p4d.24xlarge"]) == 0
        with pytest.raises(Exception, match="'Lines' is not declared"):
            cli.main(["pipeline", "start", "--name", "qcsight-retrain", "-p", "Lines=line-1"])
        stub.assert_no_pending_responses()
        s3_stub.assert_no_pending_responses()
    assert f"{arn}/execution/x1" in capsys.readouterr().out


def test_the_requests_are_valid_for_the_service_in_full() -> None:
    """Stubber checks types and required members; the service also checks patterns, enums and maxima."""
    body = pipeline.definition(inputs())
    request = pipeline.upsert_request("qcsight-retrain", ROLE, body, "d" * 4000)
    assert_valid("CreatePipeline", {**request, "ClientRequestToken": "t" * 32})
    assert_valid("UpdatePipeline", request)
    assert_valid("StartPipelineExecution", pipeline.start_request("qcsight-retrain", {"Line": "l"}, "t" * 32, "d"))


@pytest.mark.parametrize("first_model", [False, True])
def test_the_processing_commands_run_in_a_shell_and_leave_production_out_for_a_first_model(
        tmp_path: Path, first_model: bool) -> None:
    """Run Evaluate's and Gate's commands with sh, `tar`, `pip` and `qcsight` recording their arguments."""
    bin_dir, inputs, out, code = tmp_path / "bin", tmp_path / "in", tmp_path / "out", tmp_path / "code"
    for folder in (bin_dir, out, code):
        folder.mkdir()
    calls = tmp_path / "calls"
    for name in ("tar", "pip", "qcsight"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n')
        (bin_dir / name).chmod(0o755)
    (inputs / "candidate").mkdir(parents=True)
    (inputs / "candidate" / "model.tar.gz").write_bytes(b"x")
    (inputs / "candidate" / "metrics.json").write_text("{}")
    if not first_model:
        (inputs / "production").mkdir()
        (inputs / "production" / "model.tar.gz").write_bytes(b"x")
        (inputs / "production" / "metrics.json").write_text("{}")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "IN": str(inputs), "OUT": str(out), "CODE": str(code)}
    for command in (pipeline.EVALUATE_COMMAND, pipeline.GATE_COMMAND):
        assert len(command) <= 256, "one ContainerArguments item"
        subprocess.run(["sh", "-c", command], env=env, check=True, timeout=30)
    recorded = [line for line in calls.read_text().splitlines() if line.startswith("qcsight ")]
    evaluated = [line.split("--bundle ")[1].split()[0] for line in recorded if "evaluate" in line]
    gate = [line for line in recorded if "cloud gate" in line]
    models = ["candidate"] if first_model else ["candidate", "production"]
    assert evaluated == [f"{inputs}/{model}/model.tar.gz" for model in models]
    assert len(gate) == 1
    assert ("--production" in gate[0]) is (not first_model)


def _resolved(value: Any, parameters: dict[str, Any], execution: str) -> Any:
    """A step argument with its pipeline expressions evaluated the way SageMaker does at run time."""
    if isinstance(value, dict) and set(value) == {"Get"}:
        path = value["Get"]
        return execution if path == "Execution.PipelineExecutionId" else parameters[path.removeprefix("Parameters.")]
    if isinstance(value, dict) and set(value) == {"Std:Join"}:
        join = value["Std:Join"]
        return join["On"].join(str(_resolved(v, parameters, execution)) for v in join["Values"])
    if isinstance(value, dict):
        return {k: _resolved(v, parameters, execution) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolved(v, parameters, execution) for v in value]
    return value


def test_the_reviewed_channel_copies_the_policys_manifest_into_the_container_in_file_mode() -> None:
    """The policy's manifest object reaches /opt/ml/input/data/reviewed/ on every host; training fetches its images."""
    body = pipeline.definition(inputs())
    train = body["Steps"][0]
    [reviewed] = [c for c in train["Arguments"]["InputDataConfig"] if c["ChannelName"] == "reviewed"]
    assert reviewed == {"ChannelName": "reviewed", "InputMode": "File", "DataSource": {"S3DataSource": {
        "S3DataType": "S3Prefix", "S3Uri": {"Get": "Parameters.ReviewedManifest"},
        "S3DataDistributionType": "FullyReplicated"}}}
    # The request SageMaker makes once an execution the policy started resolves its parameters.
    values = {p["Name"]: p["DefaultValue"] for p in body["Parameters"]}
    values["ReviewedManifest"] = "s3://qcsight-pipeline/manifests/line-1/0123abcd.manifest"
    request = _resolved(train["Arguments"], values, "exec-1")
    assert_valid("CreateTrainingJob", {**request, "TrainingJobName": "pipelines-exec-1-train"})
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in request["InputDataConfig"]}
    assert channels["reviewed"] == values["ReviewedManifest"]


def test_an_existing_default_manifest_is_left_as_it_is() -> None:
    import boto3
    from botocore.stub import Stubber

    s3 = boto3.client("s3", region_name="eu-west-1", aws_access_key_id="k", aws_secret_access_key="s")
    body = pipeline.definition(inputs())
    uri = pipeline.default_value(body, "ReviewedManifest")
    assert uri == "s3://qcsight-pipeline/manifests/empty.manifest"
    with Stubber(s3) as stub:
        stub.add_response("head_object", {"ContentLength": 0},
                          {"Bucket": "qcsight-pipeline", "Key": "manifests/empty.manifest"})
        assert pipeline.ensure_object(s3, uri) is False
        stub.assert_no_pending_responses()
