"""`qcsight train`: transfer learning that runs the same on a laptop CPU, under torchrun and as a SageMaker job.

Settings come, later winning, from the defaults, --config YAML, the SageMaker environment
(channels, SM_MODEL_DIR, SM_HPS) and the command line; the resolved configuration is saved
next to the outputs. `--sagemaker` anywhere hands the command to the SageMaker launcher.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from qcsight_core.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, configure_logging
from qcsight_core.errors import ConfigError, QcsightError
from qcsight_train.config import (
    ANOMALY_ARCH_NAMES,
    ARCH_NAMES,
    AUGMENT_FIELDS,
    TRAIN_FIELDS,
    AugmentConfig,
    TrainConfig,
    build_config,
    flatten,
    read_yaml,
)
from qcsight_train.sm_env import SageMakerEnv

log = logging.getLogger(__name__)

GROUPS: dict[str, tuple[str, ...]] = {
    "data": ("data", "validation", "test", "reviewed", "groups", "val_fraction", "test_fraction", "defect_classes",
             "good_classes", "workers"),
    "model": ("arch", "weights", "img_size", "resize"),
    "optimisation": ("epochs", "freeze_epochs", "batch_size", "lr", "backbone_lr_scale", "weight_decay",
                     "warmup_epochs", "min_lr_ratio", "decay_fraction", "ema_epochs", "label_smoothing", "balance",
                     "balance_power", "seed", "amp", "channels_last", "threads", "select", "refit"),
    "augmentation (train only)": tuple(AUGMENT_FIELDS),
    "thresholds": ("target_recall", "max_false_reject", "review_fraction", "threshold_source", "threshold_folds"),
    "outputs": ("output", "checkpoint_dir", "resume", "name", "version", "run_id", "int8", "torchscript", "neo_onnx",
                "calibration_images"),
    "experiment tracking (MLflow)": ("tracking_uri", "experiment"),
    "anomaly (--task anomaly: fitted on good images only)": ("task", "bank_size", "feature_dim", "threshold_rule",
                                                            "false_reject_rate", "max_bundle_mb"),
}

EPILOG = """\
examples:
  qcsight train --data DIR --output runs/a                  # folder per class, efficientnet_lite0, package weights
  qcsight train --data data.csv --groups groups.csv --epochs 8 --img-size 160 --hflip --vflip --output runs/b
  qcsight train --data strips/ --img-size 224x560 --output runs/s  # long parts: height x width
  qcsight train --data defect-types/ --good-classes none --output runs/d  # every class a defect type
  qcsight train --data DIR --reviewed reviewed.manifest --output runs/r  # + operators' reviewed alerts (train only)
  qcsight train --data DIR --refit --threshold-source oof --output runs/e  # use every image; thresholds out of fold
  torchrun --nproc_per_node=2 -m qcsight_train.cli --data DIR --output runs/c  # DDP (gloo on CPU)
  qcsight train --sagemaker --help                          # submit a SageMaker training job instead
  qcsight train --task anomaly --data DIR --img-size 224 --output runs/n  # DIR/good fitted, other folders evaluate

Each epoch logs one line: epoch=3/10 train_loss=... val_loss=... val_acc=... val_macro_f1=... lr=... images_per_s=...
A killed run resumes from --checkpoint-dir when started again with the same settings.
Defaults that contradict the settings given are adapted (e.g. --epochs 1 trains no head-only epoch) and
listed at the top of OUTPUT/config.yaml; two given settings that contradict each other are refused by name.
Runs are tracked in MLflow (./mlruns by default; `qcsight runs list` shows them) when mlflow is installed.
Exit codes: 0 done, 1 failed, 2 usage error."""


def _attribute_help(cls: type) -> dict[str, str]:
    """Field help from a dataclass's Google-style "Attributes:" docstring (one source for docs and --help)."""
    text = (cls.__doc__ or "").split("Attributes:", 1)[-1]
    result: dict[str, str] = {}
    current = ""
    for line in text.splitlines():
        match = re.match(r"^\s{8}(\w+): (.*)$", line)
        if match:
            current = match.group(1)
            result[current] = match.group(2).strip()
        elif current and line.strip():
            result[current] += " " + line.strip()
    return result


def get_args_parser(prog: str = "qcsight train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n", 1)[0] if __doc__ else None, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="YAML", help="settings file (keys as below); flags override it")
    parser.add_argument("--sagemaker", action="store_true",
                        help="submit this training as a SageMaker job instead of running it here")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")
    helps = {**_attribute_help(TrainConfig), **_attribute_help(AugmentConfig)}
    for title, names in GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            _add_flag(group, name, helps.get(name, "").replace("%", "%%"))
    return parser


