"""The SageMaker launcher against a moto server on loopback.

`launch.main` runs exactly as `qcsight train --sagemaker ...` would; AWS_ENDPOINT_URL points
boto3 at moto. A WSGI wrapper records every request moto receives, so the
assertions read the CreateTrainingJob / CreateHyperParameterTuningJob / CreateCompilationJob
bodies actually sent, check them against botocore's SageMaker service model (required members,
enums, patterns, lengths and ranges: what the real service validates), and read back what moto
stored with boto3 Describe* calls and S3 downloads.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from qcsight_core.bundle import ModelFile, write_bundle
from tests.helpers.aws import FAKE_ENV, assert_valid, reset_moto
from tests.helpers.models import make_tiny_bundle

pytest.importorskip("moto.server")
pytest.importorskip("sagemaker.core.image_uris")  # the image URI lookup; the SDK import is slow: once, here

from qcsight_train.launch import cli as launcher
from qcsight_train.launch import neo
from qcsight_train.launch.plan import DEFAULT_MAX_RUN_S, ENTRY_SCRIPT, METRIC_DEFINITIONS, NODE_SCRIPT
from qcsight_train.launch.source import default_source_dir, package_source

pytestmark = pytest.mark.cloud

REPO_ROOT = Path(__file__).resolve().parents[2]
ROLE = "arn:aws:iam::123456789012:role/SageMakerQcsight"
EPOCH_LINE = ("epoch=3/10 train_loss=0.4123 val_loss=0.3812 val_acc=0.9012 val_macro_f1=0.8870 "
              "lr=0.000310 images_per_s=85.2")
EXPECTED_METRICS = {"train:loss": 0.4123, "validation:loss": 0.3812, "validation:accuracy": 0.9012,
                    "validation:macro_f1": 0.8870, "throughput": 85.2}


# --------------------------------------------------------------------------- recording moto server


@dataclass
class Recording:
    """Every request moto received: SageMaker JSON calls by operation, the rest by method and path."""

    sagemaker: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    other: list[tuple[str, str]] = field(default_factory=list)

    def calls(self, operation: str) -> list[dict[str, Any]]:
        return [body for op, body in self.sagemaker if op == operation]

    def only(self, operation: str) -> dict[str, Any]:
        bodies = self.calls(operation)
        assert len(bodies) == 1, f"expected one {operation}, got {len(bodies)}: {[op for op, _ in self.sagemaker]}"
        return bodies[0]

    @property
    def total(self) -> int:
        return len(self.sagemaker) + len(self.other)


def _recording_app(app: Callable[..., Any], recording: Recording) -> Callable[..., Any]:
    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if target.startswith("SageMaker."):
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            environ["wsgi.input"] = io.BytesIO(body)  # moto reads it again
            recording.sagemaker.append((target.split(".", 1)[1], json.loads(body or b"{}")))
        else:
            recording.other.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")))
        return app(environ, start_response)
    return wsgi


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[str, Recording]]:
    """A fresh recording moto server; fake credentials and region; no user AWS or SDK config read."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from moto.server import ThreadedMotoServer
    from werkzeug.serving import make_server

    recording = Recording()

    class RecordingServer(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = _recording_app(DomainDispatcherApplication(create_backend_app), recording)
            self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    _isolate_from_user_config(monkeypatch, tmp_path)
    for key, value in FAKE_ENV.items():
        monkeypatch.setenv(key, value)
    server = RecordingServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    reset_moto(url)
    recording.other.clear()
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    try:
        yield url, recording
    finally:
        server.stop()


def _isolate_from_user_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("SAGEMAKER_TELEMETRY_OPT_OUT", "true")


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A minimal qcsight checkout: the real pyproject, the entry script, packages, and junk to leave behind."""
    root = tmp_path / "checkout"
    files = {
        "pyproject.toml": (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"),
        "README.md": "# qcsight\n",
        ENTRY_SCRIPT: "import sys\nfrom qcsight_train.cli import main\nsys.exit(main(sys.argv[1:]))\n",
        NODE_SCRIPT: "# starts torchrun on each node\n",
        "training/qcsight_train/__init__.py": '"""train"""\n',
        "edge_agent/qcsight_core/__init__.py": '"""core"""\n',
        "batch/qcsight_batch/__init__.py": '"""batch"""\n',
        # none of these may reach the job
        "training/qcsight_train/__pycache__/cli.cpython-311.pyc": "x",
        "training/qcsight.egg-info/PKG-INFO": "x",
        ".venv/lib/site.py": "x",
        ".git/HEAD": "ref: refs/heads/main\n",
        "runs/run1/model.onnx": "x",
        "tests/test_x.py": "x",
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, Any, str]:
    code = launcher.main(argv, prog="qcsight train")
    out, err = capsys.readouterr()
    parsed = json.loads(out) if code == 0 and out.strip().startswith("{") else out
    return code, parsed, err


def train_argv(source: Path, *extra: str) -> list[str]:
    return ["--sagemaker", "--role", ROLE, "--source-dir", str(source),
            "--data", "s3://qc-data/tiles/train/", "--validation", "s3://qc-data/tiles/val/",
            "--output-s3", "s3://qc-out/qcsight/models", *extra]


def s3_client() -> Any:
    import boto3

    return boto3.client("s3")


def make_buckets() -> None:
    client = s3_client()
    client.create_bucket(Bucket="qc-out")
    client.create_bucket(Bucket="qc-data")


def s3_read(uri: str) -> bytes:
    bucket, key = uri[len("s3://"):].split("/", 1)
    body: bytes = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def channel_uri(request: Mapping[str, Any], name: str) -> str:
    for channel in request["InputDataConfig"]:
        if channel["ChannelName"] == name:
            return str(channel["DataSource"]["S3DataSource"]["S3Uri"])
    raise AssertionError(f"no {name} channel in {[c['ChannelName'] for c in request['InputDataConfig']]}")


def metric_values(line: str) -> dict[str, float]:
    values = {}
    for definition in METRIC_DEFINITIONS:
        match = re.search(definition["Regex"], line)
        if match:
            values[definition["Name"]] = float(match.group(1))
    return values


# --------------------------------------------------------------------------- metric definitions


@pytest.mark.parametrize("line", [
    EPOCH_LINE,
    "2026-11-23 11:20:01,123 INFO qcsight_train.trainer: " + EPOCH_LINE,
    "[rank0]: " + EPOCH_LINE,
])
def test_metric_regexes_read_every_value_of_the_epoch_line(line: str) -> None:
    assert metric_values(line) == pytest.approx(EXPECTED_METRICS)
    for definition in METRIC_DEFINITIONS:
        assert re.compile(definition["Regex"]).groups == 1, "SageMaker reads the first group: keep only one"


@pytest.mark.parametrize("line", [
    "best val_loss=0.30 val_macro_f1=0.91",  # a summary, not an epoch line
    "epoch 3/10 train_loss=0.4",  # not the logged form
    "resuming from epoch=3/10",
])
def test_metric_regexes_ignore_other_lines(line: str) -> None:
    assert metric_values(line) == {}


def test_metric_regexes_read_scientific_notation() -> None:
    line = EPOCH_LINE.replace("train_loss=0.4123", "train_loss=4.1e-05")
    assert metric_values(line)["train:loss"] == pytest.approx(4.1e-05)


# --------------------------------------------------------------------------- training job


def test_training_job_request_as_sagemaker_received_it(moto: tuple[str, Recording], checkout: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from sagemaker.core.telemetry import telemetry_logging

    telemetry: list[Any] = []
    monkeypatch.setattr(telemetry_logging, "_send_telemetry_request", lambda *a, **k: telemetry.append(a))
    _, recording = moto
    make_buckets()
    code, result, err = run(train_argv(
        checkout, "--instance-type", "ml.g5.2xlarge", "--instance-count", "2", "--processes-per-node", "4",
        "--spot", "--max-run", "3600", "--max-wait", "7200", "--checkpoint-s3", "s3://qc-out/qcsight/ckpt",
        "--arch", "resnet18", "--epochs", "10", "--batch-size", "64", "--lr", "0.0003", "--img-size", "192",
        "--weights", "imagenet", "--freeze-epochs", "2", "--seed", "7", "--hp", "warmup_epochs=0.5", "--wait"), capsys)
    assert code == 0, err
    name = result["training_job_name"]
    assert name.startswith("qcsight-train-")
    assert result["status"] == "Completed"  # moto finishes jobs at once; --wait polled DescribeTrainingJob
    assert result["model_artifacts"] == f"s3://qc-out/qcsight/models/{name}/output/model.tar.gz"

    sent = recording.only("CreateTrainingJob")
    assert_valid("CreateTrainingJob", sent)
    assert sent["TrainingJobName"] == name
    assert sent["RoleArn"] == ROLE
    assert sent["ResourceConfig"] == {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 2, "VolumeSizeInGB": 30}
    assert sent["EnableManagedSpotTraining"] is True
    assert sent["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert sent["CheckpointConfig"] == {"S3Uri": "s3://qc-out/qcsight/ckpt", "LocalPath": "/opt/ml/checkpoints"}
    assert sent["HyperParameters"] == {"arch": "resnet18", "epochs": "10", "batch-size": "64", "lr": "0.0003",
                                       "img-size": "192", "weights": "imagenet", "freeze-epochs": "2", "seed": "7",
                                       "warmup_epochs": "0.5"}
    assert sent["OutputDataConfig"]["S3OutputPath"] == "s3://qc-out/qcsight/models"
    spec = sent["AlgorithmSpecification"]
    assert spec["MetricDefinitions"] == [dict(m) for m in METRIC_DEFINITIONS]
    assert spec["TrainingImage"] == "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.10.0-gpu-py313"
    # Every node unpacks the code channel and runs our node script, which starts torchrun with
    # 4 processes on this node (what it runs: tests/train/test_sagemaker_node.py).
    assert spec["ContainerEntrypoint"] == ["/bin/bash"]
    flag, command = spec["ContainerArguments"]
    assert flag == "-c"
    assert "tar -xzf /opt/ml/input/data/code/sourcedir.tar.gz" in command
    assert command.endswith(f"exec python3 {NODE_SCRIPT} --processes-per-node 4")
    assert [c["ChannelName"] for c in sent["InputDataConfig"]] == ["train", "validation", "code"]
    assert channel_uri(sent, "train") == "s3://qc-data/tiles/train/"
    assert channel_uri(sent, "validation") == "s3://qc-data/tiles/val/"

    code_uri = channel_uri(sent, "code")
    assert code_uri == result["source_s3"]
    with tarfile.open(fileobj=io.BytesIO(s3_read(code_uri)), mode="r:gz") as tar:
        members = sorted(tar.getnames())
        requirements = tar.extractfile("requirements.txt").read().decode().split()  # type: ignore[union-attr]
    assert members == sorted(["README.md", "batch/qcsight_batch/__init__.py", "edge_agent/qcsight_core/__init__.py",
                              "pyproject.toml", "requirements.txt", "training/qcsight_train/__init__.py",
                              ENTRY_SCRIPT, NODE_SCRIPT])
    assert not [r for r in requirements if re.match(r"torch(vision)?\b", r)]
    assert any(r.startswith("albumentations") for r in requirements)

    stored = boto3.client("sagemaker").describe_training_job(TrainingJobName=name)
    assert stored["ResourceConfig"]["InstanceCount"] == 2
    assert stored["ResourceConfig"]["InstanceType"] == "ml.g5.2xlarge"
    assert stored["EnableManagedSpotTraining"] is True
    assert stored["StoppingCondition"]["MaxWaitTimeInSeconds"] == 7200
    assert stored["CheckpointConfig"]["S3Uri"] == "s3://qc-out/qcsight/ckpt"
    assert stored["HyperParameters"] == sent["HyperParameters"]
    assert telemetry == [], "the image lookup sends no SDK telemetry"


def test_spot_without_checkpoint_prefix_gets_one_per_job(moto: tuple[str, Recording], checkout: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    _, recording = moto
    make_buckets()
    code, result, err = run(train_argv(checkout, "--spot", "--instance-type", "ml.m5.xlarge"), capsys)
    assert code == 0, err
    sent = recording.only("CreateTrainingJob")
    assert_valid("CreateTrainingJob", sent)
    name = result["training_job_name"]
    assert sent["CheckpointConfig"]["S3Uri"].startswith("s3://qc-out/qcsight/")
    assert sent["CheckpointConfig"]["S3Uri"].endswith(f"/{name}/checkpoints")
    assert sent["StoppingCondition"] == {"MaxRuntimeInSeconds": DEFAULT_MAX_RUN_S,
                                         "MaxWaitTimeInSeconds": 2 * DEFAULT_MAX_RUN_S}
    assert sent["AlgorithmSpecification"]["TrainingImage"].endswith("pytorch-training:2.10.0-cpu-py313")
    assert "HyperParameters" not in sent or sent["HyperParameters"] == {}


def test_dry_run_prints_the_request_sends_nothing_and_matches_what_is_sent(
        moto: tuple[str, Recording], checkout: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _, recording = moto
    argv = train_argv(checkout, "--instance-count", "3", "--spot", "--checkpoint-s3", "s3://qc-out/ckpt",
                      "--epochs", "5", "--lr", "0.001")
    with monkeypatch.context() as no_credentials:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            no_credentials.delenv(key)
        code, dry, err = run([*argv, "--dry-run"], capsys)
    assert code == 0, err
    assert recording.total == 0, f"a dry run sent requests: {recording.sagemaker} {recording.other}"
    assert dry["dry_run"] is True and dry["operation"] == "CreateTrainingJob"
    request = dry["request"]
    assert_valid("CreateTrainingJob", request)
    uploads = {u["what"]: u for u in dry["uploads"]}
    assert set(uploads) == {"source"}
    assert channel_uri(request, "code") == uploads["source"]["s3"]

    make_buckets()
    code, _, err = run(argv, capsys)
    assert code == 0, err
    sent = recording.only("CreateTrainingJob")
    for key in ("RoleArn", "ResourceConfig", "StoppingCondition", "CheckpointConfig", "HyperParameters",
                "EnableManagedSpotTraining", "OutputDataConfig", "AlgorithmSpecification"):
        assert request[key] == sent[key], key
    assert request.get("Environment") == sent.get("Environment")
    assert channel_uri(request, "code") == channel_uri(sent, "code")  # same code, same content-addressed key
    assert request["InputDataConfig"][:2] == sent["InputDataConfig"][:2]


# --------------------------------------------------------------------------- tuning job


def test_tuning_job_request(moto: tuple[str, Recording], checkout: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import boto3

    _, recording = moto
    make_buckets()
    code, result, err = run(train_argv(
        checkout, "--tune", "--max-jobs", "6", "--max-parallel-jobs", "2", "--lr-range", "1e-5", "1e-2",
        "--batch-sizes", "32,64", "--instance-type", "ml.g4dn.xlarge", "--spot", "--max-run", "1800",
        "--checkpoint-s3", "s3://qc-out/ckpt/tune", "--epochs", "8", "--arch", "resnet18", "--lr", "0.001"), capsys)
    assert code == 0, err
    sent = recording.only("CreateHyperParameterTuningJob")
    assert_valid("CreateHyperParameterTuningJob", sent)
    assert sent["HyperParameterTuningJobName"] == result["tuning_job_name"]
    config = sent["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Bayesian"
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Maximize", "MetricName": "validation:macro_f1"}
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 6, "MaxParallelTrainingJobs": 2}
    assert config["ParameterRanges"]["ContinuousParameterRanges"] == [
        {"Name": "lr", "MinValue": "1e-05", "MaxValue": "0.01", "ScalingType": "Logarithmic"}]
    assert config["ParameterRanges"]["CategoricalParameterRanges"] == [{"Name": "batch-size", "Values": ["32", "64"]}]

    definition = sent["TrainingJobDefinition"]
    static = definition["StaticHyperParameters"]
    assert static["epochs"] == "8" and static["arch"] == "resnet18"
    assert "lr" not in static, "a tuned hyperparameter must not also be static"
    assert static["sagemaker_program"] == "training/sagemaker_entry.py"
    assert static["sagemaker_torch_distributed_enabled"] == "true"
    assert s3_read(static["sagemaker_submit_directory"])[:2] == b"\x1f\x8b"  # the uploaded sourcedir.tar.gz
    assert definition["AlgorithmSpecification"]["MetricDefinitions"] == [dict(m) for m in METRIC_DEFINITIONS]
    assert definition["ResourceConfig"]["InstanceType"] == "ml.g4dn.xlarge"
    assert definition["EnableManagedSpotTraining"] is True
    assert definition["StoppingCondition"] == {"MaxRuntimeInSeconds": 1800, "MaxWaitTimeInSeconds": 3600}
    assert definition["CheckpointConfig"] == {"S3Uri": "s3://qc-out/ckpt/tune", "LocalPath": "/opt/ml/checkpoints"}
    assert channel_uri(definition, "train") == "s3://qc-data/tiles/train/"
    assert channel_uri(definition, "validation") == "s3://qc-data/tiles/val/"

    stored = boto3.client("sagemaker").describe_hyper_parameter_tuning_job(
        HyperParameterTuningJobName=result["tuning_job_name"])
    assert stored["HyperParameterTuningJobConfig"]["ResourceLimits"]["MaxNumberOfTrainingJobs"] == 6
    assert stored["TrainingJobDefinition"]["StaticHyperParameters"] == static


def test_tuning_dry_run_matches_what_is_sent(moto: tuple[str, Recording], checkout: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    _, recording = moto
    argv = train_argv(checkout, "--tune", "--objective", "validation:loss", "--strategy", "Random",
                      "--instance-type", "ml.m5.2xlarge", "--instance-count", "2")
    code, dry, err = run([*argv, "--dry-run"], capsys)
    assert code == 0, err
    assert recording.total == 0
    assert_valid("CreateHyperParameterTuningJob", dry["request"])
    make_buckets()
    code, _, err = run(argv, capsys)
    assert code == 0, err
    sent = recording.only("CreateHyperParameterTuningJob")
    assert sent["HyperParameterTuningJobConfig"]["HyperParameterTuningJobObjective"] == {
        "Type": "Minimize", "MetricName": "validation:loss"}
    assert dry["request"]["HyperParameterTuningJobConfig"] == sent["HyperParameterTuningJobConfig"]
    dry_def, sent_def = dry["request"]["TrainingJobDefinition"], sent["TrainingJobDefinition"]
    for key in ("StaticHyperParameters", "AlgorithmSpecification", "ResourceConfig", "StoppingCondition", "RoleArn"):
        assert dry_def[key] == sent_def[key], key
    assert "sagemaker_torch_distributed_enabled" not in sent_def["StaticHyperParameters"]  # CPU instances


# --------------------------------------------------------------------------- Neo compilation


@pytest.mark.parametrize(("target", "color", "version", "shape"), [
    ("jetson_xavier", "RGB", "1.8", [1, 3, 48, 48]),
    ("ml_c5", "GRAY", "2.0", [1, 1, 48, 48]),
])
def test_neo_compilation_job(moto: tuple[str, Recording], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                             caplog: pytest.LogCaptureFixture, target: str, color: str, version: str,
                             shape: list[int]) -> None:
    import boto3

    _, recording = moto
    bundle = make_tiny_bundle(tmp_path / "bundle", size=48, color=color)
    code, result, err = run(["--sagemaker", "--role", ROLE, "--neo-target", target, "--bundle", str(bundle.path),
                             "--model-s3", "s3://qc-out/ts/model.tar.gz", "--output-s3", "s3://qc-out/neo",
                             "--wait"], capsys)
    assert code == 0, err
    assert f"traced with torch <= {version}" in caplog.text
    sent = recording.only("CreateCompilationJob")
    assert_valid("CreateCompilationJob", sent)
    assert sent["InputConfig"]["Framework"] == "PYTORCH"
    assert sent["InputConfig"]["FrameworkVersion"] == version
    assert json.loads(sent["InputConfig"]["DataInputConfig"]) == {"input0": shape}
    assert sent["InputConfig"]["S3Uri"] == "s3://qc-out/ts/model.tar.gz"
    assert sent["OutputConfig"] == {"S3OutputLocation": "s3://qc-out/neo", "TargetDevice": target}
    assert result["status"] == "COMPLETED"
    stored = boto3.client("sagemaker").describe_compilation_job(CompilationJobName=result["compilation_job_name"])
    assert stored["InputConfig"]["FrameworkVersion"] == version
    assert stored["OutputConfig"]["TargetDevice"] == target


def _bundle_with_neo_onnx(directory: Path, ir: int = 7, opset: int = 12) -> Path:
    """A tiny bundle carrying a model.neo.onnx entry as qcsight_train.export writes it (IR 7, opset 12)."""
    import numpy as np
    import onnx

    from tests.helpers.models import tiny_onnx_model

    bundle = make_tiny_bundle(directory, size=48)
    path = tiny_onnx_model(directory / "model.neo.onnx", 3, 3, np.ones((3, 3)), np.zeros(3), opset=opset)
    proto = onnx.load(str(path))
    proto.ir_version = ir
    onnx.save(proto, str(path))
    entry = ModelFile("model.neo.onnx", format="onnx-neo", runtime="sagemaker-neo",
                      details={"ir_version": ir, "opset": opset, "input_name": "input"})
    write_bundle(directory, replace(bundle.manifest, models=(*bundle.manifest.models, entry)))
    return directory


def test_neo_compiles_the_bundles_onnx_and_carries_the_result_per_target(
        moto: tuple[str, Recording], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--bundle without --model-s3: model.neo.onnx packed, uploaded, compiled as ONNX; the output joins the bundle."""
    import boto3

    from qcsight_core.bundle import load_bundle

    _, recording = moto
    bundle = _bundle_with_neo_onnx(tmp_path / "bundle")
    make_buckets()
    s3 = s3_client()
    s3.put_object(Bucket="qc-out", Key="neo/model-ml_c5.tar.gz", Body=b"compiled for ml_c5")  # what Neo leaves
    code, result, err = run(["--sagemaker", "--role", ROLE, "--neo-target", "ml_c5", "--bundle", str(bundle),
                             "--output-s3", "s3://qc-out/neo", "--wait"], capsys)
    assert code == 0, err
    sent = recording.only("CreateCompilationJob")
    assert_valid("CreateCompilationJob", sent)
    assert sent["InputConfig"]["Framework"] == "ONNX" and "FrameworkVersion" not in sent["InputConfig"]
    assert json.loads(sent["InputConfig"]["DataInputConfig"]) == {"input": [1, 3, 48, 48]}
    model_s3 = sent["InputConfig"]["S3Uri"]
    assert model_s3 == f"s3://qc-out/neo/{result['compilation_job_name']}/model.tar.gz"
    uploaded = s3.get_object(Bucket="qc-out", Key=model_s3[len("s3://qc-out/"):])["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(uploaded)) as tar:
        assert tar.getnames() == ["model.onnx"]
        packed = tar.extractfile("model.onnx")
        assert packed is not None and packed.read() == (bundle / "model.neo.onnx").read_bytes()
    assert result["status"] == "COMPLETED" and result["attached"] == "s3://qc-out/neo/model-ml_c5.tar.gz"
    manifest = load_bundle(bundle).manifest  # hashes verified, the new file included
    compiled = [m for m in manifest.models if m.format == neo.COMPILED_FORMAT]
    assert [(m.file, m.details["target"]) for m in compiled] == [("neo/ml_c5/model-ml_c5.tar.gz", "ml_c5")]
    assert (bundle / "neo" / "ml_c5" / "model-ml_c5.tar.gz").read_bytes() == b"compiled for ml_c5"
    stored = boto3.client("sagemaker").describe_compilation_job(CompilationJobName=result["compilation_job_name"])
    assert stored["InputConfig"]["Framework"] == "ONNX"


def test_neo_onnx_refusals_name_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = ["--role", ROLE, "--region", "us-east-1", "--dry-run", "--output-s3", "s3://qc-out/neo"]
    newer = _bundle_with_neo_onnx(tmp_path / "newer", ir=8, opset=13)
    code, _, err = run([*where, "--neo-target", "ml_c5", "--bundle", str(newer)], capsys)
    assert code == 2 and "IR 8, opset 13" in err and "opset <= 12" in err
    plain = make_tiny_bundle(tmp_path / "plain", size=48)
    code, _, err = run([*where, "--neo-target", "ml_c5", "--bundle", str(plain.path)], capsys)
    assert code == 2 and "model.neo.onnx" in err
    ok = _bundle_with_neo_onnx(tmp_path / "ok")
    code, _, err = run([*where, "--neo-target", "ml_inf2", "--bundle", str(ok)], capsys)
    assert code == 2 and "Neuron" in err
    code, dry, err = run([*where, "--neo-platform", "LINUX:ARM64:NVIDIA", "--bundle", str(ok)], capsys)
    assert code == 0, err
    assert_valid("CreateCompilationJob", dry["request"])
    assert dry["uploads"][0]["file"] == "model.neo.onnx"


def test_neo_target_platform_and_dry_run(moto: tuple[str, Recording], capsys: pytest.CaptureFixture[str]) -> None:
    _, recording = moto
    code, dry, err = run(["--role", ROLE, "--neo-platform", "linux:arm64:nvidia", "--img-size", "160",
                          "--model-s3", "s3://qc-out/ts/model.tar.gz", "--output-s3", "s3://qc-out/neo",
                          "--neo-framework-version", "1.7", "--dry-run"], capsys)
    assert code == 0, err
    assert recording.total == 0
    request = dry["request"]
    assert_valid("CreateCompilationJob", request)
    assert request["OutputConfig"]["TargetPlatform"] == {"Os": "LINUX", "Arch": "ARM64", "Accelerator": "NVIDIA"}
    assert json.loads(request["InputConfig"]["DataInputConfig"]) == {"input0": [1, 3, 160, 160]}
    assert request["InputConfig"]["FrameworkVersion"] == "1.7"


NEO_BASE = ["--role", ROLE, "--img-size", "64", "--output-s3", "s3://qc-out/neo"]
MODEL = ["--model-s3", "s3://qc-out/ts/model.tar.gz"]


@pytest.mark.parametrize(("args", "flag", "says"), [
    ([*MODEL, "--neo-target", "jetson_xavier", "--neo-framework-version", "2.0"], "--neo-framework-version",
     "1.7, 1.8"),
    ([*MODEL, "--neo-target", "ml_c5", "--neo-framework-version", "2.14"], "--neo-framework-version", "1.13, 2.0"),
    ([*MODEL, "--neo-target", "ml_inf2"], "--neo-target", "Neuron"),
    ([*MODEL, "--neo-target", "toaster"], "--neo-target", "jetson_xavier"),
    ([*MODEL, "--neo-platform", "LINUX"], "--neo-platform", "OS:ARCH"),
    (["--neo-target", "rasp4b", "--model-s3", "s3://qc-out/ts/model.pth"], "--model-s3", ".tar.gz"),
    (["--neo-target", "rasp4b"], "--model-s3", "required"),
    ([*MODEL, "--neo-target", "rasp4b", "--tune"], "--tune", "not with --neo-target"),
])
def test_neo_refuses_outside_its_policy(args: list[str], flag: str, says: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate_from_user_config(monkeypatch, tmp_path)
    code, _, err = run([*NEO_BASE, *args, "--dry-run"], capsys)
    assert code == 2
    assert flag in err and says in err
    assert "Traceback" not in err


def test_neo_refuses_torchscript_traced_by_a_newer_torch(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate_from_user_config(monkeypatch, tmp_path)
    bundle = make_tiny_bundle(tmp_path / "bundle", size=32)
    (bundle.path / "model.pth").write_bytes(b"torchscript")
    traced = ModelFile("model.pth", format="torchscript", runtime="neo", details={"torch_version": "2.14.1"})
    write_bundle(bundle.path, replace(bundle.manifest, models=(*bundle.manifest.models, traced)))
    code, _, err = run(["--role", ROLE, "--neo-target", "ml_c5", "--bundle", str(bundle.path), "--dry-run",
                        "--model-s3", "s3://qc-out/ts/model.tar.gz", "--output-s3", "s3://qc-out/neo"], capsys)
    assert code == 2
    assert "--bundle" in err and "2.14.1" in err and "PyTorch 2.0" in err


def test_neo_version_policy() -> None:
    assert neo.resolve_framework_version(neo.parse_device("ml_g4dn"), None) == "2.0"
    assert neo.resolve_framework_version(neo.parse_device("rasp4b"), None) == "1.8"
    assert neo.resolve_framework_version(neo.parse_device("ml_m5"), "1.13.1") == "1.13"
    assert neo.resolve_framework_version(neo.parse_platform("ANDROID:ARM64"), "1.7") == "1.7"
    assert neo.compilation_job_name("qcsight-neo", neo.parse_device("jetson_xavier"), "20261123-101500") == (
        "qcsight-neo-jetson-xavier-20261123-101500")


# --------------------------------------------------------------------------- usage and failures


@pytest.mark.parametrize(("change", "flag"), [
    ({"--role": None}, "--role"),
    ({"--role": "SageMakerRole"}, "--role"),
    ({"--instance-count": "0"}, "--instance-count"),
    ({"--instance-count": "two"}, "--instance-count"),
    ({"--instance-type": "ml.bogus.xlarge"}, "--instance-type"),
    ({"--instance-type": "g5.xlarge"}, "--instance-type"),
    ({"--max-wait": "600"}, "--max-wait"),  # without --spot
    ({"--data": "/local/tiles"}, "--data"),
    ({"--data": None}, "--data"),
    ({"--output-s3": None}, "--output-s3"),
    ({"--checkpoint-s3": "checkpoints/"}, "--checkpoint-s3"),
    ({"--job-name": "qcsight_train"}, "--job-name"),
    ({"--hp": "warmup_epochs"}, "--hp"),
    ({"--hp": "sagemaker_program=evil.py"}, "--hp"),
    ({"--epochs": "5", "--hp": "epochs=6"}, "--hp"),
])
def test_usage_errors_name_the_flag(change: dict[str, str | None], flag: str, checkout: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate_from_user_config(monkeypatch, tmp_path)
    options = {"--role": ROLE, "--data": "s3://qc-data/train/", "--output-s3": "s3://qc-out/models",
               "--source-dir": str(checkout), **change}
    argv = [item for key, value in options.items() if value is not None for item in (key, value)]
    code, _, err = run([*argv, "--dry-run"], capsys)
    assert code == 2, err
    assert flag in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("extra", "flag"), [
    (["--spot", "--max-run", "3600", "--max-wait", "1800"], "--max-wait"),
    (["--tune", "--max-jobs", "2", "--max-parallel-jobs", "4"], "--max-parallel-jobs"),
    (["--tune", "--lr-range", "0.1", "0.01"], "--lr-range"),
    (["--tune", "--batch-sizes", "32,big"], "--batch-sizes"),
    (["--tune", "--spot"], "--checkpoint-s3"),
])
def test_inconsistent_options_name_the_flag(extra: list[str], flag: str, checkout: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate_from_user_config(monkeypatch, tmp_path)
    code, _, err = run([*train_argv(checkout), *extra, "--dry-run"], capsys)
    assert code == 2
    assert flag in err


def test_source_dir_without_entry_script_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate_from_user_config(monkeypatch, tmp_path)
    (tmp_path / "pyproject.toml").write_text("[project]\nname='x'\n")
    code, _, err = run([*train_argv(tmp_path), "--dry-run"], capsys)
    assert code == 2
    assert "--source-dir" in err and "training/sagemaker_entry.py" in err


def test_missing_credentials_is_a_clear_error(checkout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate_from_user_config(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing may be sent anyway
    code, _, err = run(train_argv(checkout), capsys)
    assert code == 1
    assert "no AWS credentials" in err and "--dry-run" in err
    assert "Traceback" not in err
    code, _, err = run(["--role", ROLE, "--neo-target", "rasp4b", "--img-size", "64",
                        "--model-s3", "s3://qc-out/m.tar.gz", "--output-s3", "s3://qc-out/neo"], capsys)
    assert code == 1 and "no AWS credentials" in err


def test_missing_region_names_the_flag(checkout: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate_from_user_config(monkeypatch, tmp_path)
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.delenv("AWS_REGION", raising=False)
    code, _, err = run([*train_argv(checkout), "--dry-run"], capsys)
    assert code == 2 and "--region" in err


def test_an_aws_rejection_is_reported_not_raised(moto: tuple[str, Recording], checkout: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(train_argv(checkout), capsys)  # the output bucket does not exist in moto
    assert code == 1
    assert "s3://qc-out/qcsight/models" in err and "NoSuchBucket" in err
    assert "Traceback" not in err


def test_help_answers_the_question(capsys: pytest.CaptureFixture[str]) -> None:
    assert launcher.main(["--help"], prog="qcsight train") == 0
    out = capsys.readouterr().out
    for text in ("--neo-target", "--tune", "--spot", "--dry-run", "2.10.0", "1.7, 1.8", "--checkpoint-s3"):
        assert text in out


def test_dispatch_through_the_qcsight_command_ships_this_checkout(moto: tuple[str, Recording],
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from qcsight_core.cli import main as qcsight

    _, recording = moto
    code = qcsight(["train", "--sagemaker", "--role", ROLE, "--data", "s3://qc-data/train/",
                    "--output-s3", "s3://qc-out/models", "--epochs", "3", "--dry-run"])
    assert code == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["operation"] == "CreateTrainingJob"
    assert dry["request"]["HyperParameters"] == {"epochs": "3"}
    assert recording.total == 0
    source = next(u for u in dry["uploads"] if u["what"] == "source")
    assert int(source["files"]) > 10  # the real qcsight_core and qcsight_train, not a stub tree


# --------------------------------------------------------------------------- pieces


def test_source_package_is_reproducible_and_leaves_the_rest_home(checkout: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = package_source(checkout, tmp_path / "a")
    second = package_source(checkout, tmp_path / "b")
    assert first.sha256 == second.sha256
    assert first.tarball.read_bytes() == second.tarball.read_bytes()
    assert "training/sagemaker_entry.py" in first.files
    assert not [f for f in first.files if f.startswith((".venv", ".git", "runs", "tests")) or "__pycache__" in f
                or ".egg-info" in f]


def test_this_checkout_packs_the_code_the_job_needs(tmp_path: Path) -> None:
    assert default_source_dir() == REPO_ROOT
    package = package_source(REPO_ROOT, tmp_path)
    for needed in (ENTRY_SCRIPT, NODE_SCRIPT, "training/qcsight_train/cli.py", "edge_agent/qcsight_core/bundle.py",
                   "edge_agent/qcsight_core/preprocess.py", "infra/qcsight_aws/s3.py", "pyproject.toml"):
        assert needed in package.files
    assert not [f for f in package.files if f.startswith(("tests/", ".venv/", ".git/")) or f.endswith(".pyc")]
    names = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0] for r in package.requirements}
    assert {"onnxruntime", "onnx", "albumentations", "opencv-python-headless", "numpy"} <= names
    assert not names & {"torch", "torchvision", "sagemaker", "boto3", "pytest"}
