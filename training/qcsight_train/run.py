"""A whole `qcsight train` run on one rank: data, the epoch loop, then (rank 0) export, evaluation, outputs.

Files (rank 0 only): output/bundle/ and output/model.tar.gz locally; on SageMaker the bundle's
files at the root of SM_MODEL_DIR (SageMaker packs that directory as model.tar.gz).
config.yaml, history.json, summary.json and evaluation/ go beside the bundle locally, or into
SM_OUTPUT_DATA_DIR on SageMaker; checkpoints into checkpoint_dir.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from qcsight_core.bundle import Bundle
from qcsight_data.dataset import Sample
from qcsight_train.config import TrainConfig
from qcsight_train.data import Splits, defect_classes, load_data, resolve_source
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


def run(cfg: TrainConfig, sm: SageMakerEnv, info: DistInfo | None = None) -> dict[str, Any] | None:
    """Train, and on rank 0 export and evaluate; returns rank 0's summary (None on other ranks)."""
    info = info or init_distributed()
    if not info.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # one voice in the log: rank 0's
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        paths = RunPaths.for_run(cfg, sm)
        run_id = broadcast(info, run_id_for(cfg, paths.checkpoints))
        splits = _load_splits(cfg, info, paths)
        defects = defect_classes(cfg, splits.classes)
        if info.is_main:
            paths.checkpoints.mkdir(parents=True, exist_ok=True)
            (paths.checkpoints / RUN_ID_FILE).write_text(run_id + "\n", encoding="utf-8")
            cfg.save(paths.reports / "config.yaml")
            _log_splits(splits, defects)
        barrier(info)
        start = time.perf_counter()
        result = fit(cfg, splits, info, paths.checkpoints)
        train_seconds = time.perf_counter() - start
    finally:
        shutdown(info)
    if not info.is_main:
        return None
    return finish(cfg, splits, defects, result, paths, run_id, train_seconds)


def _load_splits(cfg: TrainConfig, info: DistInfo, paths: RunPaths) -> Splits:
    """Rank 0 indexes and splits (decoding every image once); the others receive its result."""
    if info.local_rank == 0:
        for source in (cfg.data, cfg.validation, cfg.test):
            if source.startswith("s3://"):
                resolve_source(source, paths.cache)  # every host needs the files, not only rank 0's
    barrier(info)
    splits = load_data(cfg, paths.cache) if info.is_main else None
    result: Splits = broadcast(info, splits)
    return result


def _log_splits(splits: Splits, defects: tuple[str, ...]) -> None:
    for name, per_class in splits.counts().items():
        log.info("%s: %d images (%s)", name, sum(per_class.values()),
                 ", ".join(f"{c} {n}" for c, n in per_class.items()))
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


def finish(cfg: TrainConfig, splits: Splits, defects: tuple[str, ...], result: TrainResult, paths: RunPaths,
           run_id: str, train_seconds: float) -> dict[str, Any]:
    """Export the best weights as a bundle, evaluate it through the device path, write the summary."""
    from qcsight_train import checkpoint
    from qcsight_train.evaluate import evaluate_bundle
    from qcsight_train.export import ExportOptions, export_bundle

    best = checkpoint.load(result.best_path)
    if best is None:
        raise checkpoint.CheckpointError(f"{result.best_path}: no best weights were saved")
    model = create_model(cfg.arch, len(splits.classes), "none")
    model.load_state_dict(best["model"])
    model.eval()
    spec = preprocess_spec(cfg.arch, cfg.img_size, cfg.resize)
    history = list(result.history)
    _write_json(paths.reports / "history.json", history)
    start = time.perf_counter()
    bundle = _export(model, paths, export_bundle, spec=spec, classes=splits.classes, defect_classes=defects,
                     architecture=cfg.arch, name=cfg.name, version=cfg.version or run_id, run_id=run_id,
                     data_fingerprint=splits.fingerprint,
                     calibration_paths=calibration_paths(splits.train, cfg.calibration_images),
                     validation=[(s.path, s.label) for s in splits.val], target_defect_recall=cfg.target_recall,
                     int8=cfg.int8, torchscript=cfg.torchscript, config=cfg.to_dict(),
                     options=ExportOptions(review_fraction=cfg.review_fraction, pack=not paths.bundle_at_root))
    export_seconds = time.perf_counter() - start
    held_out, split_name = (splits.test, "test") if splits.test else (splits.val, "val")
    metrics = evaluate_bundle(bundle, held_out, paths.reports / EVALUATION_DIR, target_defect_recall=cfg.target_recall)
    tarball = paths.output / "model.tar.gz"
    summary = {
        "run_id": run_id,
        "epochs": result.epochs, "resumed_from": result.resumed_from, "world_size": result.world_size,
        "best_epoch": result.best_epoch, "best_val_macro_f1": result.best_macro_f1,
        "train_seconds": train_seconds, "export_seconds": export_seconds,
        "images_per_s": _mean([h["images_per_s"] for h in history if h["phase"] == "full"]),
        "per_rank_images": history[-1]["per_rank_images"] if history else [],
        "splits": {name: dict(Counter(s.label for s in samples)) for name, samples in
                   (("train", splits.train), ("val", splits.val), ("test", splits.test))},
        "evaluation": {
            "split": split_name, "images": metrics["images"],
            "accuracy": metrics["classification"]["accuracy"], "macro_f1": metrics["classification"]["macro_f1"],
            "per_class_f1": {name: v["f1"] for name, v in metrics["classification"]["per_class"].items()},
            "named_accuracy": metrics["named"]["accuracy"],
            "defect_recall": metrics["at_bundle_threshold"].get("defect_recall"),
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
    return summary


def _export(model: torch.nn.Module, paths: RunPaths, export: Callable[..., Bundle], **kwargs: Any) -> Bundle:
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
