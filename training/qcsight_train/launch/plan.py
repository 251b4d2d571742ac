"""What one launch is: frozen specs validated by the command line, and the constants the requests share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qcsight_aws.s3 import S3Uri
from qcsight_train.launch import neo

DEFAULT_PROG = "qcsight train --sagemaker"
# Paths inside a qcsight checkout, as the job sees them after unpacking the source tarball.
ENTRY_SCRIPT = "training/sagemaker_entry.py"
NODE_SCRIPT = "training/sagemaker_node.py"
# The newest SageMaker PyTorch training image the SDK (3.27) knows. Our local training uses
# torch 2.14; nothing in qcsight_train may need a torch newer than this image's.
PYTORCH_IMAGE_VERSION = "2.10.0"
PYTORCH_IMAGE_PY = "py313"
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
DEFAULT_INSTANCE_TYPE = "ml.g5.xlarge"
DEFAULT_MAX_RUN_S = 24 * 3600
DEFAULT_COMPILE_MAX_RUN_S = 900

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

    @property
    def gpu(self) -> bool:
        family = self.instance_type.split(".")[1] if self.instance_type.count(".") >= 2 else ""
        return family.startswith(("p", "g", "trn"))


@dataclass(frozen=True)
class TrainingJobSpec:
    """One training job; the tuning job reuses it as its training definition.

    Attributes:
        output: where model.tar.gz goes (<output>/<job>/output/); the source tarball is staged under it too.
        train_s3, validation_s3, checkpoint_s3: S3 URIs as given (SageMaker reads them verbatim).
        image_uri: the training image, resolved when the plan is made.
    """

    base_job_name: str
    source_dir: Path
    output: S3Uri
    train_s3: str
    validation_s3: str | None
    checkpoint_s3: str | None
    image_uri: str
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
