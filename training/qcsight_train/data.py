"""Training data: sources (local or s3://) to train/val/test splits, and the torch Dataset and samplers.

Reviewed alert images (``--reviewed``, SageMaker's ``reviewed`` channel: a qcsight_core.review_manifest)
join the training split only, after the base data is split, so the base data's validation and test
sets are the ones a run without them gets; images the manifest names by s3:// URI are downloaded
into the data cache (the training role reads the images bucket).

The per-image path is qcsight_core.imageio.read_image -> qcsight_core.preprocess.prepare_pixels
(uint8 at model size) -> augmentation (train only) -> qcsight_core.preprocess.normalize, so the
pixels a model is trained and measured on are the ones the device computes.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from qcsight_aws.errors import AwsError
from qcsight_aws.s3 import S3Uri, download_file, download_prefix
from qcsight_core.bundle import sha256_file
from qcsight_core.errors import ConfigError, DataError, ImageError
from qcsight_core.imageio import read_image
from qcsight_core.preprocess import PreprocessSpec, normalize, prepare_pixels
from qcsight_core.review_manifest import SUFFIX as REVIEWED_SUFFIX
from qcsight_core.review_manifest import ReviewedImage, read_numbered
from qcsight_data.dataset import DatasetIndex, Sample, fingerprint, load_index, split_index
from qcsight_train.augment import Augment
from qcsight_train.config import GOOD_NAMES, NO_GOOD, TrainConfig

log = logging.getLogger(__name__)

INDEX_NAMES = ("index.csv",)
MANIFEST_GLOBS = ("*.manifest", "*.jsonl")
REVIEWED_CACHE = "reviewed"


@dataclass(frozen=True)
class Splits:
    """The samples of one run, split, with the class list the model's outputs follow.

    Attributes:
        train: training samples.
        val: validation samples (model selection, thresholds).
        test: held-out samples for the final evaluation; may be empty.
        classes: class names in output order.
        fingerprint: sha256 of the dataset (qcsight_data.dataset.fingerprint), reviewed images included.
        source: where the data came from.
        reviewed: the reviewed alert images among train (each its own group).
    """

    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    test: tuple[Sample, ...]
    classes: tuple[str, ...]
    fingerprint: str
    source: str
    reviewed: tuple[Sample, ...] = ()

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
    reviewed = load_reviewed(cfg.reviewed, cache_dir, classes, (*val, *test)) if cfg.reviewed else ()
    everything = replace(index, samples=(*index.samples, *reviewed))
    splits = Splits((*train, *reviewed), val, test, classes, fingerprint(everything), cfg.data, reviewed)
    _check(splits)
    return splits


def reviewed_manifests(source: str, cache_dir: Path) -> list[Path]:
    """The manifest file(s) a --reviewed value names: a file, a folder of them (a SageMaker channel), or s3://.

    Raises:
        DataError: nothing there, or a folder without a .manifest file.
    """
    path = _fetch_object(source, cache_dir / REVIEWED_CACHE, "reviewed") if source.startswith("s3://") else Path(source)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{source}: no such reviewed-image manifest (file or folder)")
    found = sorted(p for p in path.rglob(f"*{REVIEWED_SUFFIX}") if p.is_file() and not p.name.startswith("."))
    if not found:
        files = sorted(p.name for p in path.iterdir())[:5]
        raise DataError(f"{source}: no *{REVIEWED_SUFFIX} file in the reviewed-image folder (it holds {files})")
    return found


def load_reviewed(source: str, cache_dir: Path, classes: Sequence[str],
                  held_out: Sequence[Sample] = ()) -> tuple[Sample, ...]:
    """The reviewed images of a manifest as training samples, each image its own group, split "train".

    Images named by s3:// URI are downloaded into cache_dir/reviewed/<bucket>/<key> (kept for a
    resumed run). An image that is byte for byte one of ``held_out`` (validation or test) is left out
    with a warning: training on it would leak into the figures the model is chosen and judged by.

    Raises:
        DataError: a malformed line, an image that is missing or cannot be decoded, a class the base
            data does not have, or one image listed twice with different classes (each named).
    """
    known = set(classes)
    chosen: dict[str, tuple[Sample, str]] = {}
    for manifest in reviewed_manifests(source, cache_dir):
        for line, image in read_numbered(manifest):
            where = f"{line} ({image.source_ref})"
            if image.label not in known:
                raise DataError(f"{where}: class {image.label!r} is not a class of the base data {sorted(known)}; "
                                "a false alarm is labelled with the good class, which must be named as the base "
                                "data names it (qcsight review export --good-label)")
            path = _reviewed_path(image, manifest.parent, cache_dir, where)
            try:
                read_image(str(path))
            except ImageError as exc:
                raise DataError(f"{where}: cannot be trained on: {exc.reason}") from None
            key = os.path.normpath(os.path.abspath(path))
            if key in chosen:
                if chosen[key][0].label != image.label:
                    raise DataError(f"{where}: listed again as {image.label!r} (first as {chosen[key][0].label!r} "
                                    f"at {chosen[key][1]})")
                continue
            chosen[key] = (Sample(key, image.label, f"reviewed:{image.alert_id or key}", "train"), where)
    samples = [sample for sample, _ in chosen.values()]
    return _without_held_out(tuple(samples), held_out)


def fetch_reviewed(source: str, cache_dir: Path) -> int:
    """Download the images a reviewed-image manifest names by s3:// URI (every host needs them); returns how many."""
    fetched = 0
    for manifest in reviewed_manifests(source, cache_dir):
        for line, image in read_numbered(manifest):
            if image.source_ref.startswith("s3://"):
                _reviewed_path(image, manifest.parent, cache_dir, f"{line} ({image.source_ref})")
                fetched += 1
    return fetched


def _reviewed_path(image: ReviewedImage, base: Path, cache_dir: Path, where: str) -> Path:
    ref = image.source_ref
    if ref.startswith("s3://"):
        try:
            return _fetch_object(ref, cache_dir / REVIEWED_CACHE, "source-ref")
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
    path = Path(ref.removeprefix("file://"))
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise DataError(f"{where}: no such image file {path}")
    return path


def _fetch_object(uri: str, cache_dir: Path, field: str) -> Path:
    """One s3:// object into cache_dir/<bucket>/<key>, unless a previous attempt of the run fetched it."""
    import boto3  # only runs with s3:// sources need it

    location = S3Uri.parse(uri, field, allowed="s3://bucket/key of one object", legacy_bucket=True)
    if not location.key or location.key.endswith("/"):
        raise ConfigError(field, uri, "s3://bucket/key of one object")
    target = cache_dir / location.bucket / location.key
    if not target.is_file():
        try:
            download_file(boto3.client("s3"), location, target)
        except AwsError as exc:
            raise DataError(f"{uri}: cannot download ({exc})") from None
    return target


def _without_held_out(reviewed: tuple[Sample, ...], held_out: Sequence[Sample]) -> tuple[Sample, ...]:
    if not reviewed or not held_out:
        return reviewed
    unseen = {sha256_file(Path(s.path)): s.path for s in held_out}
    kept = []
    for sample in reviewed:
        twin = unseen.get(sha256_file(Path(sample.path)))
        if twin is not None:
            log.warning("reviewed image %s is the held-out image %s: left out of training", sample.path, twin)
            continue
        kept.append(sample)
    return tuple(kept)


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
