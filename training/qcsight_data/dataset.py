"""Labelled image datasets: loading folders, CSVs and AWS manifests into one index, splitting, fingerprinting.

Every source becomes a `DatasetIndex` of `Sample`s with absolute local paths. Images that
cannot be used (missing, empty, truncated, not an image) are listed in `skipped` with the
reason instead of stopping the load, so one bad file in ten thousand costs one sample.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from qcsight_core.bundle import sha256_file
from qcsight_core.checks import check_number
from qcsight_core.errors import ConfigError, DataError, ImageError
from qcsight_core.imageio import is_image_path, read_image

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MASKS_DIR = "masks"
INDEX_COLUMNS = ("path", "label", "group", "split")
MANIFEST_SUFFIXES = frozenset({".manifest", ".jsonl", ".json"})
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test", "": ""}
_PATH_HEADERS = ("path", "file", "filename", "image", "source-ref")
_LABEL_HEADERS = ("label", "class", "class-name", "class_name")

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Sample:
    """One labelled image.

    Attributes:
        path: absolute local path of the image file.
        label: class name.
        group: near-duplicate group; samples in one group always land in the same split.
            Defaults to the path itself when nothing groups the image with others.
        split: "train", "val", "test", or "" when not assigned yet.
    """

    path: str
    label: str
    group: str
    split: str = ""


@dataclass(frozen=True)
class Skipped:
    """A file (or manifest line) that was left out of the index, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class DatasetIndex:
    """The usable samples of one dataset source, plus what was skipped.

    Attributes:
        samples: the usable samples, in source order (folders: sorted by class, then path).
        classes: sorted class names; a subset keeps its parent's classes so label indices agree.
        skipped: files or manifest lines left out, each with its reason.
        source: what was loaded (a directory, CSV or manifest path).
        root: the directory that relative paths (groups CSV, index CSV) are taken against.
        format: "folder", "csv", "groundtruth" or "lookout".
    """

    samples: tuple[Sample, ...]
    classes: tuple[str, ...]
    skipped: tuple[Skipped, ...] = ()
    source: str = ""
    root: str = ""
    format: str = ""

    def subset(self, split: str) -> DatasetIndex:
        """The samples of one split ("" for unassigned ones), keeping the full class list."""
        if split not in (*SPLITS, ""):
            raise ConfigError("split", split, f"one of {', '.join(SPLITS)} or '' (unassigned)")
        chosen = tuple(s for s in self.samples if s.split == split)
        return replace(self, samples=chosen, skipped=())

    def counts(self) -> dict[str, dict[str, int]]:
        """split -> class -> number of samples, for every split present (unassigned is "")."""
        result: dict[str, dict[str, int]] = {}
        for sample in self.samples:
            per_class = result.setdefault(sample.split, dict.fromkeys(self.classes, 0))
            per_class[sample.label] = per_class.get(sample.label, 0) + 1
        order = {name: i for i, name in enumerate((*SPLITS, ""))}
        return dict(sorted(result.items(), key=lambda item: order.get(item[0], len(order))))


@dataclass
class _Builder:
    """Collects samples and skipped entries while a source is read; turns them into an index."""

    source: str
    root: Path
    format: str
    samples: list[Sample]
    skipped: list[Skipped]
    seen: dict[str, str]

    @classmethod
    def start(cls, source: Path, root: Path, fmt: str) -> _Builder:
        return cls(str(source), Path(_normalise(root)), fmt, [], [], {})

    def add(self, path: Path, label: str, group: str = "", split: str = "", where: str = "") -> None:
        key = _normalise(path)
        label = label.strip()
        if not label:
            self.skipped.append(Skipped(key, f"{where}no label".strip()))
            return
        if key in self.seen:
            reason = "listed twice" if self.seen[key] == label else f"listed again with label {label!r}"
            self.skipped.append(Skipped(key, f"{where}{reason} (first label {self.seen[key]!r})"))
            return
        if not is_image_path(key):
            self.skipped.append(Skipped(key, f"{where}not an image file name (suffix {Path(key).suffix!r})"))
            return
        if not os.path.isfile(key):
            self.skipped.append(Skipped(key, f"{where}file not found"))
            return
        self.seen[key] = label
        self.samples.append(Sample(key, label, group.strip() or key, split))

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append(Skipped(path, reason))

    def build(self) -> DatasetIndex:
        classes = tuple(sorted({s.label for s in self.samples}))
        return DatasetIndex(tuple(self.samples), classes, tuple(self.skipped), self.source, str(self.root), self.format)


