"""Training data: sources (local or s3://) to train/val/test splits, and the torch Dataset and samplers.

The per-image path is qcsight_core.imageio.read_image -> qcsight_core.preprocess.prepare_pixels
(uint8 at model size) -> augmentation (train only) -> qcsight_core.preprocess.normalize, so the
pixels a model is trained and measured on are the ones the device computes.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from qcsight_aws.errors import AwsError
from qcsight_aws.s3 import S3Uri, download_prefix
from qcsight_core.errors import ConfigError, DataError
from qcsight_core.imageio import read_image
from qcsight_core.preprocess import PreprocessSpec, normalize, prepare_pixels
from qcsight_data.dataset import DatasetIndex, Sample, fingerprint, load_index, split_index
from qcsight_train.augment import Augment
from qcsight_train.config import GOOD_NAMES, NO_GOOD, TrainConfig

log = logging.getLogger(__name__)

INDEX_NAMES = ("index.csv",)
MANIFEST_GLOBS = ("*.manifest", "*.jsonl")


@dataclass(frozen=True)
class Splits:
    """The samples of one run, split, with the class list the model's outputs follow.

    Attributes:
        train: training samples.
        val: validation samples (model selection, thresholds).
        test: held-out samples for the final evaluation; may be empty.
        classes: class names in output order.
        fingerprint: sha256 of the dataset (qcsight_data.dataset.fingerprint).
        source: where the data came from.
    """

    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    test: tuple[Sample, ...]
    classes: tuple[str, ...]
    fingerprint: str
    source: str

    def counts(self) -> dict[str, dict[str, int]]:
        result = {}
        for name, samples in (("train", self.train), ("val", self.val), ("test", self.test)):
            per_class = Counter(s.label for s in samples)
            result[name] = {c: per_class.get(c, 0) for c in self.classes}
        return result


def resolve_source(source: str, cache_dir: Path) -> tuple[Path, Path | None]:
    """A --data value to a local path that load_index reads, and the image root for manifests.

    s3:// prefixes are downloaded first; a directory holding index.csv or one manifest (as a
    SageMaker channel does) means that file.
    """
    path = fetch_s3(source, cache_dir) if source.startswith("s3://") else Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such dataset directory or file")
    if path.is_dir():
        for name in INDEX_NAMES:
            if (path / name).is_file():
                return path / name, None
        manifests = sorted(m for pattern in MANIFEST_GLOBS for m in path.glob(pattern))
        if len(manifests) == 1 and not any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
            return manifests[0], path
    return path, None


def fetch_s3(uri: str, cache_dir: Path) -> Path:
    """Download s3://bucket/prefix (a folder, or a CSV/manifest and the folder it sits in) into cache_dir.

    Objects already present with the same size are not fetched again, so a resumed run is cheap.
    Returns the local path standing for the URI.
    """
    import boto3  # only runs that read s3:// need it

    location = S3Uri.parse(uri, "data", allowed="s3://bucket/prefix", legacy_bucket=True)
    key = location.key
    is_file = bool(key) and not key.endswith("/") and Path(key).suffix.lower() in (".csv", ".manifest", ".jsonl")
    folder = S3Uri(location.bucket, key.rsplit("/", 1)[0] if is_file and "/" in key else ("" if is_file else key))
    local_root = cache_dir / location.bucket / folder.prefix
    try:
        download_prefix(boto3.client("s3"), folder, local_root)
    except AwsError as exc:
        raise DataError(f"{uri}: cannot download ({exc})") from exc
    result = local_root / key[len(folder.prefix):] if is_file else local_root
    if not result.exists():
        raise DataError(f"{uri}: no objects under this prefix")
    return result


def _load(source: str, cache_dir: Path, groups: str | None) -> DatasetIndex:
    path, image_root = resolve_source(source, cache_dir)
    groups_path = None
    if groups:
        groups_path = Path(groups)
        if not groups_path.is_absolute() and not groups_path.exists() and path.is_dir():
            groups_path = path / groups  # a groups CSV shipped inside a SageMaker channel
    index = load_index(path, groups=groups_path, image_root=image_root)
    if index.skipped:
        shown = "; ".join(f"{s.path}: {s.reason}" for s in index.skipped[:3])
        log.warning("%s: skipped %d unusable file(s): %s%s", source, len(index.skipped), shown,
                    " ..." if len(index.skipped) > 3 else "")
    if not index.samples:
        raise DataError(f"{source}: no usable labelled images")
    return index


def load_data(cfg: TrainConfig, cache_dir: Path) -> Splits:
    """Load and split the configured sources.

    Without separate validation/test sources, the data is split by near-duplicate group and
    class (qcsight_data.dataset.split_index); preset splits in a CSV are kept.

    Raises:
        DataError: a source is unreadable or a split lacks samples or classes.
    """
    index = _load(cfg.data, cache_dir, cfg.groups or None)
    extra_val = _load(cfg.validation, cache_dir, None) if cfg.validation else None
    extra_test = _load(cfg.test, cache_dir, None) if cfg.test else None
    classes = index.classes
    for name, other in (("validation", extra_val), ("test", extra_test)):
        if other is not None and not set(other.classes) <= set(classes):
            unknown = sorted(set(other.classes) - set(classes))
            raise DataError(f"{getattr(cfg, name)}: {name} classes {unknown} do not occur in the training data")
    val_fraction = 0.0 if extra_val is not None else cfg.val_fraction
    test_fraction = 0.0 if extra_test is not None else cfg.test_fraction
    if (val_fraction or test_fraction) and not all(s.split for s in index.samples):
        index = split_index(index, val=val_fraction, test=test_fraction, seed=cfg.seed)
    train = tuple(s for s in index.samples if s.split in ("", "train"))
    val = extra_val.samples if extra_val is not None else _of(index, "val")
    test = extra_test.samples if extra_test is not None else _of(index, "test")
    splits = Splits(train, val, test, classes, fingerprint(index), cfg.data)
    _check(splits)
    return splits


def _of(index: DatasetIndex, split: str) -> tuple[Sample, ...]:
    return tuple(s for s in index.samples if s.split == split)


def _check(splits: Splits) -> None:
    if len(splits.classes) < 2:
        raise DataError(f"{splits.source}: at least two classes are needed, found {list(splits.classes)}")
    if not splits.val:
        raise DataError(f"{splits.source}: the validation split is empty; add data or raise --val-fraction")
    counts = splits.counts()
    missing = [c for c, n in counts["train"].items() if n == 0]
    if missing:
        raise DataError(f"{splits.source}: classes {missing} have no training images")
    for name in ("val", "test"):
        absent = [c for c, n in counts[name].items() if n == 0]
        if absent and (name == "val" or splits.test):
            log.warning("%s split has no images of %s; its per-class figures for them are undefined", name, absent)


def defect_classes(cfg: TrainConfig, classes: Sequence[str]) -> tuple[str, ...]:
    """Which classes are defects: configured, or every class but the one(s) named like good/ok/free.

    `--good-classes none` (when no class is literally named "none") makes every class a defect
    type: a model that sorts defects already found, whose verdict is always a defect named by class.
    A dataset with no class named like a good one is not taken for such a set silently: the user
    confirms it with --good-classes none, or names the good class.
    """
    if cfg.no_good_class and NO_GOOD not in classes:
        log.info("--good-classes none: all %d classes are defect types; every verdict names one of them",
                 len(classes))
        return tuple(classes)
    if cfg.defect_classes:
        unknown = [c for c in cfg.defect_classes if c not in classes]
        if unknown:
            raise ConfigError("defect_classes", list(cfg.defect_classes), f"names among {list(classes)}")
        chosen = tuple(c for c in classes if c in cfg.defect_classes)
        if len(chosen) == len(classes):
            raise ConfigError("defect_classes", list(chosen), "fewer than all classes: to make every class a defect "
                              "type, pass --good-classes none instead")
    else:
        good = cfg.good_classes or tuple(c for c in classes if c.lower() in GOOD_NAMES)
        unknown = [c for c in good if c not in classes]
        if unknown:
            raise ConfigError("good_classes", list(good), f"names among {list(classes)}, or none")
        if not good:
            raise ConfigError("good_classes", [], f"which of {list(classes)} are not defects: no class is named like "
                              f"a good one ({', '.join(GOOD_NAMES)}). Name it with --good-classes NAME, or, if "
                              "every class is a defect type (sorting defects already found), confirm with "
                              "--good-classes none")
        chosen = tuple(c for c in classes if c not in good)
    if not chosen:
        raise ConfigError("good_classes", list(cfg.good_classes), f"fewer than all classes: no defect class is left "
                          f"among {list(classes)}")
    return chosen


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one image in one epoch: independent of workers, ranks and resumption."""
    return zlib.crc32(f"{seed}:{epoch}:{index}".encode())


