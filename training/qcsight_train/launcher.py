"""`qcsight train --sagemaker`: submit SageMaker training, tuning and Neo compilation jobs.

The training job is built with the SageMaker Python SDK v3 (`ModelTrainer` with a `Torchrun`
distribution, `Compute`, `CheckpointConfig`, `StoppingCondition`, metric definitions), the
tuning job with its `HyperparameterTuner`, and the Neo request by `qcsight_train.neo` and sent
with boto3. The SDK and boto3 are imported inside the functions that use them: this module is
the only place in qcsight_train that touches `sagemaker`, and the code that runs inside the
training container never imports it.

What the job runs: the container unpacks our source tarball (qcsight_core, qcsight_train and
`training/sagemaker_entry.py`), pip-installs the project's dependencies except torch and
torchvision (the PyTorch image provides them), and starts the entry script under torchrun on
every node. The hyperparameters arrive as `--key value` flags (and in $SM_HPS); the data
channels at $SM_CHANNEL_TRAIN / $SM_CHANNEL_VALIDATION, the model directory at $SM_MODEL_DIR;
checkpoints written to /opt/ml/checkpoints are synced with --checkpoint-s3.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import importlib
import io
import json
import logging
import os
import re
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qcsight_core.bundle import Manifest, load_bundle
from qcsight_core.cli import configure_logging, parse_args
from qcsight_core.errors import ConfigError, QcsightError
from qcsight_train import neo

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_PROG = "qcsight train --sagemaker"

ENTRY_SCRIPT = "training/sagemaker_entry.py"
# The newest SageMaker PyTorch training image the SDK (3.27) knows. Our local training uses
# torch 2.14; nothing in qcsight_train may need a torch newer than this image's.
PYTORCH_IMAGE_VERSION = "2.10.0"
PYTORCH_IMAGE_PY = "py313"
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
DEFAULT_INSTANCE_TYPE = "ml.g5.xlarge"
DEFAULT_MAX_RUN_S = 24 * 3600
DEFAULT_COMPILE_MAX_RUN_S = 900

# What the container needs from a checkout; everything else (venv, .git, data, runs) stays home.
SOURCE_TOP_LEVEL = ("pyproject.toml", "README.md", "LICENSE", "edge_agent", "batch", "training")
_SOURCE_SKIP_DIRS = {"__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".ipynb_checkpoints"}
_SOURCE_SKIP_SUFFIXES = (".pyc", ".pyo")
# Installed by the PyTorch image with matching CUDA builds; reinstalling them from PyPI would not.
PROVIDED_BY_IMAGE = ("torch", "torchvision")

# Metric definitions for the one line per epoch that qcsight_train logs, e.g.
#   epoch=3/10 train_loss=0.4123 val_loss=0.3812 val_acc=0.9012 val_macro_f1=0.8870 lr=0.000310 images_per_s=85.2
# Anchored on "epoch=N/M" so a summary line that repeats a key is not read as an epoch. Only the
# value is a group, and no look-arounds: SageMaker reads the first capture group of each regex.
_NUMBER = r"([-+]?[0-9.]+[eE]?[-+]?[0-9]*)"
METRIC_DEFINITIONS: tuple[Mapping[str, str], ...] = (
    {"Name": "train:loss", "Regex": r"epoch=[0-9]+/[0-9]+ train_loss=" + _NUMBER},
    {"Name": "validation:loss", "Regex": r"epoch=[0-9]+/[0-9]+ .* val_loss=" + _NUMBER},
    {"Name": "validation:accuracy", "Regex": r"epoch=[0-9]+/[0-9]+ .* val_acc=" + _NUMBER},
    {"Name": "validation:macro_f1", "Regex": r"epoch=[0-9]+/[0-9]+ .* val_macro_f1=" + _NUMBER},
    {"Name": "throughput", "Regex": r"epoch=[0-9]+/[0-9]+ .* images_per_s=" + _NUMBER},
)
METRIC_NAMES = tuple(m["Name"] for m in METRIC_DEFINITIONS)
TUNING_STRATEGIES = ("Bayesian", "Random", "Hyperband")  # Grid cannot search a continuous lr range

_ROLE_ARN = re.compile(r"arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+")
_S3_URI = re.compile(r"s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(/.*)?")
_BASE_JOB_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,37}")

# Statuses of the Describe* calls each kind of job is polled with: key, done, failed.
_JobStatus = tuple[str, tuple[str, ...], tuple[str, ...]]
_TRAINING_STATUS: _JobStatus = ("TrainingJobStatus", ("Completed",), ("Failed", "Stopped"))
_TUNING_STATUS: _JobStatus = ("HyperParameterTuningJobStatus", ("Completed",), ("Failed", "Stopped", "DeleteFailed"))
_COMPILATION_STATUS: _JobStatus = ("CompilationJobStatus", ("COMPLETED",), ("FAILED", "STOPPED"))


class LaunchError(QcsightError):
    """A SageMaker or S3 call failed, or credentials are missing; the message names the call."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def join(self, *parts: str) -> str:
        return "/".join([self.uri, *(p.strip("/") for p in parts)])


@dataclass(frozen=True)
class AwsSpec:
    """Where and as whom jobs are created, and whether the launcher sends and waits."""

    region: str
    role_arn: str
    dry_run: bool = False
    wait: bool = False
    wait_timeout_s: int = 0
    poll_s: float = 30.0


@dataclass(frozen=True)
class ComputeSpec:
    instance_type: str = DEFAULT_INSTANCE_TYPE
    instance_count: int = 1
    processes_per_node: int | None = None
    volume_gb: int = 30
    spot: bool = False
    max_run_s: int = DEFAULT_MAX_RUN_S
    max_wait_s: int | None = None


@dataclass(frozen=True)
class TrainingJobSpec:
    """One training job; the tuning job reuses it as its training definition."""

    base_job_name: str
    source_dir: Path
    output: S3Location
    train_s3: str
    validation_s3: str | None
    checkpoint_s3: str | None
    image_uri: str | None
    hyperparameters: Mapping[str, str]
    compute: ComputeSpec = field(default_factory=ComputeSpec)