def _add_flag(group: argparse._ArgumentGroup, name: str, text: str) -> None:
    spec = TRAIN_FIELDS.get(name) or AUGMENT_FIELDS[name]
    default = spec.default if not callable(spec.default_factory) else spec.default_factory()
    shown = f" (default: {default})" if default not in ("", ()) else ""
    if name == "arch":
        shown += f"; one of {', '.join(ARCH_NAMES)} (--task anomaly: {', '.join(ANOMALY_ARCH_NAMES)})"
    flag = f"--{name.replace('_', '-')}"
    if spec.type in ("bool", bool):
        kwargs: dict[str, Any] = {"nargs": "?", "const": "true", "metavar": "BOOL"}
    else:
        kwargs = {"metavar": name.upper()}
    group.add_argument(flag, dest=name, help=f"{text}{shown}", **kwargs)
    if "_" in name:  # SageMaker passes hyperparameters as --key value, with the key as the launcher wrote it
        group.add_argument(f"--{name}", dest=name, help=argparse.SUPPRESS, **kwargs)


def resolve_config(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[TrainConfig, SageMakerEnv]:
    """Defaults < --config YAML < SageMaker environment (channels, SM_HPS) < command-line flags.

    Raises:
        ConfigError: a value is not allowed or a key unknown (naming it and where it came from).
    """
    given = {k: v for k, v in vars(args).items() if k not in ("config", "sagemaker", "verbose")}
    sm = SageMakerEnv.from_environ(environ)
    layers: list[dict[str, Any]] = []
    if getattr(args, "config", None):
        layers.append(read_yaml(args.config))
    layers.append(sm.settings())
    if sm.hyperparameters:
        layers.append(flatten(sm.hyperparameters, "SM_HPS"))
    layers.append(flatten(given, "command line"))
    return build_config(*layers), sm


def _without_sagemaker_internal(argv: list[str]) -> list[str]:
    """Drop `--sagemaker_<name> VALUE` pairs: SageMaker's own hyperparameters, passed to every entry script."""
    result: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        if item.startswith("--sagemaker_"):
            skip = "=" not in item
            continue
        result.append(item)
    return result


def main(argv: Sequence[str], prog: str = "qcsight train") -> int:
    argv = list(argv)
    if "--sagemaker" in argv:
        from qcsight_train.launch import cli as launch

        return int(launch.main(argv, prog))
    parser = get_args_parser(prog)
    args = parser.parse_args(_without_sagemaker_internal(argv))
    configure_logging(args.verbose)
    try:
        cfg, sm = resolve_config(args, os.environ)
    except ConfigError as exc:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # torch is imported only once the command line is valid
    if cfg.task == "anomaly":
        from qcsight_train.anomaly.run import print_summary
        from qcsight_train.anomaly.run import run as run_task
    else:
        from qcsight_train.run import run as run_task

    try:
        summary = run_task(cfg, sm)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except QcsightError as exc:
        log.debug("failed", exc_info=True)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if summary is not None:
        (print_summary if cfg.task == "anomaly" else _print_summary)(summary)
    return EXIT_OK


def _print_summary(summary: Mapping[str, Any]) -> None:
    paths = summary["paths"]
    figures = summary.get("evaluation", {})
    print(f"bundle:      {paths['bundle']}")
    if paths.get("tarball"):
        print(f"model.tar.gz {paths['tarball']}")
    print(f"evaluation:  {paths['evaluation']} ({figures.get('split', '')} split)")
    print(f"  classifier (top-1 class): accuracy {figures['accuracy']:.4f}, macro-F1 {figures['macro_f1']:.4f}")
    print(f"  device verdicts at threshold {figures['defect_threshold']:.3f}: defect recall "
          f"{_fmt(figures['defect_recall'])}{_ci(figures.get('defect_recall_ci95'), figures.get('defect_images'))}, "
          f"good parts rejected {_fmt(figures['false_reject_rate'])}"
          f"{_ci(figures.get('false_reject_rate_ci95'), figures.get('good_images'))}, "
          f"good parts to review {_fmt(figures['good_to_review_rate'])}, uncertain {_fmt(figures['uncertain_rate'])}")
    warning = summary.get("threshold", {}).get("warning")
    if warning:
        print(f"  warning: {warning}")
    for note in summary.get("adapted", []):
        print(f"adapted:     {note}")
    print(f"config:      {paths['config']}")
    print(f"checkpoints: {paths['checkpoints']}")
    kept = "kept" if summary.get("select") == "last" else "best"
    print(f"trained {summary['epochs']} epochs on {summary['world_size']} process(es) in "
          f"{summary['train_seconds']:.0f} s; {kept} val macro-F1 {summary['best_val_macro_f1']:.4f} "
          f"at epoch {summary['best_epoch']}"
          + (f"; refit on train+validation for {summary['refit_epochs']} epochs" if summary.get("refit") else ""))
    tracked = summary.get("tracking")
    if tracked:
        print(f"tracked:     MLflow run {tracked['run_id']} at {tracked['uri']} (model {tracked['registered_model']} "
              f"version {tracked['registered_version']})")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _ci(interval: list[float] | None, count: int | None) -> str:
    return "" if not interval else f" (95 % CI {interval[0]:.3f}-{interval[1]:.3f}, n={count})"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