class ImageDataset(Dataset[tuple[torch.Tensor, int, int]]):
    """Labelled images through the qcsight_core preprocessing path; yields (CHW float32, label, index)."""

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str], spec: PreprocessSpec,
                 augment: Augment | None = None, seed: int = 0) -> None:
        self.samples = tuple(samples)
        self.class_index = {name: i for i, name in enumerate(classes)}
        self.labels = [self.class_index[s.label] for s in self.samples]
        self.spec = spec
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating; workers get a copy of the dataset, epoch included, per iterator."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        sample = self.samples[index]
        pixels = prepare_pixels(read_image(sample.path), self.spec)
        if self.augment is not None:
            pixels = self.augment(pixels, sample_seed(self.seed, self.epoch, index))
        return torch.from_numpy(normalize(pixels, self.spec)), self.labels[index], index


def class_weights(labels: Sequence[int], num_classes: int, power: float) -> torch.Tensor:
    """(median count / class count) ** power, scaled so that the average sample weight is 1."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise DataError(f"class(es) {np.flatnonzero(counts == 0).tolist()} have no training samples")
    weights = (np.median(counts) / counts) ** power
    weights *= counts.sum() / (counts * weights).sum()
    return torch.tensor(weights, dtype=torch.float32)


class WeightedShardSampler(Sampler[int]):
    """Class-balanced sampling with replacement, the same draw on every rank, each rank taking its shard.

    Per epoch it draws ceil(N / world) * world indices (seeded by seed and epoch) and rank r
    takes every world-th from r, so ranks see disjoint draws of equal length.
    """

    def __init__(self, labels: Sequence[int], weights: torch.Tensor, *, rank: int, world_size: int,
                 seed: int) -> None:
        self.sample_weights = weights[torch.as_tensor(list(labels), dtype=torch.long)].double()
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.per_rank = math.ceil(len(labels) / world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        draw = torch.multinomial(self.sample_weights, self.per_rank * self.world_size, True, generator=generator)
        return iter(draw[self.rank :: self.world_size].tolist())


class ShardSampler(Sampler[int]):
    """Evaluation sharding without padding: rank r gets indices r, r + world, ... (each image counted once)."""

    def __init__(self, size: int, *, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, size, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