@dataclass(frozen=True)
class TuningSpec:
    max_jobs: int
    max_parallel_jobs: int
    lr_range: tuple[float, float]
    batch_sizes: tuple[int, ...]
    objective: str
    strategy: str

    @property
    def objective_type(self) -> str:
        return "Minimize" if self.objective.endswith("loss") else "Maximize"


@dataclass(frozen=True)
class TrainingPlan:
    aws: AwsSpec
    job: TrainingJobSpec
    tuning: TuningSpec | None = None


@dataclass(frozen=True)
class CompilationPlan:
    aws: AwsSpec
    spec: neo.CompilationSpec
    onnx: neo.OnnxSource | None = None  # the bundle's model.neo.onnx, packed and uploaded to spec.model_s3


# --------------------------------------------------------------------------- command line

EXAMPLES = f"""\
examples:
  # one training job, 2 x ml.g5.2xlarge, managed spot with checkpoints, wait for it
  %(prog)s --role arn:aws:iam::123456789012:role/SageMakerQcsight \\
      --data s3://my-bucket/tiles/train/ --validation s3://my-bucket/tiles/val/ \\
      --output-s3 s3://my-bucket/qcsight/models --checkpoint-s3 s3://my-bucket/qcsight/ckpt \\
      --instance-type ml.g5.2xlarge --instance-count 2 --spot --max-run 7200 --max-wait 14400 \\
      --arch resnet18 --epochs 20 --batch-size 64 --lr 0.001 --wait

  # 8-job Bayesian search over the learning rate and batch size, objective validation:macro_f1
  %(prog)s --role ... --data ... --output-s3 ... --tune --max-jobs 8 --max-parallel-jobs 2 \\
      --lr-range 1e-5 1e-2 --batch-sizes 32,64

  # compile an existing TorchScript model.tar.gz with Neo for a Jetson Xavier
  %(prog)s --role ... --neo-target jetson_xavier --model-s3 s3://my-bucket/ts/model.tar.gz \\
      --output-s3 s3://my-bucket/qcsight/neo --bundle runs/latest/bundle

  # print the request that would be sent; needs no credentials and sends nothing
  %(prog)s --role ... --data ... --output-s3 ... --dry-run

The default image is the SageMaker PyTorch training image {PYTORCH_IMAGE_VERSION} ({PYTORCH_IMAGE_PY}),
GPU or CPU build by instance type. Neo accepts PyTorch {', '.join(neo.CLOUD_PYTORCH_VERSIONS)} for cloud
targets and {', '.join(neo.EDGE_PYTORCH_VERSIONS)} for edge devices; the TorchScript file must be traced
with an accepted version (qcsight trains with torch 2.14, which Neo does not accept).
Exit codes: 0 done (or dry run printed), 1 an AWS call failed or no credentials, 2 usage error.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def build_parser(prog: str = DEFAULT_PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Submit a SageMaker training job (torchrun on every node), a hyperparameter tuning job, "
                    "or a SageMaker Neo compilation job for qcsight.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sagemaker", action="store_true", help="run on SageMaker (what this command does)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")

    aws = parser.add_argument_group("AWS")
    aws.add_argument("--role", metavar="ARN", help="IAM role SageMaker assumes (required)")
    aws.add_argument("--region", help="AWS region (default: AWS_DEFAULT_REGION / the profile's region)")
    aws.add_argument("--dry-run", action="store_true",
                     help="print the request JSON that would be sent and exit 0; uploads and sends nothing")
    aws.add_argument("--wait", action=argparse.BooleanOptionalAction, default=False,
                     help="poll until the job finishes (default: return once it is created)")
    aws.add_argument("--wait-timeout", type=_positive_int, metavar="SECONDS",
                     help="give up waiting after this long (default: the job's own time limits plus 30 min)")

    job = parser.add_argument_group("training job")
    job.add_argument("--data", metavar="S3_URI", help="training data prefix, the 'train' channel (s3://...)")
    job.add_argument("--validation", metavar="S3_URI", help="validation data prefix, the 'validation' channel")
    job.add_argument("--output-s3", metavar="S3_URI",
                     help="where model.tar.gz (or the Neo output) goes; source and drivers are staged here too")
    job.add_argument("--checkpoint-s3", metavar="S3_URI",
                     help=f"checkpoint prefix synced with {CHECKPOINT_LOCAL_PATH} (default with --spot: under "
                          "--output-s3, per job)")
    job.add_argument("--instance-type", default=DEFAULT_INSTANCE_TYPE,
                     help="training instance type (default: %(default)s)")
    job.add_argument("--instance-count", type=_positive_int, default=1, help="number of instances (default: 1)")
    job.add_argument("--processes-per-node", type=_positive_int,
                     help="torchrun processes per instance (default: one per GPU)")
    job.add_argument("--volume-size", type=_positive_int, default=30, metavar="GB", help="EBS volume per instance")
    job.add_argument("--spot", action="store_true", help="managed spot training (needs --max-wait >= --max-run)")
    job.add_argument("--max-run", type=_positive_int, metavar="SECONDS",
                     help=f"job time limit (default: {DEFAULT_MAX_RUN_S} for training, "
                          f"{DEFAULT_COMPILE_MAX_RUN_S} for Neo)")
    job.add_argument("--max-wait", type=_positive_int, metavar="SECONDS",
                     help="spot only: limit including time waiting for capacity (default: 2 x --max-run)")
    job.add_argument("--image-uri", help=f"training image (default: SageMaker PyTorch {PYTORCH_IMAGE_VERSION} "
                                         f"{PYTORCH_IMAGE_PY}, GPU or CPU by instance type)")
    job.add_argument("--source-dir", type=Path,
                     help=f"qcsight checkout to ship (default: this checkout); must hold {ENTRY_SCRIPT}")
    job.add_argument("--job-name", default=None, help="base job name (default: qcsight-train / qcsight-tune / "
                                                      "qcsight-neo)")

    hp = parser.add_argument_group("hyperparameters (passed to `qcsight train` inside the job; see its --help)")
    hp.add_argument("--arch", help="backbone, e.g. efficientnet_lite0, resnet18")
    hp.add_argument("--epochs", type=_positive_int, help="total epochs")
    hp.add_argument("--batch-size", type=_positive_int, help="images per process per step")
    hp.add_argument("--lr", type=_positive_float, help="peak learning rate")
    hp.add_argument("--img-size", type=_positive_int, help="model input size (also Neo's input shape)")
    hp.add_argument("--weights", help="auto, imagenet, none, package, or a state-dict path")
    hp.add_argument("--freeze-epochs", type=int, help="leading head-only epochs")
    hp.add_argument("--seed", type=int, help="random seed")
    hp.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                    help="any other `qcsight train` setting, e.g. --hp warmup_epochs=2 (repeatable)")

    tune = parser.add_argument_group("hyperparameter tuning")
    tune.add_argument("--tune", action="store_true", help="start a tuning job instead of one training job")
    tune.add_argument("--max-jobs", type=_positive_int, default=8, help="training jobs in all (default: 8)")
    tune.add_argument("--max-parallel-jobs", type=_positive_int, default=2, help="at once (default: 2)")
    tune.add_argument("--lr-range", type=_positive_float, nargs=2, metavar=("MIN", "MAX"), default=(1e-5, 1e-2),
                      help="learning rate searched on a log scale (default: 1e-5 1e-2)")
    tune.add_argument("--batch-sizes", metavar="N,N,...", help="also search these batch sizes, e.g. 32,64")
    tune.add_argument("--objective", choices=METRIC_NAMES, default="validation:macro_f1",
                      help="metric to optimise (default: %(default)s; *loss is minimised, others maximised)")
    tune.add_argument("--strategy", choices=TUNING_STRATEGIES, default="Bayesian")

    comp = parser.add_argument_group("SageMaker Neo compilation")
    comp.add_argument("--neo-target", metavar="DEVICE",
                      help=f"compile for a device: {', '.join(neo.CLOUD_TARGETS)}, or an edge device such as "
                           "jetson_xavier, rasp4b, x86_win64")
    comp.add_argument("--neo-platform", metavar="OS:ARCH[:ACCEL]",
                      help="compile for a platform instead, e.g. LINUX:ARM64:NVIDIA")
    comp.add_argument("--model-s3", metavar="S3_URI",
                      help="model.tar.gz holding a TorchScript model.pth (PyTorch path); without it, --bundle's "
                           "model.neo.onnx is compiled (ONNX 1.7: IR 7, opset 12), uploaded under --output-s3")
    comp.add_argument("--bundle", type=Path,
                      help="the qcsight bundle (dir or .tar.gz): its ONNX for Neo, input size, traced torch; with "
                           "--wait, the compiled model is added to a bundle directory (neo/<target>/)")
    comp.add_argument("--neo-framework-version", metavar="X.Y",
                      help="PyTorch version Neo loads the model with (default: the highest Neo accepts)")
    return parser


def _s3(flag: str, value: str | None, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise ConfigError(flag, None, "required: an s3://bucket/prefix URI")
        return None
    if not _S3_URI.fullmatch(value):
        raise ConfigError(flag, value, "an s3://bucket/prefix URI (bucket: 3-63 lowercase letters, digits, . or -)")
    return value


def _s3_location(flag: str, value: str | None) -> S3Location:
    uri = _s3(flag, value)
    assert uri is not None  # _s3 raised for a missing required value
    match = _S3_URI.fullmatch(uri)
    assert match is not None
    return S3Location(match.group(1), (match.group(2) or "").strip("/"))


def _role(value: str | None) -> str:
    if not value:
        raise ConfigError("--role", None, "required: the IAM role ARN SageMaker assumes, "
                                          "e.g. arn:aws:iam::123456789012:role/SageMakerQcsight")
    if not _ROLE_ARN.fullmatch(value):
        raise ConfigError("--role", value, "an IAM role ARN like arn:aws:iam::123456789012:role/NAME")
    return value


def _region(value: str | None) -> str:
    if value:
        return value
    import boto3

    region = boto3.Session().region_name
    if not region:
        raise ConfigError("--region", None, "an AWS region: pass --region or set AWS_DEFAULT_REGION")
    return str(region)


def training_instance_types() -> tuple[str, ...]:
    """Instance types CreateTrainingJob accepts, from botocore's SageMaker service model."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("sagemaker")
    shape = model.operation_model("CreateTrainingJob").input_shape.members["ResourceConfig"]
    return tuple(shape.members["InstanceType"].enum)