def _normalise(path: Path | str) -> str:
    return os.path.normpath(os.path.abspath(path))


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def load_index(
    source: str | Path,
    *,
    groups: str | Path | None = None,
    check_images: bool = True,
    progress: Progress | None = None,
    image_root: str | Path | None = None,
    label_attribute: str | None = None,
) -> DatasetIndex:
    """Load a labelled dataset from a folder, a CSV, or a Ground Truth / Lookout for Vision manifest.

    Args:
        source: a directory with one subdirectory per class (``masks/`` and hidden entries are
            ignored); a ``.csv`` of ``path,label[,group][,split]`` with paths relative to the CSV
            (a header row is optional); or a JSON Lines manifest (``.manifest``, ``.jsonl``) as
            SageMaker Ground Truth image classification or Lookout for Vision writes it.
        groups: a CSV ``file,class,group`` assigning near-duplicate groups; files are relative to
            the dataset root (the folder, the CSV's directory, or image_root for manifests).
        check_images: decode every image and move unreadable ones to ``skipped``.
        progress: called as progress(done, total) while images are checked.
        image_root: a local directory holding the images that a manifest names by ``s3://`` URI.
            ``s3://bucket/prefix/x.jpg`` maps to ``image_root/x.jpg`` when every URI shares
            ``s3://bucket/prefix/`` (deeper folders are kept); ``image_root/prefix/x.jpg`` and
            ``image_root/bucket/prefix/x.jpg`` are tried as well.
        label_attribute: the manifest's label attribute, when a line holds several jobs' labels.

    Raises:
        DataError: the source does not exist, has an unknown format, or cannot be parsed at all.
    """
    path = Path(source)
    if str(source).startswith("s3://"):
        raise DataError(f"{source}: S3 sources are not read directly; download the manifest and pass a local path")
    if not path.exists():
        raise DataError(f"{path}: no such dataset directory or file")
    if path.is_dir():
        builder = _load_folder(path)
    elif path.suffix.lower() == ".csv":
        builder = _load_csv(path, image_root)
    elif path.suffix.lower() in MANIFEST_SUFFIXES or _looks_like_json_lines(path):
        builder = _load_manifest(path, image_root, label_attribute)
    else:
        raise DataError(
            f"{path}: unknown dataset format; expected a folder per class, a .csv index, "
            "or a JSON Lines manifest (.manifest/.jsonl)"
        )
    if groups is not None:
        _apply_groups(builder, Path(groups))
    if check_images:
        _check_images(builder, progress)
    index = builder.build()
    log.info("%s: %d samples in %d classes, %d skipped", path, len(index.samples), len(index.classes),
             len(index.skipped))
    return index


