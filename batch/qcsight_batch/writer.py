"""Result rows and the append-only, crash-safe results file (JSON lines or CSV) that --resume reads back.

Rows are appended chunk by chunk: one write of whole rows, then fsync, so after a crash the
file holds complete rows plus at most one torn row at its end. Opening with resume=True
reads every row back, truncates a torn tail, and returns the keys already written (as
16-byte digests in a sorted numpy array: 10 million rows take 160 MB, not gigabytes of
Python strings) and the tallies the summary needs, so that the resumed run's output and
summary equal an uninterrupted run's.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from qcsight_batch.errors import OutputError
from qcsight_core.bundle import Manifest
from qcsight_core.verdict import Verdict

log = logging.getLogger(__name__)

ERROR = "error"
BOX_COLUMNS = ("box_x0", "box_y0", "box_x1", "box_y1")  # CSV rows of anomaly models
FORMATS = ("jsonl", "csv")
_ENCODING_ERRORS = "surrogateescape"  # file names that are not UTF-8 survive the round trip
_DIGEST_SIZE = 16
_READ_CHUNK = 1 << 16


@dataclass(frozen=True)
class ModelInfo:
    """What every row records about the model that produced it."""

    name: str
    version: str
    precision: str
    classes: tuple[str, ...]
    task: str = "classification"

    @classmethod
    def from_manifest(cls, manifest: Manifest, precision: str) -> ModelInfo:
        return cls(manifest.name, manifest.version, precision, manifest.classes, manifest.task)


@dataclass(frozen=True)
class ResultRow:
    """One image's outcome: a verdict with scores, or an error with its reason."""

    source: str
    verdict: str
    label: str
    defect_score: float | None
    confidence: float | None
    scores: Mapping[str, float]
    model: str
    model_version: str
    precision: str
    error: str = ""
    box: Mapping[str, float] | None = None  # anomaly bundles: the hottest region, relative to the image

    @classmethod
    def scored(cls, source: str, verdict: Verdict, model: ModelInfo) -> ResultRow:
        return cls(
            source=source,
            verdict=verdict.status,
            label=verdict.label,
            defect_score=round(verdict.score, 6),
            confidence=round(verdict.confidence, 6),
            scores=verdict.scores(model.classes),
            model=model.name,
            model_version=model.version,
            precision=model.precision,
            box=None if verdict.box is None else verdict.box.to_dict(),
        )

    @classmethod
    def failed(cls, source: str, reason: str, model: ModelInfo) -> ResultRow:
        return cls(source, ERROR, "", None, None, {}, model.name, model.version, model.precision, reason)

    def to_dict(self, with_source: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {"source": self.source} if with_source else {}
        data.update(
            verdict=self.verdict,
            **{"class": self.label},
            defect_score=self.defect_score,
            confidence=self.confidence,
            scores=dict(self.scores),
            model=self.model,
            model_version=self.model_version,
            precision=self.precision,
            error=self.error or None,
        )
        if self.box is not None:
            data["box"] = dict(self.box)
        return data


@dataclass
class Tally:
    """Counts for the summary: rows by verdict and by class."""

    by_verdict: Counter[str] = field(default_factory=Counter)
    by_class: Counter[str] = field(default_factory=Counter)

    def add(self, verdict: str, label: str) -> None:
        self.by_verdict[verdict] += 1
        if verdict != ERROR and label:
            self.by_class[label] += 1

    def merge(self, other: Tally) -> Tally:
        return Tally(self.by_verdict + other.by_verdict, self.by_class + other.by_class)

    @property
    def rows(self) -> int:
        return sum(self.by_verdict.values())

    @property
    def errors(self) -> int:
        return self.by_verdict[ERROR]


def key_digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8", _ENCODING_ERRORS), digest_size=_DIGEST_SIZE).digest()


class KeySet:
    """An immutable set of keys held as sorted 16-byte digests (a collision is a 2^-128 event per pair)."""

    def __init__(self, digests: Iterable[bytes] = ()) -> None:
        array = np.array(list(digests), dtype=f"S{_DIGEST_SIZE}")
        self._sorted = np.unique(array) if array.size else array

    @classmethod
    def from_array(cls, array: np.ndarray) -> KeySet:
        instance = cls()
        instance._sorted = np.unique(array) if array.size else array
        return instance

    def __len__(self) -> int:
        return int(self._sorted.size)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(self.contains_many([key])[0])

    def contains_many(self, keys: Sequence[str]) -> np.ndarray:
        """A boolean array: which of keys are in the set (one vectorised search for the lot)."""
        if not keys or not self._sorted.size:
            return np.zeros(len(keys), dtype=bool)
        query = np.array([key_digest(k) for k in keys], dtype=f"S{_DIGEST_SIZE}")
        index = np.minimum(np.searchsorted(self._sorted, query), self._sorted.size - 1)
        found: np.ndarray = self._sorted[index] == query
        return found


@dataclass(frozen=True)
class ResumeState:
    """What an existing results file already holds."""

    done: KeySet
    tally: Tally
    truncated_bytes: int = 0


class ResultWriter(Protocol):
    """Append-only results: open (creating or resuming), write chunks of rows, close."""

    path: Path

    def open(self, resume: bool) -> ResumeState: ...

    def write(self, rows: Sequence[ResultRow]) -> None: ...

    def close(self) -> None: ...


class _Torn(Exception):
    """The file ends inside a row."""


class _AppendOnlyFile:
    """The durable part shared by both formats: create or recover, append whole chunks, fsync."""

    suffix = ""

    def __init__(self, path: str | Path, model: ModelInfo, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.model = model
        self.overwrite = overwrite
        self._fd: int | None = None

    # Format hooks -----------------------------------------------------------------------
    def _header(self) -> bytes:
        return b""

    def _encode(self, rows: Sequence[ResultRow]) -> bytes:
        raise NotImplementedError

    def _records(self, handle: io.BufferedReader) -> Iterator[tuple[int, str, str, str, str]]:
        """(end offset, source, verdict, class, model identity) for each complete row; raises _Torn."""
        raise NotImplementedError

    # Shared logic -------------------------------------------------------------------------
    def _identity(self) -> str:
        return f"{self.model.name} {self.model.version} ({self.model.precision})"

    def open(self, resume: bool) -> ResumeState:
        exists = self.path.exists() and self.path.stat().st_size > 0
        if exists and not resume and not self.overwrite:
            raise OutputError(f"{self.path}: already exists; pass --resume to continue it or --overwrite to replace it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = ResumeState(KeySet(), Tally())
        if exists and resume:
            state = self._recover()
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if not resume else 0)
        try:
            self._fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot open for writing: {exc.strerror or exc}") from exc
        if os.fstat(self._fd).st_size == 0:
            self._append(self._header())
            self._sync_dir()
        return state

    def _recover(self) -> ResumeState:
        digests: list[bytes] = []
        tally = Tally()
        good_end = 0
        identity = self._identity()
        with self.path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            try:
                for end, source, verdict, label, row_identity in self._records(handle):
                    if row_identity != identity:
                        raise OutputError(
                            f"{self.path}: rows were written by model {row_identity}, this run uses {identity}; "
                            "write to a new --output instead of resuming"
                        )
                    digests.append(key_digest(source))
                    tally.add(verdict, label)
                    good_end = end
            except _Torn:
                pass
        torn = size - good_end
        if torn:
            log.warning("%s: dropping a torn last row (%d bytes) left by an interrupted run", self.path, torn)
            with self.path.open("r+b") as handle:
                handle.truncate(good_end)
                os.fsync(handle.fileno())
        log.info("resuming %s: %d rows already written", self.path, tally.rows)
        array = np.array(digests, dtype=f"S{_DIGEST_SIZE}") if digests else np.array([], dtype=f"S{_DIGEST_SIZE}")
        return ResumeState(KeySet.from_array(array), tally, torn)

    def _append(self, data: bytes) -> None:
        if self._fd is None:
            raise OutputError(f"{self.path}: not open")
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write results: {exc.strerror or exc}") from exc

    def _sync_dir(self) -> None:
        # A new file's directory entry is durable only once the directory itself is synced.
        try:
            fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def write(self, rows: Sequence[ResultRow]) -> None:
        if rows:
            self._append(self._encode(rows))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class JsonlWriter(_AppendOnlyFile):
    """One JSON object per line; json.dumps escapes newlines, so a row is exactly one line."""

    suffix = ".jsonl"

    def _encode(self, rows: Sequence[ResultRow]) -> bytes:
        text = "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in rows)
        return text.encode("utf-8", _ENCODING_ERRORS)

    def _records(self, handle: io.BufferedReader) -> Iterator[tuple[int, str, str, str, str]]:
        offset = 0
        bad_line = 0
        for number, raw in enumerate(handle, start=1):
            offset += len(raw)
            if not raw.endswith(b"\n"):
                raise _Torn
            try:
                row = json.loads(raw.decode("utf-8", _ENCODING_ERRORS))
                record = (
                    offset,
                    str(row["source"]),
                    str(row["verdict"]),
                    str(row.get("class") or ""),
                    f"{row['model']} {row['model_version']} ({row['precision']})",
                )
            except (ValueError, KeyError, TypeError):
                # A torn write can leave a garbage line (zeros after a power cut) at the very end;
                # garbage followed by good rows is damage we must not paper over.
                bad_line = bad_line or number
                continue
            if bad_line:
                raise OutputError(f"{self.path}: line {bad_line} is not a result row; the file is damaged")
            yield record
        if bad_line:
            raise _Torn


class CsvWriter(_AppendOnlyFile):
    """A header, then one row per image with a score_<class> column per class; scores as 6-decimal numbers."""

    suffix = ".csv"

    @property
    def columns(self) -> list[str]:
        return [
            "source",
            "verdict",
            "class",
            "defect_score",
            "confidence",
            *(f"score_{c}" for c in self.model.classes),
            "model",
            "model_version",
            "precision",
            "error",
            *(BOX_COLUMNS if self.model.task == "anomaly" else ()),
        ]

    def _lines(self, rows: Iterable[Sequence[object]]) -> bytes:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerows(rows)
        return buffer.getvalue().encode("utf-8", _ENCODING_ERRORS)

    def _header(self) -> bytes:
        return self._lines([self.columns])

    def _encode(self, rows: Sequence[ResultRow]) -> bytes:
        def cells(r: ResultRow) -> list[object]:
            number = ["" if v is None else f"{v:.6f}" for v in (r.defect_score, r.confidence)]
            scores = [f"{r.scores[c]:.6f}" if c in r.scores else "" for c in self.model.classes]
            box = ([f"{r.box[k]:.4f}" if r.box else "" for k in ("x0", "y0", "x1", "y1")]
                   if self.model.task == "anomaly" else [])
            return [r.source, r.verdict, r.label, *number, *scores, r.model, r.model_version, r.precision, r.error,
                    *box]

        return self._lines(cells(r) for r in rows)

    def _records(self, handle: io.BufferedReader) -> Iterator[tuple[int, str, str, str, str]]:
        offset = 0

        def lines() -> Iterator[str]:
            nonlocal offset
            for raw in handle:
                if not raw.endswith(b"\n"):
                    raise _Torn
                offset += len(raw)
                yield raw.decode("utf-8", _ENCODING_ERRORS)

        reader = csv.reader(lines(), strict=True)
        columns = self.columns
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise _Torn from exc
        if header != columns:
            raise OutputError(
                f"{self.path}: its columns {header} differ from this model's {columns}; write to a new --output"
            )
        at = {name: i for i, name in enumerate(columns)}
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:  # a quoted field left open at the end of the file
                raise _Torn from exc
            if len(cells) != len(columns):
                raise _Torn
            identity = f"{cells[at['model']]} {cells[at['model_version']]} ({cells[at['precision']]})"
            yield offset, cells[at["source"]], cells[at["verdict"]], cells[at["class"]], identity


def output_format(path: str | Path, explicit: str | None = None) -> str:
    """jsonl or csv, from an explicit choice or the file suffix."""
    if explicit:
        if explicit not in FORMATS:
            raise OutputError(f"output format {explicit!r} is not one of {', '.join(FORMATS)}")
        return explicit
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    raise OutputError(f"{path}: cannot tell the format from the suffix; use .jsonl or .csv (or --format)")


def open_writer(path: str | Path, model: ModelInfo, fmt: str | None = None, overwrite: bool = False) -> ResultWriter:
    """A JsonlWriter or CsvWriter for path (not yet opened)."""
    kind = output_format(path, fmt)
    writer_type = JsonlWriter if kind == "jsonl" else CsvWriter
    return writer_type(path, model, overwrite)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a results file as a dict (JSON lines) or a dict of strings (CSV); for tests and tools."""
    target = Path(path)
    if output_format(target) == "jsonl":
        with target.open(encoding="utf-8", errors=_ENCODING_ERRORS) as handle:
            return [json.loads(line) for line in handle if line.strip()]
    with target.open(encoding="utf-8", errors=_ENCODING_ERRORS, newline="") as handle:
        return list(csv.DictReader(handle))