def _instance_type(value: str) -> str:
    allowed = training_instance_types()
    if value not in allowed:
        family = value.rsplit(".", 1)[0]
        near = [t for t in allowed if t.startswith(family + ".")] or [t for t in allowed if t.startswith("ml.g5.")]
        raise ConfigError("--instance-type", value, f"a SageMaker training instance type, e.g. {', '.join(near[:6])}")
    return value


_HP_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,63}")


def _hyperparameters(args: argparse.Namespace) -> dict[str, str]:
    """Training settings given on the command line, keyed as `qcsight train` spells its flags."""
    names = ("arch", "epochs", "batch_size", "lr", "img_size", "weights", "freeze_epochs", "seed")
    values = {name.replace("_", "-"): str(getattr(args, name)) for name in names if getattr(args, name) is not None}
    for item in args.hp:
        key, sep, value = item.partition("=")
        if not sep or not _HP_KEY.fullmatch(key) or key.startswith("sagemaker"):
            raise ConfigError("--hp", item, "KEY=VALUE with a `qcsight train` setting name, e.g. warmup_epochs=2")
        if {key, key.replace("_", "-"), key.replace("-", "_")} & values.keys():
            raise ConfigError("--hp", item, f"a setting not given twice ({key} is already set)")
        values[key] = value
    return values


