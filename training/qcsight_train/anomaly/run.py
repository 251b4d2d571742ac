"""A whole `qcsight train --task anomaly` run: data, the bank, export, evaluation, summary.

Writes what a classifier run writes, in the same places (qcsight_train.run.RunPaths): the
bundle (output/bundle and output/model.tar.gz, or SM_MODEL_DIR's root on SageMaker),
config.yaml, summary.json and evaluation/ (with overlays/). No gradient training: one
process, no checkpoints (a killed run starts again; it takes minutes).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from qcsight_core.bundle import load_bundle
from qcsight_core.errors import ConfigError
from qcsight_train import tracking
from qcsight_train.anomaly import features
from qcsight_train.anomaly.coreset import OVERSAMPLE, SELECTION_DIM
from qcsight_train.anomaly.data import AnomalySplits, dataset_root, load_anomaly_data, mask_path
from qcsight_train.anomaly.evaluate import LabelledImage, evaluate_anomaly_bundle
from qcsight_train.anomaly.export import AnomalyExportOptions, export_anomaly_bundle
from qcsight_train.anomaly.model import fit_bank
from qcsight_train.config import TrainConfig
from qcsight_train.run import (
    EVALUATION_DIR,
    RunPaths,
    calibration_paths,
    export_into_place,
    input_size,
    resolve_input_size,
    run_id_for,
    start_tracking,
    track_bundle,
)
from qcsight_train.sm_env import SageMakerEnv

log = logging.getLogger(__name__)

METHOD = ("memory bank of good patches (PatchCore-style): two mid-level feature maps, 3x3 average pooling, "
          "seeded random projection when wider than feature_dim, two-stage greedy k-center coreset, "
          "nearest-neighbour patch distance, image score = largest patch score")


def run(cfg: TrainConfig, sm: SageMakerEnv) -> dict[str, Any]:
    """Fit, export and evaluate one anomaly bundle; returns the summary (also written as summary.json)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("WORLD_SIZE", os.environ["WORLD_SIZE"],
                          "1: --task anomaly fits in one process (no gradients to share); run it without torchrun")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    paths = RunPaths.for_run(cfg, sm)
    run_id = run_id_for(cfg, paths.checkpoints)
    splits = load_anomaly_data(cfg, paths.cache)
    _log_splits(splits)
    cfg, sizing = resolve_input_size(cfg, splits.train, features.preprocess_spec(cfg.arch, 224, 224, cfg.resize))
    for note in cfg.adapted:
        log.info("adapted default: %s", note)
    cfg.save(paths.reports / "config.yaml")
    tracker = start_tracking(cfg, sm, paths, run_id, splits)
    try:
        summary = _fit_export_evaluate(cfg, splits, paths, run_id, sizing)
        _track(tracker, cfg, summary, paths)
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return summary


def _fit_export_evaluate(cfg: TrainConfig, splits: AnomalySplits, paths: RunPaths, run_id: str,
                         sizing: dict[str, Any]) -> dict[str, Any]:
    height, width = input_size(cfg)
    spec = features.preprocess_spec(cfg.arch, height, width, cfg.resize)
    embedding = features.create_embedding(cfg.arch, cfg.weights, cfg.feature_dim, cfg.seed)
    start = time.perf_counter()
    fit = fit_bank(embedding, [s.path for s in splits.train], spec, cfg.bank_size, seed=cfg.seed)
    train_seconds = time.perf_counter() - start
    described = describe(cfg, splits)
    options = AnomalyExportOptions(max_bundle_mb=cfg.max_bundle_mb, calibration_images=cfg.calibration_images,
                                   threshold_rule=cfg.threshold_rule, false_reject_rate=cfg.false_reject_rate,
                                   target_recall=cfg.target_recall, max_false_reject=cfg.max_false_reject,
                                   review_fraction=cfg.review_fraction, pack=not paths.bundle_at_root)
    start = time.perf_counter()
    bundle = export_into_place(
        embedding, paths, export_anomaly_bundle, fit=fit, spec=spec, architecture=cfg.arch, name=cfg.name,
        version=cfg.version or run_id, run_id=run_id, data_fingerprint=splits.fingerprint,
        validation=[(s.path, splits.is_defect(s)) for s in splits.val],
        calibration_paths=calibration_paths(splits.train, cfg.calibration_images), int8=cfg.int8,
        neo_onnx=cfg.neo_onnx,
        describe=described, config=cfg.to_dict(), options=options)
    export_seconds = time.perf_counter() - start
    held_out, split_name = (splits.test, "test") if splits.test else (splits.val, "val")
    root = dataset_root(cfg.data, paths.cache)
    by_path = {s.path: s for s in held_out}
    metrics = evaluate_anomaly_bundle(
        bundle, [LabelledImage(s.path, s.label, splits.is_defect(s)) for s in held_out],
        paths.reports / EVALUATION_DIR, masks=lambda p: mask_path(by_path[p], root))
    manifest = bundle.manifest
    bank = manifest.metrics["bank"]
    bundle_bytes = sum(p.stat().st_size for p in bundle.path.rglob("*") if p.is_file())
    summary = {
        "task": "anomaly", "run_id": run_id, "method": described,
        "train_seconds": train_seconds, "extract_seconds": fit.extract_seconds,
        "coreset_seconds": fit.coreset_seconds, "export_seconds": export_seconds,
        "splits": splits.counts(), "train_images": fit.images, "input_size": sizing,
        "bank": bank, "bundle_mib": bundle_bytes / 2**20, "bundle_bound_mib": cfg.max_bundle_mb,
        "models": [m.file for m in manifest.models if m.format == "onnx"],
        "threshold": manifest.metrics["threshold"], "int8": manifest.metrics["int8"],
        "neo_onnx": manifest.metrics.get("neo_onnx", {}),
        "evaluation": {"split": split_name, "images": metrics["images"], **metrics["image"],
                       "pixel_auroc": metrics["pixel"]["pixel_auroc"], "pro": metrics["pixel"]["pro"],
                       **{k: metrics["at_threshold"][k] for k in ("defect_recall", "precision", "f1",
                                                                  "false_reject_rate")}},
        "paths": {"bundle": str(bundle.path),
                  "tarball": str(paths.output / "model.tar.gz") if (paths.output / "model.tar.gz").is_file() else "",
                  "evaluation": str(paths.reports / EVALUATION_DIR), "config": str(paths.reports / "config.yaml")},
    }
    _write_json(paths.reports / "summary.json", summary)
    return summary


