"""A whole `qcsight train` run on one rank: data, the epoch loop, then (rank 0) export, evaluation, outputs.

Files (rank 0 only): output/bundle/ and output/model.tar.gz locally; on SageMaker the bundle's
files at the root of SM_MODEL_DIR (SageMaker packs that directory as model.tar.gz).
config.yaml, history.json, summary.json and evaluation/ go beside the bundle locally, or into
SM_OUTPUT_DATA_DIR on SageMaker; checkpoints into checkpoint_dir.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch

from qcsight_core.bundle import Bundle
from qcsight_core.preprocess import PreprocessSpec
from qcsight_data.dataset import Sample
from qcsight_train import tracking
from qcsight_train.config import TrainConfig
from qcsight_train.data import Splits, defect_classes, fetch_reviewed, load_data, resolve_source
from qcsight_train.distributed import DistInfo, barrier, broadcast, init_distributed, shutdown
from qcsight_train.models import create_model, preprocess_spec
from qcsight_train.sm_env import SageMakerEnv
from qcsight_train.trainer import TrainResult, fit

log = logging.getLogger(__name__)

BUNDLE_DIR = "bundle"
EVALUATION_DIR = "evaluation"


@dataclass(frozen=True)
class RunPaths:
    """Where one run writes.

    Attributes:
        output: the bundle's parent (SM_MODEL_DIR on SageMaker).
        reports: config, history, summary and evaluation (SM_OUTPUT_DATA_DIR on SageMaker).
        checkpoints: last.pt and best.pt.
        cache: downloaded s3:// data.
        bundle_at_root: the bundle's files go straight into output (SageMaker): the model.tar.gz
            SageMaker makes of SM_MODEL_DIR is then the bundle itself, with manifest.json at its
            root, as Batch Transform and load_bundle read it.
    """

    output: Path
    reports: Path
    checkpoints: Path
    cache: Path
    bundle_at_root: bool = False

    @classmethod
    def for_run(cls, cfg: TrainConfig, sm: SageMakerEnv) -> RunPaths:
        output = Path(cfg.output)
        reports = Path(sm.output_data_dir) if sm.active and sm.output_data_dir else output
        checkpoints = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else output / "checkpoints"
        if sm.active and sm.job_name:
            # SageMaker syncs the whole checkpoint prefix; the jobs of a tuning job share it. A folder
            # per job keeps each job's last.pt its own, and a spot restart keeps its job name.
            checkpoints = checkpoints / sm.job_name
        at_root = sm.active and bool(sm.model_dir) and output == Path(sm.model_dir)
        cache = Path(tempfile.gettempdir()) / "qcsight-data-cache" if at_root else output / ".data-cache"
        return cls(output, reports, checkpoints, cache, at_root)

    @property
    def bundle(self) -> Path:
        return self.output if self.bundle_at_root else self.output / BUNDLE_DIR


RUN_ID_FILE = "run_id.txt"


def run_id_for(cfg: TrainConfig, checkpoints: Path) -> str:
    """The run's id: configured (on SageMaker the job name), the interrupted run's when resuming, else a new one.

    A resumed run is the same run: its bundle carries the id (and default version) it started with.
    """
    if cfg.run_id:
        return cfg.run_id
    from qcsight_train.checkpoint import LAST

    saved = checkpoints / RUN_ID_FILE
    if cfg.resume and (checkpoints / LAST).is_file() and saved.is_file():
        previous = saved.read_text(encoding="utf-8").strip()
        if previous:
            return previous
    return datetime.now(timezone.utc).strftime("train-%Y%m%d-%H%M%S")


@dataclass(frozen=True)
class Phases:
    """What the run trained: the selection run, and the refit that replaced its weights (if any).

    Attributes:
        selection: the run on train whose validation chose the epoch (and, without refit, the weights).
        final: the weights exported: selection's, or the refit's on train+validation.
        threshold_scores: scores the thresholds are chosen on when not the exported model's validation.
        sizing: how --img-size auto chose the input size (empty when it was given).
    """

    selection: TrainResult
    final: TrainResult
    threshold_scores: Any = None
    sizing: dict[str, Any] = dataclasses.field(default_factory=dict)


def run(cfg: TrainConfig, sm: SageMakerEnv, info: DistInfo | None = None) -> dict[str, Any] | None:
    """Train, and on rank 0 export and evaluate; returns rank 0's summary (None on other ranks)."""
    info = info or init_distributed()
    if not info.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one voice in the log: rank 0's
    tracker = tracking.Tracker()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        paths = RunPaths.for_run(cfg, sm)
        run_id = broadcast(info, run_id_for(cfg, paths.checkpoints))
        splits = _load_splits(cfg, info, paths)
        # Sized on train and validation (the refit learns from both; the test never counts): the seed's
        # validation cut no longer moves the size. A test share cut from --data still does; --test fixes it.
        cfg, sizing = broadcast(info, resolve_input_size(cfg, (*splits.train, *splits.val))
                                if info.is_main else None)
        defects = defect_classes(cfg, splits.classes)
        if info.is_main:
            paths.checkpoints.mkdir(parents=True, exist_ok=True)
            (paths.checkpoints / RUN_ID_FILE).write_text(run_id + "\n", encoding="utf-8")
            cfg.save(paths.reports / "config.yaml")
            for note in cfg.adapted:
                log.info("adapted default: %s", note)
            _log_splits(splits, defects)
            tracker = start_tracking(cfg, sm, paths, run_id, splits)
        barrier(info)
        start = time.perf_counter()
        phases = train_phases(cfg, splits, info, paths, sizing)
        train_seconds = time.perf_counter() - start
    except BaseException:
        tracker.finish("FAILED")
        raise
    finally:
        shutdown(info)
    if not info.is_main:
        return None
    try:
        summary = finish(cfg, splits, defects, phases, paths, run_id, train_seconds, tracker)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return summary


