"""Anomaly data: good images to fit on, good and defect images to choose the threshold and to evaluate.

DIR/<good> is required (found by name as for classifiers, or --good-classes); every other
class folder holds defects, which are never fitted: they go to validation (threshold by
defect recall, the INT8 gate) and test (evaluation). The split is the classifiers' own
(qcsight_data.dataset.split_index: by near-duplicate group, stratified by class, seeded);
then every group holding a defect that split_index put into train moves, whole, to
validation or test (seeded per group, in the val:test proportion), so a near-duplicate of an
evaluated image is never in the bank, and a defect image is never fitted.

Reviewed alert images (--reviewed) that operators called false alarms are good parts: they join
the fitted images; the confirmed defects among them are not fitted (and not evaluated, as they
are not part of the frozen split).

Masks: DATA/masks/<class>/<stem>.<png|jpg|...> (what `qcsight data synth` writes and the
magnetic-tile set ships); a defect image without one is left out of the pixel metrics.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from qcsight_core.errors import ConfigError, DataError
from qcsight_core.imageio import is_image_path
from qcsight_data.dataset import MASKS_DIR, DatasetIndex, Sample, fingerprint, load_index, split_index
from qcsight_train.config import GOOD_NAMES, TrainConfig
from qcsight_train.data import load_reviewed, resolve_source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnomalySplits:
    """The images of one anomaly run.

    Attributes:
        train: good images only: the bank is fitted on them.
        val: good images (threshold at a false-reject rate) and defects (threshold by recall, INT8 gate).
        test: good and defect images for the evaluation; may be empty.
        good_classes: the class names that are good.
        defect_classes: the class names that are defects (may be empty: good images only).
        fingerprint: sha256 of the dataset (qcsight_data.dataset.fingerprint).
        source: where the data came from.
        unused_defects: defect images a preset split put into train: not fitted, not evaluated.
    """

    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    test: tuple[Sample, ...]
    good_classes: tuple[str, ...]
    defect_classes: tuple[str, ...]
    fingerprint: str
    source: str
    unused_defects: int = 0

    def is_defect(self, sample: Sample) -> bool:
        return sample.label not in self.good_classes

    def counts(self) -> dict[str, dict[str, int]]:
        classes = (*self.good_classes, *self.defect_classes)
        return {name: {c: Counter(s.label for s in samples).get(c, 0) for c in classes}
                for name, samples in (("train", self.train), ("val", self.val), ("test", self.test))}


def good_classes(cfg: TrainConfig, classes: Sequence[str]) -> tuple[str, ...]:
    """The good classes: --good-classes, else the complement of --defect-classes, else the ones named like good."""
    if cfg.defect_classes:
        unknown = [c for c in cfg.defect_classes if c not in classes]
        if unknown:
            raise ConfigError("defect_classes", list(cfg.defect_classes), f"names among {list(classes)}")
        chosen = tuple(c for c in classes if c not in cfg.defect_classes)
    else:
        chosen = cfg.good_classes or tuple(c for c in classes if c.lower() in GOOD_NAMES)
        unknown = [c for c in chosen if c not in classes]
        if unknown:
            raise ConfigError("good_classes", list(chosen), f"names among {list(classes)}")
    if not chosen:
        raise ConfigError("good_classes", [], f"the class folder of good parts among {list(classes)} "
                          f"(DATA/good, or --good-classes NAME): --task anomaly fits on good images only")
    return chosen


def _load(source: str, cache_dir: Path, groups: str | None) -> DatasetIndex:
    path, image_root = resolve_source(source, cache_dir)
    groups_path = Path(groups) if groups else None
    if groups_path is not None and not groups_path.is_absolute() and not groups_path.exists() and path.is_dir():
        groups_path = path / groups_path  # a groups CSV shipped inside a SageMaker channel
    index = load_index(path, groups=groups_path, image_root=image_root)
    if index.skipped:
        log.warning("%s: skipped %d unusable file(s), first %s: %s", source, len(index.skipped),
                    index.skipped[0].path, index.skipped[0].reason)
    if not index.samples:
        raise DataError(f"{source}: no usable images")
    return index


def _move_defect_groups(index: DatasetIndex, good: tuple[str, ...], val: float, test: float,
                        seed: int) -> DatasetIndex:
    """Groups in train that hold a defect go, whole, to val or test (seeded per group, val:test odds)."""
    flagged = {s.group for s in index.samples if s.split == "train" and s.label not in good}
    if not flagged:
        return index
    share_val = val / (val + test) if val + test > 0 else 1.0

    def target(group: str) -> str:
        draw = zlib.crc32(f"{seed}:{group}".encode()) / 2**32
        return "val" if draw < share_val else "test"

    samples = tuple(replace(s, split=target(s.group)) if s.group in flagged else s for s in index.samples)
    moved = sum(1 for s in index.samples if s.group in flagged)
    log.info("%d defect-holding group(s) (%d images) moved from train to val/test: defects are never fitted",
             len(flagged), moved)
    return replace(index, samples=samples)


def load_anomaly_data(cfg: TrainConfig, cache_dir: Path) -> AnomalySplits:
    """Load, split and check the data of an anomaly run (see the module docstring).

    Raises:
        ConfigError: no good class can be found.
        DataError: a source is unreadable, or there are no good images to fit or to validate on.
    """
    index = _load(cfg.data, cache_dir, cfg.groups or None)
    extra_val = _load(cfg.validation, cache_dir, None) if cfg.validation else None
    extra_test = _load(cfg.test, cache_dir, None) if cfg.test else None
    classes = sorted({*index.classes, *(extra_val.classes if extra_val else ()),
                      *(extra_test.classes if extra_test else ())})
    good = good_classes(cfg, classes)
    val_fraction = 0.0 if extra_val is not None else cfg.val_fraction
    test_fraction = 0.0 if extra_test is not None else cfg.test_fraction
    if (val_fraction or test_fraction) and not all(s.split for s in index.samples):
        index = split_index(index, val=val_fraction, test=test_fraction, seed=cfg.seed)
        index = _move_defect_groups(index, good, val_fraction, test_fraction, cfg.seed)
    in_train = [s for s in index.samples if s.split in ("", "train")]
    train = tuple(s for s in in_train if s.label in good)
    unused = len(in_train) - len(train)
    if unused:
        log.warning("%d defect image(s) are preset to the train split: they are neither fitted nor evaluated", unused)
    val = extra_val.samples if extra_val is not None else tuple(s for s in index.samples if s.split == "val")
    test = extra_test.samples if extra_test is not None else tuple(s for s in index.samples if s.split == "test")
    reviewed = load_reviewed(cfg.reviewed, cache_dir, classes, (*val, *test)) if cfg.reviewed else ()
    fitted = tuple(s for s in reviewed if s.label in good)
    if len(fitted) < len(reviewed):
        log.info("%d reviewed defect image(s) are not fitted: the bank holds good parts only",
                 len(reviewed) - len(fitted))
    splits = AnomalySplits((*train, *fitted), val, test, good, tuple(c for c in classes if c not in good),
                           fingerprint(replace(index, samples=(*index.samples, *fitted))), cfg.data, unused)
    if not splits.train:
        raise DataError(f"{cfg.data}: no good images to fit on (classes {list(good)} in the train split)")
    if not any(s.label in good for s in splits.val):
        raise DataError(f"{cfg.data}: the validation split holds no good image; the threshold is chosen on held-out "
                        "good images: add data or raise --val-fraction")
    return splits


def mask_path(sample: Sample, dataset_root: Path) -> Path | None:
    """The defect mask of a sample, DATA/masks/<class>/<stem>.*, or None when there is none."""
    folder = dataset_root / MASKS_DIR / sample.label
    stem = Path(sample.path).stem
    if not folder.is_dir():
        return None
    for candidate in sorted(folder.glob(f"{stem}.*")):
        if candidate.is_file() and is_image_path(candidate):
            return candidate
    return None


def dataset_root(source: str, cache_dir: Path) -> Path:
    """The folder that holds the class folders (and masks/) of a --data source."""
    path, image_root = resolve_source(source, cache_dir)
    if image_root is not None:
        return image_root
    return path if path.is_dir() else path.parent