def _track(tracker: tracking.Tracker, cfg: TrainConfig, summary: dict[str, Any], paths: RunPaths) -> None:
    """The anomaly run's figures, reports and bundle in MLflow, as a classifier run's are."""
    if not tracker.active:
        return
    figures = summary["evaluation"]
    split = figures["split"]
    tracker.log_metrics({**{f"{split}_{k}": figures.get(k) for k in
                            ("auroc", "pixel_auroc", "pro", "defect_recall", "f1", "false_reject_rate")},
                         "train_seconds": summary["train_seconds"], "bank_size": summary["bank"].get("size"),
                         "bundle_mib": summary["bundle_mib"]})
    track_bundle(tracker, cfg, summary, load_bundle(summary["paths"]["bundle"]), paths, ("config.yaml",))


def describe(cfg: TrainConfig, splits: AnomalySplits) -> dict[str, Any]:
    """The method's settings, for the manifest's extra.anomaly and the summary."""
    spec = features.backbone(cfg.arch)
    width = sum(spec.channels)
    return {"method": METHOD, "backbone": cfg.arch, "weights": cfg.weights, "layers": list(spec.layers),
            "channels": list(spec.channels), "pooling": f"{features.POOL_SIZE}x{features.POOL_SIZE} average",
            "feature_dim": min(width, cfg.feature_dim), "projection": "seeded Gaussian" if width > cfg.feature_dim
            else "none (already narrower)", "coreset": f"two-stage greedy k-center, selection dims {SELECTION_DIM}, "
            f"oversample {OVERSAMPLE}", "bank_size_requested": cfg.bank_size, "seed": cfg.seed,
            "image_score": "max patch score", "trained_on": list(splits.good_classes),
            "evaluated_against": list(splits.defect_classes)}


def _log_splits(splits: AnomalySplits) -> None:
    for name, per_class in splits.counts().items():
        log.info("%s: %d images (%s)", name, sum(per_class.values()),
                 ", ".join(f"{c} {n}" for c, n in per_class.items()))
    log.info("fitted on %s; defects (threshold and evaluation only): %s; data fingerprint %s",
             ", ".join(splits.good_classes), ", ".join(splits.defect_classes) or "none", splits.fingerprint[:16])


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False, default=float) + "\n", encoding="utf-8")
    tmp.replace(path)


def print_summary(summary: Mapping[str, Any]) -> None:
    """The CLI's closing lines for an anomaly run."""
    paths, figures, bank = summary["paths"], summary["evaluation"], summary["bank"]
    threshold = summary["threshold"]
    print(f"bundle:      {paths['bundle']} ({', '.join(summary['models'])}; {summary['bundle_mib']:.1f} MiB, "
          f"bound {summary['bundle_bound_mib']:g} MiB)")
    if paths.get("tarball"):
        print(f"model.tar.gz {paths['tarball']}")
    print(f"bank:        {bank['size']} patches x {bank['dim']} dims ({bank['dtype']}) of {bank['training_patches']} "
          f"training patches; fitted in {summary['train_seconds']:.0f} s on {summary['train_images']} good images")
    print(f"threshold:   raw {threshold['raw_threshold']:.4g} = 1.0 ({threshold['rule']})")
    print(f"evaluation:  {paths['evaluation']} ({figures['split']} split, {figures['images']} images)")
    print(f"  image AUROC {_fmt(figures['auroc'])}, pixel AUROC {_fmt(figures['pixel_auroc'])}, "
          f"PRO {_fmt(figures['pro'])}")
    print(f"  at 1.0: defect recall {_fmt(figures['defect_recall'])}, F1 {_fmt(figures['f1'])}, "
          f"good parts rejected {_fmt(figures['false_reject_rate'])}")
    print(f"config:      {paths['config']}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