def _looks_like_json_lines(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            head = handle.read(64).lstrip()
    except OSError:
        return False
    return head.startswith(b"{")


def _load_folder(root: Path) -> _Builder:
    builder = _Builder.start(root, root, "folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != MASKS_DIR)
    if not class_dirs:
        raise DataError(f"{root}: no class folders found (expected one subdirectory per class, e.g. good/, scratch/)")
    for class_dir in class_dirs:
        files = sorted(
            p for p in class_dir.rglob("*")
            if p.is_file() and is_image_path(p) and not _is_hidden(p.relative_to(class_dir))
        )
        if not files:
            log.warning("%s: class folder holds no images", class_dir)
        for file in files:
            builder.add(file, class_dir.name)
    return builder


def _open_text(path: Path) -> Iterator[str]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            yield from handle
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _csv_rows(path: Path) -> tuple[dict[str, int] | None, list[tuple[int, list[str]]]]:
    """(column positions from the header, or None without one; [(line number, cells)])."""
    rows = [(n, [c.strip() for c in row]) for n, row in enumerate(csv.reader(_open_text(path)), start=1)
            if row and any(c.strip() for c in row) and not row[0].lstrip().startswith("#")]
    if not rows:
        return None, []
    first = [c.lower() for c in rows[0][1]]
    if first and first[0] in _PATH_HEADERS:
        return {name: i for i, name in enumerate(first)}, rows[1:]
    return None, rows


def _column(header: Mapping[str, int] | None, names: Iterable[str], default: int | None) -> int | None:
    if header is None:
        return default
    for name in names:
        if name in header:
            return header[name]
    return None


def _cell(cells: list[str], position: int | None) -> str:
    return cells[position] if position is not None and position < len(cells) else ""


def _load_csv(path: Path, image_root: str | Path | None) -> _Builder:
    root = path.parent
    builder = _Builder.start(path, root, "csv")
    header, rows = _csv_rows(path)
    path_col = _column(header, _PATH_HEADERS, 0)
    label_col = _column(header, _LABEL_HEADERS, 1)
    group_col = _column(header, ("group",), 2)
    split_col = _column(header, ("split",), 3)
    if path_col is None or label_col is None:
        raise DataError(f"{path}: the header needs a path column and a label column, got {sorted(header or {})}")
    resolver = _S3Resolver.from_refs(path, [_cell(c, path_col) for _, c in rows], image_root)
    for line, cells in rows:
        ref, where = _cell(cells, path_col), f"{path.name} line {line}: "
        if not ref:
            builder.skip(f"{path}:{line}", "no path")
            continue
        split_text = _cell(cells, split_col)
        split = _SPLIT_ALIASES.get(split_text.lower())
        if split is None:
            raise DataError(f"{path} line {line}: split {split_text!r} is not one of {', '.join(SPLITS)} or empty")
        builder.add(resolver.resolve(ref, root), _cell(cells, label_col), _cell(cells, group_col), split, where)
    if not rows:
        raise DataError(f"{path}: the CSV lists no images (expected rows of path,label[,group][,split])")
    return builder


@dataclass(frozen=True)
class _S3Resolver:
    """Maps s3:// URIs onto a local image_root; local paths resolve against the source's directory."""

    source: Path
    image_root: Path | None
    common_prefix: str

    @classmethod
    def from_refs(cls, source: Path, refs: Iterable[str], image_root: str | Path | None) -> _S3Resolver:
        keys = [ref[len("s3://"):] for ref in refs if ref.startswith("s3://")]
        prefix = ""
        if keys:
            prefix = "".join(part + "/" for part in _shared_folders([k.split("/")[:-1] for k in keys]))
            if image_root is None:
                raise DataError(
                    f"{source}: images are named by S3 URI (e.g. s3://{keys[0]}); download them and pass "
                    "image_root (--image-root DIR) so that s3://bucket/prefix/x.jpg maps to DIR/x.jpg"
                )
        return cls(source, Path(image_root) if image_root is not None else None, prefix)

    def resolve(self, ref: str, base: Path) -> Path:
        if not ref.startswith("s3://"):
            return base / ref
        if self.image_root is None:  # from_refs refuses this; kept for a resolver built by hand
            raise DataError(f"{self.source}: {ref} is an S3 URI and no image_root was given")
        key = ref[len("s3://"):]
        bucket_key = key.split("/", 1)[1] if "/" in key else key
        candidates = [self.image_root / key[len(self.common_prefix):], self.image_root / bucket_key,
                      self.image_root / key]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        return candidates[0]


def _shared_folders(folders: list[list[str]]) -> list[str]:
    """The leading folder names that every key shares (bucket included)."""
    shared = folders[0]
    for parts in folders[1:]:
        n = 0
        while n < min(len(shared), len(parts)) and shared[n] == parts[n]:
            n += 1
        shared = shared[:n]
    return shared


def _load_manifest(path: Path, image_root: str | Path | None, label_attribute: str | None) -> _Builder:
    records: list[tuple[int, dict[str, Any]]] = []
    bad: list[Skipped] = []
    for line_no, line in enumerate(_open_text(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(Skipped(f"{path}:{line_no}", f"not valid JSON: {exc.msg}"))
            continue
        if not isinstance(record, dict):
            bad.append(Skipped(f"{path}:{line_no}", "not a JSON object"))
            continue
        records.append((line_no, record))
    if not records:
        raise DataError(f"{path}: no JSON objects found; is this a Ground Truth or Lookout for Vision manifest?")
    refs = [str(r.get("source-ref", "")) for _, r in records]
    resolver = _S3Resolver.from_refs(path, refs, image_root)
    fmt = "lookout" if any("anomaly-label" in r for _, r in records) else "groundtruth"
    root = resolver.image_root if resolver.image_root is not None else path.parent
    builder = _Builder.start(path, root, fmt)
    builder.skipped.extend(bad)
    for line_no, record in records:
        where = f"{path}:{line_no}"
        ref = record.get("source-ref")
        if not isinstance(ref, str) or not ref:
            builder.skip(where, "no source-ref")
            continue
        try:
            label = _manifest_label(record, label_attribute)
        except DataError as exc:
            builder.skip(where, str(exc))
            continue
        builder.add(resolver.resolve(ref, path.parent), label, where=f"{path.name} line {line_no}: ")
    return builder


def _manifest_label(record: Mapping[str, Any], attribute: str | None) -> str:
    """The class name of one Ground Truth / Lookout for Vision line (from "<attr>-metadata"."class-name")."""
    if attribute is None:
        candidates = [k[: -len("-metadata")] for k, v in record.items()
                      if k.endswith("-metadata") and isinstance(v, dict) and k[: -len("-metadata")] in record]
        if not candidates:
            raise DataError("no label attribute (a key with a matching '<key>-metadata' object holding 'class-name')")
        if len(candidates) > 1:
            raise DataError(f"several label attributes {sorted(candidates)}; choose one with label_attribute")
        attribute = candidates[0]
    metadata = record.get(f"{attribute}-metadata")
    if not isinstance(metadata, dict):
        raise DataError(f"no '{attribute}-metadata' object")
    if "failure-reason" in metadata:
        raise DataError(f"labelling failed: {metadata['failure-reason']}")
    name = metadata.get("class-name")
    if isinstance(name, str) and name:
        return name
    if attribute == "anomaly-label" and record.get(attribute) in (0, 1):
        return ("normal", "anomaly")[int(record[attribute])]  # Lookout for Vision's fixed meaning of 0/1
    if "class-map" in metadata:
        raise DataError(f"'{attribute}' is a multi-label result; qcsight needs one class per image")
    raise DataError(f"'{attribute}-metadata' has no class-name")


def _read_groups(path: Path) -> list[tuple[int, str, str]]:
    if not path.is_file():
        raise DataError(f"{path}: no such groups CSV")
    header, rows = _csv_rows(path)
    file_col = _column(header, ("file", "path", "filename"), 0)
    group_col = _column(header, ("group",), 2)
    if file_col is None or group_col is None:
        raise DataError(f"{path}: the groups CSV needs 'file' and 'group' columns, got {sorted(header or {})}")
    result = []
    for line, cells in rows:
        file, group = _cell(cells, file_col), _cell(cells, group_col)
        if not file or not group:
            raise DataError(f"{path} line {line}: needs a file and a group (file,class,group)")
        result.append((line, file, group))
    return result


def _apply_groups(builder: _Builder, path: Path) -> None:
    by_path = {_normalise(builder.root / file): group for _, file, group in _read_groups(path)}
    matched = 0
    for i, sample in enumerate(builder.samples):
        group = by_path.get(sample.path)
        if group is not None:
            builder.samples[i] = replace(sample, group=group)
            matched += 1
    if by_path and not matched and builder.samples:
        raise DataError(
            f"{path}: none of its {len(by_path)} files matched a sample; "
            f"file paths must be relative to the dataset root {builder.root}"
        )
    if matched < len(builder.samples):
        log.info("%s: %d of %d samples have no group there; each stands alone", path,
                 len(builder.samples) - matched, len(builder.samples))


def _check_images(builder: _Builder, progress: Progress | None) -> None:
    kept: list[Sample] = []
    total = len(builder.samples)
    for done, sample in enumerate(builder.samples, start=1):
        try:
            read_image(sample.path)
        except ImageError as exc:
            builder.skip(sample.path, exc.reason)
        else:
            kept.append(sample)
        if progress is not None:
            progress(done, total)
    builder.samples = kept


def split_index(index: DatasetIndex, *, val: float = 0.15, test: float = 0.15, seed: int = 0) -> DatasetIndex:
    """Assign train/val/test by group, stratified by class, reproducibly.

    A group (near-duplicates) always lands in one split. Groups are stratified by their rarest
    class, and each class with at least as many free groups as non-empty splits gets at least one
    group in each of them. Samples that already carry a split keep it, and the rest of their
    group follows them. The result depends only on the samples' (path, label, group, split) and
    the seed, not on the order in which they are listed.

    Raises:
        ConfigError: val or test is outside [0, 1) or they leave nothing for training.
    """
    val = check_number("val", val, 0.0, 1.0, open_high=True)
    test = check_number("test", test, 0.0, 1.0, open_high=True)
    if val + test >= 1.0:
        raise ConfigError("val+test", val + test, "below 1, so that something is left for training")
    fractions = {"train": 1.0 - val - test, "val": val, "test": test}
    members: dict[str, list[Sample]] = defaultdict(list)
    for sample in index.samples:
        members[sample.group].append(sample)
    assignment = _locked_groups(members)
    frequency = Counter(s.label for s in index.samples)
    strata: dict[str, list[str]] = defaultdict(list)
    for group in sorted(members):
        rarest = min({s.label for s in members[group]}, key=lambda label: (frequency[label], label))
        strata[rarest].append(group)
    for stratum, groups in sorted(strata.items()):
        _split_stratum(stratum, groups, members, assignment, fractions, seed)
    samples = tuple(s if s.split else replace(s, split=assignment[s.group]) for s in index.samples)
    result = replace(index, samples=samples)
    _warn_missing_classes(result, members, fractions)
    return result


def _locked_groups(members: Mapping[str, list[Sample]]) -> dict[str, str]:
    """Groups with preset splits go where most of their preset samples are."""
    locked: dict[str, str] = {}
    for group, samples in members.items():
        preset = Counter(s.split for s in samples if s.split)
        if preset:
            locked[group] = max(SPLITS, key=lambda split: (preset[split], -SPLITS.index(split)))
            if len(preset) > 1:
                log.warning("group %r has samples preset to several splits %s; keeping them", group, dict(preset))
    return locked


def _split_stratum(stratum: str, groups: list[str], members: Mapping[str, list[Sample]],
                   assignment: dict[str, str], fractions: Mapping[str, float], seed: int) -> None:
    # Seeded per stratum, so adding images of one class does not reshuffle the others.
    rng = np.random.default_rng([seed, zlib.crc32(stratum.encode("utf-8"))])
    # Only the stratum's own class counts: a group mixing one rare sample with many common ones
    # must not fill the rare class's quota.
    size = {g: sum(1 for s in members[g] if s.label == stratum) for g in groups}
    total = sum(size.values())
    target = {s: fractions[s] * total for s in SPLITS}
    count = dict.fromkeys(SPLITS, 0)
    for group in groups:
        if group in assignment:
            count[assignment[group]] += size[group]
    free = [groups[i] for i in rng.permutation(len(groups)) if groups[i] not in assignment]
    active = [s for s in SPLITS if fractions[s] > 0]

    def place(group: str, split: str) -> None:
        assignment[group] = split
        count[split] += size[group]
        free.remove(group)

    for split in active:
        if not free:
            break
        if count[split] == 0:
            room = max(1.0, target[split] - count[split])
            fitting = [g for g in free if size[g] <= room]
            place(fitting[0] if fitting else min(free, key=lambda g: size[g]), split)
    # In random order, each group goes where the largest share of the target is still missing
    # once half the group is counted. Largest-first would balance counts a touch better, but it
    # would send the biggest near-duplicate clusters to train whatever the seed.
    for group in list(free):
        split = max(active, key=lambda s: ((target[s] - count[s] - size[group] / 2) / target[s], -SPLITS.index(s)))
        place(group, split)


def _warn_missing_classes(index: DatasetIndex, members: Mapping[str, list[Sample]],
                          fractions: Mapping[str, float]) -> None:
    counts = index.counts()
    active = [s for s in SPLITS if fractions[s] > 0]
    for label in index.classes:
        n_groups = sum(1 for samples in members.values() if any(s.label == label for s in samples))
        missing = [s for s in active if counts.get(s, {}).get(label, 0) == 0]
        if missing:
            level = logging.WARNING if n_groups >= len(active) else logging.INFO
            log.log(level, "class %r (%d groups) has no samples in %s", label, n_groups, ", ".join(missing))


def _common_root(paths: Iterable[str]) -> str:
    parents = {os.path.dirname(p) for p in paths}
    return os.path.commonpath(list(parents)) if parents else ""


def fingerprint(index: DatasetIndex, progress: Progress | None = None) -> str:
    """sha256 over the sorted (relative path, label, sha256 of the file) of every sample.

    Paths are taken relative to the samples' common directory, so the same data gives the same
    fingerprint wherever it is stored and in whatever order it is listed; a changed byte, a
    changed label, an added or a removed file changes it. Groups and splits do not count.

    Raises:
        DataError: a sample's file cannot be read.
    """
    root = _common_root(s.path for s in index.samples)
    entries = []
    total = len(index.samples)
    for done, sample in enumerate(index.samples, start=1):
        if sample.path.startswith("s3://"):
            raise DataError(f"{sample.path}: cannot fingerprint an S3 object; download the images first")
        try:
            digest = sha256_file(Path(sample.path))
        except OSError as exc:
            raise DataError(f"{sample.path}: cannot read for the fingerprint: {exc.strerror or exc}") from exc
        entries.append((Path(os.path.relpath(sample.path, root)).as_posix(), sample.label, digest))
        if progress is not None:
            progress(done, total)
    overall = hashlib.sha256()
    for rel, label, digest in sorted(entries):
        overall.update(f"{rel}\t{label}\t{digest}\n".encode())
    return overall.hexdigest()


def write_index(index: DatasetIndex, path: Path) -> Path:
    """Write path,label,group,split as a CSV that load_index reads back.

    Images under the CSV's directory are written relative to it (the folder can move as a
    whole); others keep their absolute path. A group that is just the sample's own path is
    written empty (load_index restores it).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    base = _normalise(target.parent)
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(INDEX_COLUMNS)
        for sample in index.samples:
            inside = os.path.commonpath([base, sample.path]) == base
            name = Path(os.path.relpath(sample.path, base)).as_posix() if inside else sample.path
            writer.writerow([name, sample.label, "" if sample.group == sample.path else sample.group, sample.split])
    os.replace(tmp, target)
    return target