def _compute(args: argparse.Namespace) -> ComputeSpec:
    max_run = args.max_run or DEFAULT_MAX_RUN_S
    if args.max_wait is not None and not args.spot:
        raise ConfigError("--max-wait", args.max_wait, "only with --spot (it bounds the wait for spot capacity)")
    max_wait = None
    if args.spot:
        max_wait = args.max_wait or 2 * max_run
        if max_wait < max_run:
            raise ConfigError("--max-wait", max_wait, f"at least --max-run ({max_run} s): it includes the run time")
    return ComputeSpec(
        instance_type=_instance_type(args.instance_type),
        instance_count=args.instance_count,
        processes_per_node=args.processes_per_node,
        volume_gb=args.volume_size,
        spot=args.spot,
        max_run_s=max_run,
        max_wait_s=max_wait,
    )


def default_source_dir() -> Path:
    """The checkout this module runs from when it is one, else the working directory."""
    checkout = Path(__file__).resolve().parents[2]
    return checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()


def _source_dir(value: Path | None) -> Path:
    source = (value or default_source_dir()).resolve()
    if not (source / ENTRY_SCRIPT).is_file() or not (source / "pyproject.toml").is_file():
        raise ConfigError("--source-dir", str(source),
                          f"a qcsight checkout holding pyproject.toml and {ENTRY_SCRIPT} (the job's entry script)")
    return source


def _base_name(value: str | None, default: str) -> str:
    name = value or default
    if not _BASE_JOB_NAME.fullmatch(name):
        raise ConfigError("--job-name", name, "1-38 letters, digits and hyphens, starting alphanumeric "
                                              "(SageMaker appends a timestamp)")
    return name


def _tuning(args: argparse.Namespace) -> TuningSpec:
    if args.max_parallel_jobs > args.max_jobs:
        raise ConfigError("--max-parallel-jobs", args.max_parallel_jobs, f"at most --max-jobs ({args.max_jobs})")
    low, high = args.lr_range
    if not low < high:
        raise ConfigError("--lr-range", f"{low} {high}", "MIN MAX with 0 < MIN < MAX")
    sizes: tuple[int, ...] = ()
    if args.batch_sizes:
        try:
            sizes = tuple(int(s) for s in args.batch_sizes.split(",") if s.strip())
        except ValueError:
            raise ConfigError("--batch-sizes", args.batch_sizes, "comma-separated whole numbers, e.g. 32,64") from None
        if not sizes or min(sizes) < 1:
            raise ConfigError("--batch-sizes", args.batch_sizes, "comma-separated whole numbers >= 1, e.g. 32,64")
    return TuningSpec(args.max_jobs, args.max_parallel_jobs, (low, high), sizes, args.objective, args.strategy)


def _aws(args: argparse.Namespace, role_arn: str, default_timeout_s: int) -> AwsSpec:
    return AwsSpec(
        region=_region(args.region),
        role_arn=role_arn,
        dry_run=args.dry_run,
        wait=args.wait,
        wait_timeout_s=args.wait_timeout or default_timeout_s,
    )


