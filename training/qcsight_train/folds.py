"""Scores to choose thresholds on when the exported model's validation scores will not do.

Two cases: `--refit` (the exported model has trained on validation, so its validation scores
are optimistic: the selection model's are used, scored before the refit), and
`--threshold-source oof` (validation holds too few defects for a recall target: k models, each
trained on k-1 folds of train+validation, score the fold they did not see, so every defect
image counts once). Folds keep near-duplicate groups whole and are stratified by class.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from qcsight_core.preprocess import PreprocessSpec
from qcsight_data.dataset import Sample
from qcsight_train import checkpoint
from qcsight_train.config import TrainConfig
from qcsight_train.data import ImageDataset, Splits
from qcsight_train.distributed import DistInfo
from qcsight_train.export import ThresholdScores
from qcsight_train.models import create_model

log = logging.getLogger(__name__)


def assign_folds(samples: Sequence[Sample], folds: int, seed: int) -> list[int]:
    """A fold (0..folds-1) per sample: whole near-duplicate groups, stratified by each group's rarest class.

    Within a stratum the groups are shuffled (seeded per stratum, as the split is) and each goes
    to the fold holding the fewest of that stratum's images so far, so every class with at least
    `folds` groups appears in every fold.
    """
    members: dict[str, list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        members[sample.group].append(i)
    frequency = Counter(s.label for s in samples)
    strata: dict[str, list[str]] = defaultdict(list)
    for group in sorted(members):
        rarest = min({samples[i].label for i in members[group]}, key=lambda label: (frequency[label], label))
        strata[rarest].append(group)
    fold_of = [0] * len(samples)
    for stratum, groups in sorted(strata.items()):
        rng = np.random.default_rng([seed, zlib.crc32(stratum.encode("utf-8"))])
        load = [0] * folds
        for position in rng.permutation(len(groups)):
            group = groups[int(position)]
            target = min(range(folds), key=lambda k: (load[k], k))
            load[target] += len(members[group])
            for i in members[group]:
                fold_of[i] = target
    return fold_of


def predict(model: torch.nn.Module, samples: Sequence[Sample], classes: Sequence[str], spec: PreprocessSpec,
            batch_size: int, workers: int) -> np.ndarray:
    """Class probabilities (NxK, float64) through the evaluation preprocessing (qcsight_core, no augmentation)."""
    dataset = ImageDataset(samples, classes, spec)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    model.eval()
    chunks = []
    with torch.inference_mode():
        for images, _, _ in loader:
            chunks.append(torch.softmax(model(images).float(), dim=1).double().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, len(classes)))


def load_weights(cfg: TrainConfig, num_classes: int, path: Path) -> torch.nn.Module:
    payload = checkpoint.load(path)
    if payload is None:
        raise checkpoint.CheckpointError(f"{path}: no weights were saved")
    model = create_model(cfg.arch, num_classes, "none")
    model.load_state_dict(payload["model"])
    return model.eval()


def selection_scores(cfg: TrainConfig, splits: Splits, spec: PreprocessSpec, best_path: Path,
                     best_epoch: int) -> ThresholdScores:
    """The selection model's validation probabilities, kept before a refit trains on validation."""
    model = load_weights(cfg, len(splits.classes), best_path)
    probs = predict(model, splits.val, splits.classes, spec, cfg.batch_size * 2, cfg.workers)
    return ThresholdScores(tuple(s.label for s in splits.val), probs,
                           f"validation scores of the selection model (epoch {best_epoch}), before the refit on "
                           "train+validation")


def fold_config(cfg: TrainConfig, epochs: int) -> TrainConfig:
    """cfg for a run of `epochs` epochs that keeps its last weights (refit, folds), its schedule fitted to them."""
    freeze = min(cfg.freeze_epochs, epochs - 1) if epochs > 1 else 0
    warmup = min(cfg.warmup_epochs, epochs / 2)
    return dataclasses.replace(cfg, epochs=epochs, freeze_epochs=freeze, warmup_epochs=warmup, select="last")


def out_of_fold_scores(cfg: TrainConfig, splits: Splits, info: DistInfo, directory: Path, epochs: int,
                       spec: PreprocessSpec) -> ThresholdScores | None:
    """Train cfg.threshold_folds models on train+validation minus one fold each; score each held-out fold.

    Every rank trains; rank 0 scores and returns the scores (None on the other ranks).
    """
    from qcsight_train.trainer import fit

    pool = (*splits.train, *splits.val)
    folds = assign_folds(pool, cfg.threshold_folds, cfg.seed)
    probs = np.zeros((len(pool), len(splits.classes)))
    fold_cfg = fold_config(cfg, epochs)
    for k in range(cfg.threshold_folds):
        held = tuple(s for s, f in zip(pool, folds, strict=True) if f == k)
        rest = tuple(s for s, f in zip(pool, folds, strict=True) if f != k)
        missing = set(splits.classes) - {s.label for s in rest}
        if not held or missing:
            log.warning("fold %d of %d skipped: %s", k + 1, cfg.threshold_folds,
                        "it is empty" if not held else f"the other folds lack {sorted(missing)}")
            continue
        log.info("out-of-fold thresholds: fold %d of %d (%d images held out, %d epochs)", k + 1,
                 cfg.threshold_folds, len(held), epochs)
        result = fit(fold_cfg, dataclasses.replace(splits, train=rest, val=held, test=()), info,
                     directory / f"fold{k + 1}", log_as="fold")
        if info.is_main:
            model = load_weights(cfg, len(splits.classes), result.best_path)
            rows = [i for i, f in enumerate(folds) if f == k]
            probs[rows] = predict(model, held, splits.classes, spec, cfg.batch_size * 2, cfg.workers)
    if not info.is_main:
        return None
    scored = [i for i in range(len(pool)) if probs[i].sum() > 0]
    return ThresholdScores(tuple(pool[i].label for i in scored), probs[scored],
                           f"out-of-fold scores: {cfg.threshold_folds} models of {epochs} epochs, each scoring the "
                           f"fold of train+validation it did not train on ({len(scored)} images)")