def resolve_input_size(cfg: TrainConfig, train: Sequence[Sample],
                       base: PreprocessSpec | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """--img-size auto: measure the training images (and masks) and take qcsight_data.sizing's recommendation.

    Args:
        train: the images the model learns from (a classifier's train and validation images; an anomaly
            run's good parts, which have no masks, so the size comes from their shape alone).
        base: colour and normalisation the recommendation's spec assumes (only its geometry is chosen).
    """
    if cfg.input_size is not None:
        return cfg, {}
    from qcsight_data import sizing

    root = _dataset_root(cfg.data)
    sizes = sizing.measure([(s.path, s.label) for s in train], root)  # its sample, beyond 2,000, is not the run's seed
    choice = sizing.recommend(sizes, base or preprocess_spec(cfg.arch, 224, cfg.resize))
    resize = choice.resize if cfg.resize == "stretch" else cfg.resize  # an explicit rule is kept
    note = f"img_size auto -> {choice.size_text}, resize {resize}: " + "; ".join(choice.reasons)
    adapted = (*cfg.adapted, note)
    return dataclasses.replace(cfg, img_size=choice.size_text, resize=resize, adapted=adapted), \
        sizing.to_dict(sizes, choice)


def _dataset_root(source: str) -> Path | None:
    """Where masks/<class>/ would sit: the data folder, or the folder of an index CSV/manifest."""
    path = Path(source)
    if source.startswith("s3://") or not path.exists():
        return None
    return path if path.is_dir() else path.parent


def train_phases(cfg: TrainConfig, splits: Splits, info: DistInfo, paths: RunPaths,
                 sizing: dict[str, Any]) -> Phases:
    """The selection run, then (when asked) out-of-fold threshold scores and the refit on train+validation."""
    from qcsight_train import folds

    selection = fit(cfg, splits, info, paths.checkpoints)
    spec = preprocess_spec(cfg.arch, input_size(cfg), cfg.resize)
    threshold_scores = None
    if cfg.threshold_source == "oof":
        threshold_scores = folds.out_of_fold_scores(cfg, splits, info, paths.checkpoints / "oof",
                                                    selection.best_epoch, spec)
    elif cfg.refit and info.is_main:
        threshold_scores = folds.selection_scores(cfg, splits, spec, selection.best_path, selection.best_epoch)
    final = selection
    if cfg.refit:
        epochs = selection.best_epoch
        log.info("refit: training again on train+validation (%d images) for the selected %d epochs",
                 len(splits.train) + len(splits.val), epochs)
        final = fit(folds.fold_config(cfg, epochs), dataclasses.replace(splits, train=(*splits.train, *splits.val)),
                    info, paths.checkpoints / "refit", log_as="refit")
    return Phases(selection, final, threshold_scores, sizing)


def input_size(cfg: TrainConfig) -> tuple[int, int]:
    """(height, width) of a config whose img_size resolve_input_size has resolved."""
    size = cfg.input_size
    if size is None:  # resolve_input_size runs first; this is a programming error, not a user's
        raise ValueError("img_size auto was not resolved from the data")
    return size


class SplitCounts(Protocol):
    """What tracking reads of a run's split (a classifier's Splits, an anomaly run's AnomalySplits)."""

    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    test: tuple[Sample, ...]
    fingerprint: str


def start_tracking(cfg: TrainConfig, sm: SageMakerEnv, paths: RunPaths, run_id: str,
                   splits: SplitCounts) -> tracking.Tracker:
    """An MLflow run with the resolved settings as parameters (a no-op Tracker without mlflow or with `none`)."""
    default_dir = paths.reports / tracking.DEFAULT_DIR if sm.active else Path.cwd() / tracking.DEFAULT_DIR
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    tracker = tracking.start(uri, default_dir, cfg.experiment, run_id,
                             {"qcsight.run_id": run_id, "qcsight.data_fingerprint": splits.fingerprint,
                              "qcsight.output": str(paths.output), "qcsight.arch": cfg.arch})
    if tracker.active:
        params = {k: (",".join(v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.to_dict().items()
                  if k != "augment"}
        params.update({f"augment.{k}": v for k, v in dataclasses.asdict(cfg.augment).items()})
        params.update({f"adapted.{i + 1}": note for i, note in enumerate(cfg.adapted)})
        params.update({f"images.{name}": len(samples) for name, samples in
                       (("train", splits.train), ("val", splits.val), ("test", splits.test))})
        tracker.log_params(params)
    return tracker


def _load_splits(cfg: TrainConfig, info: DistInfo, paths: RunPaths) -> Splits:
    """Rank 0 indexes and splits (decoding every image once); the others receive its result."""
    if info.local_rank == 0:
        for source in (cfg.data, cfg.validation, cfg.test):
            if source.startswith("s3://"):
                resolve_source(source, paths.cache)  # every host needs the files, not only rank 0's
        if cfg.reviewed:
            fetch_reviewed(cfg.reviewed, paths.cache)
    barrier(info)
    splits = load_data(cfg, paths.cache) if info.is_main else None
    result: Splits = broadcast(info, splits)
    return result


def _log_splits(splits: Splits, defects: tuple[str, ...]) -> None:
    for name, per_class in splits.counts().items():
        log.info("%s: %d images (%s)", name, sum(per_class.values()),
                 ", ".join(f"{c} {n}" for c, n in per_class.items()))
    if splits.reviewed:
        per_class = Counter(s.label for s in splits.reviewed)
        log.info("train includes %d reviewed alert images (%s)", len(splits.reviewed),
                 ", ".join(f"{c} {n}" for c, n in sorted(per_class.items())))
    log.info("defect classes: %s; data fingerprint %s", ", ".join(defects), splits.fingerprint[:16])


def calibration_paths(samples: tuple[Sample, ...], limit: int) -> list[str]:
    """Up to limit training images for INT8 calibration, spread over the classes (round robin)."""
    by_class: dict[str, list[str]] = {}
    for sample in samples:
        by_class.setdefault(sample.label, []).append(sample.path)
    chosen: list[str] = []
    position = 0
    while len(chosen) < limit and any(position < len(v) for v in by_class.values()):
        for paths in by_class.values():
            if position < len(paths) and len(chosen) < limit:
                chosen.append(paths[position])
        position += 1
    return chosen


def _training_record(cfg: TrainConfig, splits: Splits, phases: Phases) -> dict[str, Any]:
    """What the manifest's extra["training"] says about how the exported weights were made."""
    selection, final = phases.selection, phases.final
    record: dict[str, Any] = {
        "select": cfg.select, "selected_epoch": selection.best_epoch, "epochs": cfg.epochs,
        "selection_val_macro_f1": selection.best_macro_f1,
        "refit": cfg.refit, "trained_on": "train+validation" if cfg.refit else "train",
        "train_images": len(splits.train) + (len(splits.val) if cfg.refit else 0),
        "reviewed_images": len(splits.reviewed),
        "threshold_source": cfg.threshold_source, "adapted": list(cfg.adapted),
    }
    if cfg.refit:
        record["refit_epochs"] = final.epochs
        record["note"] = ("refit on train+validation for the selected number of epochs; the validation figures in "
                          "metrics.validation are on images this model trained on; the test split was not used")
    if phases.sizing:
        record["input_size"] = phases.sizing
    return record


def finish(cfg: TrainConfig, splits: Splits, defects: tuple[str, ...], phases: Phases, paths: RunPaths,
           run_id: str, train_seconds: float, tracker: tracking.Tracker | None = None) -> dict[str, Any]:
    """Export the kept weights as a bundle, evaluate it through the device path, write the summary."""
    from qcsight_train import checkpoint
    from qcsight_train.evaluate import evaluate_bundle
    from qcsight_train.export import ExportOptions, export_bundle

    tracker = tracker or tracking.Tracker()
    result = phases.final
    best = checkpoint.load(result.best_path)
    if best is None:
        raise checkpoint.CheckpointError(f"{result.best_path}: no best weights were saved")
    model = create_model(cfg.arch, len(splits.classes), "none")
    model.load_state_dict(best["model"])
    model.eval()
    spec = preprocess_spec(cfg.arch, input_size(cfg), cfg.resize)
    history = list(phases.selection.history)
    _write_json(paths.reports / "history.json", history)
    start = time.perf_counter()
    bundle = export_into_place(
        model, paths, export_bundle, spec=spec, classes=splits.classes, defect_classes=defects,
        architecture=cfg.arch, name=cfg.name, version=cfg.version or run_id, run_id=run_id,
        data_fingerprint=splits.fingerprint, calibration_paths=calibration_paths(splits.train, cfg.calibration_images),
        validation=[(s.path, s.label) for s in splits.val], target_defect_recall=cfg.target_recall,
        int8=cfg.int8, torchscript=cfg.torchscript, config=cfg.to_dict(),
        options=ExportOptions(review_fraction=cfg.review_fraction, max_false_reject=cfg.max_false_reject,
                              pack=not paths.bundle_at_root),
        threshold_scores=phases.threshold_scores, neo_onnx=cfg.neo_onnx,
        extra={"training": _training_record(cfg, splits, phases)})
    export_seconds = time.perf_counter() - start
    held_out, split_name = (splits.test, "test") if splits.test else (splits.val, "val")
    metrics = evaluate_bundle(bundle, held_out, paths.reports / EVALUATION_DIR, target_defect_recall=cfg.target_recall)
    tarball = paths.output / "model.tar.gz"
    at = metrics["at_bundle_threshold"]
    summary = {
        "run_id": run_id,
        "epochs": phases.selection.epochs, "resumed_from": phases.selection.resumed_from,
        "world_size": result.world_size,
        "best_epoch": phases.selection.best_epoch, "best_val_macro_f1": phases.selection.best_macro_f1,
        "select": cfg.select, "refit": cfg.refit, "refit_epochs": result.epochs if cfg.refit else 0,
        "refit_history": list(result.history) if cfg.refit else [],
        "adapted": list(cfg.adapted), "img_size": cfg.img_size, "resize": cfg.resize,
        "threshold": bundle.manifest.metrics.get("threshold", {}),
        "train_seconds": train_seconds, "export_seconds": export_seconds,
        "images_per_s": _mean([h["images_per_s"] for h in history if h["phase"] == "full"]),
        "per_rank_images": history[-1]["per_rank_images"] if history else [],
        "splits": {name: dict(Counter(s.label for s in samples)) for name, samples in
                   (("train", splits.train), ("val", splits.val), ("test", splits.test))},
        "reviewed_images": dict(Counter(s.label for s in splits.reviewed)),
        "evaluation": {
            "split": split_name, "images": metrics["images"],
            "accuracy": metrics["classification"]["accuracy"], "macro_f1": metrics["classification"]["macro_f1"],
            "per_class_f1": {name: v["f1"] for name, v in metrics["classification"]["per_class"].items()},
            "named_accuracy": metrics["named"]["accuracy"],
            "defect_recall": metrics["at_bundle_threshold"].get("defect_recall"),
            "defect_recall_ci95": at.get("defect_recall_ci95"), "defect_images": at.get("defect_images"),
            "false_reject_rate_ci95": at.get("false_reject_rate_ci95"), "good_images": at.get("good_images"),
            "false_reject_rate": metrics["at_bundle_threshold"].get("false_reject_rate"),
            "uncertain_rate": metrics["at_bundle_threshold"].get("uncertain_rate"),
            "good_to_review_rate": metrics["at_bundle_threshold"].get("good_to_review_rate"),
            "defect_threshold": bundle.manifest.decision.defect_threshold,
            "uncertain_threshold": bundle.manifest.decision.uncertain_threshold,
            "roc_auc": metrics["binary"].get("roc_auc"),
        },
        "paths": {"bundle": str(bundle.path), "tarball": str(tarball) if tarball.is_file() else "",
                  "evaluation": str(paths.reports / EVALUATION_DIR), "config": str(paths.reports / "config.yaml"),
                  "checkpoints": str(paths.checkpoints)},
    }
    _write_json(paths.reports / "summary.json", summary)
    _track_outputs(tracker, cfg, summary, history, result, bundle, paths)
    return summary


def _track_outputs(tracker: tracking.Tracker, cfg: TrainConfig, summary: dict[str, Any],
                   history: list[dict[str, Any]], result: TrainResult, bundle: Bundle, paths: RunPaths) -> None:
    if not tracker.active:
        return
    tracker.log_epochs(history)
    if cfg.refit:
        tracker.log_epochs(result.history, prefix="refit_")
    figures = summary["evaluation"]
    values = {f"{figures['split']}_{k}": figures.get(k) for k in
              ("accuracy", "macro_f1", "roc_auc", "defect_recall", "false_reject_rate")}
    tracker.log_metrics({**values, "train_seconds": summary["train_seconds"],
                         "best_val_macro_f1": summary["best_val_macro_f1"]})
    track_bundle(tracker, cfg, summary, bundle, paths, ("config.yaml", "history.json", "summary.json"))


def track_bundle(tracker: tracking.Tracker, cfg: TrainConfig, summary: dict[str, Any], bundle: Bundle,
                 paths: RunPaths, reports: Sequence[str]) -> None:
    """The run's reports, evaluation and bundle as artefacts, the bundle registered; summary.json says where."""
    for name in reports:
        tracker.log_artifacts(paths.reports / name)
    tracker.log_artifacts(paths.reports / EVALUATION_DIR, EVALUATION_DIR)
    tracker.log_artifacts(bundle.path, "bundle")
    version = tracker.register(cfg.name, "bundle", f"qcsight bundle {bundle.manifest.version} ({cfg.arch})")
    tracker.set_tags({"qcsight.bundle_version": bundle.manifest.version,
                      "qcsight.registered_version": version or "", "qcsight.task": cfg.task})
    summary["tracking"] = {"run_id": tracker.run_id, "uri": tracker.target.uri if tracker.target else "",
                           "registered_model": cfg.name, "registered_version": version}
    _write_json(paths.reports / "summary.json", summary)
    log.info("tracked as MLflow run %s (model %s version %s)", tracker.run_id, cfg.name, version)


def export_into_place(model: torch.nn.Module, paths: RunPaths, export: Callable[..., Bundle], **kwargs: Any) -> Bundle:
    """export_bundle into output/bundle (+ output/model.tar.gz), or on SageMaker into SM_MODEL_DIR itself.

    export_bundle stages beside its target and renames into place; SM_MODEL_DIR may be a mount
    point that cannot be renamed over, so there the bundle is staged elsewhere and its files moved in.
    """
    from qcsight_core.bundle import load_bundle

    if not paths.bundle_at_root:
        return export(model, output_dir=paths.bundle, **kwargs)
    with tempfile.TemporaryDirectory(prefix="qcsight-bundle-") as tmp:
        staged = export(model, output_dir=Path(tmp) / BUNDLE_DIR, **kwargs)
        paths.output.mkdir(parents=True, exist_ok=True)
        for file in sorted(p for p in staged.path.rglob("*") if p.is_file()):
            target = paths.output / file.relative_to(staged.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(file), target)
    return load_bundle(paths.output)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False, default=float) + "\n", encoding="utf-8")
    tmp.replace(path)