def plan_from_args(args: argparse.Namespace) -> TrainingPlan | CompilationPlan:
    """Validate the parsed flags into one plan; ConfigError names the flag at fault."""
    if args.neo_target or args.neo_platform:
        return _compilation_plan(args)
    for flag in ("model_s3", "bundle", "neo_framework_version"):
        if getattr(args, flag) is not None:
            raise ConfigError("--" + flag.replace("_", "-"), getattr(args, flag),
                              "only with --neo-target/--neo-platform")
    role = _role(args.role)  # checked first: the flag users most often forget
    job = TrainingJobSpec(
        base_job_name=_base_name(args.job_name, "qcsight-tune" if args.tune else "qcsight-train"),
        source_dir=_source_dir(args.source_dir),
        output=_s3_location("--output-s3", args.output_s3),
        train_s3=str(_s3("--data", args.data)),
        validation_s3=_s3("--validation", args.validation, required=False),
        checkpoint_s3=_s3("--checkpoint-s3", args.checkpoint_s3, required=False),
        image_uri=args.image_uri,
        hyperparameters=_hyperparameters(args),
        compute=_compute(args),
    )
    tuning = _tuning(args) if args.tune else None
    if tuning is not None and job.compute.spot and job.checkpoint_s3 is None:
        # A training job picks a checkpoint prefix per job by itself; a tuning job's definition
        # is shared by all its jobs and must name one.
        raise ConfigError("--checkpoint-s3", None, "required with --tune --spot: the prefix the tuning job's "
                                                   "training jobs checkpoint to")
    limit = job.compute.max_wait_s or job.compute.max_run_s
    if tuning is not None:
        limit *= -(-tuning.max_jobs // tuning.max_parallel_jobs)  # rounds of parallel jobs
    return TrainingPlan(aws=_aws(args, role, limit + 1800), job=job, tuning=tuning)


def _bundle_manifest(path: Path) -> Manifest:
    with tempfile.TemporaryDirectory(prefix="qcsight-neo-bundle-") as tmp:
        return load_bundle(path, extract_to=tmp if path.is_file() else None).manifest


def _compilation_plan(args: argparse.Namespace) -> CompilationPlan:
    if args.neo_target and args.neo_platform:
        raise ConfigError("--neo-platform", args.neo_platform, "either --neo-target or --neo-platform, not both")
    if args.tune:
        raise ConfigError("--tune", True, "not with --neo-target: compile a model after its tuning job picked it")
    target = neo.parse_device(args.neo_target) if args.neo_target else neo.parse_platform(args.neo_platform)
    role = _role(args.role)
    if args.model_s3 is None and args.bundle is not None:
        return _onnx_compilation_plan(args, target, role)
    if args.model_s3 is None:
        raise ConfigError("--model-s3", None, "required with --neo-target: the s3://.../model.tar.gz to compile")
    framework_version = neo.resolve_framework_version(target, args.neo_framework_version)
    manifest = None
    if args.bundle is not None:
        if not args.bundle.exists():
            raise ConfigError("--bundle", str(args.bundle), "an existing bundle directory or .tar.gz")
        manifest = _bundle_manifest(args.bundle)
        traced = neo.traced_torch_version(manifest)
        if traced:
            neo.check_traced_version(traced, framework_version)
    if manifest is None and args.img_size is None:
        raise ConfigError("--bundle", None, "--bundle (to read the input size) or --img-size: Neo needs the "
                                            "model's input shape")
    output = _s3_location("--output-s3", args.output_s3)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    spec = neo.CompilationSpec(
        job_name=neo.compilation_job_name(_base_name(args.job_name, "qcsight-neo"), target, stamp),
        role_arn=role,
        model_s3=args.model_s3,
        output_s3=output.uri,
        target=target,
        framework_version=framework_version,
        input_shape=neo.input_shape(manifest, args.img_size),
        max_runtime_s=args.max_run or DEFAULT_COMPILE_MAX_RUN_S,
    )
    return CompilationPlan(aws=_aws(args, role, spec.max_runtime_s + 600), spec=spec)


def _onnx_compilation_plan(args: argparse.Namespace, target: neo.NeoTarget, role: str) -> CompilationPlan:
    """--bundle without --model-s3: compile the bundle's model.neo.onnx (policy and request in qcsight_train.neo)."""
    neo.check_onnx_target(target)
    if args.neo_framework_version is not None:
        raise ConfigError("--neo-framework-version", args.neo_framework_version,
                          "only with --model-s3 (PyTorch): Neo takes no framework version for ONNX")
    if not args.bundle.exists():
        raise ConfigError("--bundle", str(args.bundle), "an existing bundle directory or .tar.gz")
    manifest = _bundle_manifest(args.bundle)
    entry = neo.neo_onnx_entry(manifest, str(args.bundle))
    output = _s3_location("--output-s3", args.output_s3)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    job_name = neo.compilation_job_name(_base_name(args.job_name, "qcsight-neo"), target, stamp)
    spec = neo.CompilationSpec(job_name=job_name, role_arn=role, model_s3=output.join(job_name, "model.tar.gz"),
                               output_s3=output.uri, target=target, framework_version="",
                               input_shape=neo.input_shape(manifest, None),
                               max_runtime_s=args.max_run or DEFAULT_COMPILE_MAX_RUN_S, framework="ONNX")
    return CompilationPlan(aws=_aws(args, role, spec.max_runtime_s + 600), spec=spec,
                           onnx=neo.OnnxSource(args.bundle, entry))


# --------------------------------------------------------------------------- source tarball


@dataclass(frozen=True)
class SourcePackage:
    """The tarball the job unpacks as its working directory."""

    tarball: Path
    sha256: str
    files: tuple[str, ...]
    requirements: tuple[str, ...]


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        toml = importlib.import_module("tomllib")
    except ModuleNotFoundError:  # Python 3.10
        toml = importlib.import_module("tomli")
    data: dict[str, Any] = toml.loads(path.read_text(encoding="utf-8"))
    return data


def image_requirements(pyproject: Path) -> tuple[str, ...]:
    """The job's pip requirements: the core dependencies plus the train extra, minus what the image has."""
    project = _load_toml(pyproject).get("project", {})
    wanted = list(project.get("dependencies", [])) + list(project.get("optional-dependencies", {}).get("train", []))
    keep = []
    for requirement in wanted:
        name = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        if name not in PROVIDED_BY_IMAGE:
            keep.append(requirement)
    return tuple(keep)


def _source_files(source_dir: Path) -> list[str]:
    files = []
    for top in SOURCE_TOP_LEVEL:
        path = source_dir / top
        if path.is_file():
            files.append(top)
        elif path.is_dir():
            for item in path.rglob("*"):
                rel = item.relative_to(source_dir)
                if not item.is_file() or item.suffix in _SOURCE_SKIP_SUFFIXES:
                    continue
                if any(part in _SOURCE_SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
                    continue
                files.append(rel.as_posix())
    return sorted(files)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


def package_source(source_dir: Path, work_dir: Path) -> SourcePackage:
    """Write sourcedir.tar.gz: the checkout's code plus a generated requirements.txt.

    Byte-for-byte reproducible (sorted names, zero mtimes and owners), so the same code gives
    the same sha256 and the same S3 key.
    """
    files = _source_files(source_dir)
    requirements = image_requirements(source_dir / "pyproject.toml")
    tar_path = work_dir / "sourcedir.tar.gz"
    with tar_path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in files:
            path = source_dir / name
            _add_bytes(tar, name, path.read_bytes(), 0o755 if os.access(path, os.X_OK) else 0o644)
        _add_bytes(tar, "requirements.txt", ("\n".join(requirements) + "\n").encode())
    digest = hashlib.sha256(tar_path.read_bytes()).hexdigest()
    log.info("packed %d files from %s (%.1f kB, sha256 %s)", len(files), source_dir,
             tar_path.stat().st_size / 1024, digest[:12])
    return SourcePackage(tar_path, digest, tuple(files), requirements)


# --------------------------------------------------------------------------- AWS plumbing


@contextlib.contextmanager
def aws_errors(operation: str) -> Iterator[None]:
    """Turn botocore and SDK failures into one LaunchError that names the call."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

    try:
        yield
    except (NoCredentialsError, PartialCredentialsError) as exc:
        log.debug("%s: credentials", operation, exc_info=True)
        raise LaunchError(f"{operation}: no usable AWS credentials ({exc}); set AWS_PROFILE or "
                          "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or use --dry-run") from exc
    except ClientError as exc:
        log.debug("%s failed", operation, exc_info=True)
        error = exc.response.get("Error", {})
        raise LaunchError(f"{operation} failed: {error.get('Code', '?')}: {error.get('Message', exc)}") from exc
    except (BotoCoreError, Boto3Error) as exc:  # Boto3Error: S3 transfers wrap their ClientError in one
        log.debug("%s failed", operation, exc_info=True)
        raise LaunchError(f"{operation} failed: {exc}") from exc
    except ValueError as exc:  # the SDK's own validation (pydantic, role resolution) raises ValueError
        log.debug("%s rejected", operation, exc_info=True)
        raise LaunchError(f"{operation} rejected by the SageMaker SDK: {exc}") from exc


def _boto_session(region: str, need_credentials: bool) -> Any:
    import boto3

    session = boto3.Session(region_name=region)
    if need_credentials and session.get_credentials() is None:
        raise LaunchError("no AWS credentials found (environment, AWS_PROFILE, ~/.aws or instance role); "
                          "configure them, or use --dry-run to print the request without sending it")
    return session


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _sdk_config() -> dict[str, Any]:
    """The user's SageMaker SDK config with telemetry switched off.

    The SDK only reads its opt-out from this config (not from the environment); qcsight does not
    send usage data on its users' behalf.
    """
    from sagemaker.core.config.config import load_sagemaker_config

    config: dict[str, Any] = dict(load_sagemaker_config() or {})
    config.setdefault("SchemaVersion", "1.0")
    sdk = config.setdefault("SageMaker", {}).setdefault("PythonSDK", {}).setdefault("Modules", {})
    sdk["TelemetryOptOut"] = True
    return config


def _sdk_session(boto_session: Any, output: S3Location, dry_run: bool, planned: list[dict[str, str]]) -> Any:
    """A SageMaker Session staging under --output-s3; in a dry run, one that records uploads instead."""
    from sagemaker.core.helper.session_helper import Session

    class DryRunSession(Session):  # type: ignore[misc]
        """Resolves S3 keys exactly as Session does, but uploads nothing and touches no bucket."""

        def default_bucket(self) -> str:
            return str(self._default_bucket_name_override)

        def upload_data(self, path: str, bucket: str | None = None, key_prefix: str = "data",
                        callback: Any = None, extra_args: Any = None) -> str:
            bucket, key_prefix = self.determine_bucket_and_prefix(bucket, key_prefix, self)
            uri = f"s3://{bucket}/{key_prefix}"
            if not os.path.isdir(path):
                uri += "/" + os.path.basename(path)
            planned.append({"what": os.path.basename(key_prefix.rstrip("/")), "s3": uri})
            return uri

    cls = DryRunSession if dry_run else Session
    return cls(boto_session=boto_session, default_bucket=output.bucket, default_bucket_prefix=output.prefix or None,
               sagemaker_config=_sdk_config())


def default_image_uri(region: str, instance_type: str) -> str:
    from sagemaker.core import image_uris

    return str(image_uris.retrieve(framework="pytorch", region=region, version=PYTORCH_IMAGE_VERSION,
                                   py_version=PYTORCH_IMAGE_PY, instance_type=instance_type, image_scope="training"))


def _is_gpu_instance(instance_type: str) -> bool:
    family = instance_type.split(".")[1] if instance_type.count(".") >= 2 else ""
    return family.startswith(("p", "g", "trn"))


def _build_trainer(plan: TrainingPlan, session: Any, source_s3: str) -> Any:
    """The ModelTrainer for the plan's job: torchrun on every node, our metrics, checkpoints, spot."""
    from sagemaker.core.training.configs import (
        CheckpointConfig,
        Compute,
        MetricDefinition,
        OutputDataConfig,
        SourceCode,
        StoppingCondition,
    )
    from sagemaker.train.distributed import Torchrun
    from sagemaker.train.model_trainer import ModelTrainer

    job, compute = plan.job, plan.job.compute

    class DryRunTrainer(ModelTrainer):  # type: ignore[misc]
        def _resolve_staging_bucket(self) -> tuple[str, None]:
            # The real method asks IAM whether the role can write the default bucket; a dry run
            # sends nothing, and our default bucket is the --output-s3 bucket anyway.
            return self.sagemaker_session.default_bucket(), None

    checkpoint = None
    if job.checkpoint_s3 or compute.spot:
        # Without an S3 URI the SDK picks one per job under the staging bucket (--output-s3).
        checkpoint = CheckpointConfig(s3_uri=job.checkpoint_s3, local_path=CHECKPOINT_LOCAL_PATH)
    cls = DryRunTrainer if plan.aws.dry_run else ModelTrainer
    trainer = cls(
        sagemaker_session=session,
        role=plan.aws.role_arn,
        base_job_name=job.base_job_name,
        training_image=job.image_uri or default_image_uri(plan.aws.region, compute.instance_type),
        # ignore_patterns=None: the source is a tarball we already filtered, and with patterns set the
        # tuner copies its drivers into a temporary directory that it never removes.
        source_code=SourceCode(source_dir=source_s3, entry_script=ENTRY_SCRIPT, requirements="requirements.txt",
                               ignore_patterns=None),
        distributed=Torchrun(process_count_per_node=compute.processes_per_node),
        compute=Compute(instance_type=compute.instance_type, instance_count=compute.instance_count,
                        volume_size_in_gb=compute.volume_gb, enable_managed_spot_training=compute.spot or None),
        stopping_condition=StoppingCondition(max_runtime_in_seconds=compute.max_run_s,
                                             max_wait_time_in_seconds=compute.max_wait_s),
        output_data_config=OutputDataConfig(s3_output_path=job.output.uri),
        checkpoint_config=checkpoint,
        hyperparameters=dict(job.hyperparameters),
    )
    return trainer.with_metric_definitions([MetricDefinition(name=m["Name"], regex=m["Regex"])
                                            for m in METRIC_DEFINITIONS])


def _inputs(job: TrainingJobSpec) -> list[Any]:
    from sagemaker.core.training.configs import InputData

    inputs = [InputData(channel_name="train", data_source=job.train_s3)]
    if job.validation_s3:
        inputs.append(InputData(channel_name="validation", data_source=job.validation_s3))
    return inputs


def _build_tuner(plan: TrainingPlan, trainer: Any) -> Any:
    from sagemaker.core.parameter import CategoricalParameter, ContinuousParameter
    from sagemaker.train.tuner import HyperparameterTuner

    tuning = plan.tuning
    assert tuning is not None
    ranges: dict[str, Any] = {"lr": ContinuousParameter(tuning.lr_range[0], tuning.lr_range[1], "Logarithmic")}
    if tuning.batch_sizes:
        ranges["batch-size"] = CategoricalParameter([str(b) for b in tuning.batch_sizes])
    if _is_gpu_instance(plan.job.compute.instance_type):
        # A tuning job cannot set a container entrypoint, so its jobs start through the PyTorch
        # image's own launcher; this is the flag that makes that launcher use torchrun.
        trainer.hyperparameters = {**trainer.hyperparameters, "sagemaker_torch_distributed_enabled": "true"}
    elif plan.job.compute.instance_count > 1:
        log.warning("tuning on CPU instances: each training job runs one process per instance (no torchrun)")
    return HyperparameterTuner(
        trainer,
        objective_metric_name=tuning.objective,
        objective_type=tuning.objective_type,
        hyperparameter_ranges=ranges,
        metric_definitions=[dict(m) for m in METRIC_DEFINITIONS],
        strategy=tuning.strategy,
        max_jobs=tuning.max_jobs,
        max_parallel_jobs=tuning.max_parallel_jobs,
        base_tuning_job_name=plan.job.base_job_name,
    )


def _tuning_request(tuner: Any, inputs: list[Any]) -> dict[str, Any]:
    """The CreateHyperParameterTuningJob request tune() would send, assembled by the tuner's own steps."""
    from sagemaker.core.apiutils._boto_functions import to_pascal_case
    from sagemaker.core.utils.utils import serialize

    tuner._prepare_model_trainer_for_tuning(tuner.model_trainer, inputs)
    tuner._prepare_for_tuning()
    request = {
        "hyper_parameter_tuning_job_name": tuner._current_job_name,
        "hyper_parameter_tuning_job_config": tuner._build_tuning_job_config(),
        "training_job_definition": tuner._build_training_job_definition(inputs),
    }
    serialized: dict[str, Any] = serialize({to_pascal_case(k): v for k, v in request.items()})
    return serialized


def _dry_run_request(plan: TrainingPlan, trainer: Any) -> dict[str, Any]:
    inputs = _inputs(plan.job)
    if plan.tuning is not None:
        return _tuning_request(_build_tuner(plan, trainer), inputs)
    request: dict[str, Any] = trainer._create_training_job_args(input_data_config=inputs, boto3=True)
    return request


def _create_job(plan: TrainingPlan, trainer: Any) -> str:
    """Create the job through the SDK; returns its name."""
    inputs = _inputs(plan.job)
    if plan.tuning is not None:
        tuner = _build_tuner(plan, trainer)
        tuner.tune(inputs=inputs, wait=False)
        return str(tuner.latest_tuning_job.hyper_parameter_tuning_job_name)
    trainer.train(input_data_config=inputs, wait=False, logs=False)
    return str(trainer._latest_training_job.training_job_name)


def _cleanup_sdk_temp_dirs(trainer: Any) -> None:
    # The SDK stages its drivers in temporary directories it does not always remove (the
    # tuner never does); left to the garbage collector they warn, so remove them here.
    for attribute in ("_temp_code_dir", "_tuner_temp_dir"):
        temp = getattr(trainer, attribute, None)
        if temp is not None:
            temp.cleanup()


def console_url(region: str, kind: str, name: str) -> str:
    return f"https://{region}.console.aws.amazon.com/sagemaker/home?region={region}#/{kind}/{name}"


def submit_training(plan: TrainingPlan) -> dict[str, Any]:
    """Create the training (or tuning) job; in a dry run return the request instead."""
    aws, job = plan.aws, plan.job
    planned: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="qcsight-sagemaker-") as tmp:
        package = package_source(job.source_dir, Path(tmp))
        source_s3 = job.output.join(job.base_job_name, "source", package.sha256[:16], "sourcedir.tar.gz")
        boto_session = _boto_session(aws.region, need_credentials=not aws.dry_run)
        if aws.dry_run:
            planned.append({"what": "source", "s3": source_s3, "files": str(len(package.files)),
                            "sha256": package.sha256})
        else:
            bucket, key = source_s3[len("s3://"):].split("/", 1)
            with aws_errors(f"upload of the source tarball to {source_s3}"):
                boto_session.client("s3").upload_file(str(package.tarball), bucket, key)
            log.info("uploaded source to %s", source_s3)
        # A dry run sends nothing, so there is no role to check with IAM.
        role_check = _env("SAGEMAKER_VALIDATE_ROLE", "false") if aws.dry_run else contextlib.nullcontext()
        operation = "CreateHyperParameterTuningJob" if plan.tuning else "CreateTrainingJob"
        with role_check, aws_errors(operation):
            session = _sdk_session(boto_session, job.output, aws.dry_run, planned)
            trainer = _build_trainer(plan, session, source_s3)
            try:
                if aws.dry_run:
                    request = _dry_run_request(plan, trainer)
                    return {"dry_run": True, "operation": operation, "request": request, "uploads": planned}
                name = _create_job(plan, trainer)
            finally:
                _cleanup_sdk_temp_dirs(trainer)
    log.info("%s: created %s", operation, name)
    client = boto_session.client("sagemaker")
    if plan.tuning is not None:
        describe = _describer(client.describe_hyper_parameter_tuning_job, HyperParameterTuningJobName=name)
        result = {"operation": operation, "tuning_job_name": name, "console": console_url(aws.region,
                                                                                           "hyper-tuning-jobs", name)}
        status = _TUNING_STATUS
    else:
        describe = _describer(client.describe_training_job, TrainingJobName=name)
        result = {"operation": operation, "training_job_name": name,
                  "model_artifacts": job.output.join(name, "output", "model.tar.gz"),
                  "console": console_url(aws.region, "jobs", name)}
        status = _TRAINING_STATUS
    result["source_s3"] = source_s3
    result["status"] = _final_status(describe, status, aws) if aws.wait else "created"
    return result


def submit_compilation(plan: CompilationPlan) -> dict[str, Any]:
    """Create the Neo compilation job; in a dry run return the request instead."""
    aws, spec = plan.aws, plan.spec
    if plan.onnx is not None:
        request = neo.build_onnx_compilation_request(spec, plan.onnx.input_name)
    else:
        request = neo.build_compilation_request(spec)
        log.warning("Neo loads the model with PyTorch %s: model.pth in %s must be traced with torch <= %s "
                    "(qcsight trains with torch 2.14)", spec.framework_version, spec.model_s3, spec.framework_version)
    if aws.dry_run:
        uploads = [{"what": "model", "s3": spec.model_s3, "file": plan.onnx.entry.file}] if plan.onnx else []
        return {"dry_run": True, "operation": "CreateCompilationJob", "request": request, "uploads": uploads}
    session = _boto_session(aws.region, need_credentials=True)
    if plan.onnx is not None:
        _upload_neo_onnx(session, plan.onnx, spec.model_s3)
    client = session.client("sagemaker")
    with aws_errors("CreateCompilationJob"):
        arn = client.create_compilation_job(**request)["CompilationJobArn"]
    log.info("CreateCompilationJob: created %s", spec.job_name)
    result = {"operation": "CreateCompilationJob", "compilation_job_name": spec.job_name, "arn": arn,
              "output_s3": spec.output_s3, "console": console_url(aws.region, "compilation-jobs", spec.job_name)}
    describe = _describer(client.describe_compilation_job, CompilationJobName=spec.job_name)
    result["status"] = _final_status(describe, _COMPILATION_STATUS, aws) if aws.wait else "created"
    if plan.onnx is not None and result["status"] == "COMPLETED" and plan.onnx.bundle.is_dir():
        result["attached"] = _attach_compiled(session, describe(), plan)
    return result


def _upload_neo_onnx(session: Any, source: neo.OnnxSource, model_s3: str) -> None:
    with tempfile.TemporaryDirectory(prefix="qcsight-neo-") as tmp:
        bundle_dir = source.bundle if source.bundle.is_dir() else load_bundle(source.bundle, extract_to=tmp).path
        tarball = neo.pack_neo_onnx(bundle_dir, source.entry, Path(tmp) / "upload" / "model.tar.gz")
        bucket, key = model_s3[len("s3://"):].split("/", 1)
        with aws_errors(f"upload of {source.entry.file} to {model_s3}"):
            session.client("s3").upload_file(str(tarball), bucket, key)
    log.info("uploaded %s to %s", source.entry.file, model_s3)


def _attach_compiled(session: Any, description: Mapping[str, Any], plan: CompilationPlan) -> str | None:
    """Download the compiled model and add it to the bundle directory (neo/<target>/, a runtimes entry)."""
    artefacts = str(description.get("ModelArtifacts", {}).get("S3ModelArtifacts", ""))
    bucket, _, prefix = artefacts[len("s3://"):].partition("/")
    s3 = session.client("s3")
    with aws_errors(f"listing {artefacts}"):
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    key = neo.find_compiled([(o["Key"], o["LastModified"].timestamp()) for o in listed],
                            prefix if prefix.endswith(".tar.gz") else "", plan.spec.target)
    if key is None or plan.onnx is None:
        log.warning("no compiled model found under %s; the bundle is left as it was", artefacts)
        return None
    with tempfile.TemporaryDirectory(prefix="qcsight-neo-") as tmp:
        local = Path(tmp) / Path(key).name
        with aws_errors(f"download of s3://{bucket}/{key}"):
            s3.download_file(bucket, key, str(local))
        neo.attach_compiled(plan.onnx.bundle, plan.spec.target, local, plan.spec.job_name)
    log.info("added the compiled model for %s to %s", plan.spec.target.label, plan.onnx.bundle)
    return f"s3://{bucket}/{key}"


# --------------------------------------------------------------------------- waiting


def _describer(call: Callable[..., Mapping[str, Any]], **kwargs: str) -> Callable[[], Mapping[str, Any]]:
    def describe() -> Mapping[str, Any]:
        with aws_errors(call.__name__):
            return call(**kwargs)
    return describe


def wait_for_job(describe: Callable[[], Mapping[str, Any]], status_key: str, done: Sequence[str],
                 failed: Sequence[str], timeout_s: float, poll_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> Mapping[str, Any]:
    """Poll a Describe* call until the job finishes or timeout_s passes.

    Returns:
        The last description, whose status is in done.

    Raises:
        LaunchError: the job failed or stopped, or the timeout passed (the job keeps running).
    """
    deadline = clock() + timeout_s
    last = None
    while True:
        description = describe()
        status = str(description.get(status_key, "?"))
        detail = str(description.get("SecondaryStatus", ""))
        if (status, detail) != last:
            log.info("status %s%s", status, f" ({detail})" if detail else "")
            last = (status, detail)
        if status in done:
            return description
        if status in failed:
            reason = description.get("FailureReason") or "no reason given"
            raise LaunchError(f"job ended {status}: {reason}")
        if clock() + poll_s > deadline:
            raise LaunchError(f"still {status} after {timeout_s:.0f} s of waiting; the job keeps running "
                              "(see the console link), raise --wait-timeout to wait longer")
        sleep(poll_s)


def _final_status(describe: Callable[[], Mapping[str, Any]], status: _JobStatus, aws: AwsSpec) -> str:
    key, done, failed = status
    description = wait_for_job(describe, key, done, failed, aws.wait_timeout_s, aws.poll_s)
    for metric in description.get("FinalMetricDataList", []):
        log.info("final %s = %s", metric.get("MetricName"), metric.get("Value"))
    return str(description[key])


# --------------------------------------------------------------------------- entry point


def main(argv: list[str], prog: str = DEFAULT_PROG) -> int:
    """Parse, validate, submit (or print with --dry-run); exit 0 done, 1 AWS failure, 2 usage."""
    parser = build_parser(prog)
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    configure_logging(args.verbose)
    try:
        plan = plan_from_args(args)
    except ConfigError as exc:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        print(f"{prog}: needs the 'cloud' extra (module {exc.name!r} is missing): pip install 'qcsight[cloud]'",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        result = submit_compilation(plan) if isinstance(plan, CompilationPlan) else submit_training(plan)
    except LaunchError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(result, indent=2, default=str))
    return EXIT_OK
