"""Scoring a stream of images: decode workers -> batched ONNX Runtime -> verdicts -> result rows.

The main process iterates the source lazily, cuts the keys into chunks of batch_size, and
keeps at most chunks_in_flight of them submitted to a process pool. Each worker reads the
bytes, decodes (at reduced resolution when a JPEG is much larger than the model input)
and resizes its chunk with qcsight_core.preprocess.prepare_pixels, returning one uint8
batch. The main process normalizes it (prepare_pixels then normalize is preprocess_batch),
runs it through OnnxRunner, applies the Decider and appends the rows. Memory stays
bounded by chunks_in_flight x batch_size images whatever the input's length.

A worker that dies (SIGKILLed by the kernel's OOM killer, or crashed inside a decoder)
breaks the whole pool and every chunk in flight with it. The scorer then starts a fresh
pool and decodes those chunks again one image at a time, so the image that kills a worker
is named: it gets an error row and the run goes on with pooled chunks.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, TypeVar

import cv2
import numpy as np

from qcsight_batch.decode import (
    DecodedChunk,
    DecodeSettings,
    decode_chunk,
    decode_in_worker,
    init_worker,
    worker_environment,
)
from qcsight_batch.errors import WorkerError
from qcsight_batch.progress import NoProgress, Progress
from qcsight_batch.sources import ImageSource
from qcsight_batch.writer import KeySet, ModelInfo, ResultRow, ResultWriter, Tally
from qcsight_core.bundle import Bundle
from qcsight_core.errors import ConfigError
from qcsight_core.imageio import DEFAULT_MAX_PIXELS
from qcsight_core.preprocess import normalize
from qcsight_core.runner import OnnxRunner, RunnerOptions
from qcsight_core.verdict import DEFECT, Decider

log = logging.getLogger(__name__)

T = TypeVar("T")
_FILTER_GROUP = 1024
# Images in a row that each kill a fresh worker before the run gives up: one poisoned file is
# data, eight in a row is a host problem (workers that cannot start, memory held elsewhere).
_MAX_DEATHS_IN_A_ROW = 8
WORKER_DIED = "the decode worker died while decoding this image (killed, out of memory, or crashed in the decoder)"


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def ort_intra_threads(workers: int, cores: int) -> int:
    """ONNX Runtime intra-op threads that leave the decode workers their own cores.

    With W decode processes on C cores, each worker is one busy thread (OpenCV is held to
    one thread in the workers), so the cores left for the model are C - W. Giving ONNX
    Runtime more than that oversubscribes the machine: its pool threads spin-wait between
    operators and then fight the decoders for the same cores, which is slower than either
    alone. At least one thread, since inference must make progress even when W >= C.
    """
    return max(1, cores - workers)


@dataclass(frozen=True)
class ScorerConfig:
    """How a scoring run uses the machine.

    Attributes:
        workers: decode processes; 0 decodes in the main process (small inputs, debugging).
        batch_size: images per decode chunk and per ONNX Runtime call.
        precision: fp32, int8 or auto (see qcsight_core.runner).
        intra_op_threads: ONNX Runtime threads; 0 chooses ort_intra_threads(workers, cores).
        chunks_in_flight: decoded or decoding chunks held at once; 0 means 2 x workers.
        chunk_timeout_s: the longest wait for one chunk before the run fails.
        reduced_decode: decode large JPEGs at 1/2, 1/4 or 1/8 size when the model input allows.
        max_pixels: the pixel budget per image, checked from its header before decoding.
    """

    workers: int = 2
    batch_size: int = 32
    precision: str = "fp32"
    intra_op_threads: int = 0
    chunks_in_flight: int = 0
    chunk_timeout_s: float = 300.0
    reduced_decode: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if not 0 <= self.workers <= 256:
            raise ConfigError("workers", self.workers, "an integer from 0 to 256")
        if not 1 <= self.batch_size <= 4096:
            raise ConfigError("batch_size", self.batch_size, "an integer from 1 to 4096")
        if self.intra_op_threads < 0:
            raise ConfigError("intra_op_threads", self.intra_op_threads, "0 (automatic) or more")
        if self.chunks_in_flight < 0:
            raise ConfigError("chunks_in_flight", self.chunks_in_flight, "0 (automatic) or more")
        if self.chunk_timeout_s <= 0:
            raise ConfigError("chunk_timeout_s", self.chunk_timeout_s, "a positive number of seconds")
        if self.max_pixels < 1:
            raise ConfigError("max_pixels", self.max_pixels, "a positive number of pixels")

    @property
    def in_flight(self) -> int:
        return self.chunks_in_flight or max(2, 2 * self.workers)

    def threads(self, cores: int | None = None) -> int:
        return self.intra_op_threads or ort_intra_threads(self.workers, cores or available_cores())


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of up to size items, consuming items lazily."""
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def pending_keys(keys: Iterable[str], done: KeySet) -> Iterator[str]:
    """The keys not in done (looked up a group at a time, vectorised)."""
    if not len(done):
        yield from keys
        return
    for group in batched(keys, _FILTER_GROUP):
        seen = done.contains_many(group)
        yield from (key for key, skip in zip(group, seen, strict=True) if not skip)


def _start_method() -> str:
    # forkserver: workers fork from a clean server process rather than from this one, which
    # holds ONNX Runtime and possibly boto3 threads (fork would copy their locks mid-state);
    # cheaper than spawn once the server is up. spawn where forkserver does not exist.
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


@dataclass
class RunStats:
    """What one run did (the resumed rows are not included)."""

    tally: Tally = field(default_factory=Tally)
    elapsed_s: float = 0.0
    skipped: int = 0

    @property
    def images_per_s(self) -> float:
        return self.tally.rows / self.elapsed_s if self.elapsed_s > 0 else 0.0


class Scorer:
    """Wires decode workers, the ONNX runner and the decision policy to a source and a writer."""

    def __init__(self, bundle: Bundle, config: ScorerConfig | None = None, runner: OnnxRunner | None = None) -> None:
        self.config = config or ScorerConfig()
        self.bundle = bundle
        self.intra_op_threads = self.config.threads()
        self.runner = runner or OnnxRunner(
            bundle,
            RunnerOptions(precision=self.config.precision, intra_op_threads=self.intra_op_threads, inter_op_threads=1),
        )
        self.decider = Decider(bundle.manifest)
        self.model = ModelInfo.from_manifest(bundle.manifest, self.runner.precision)
        self.settings = DecodeSettings.for_spec(bundle.manifest.input, self.config.reduced_decode,
                                                self.config.max_pixels)

    def run(
        self,
        source: ImageSource,
        writer: ResultWriter,
        done: KeySet | None = None,
        progress: Progress | None = None,
    ) -> RunStats:
        """Score every key of source not in done, appending one row per image to writer (already open)."""
        stats = RunStats()
        report = progress or NoProgress()
        chunks = batched(pending_keys(source.iter_keys(), done or KeySet()), self.config.batch_size)
        start = time.perf_counter()
        log.info(
            "scoring %s with %s %s (%s): %d decode workers, batch %d, %d ONNX Runtime threads",
            source.describe(), self.model.name, self.model.version, self.model.precision,
            self.config.workers, self.config.batch_size, self.intra_op_threads,
        )
        try:
            if self.config.workers == 0:
                cv2.setNumThreads(1)
                for keys in chunks:
                    self._emit(decode_chunk(keys, source, self.settings), writer, stats, report)
            else:
                self._run_pool(source, chunks, writer, stats, report)
        finally:
            stats.elapsed_s = time.perf_counter() - start
        return stats

    def _run_pool(
        self, source: ImageSource, chunks: Iterator[list[str]], writer: ResultWriter, stats: RunStats,
        report: Progress,
    ) -> None:
        pool = _WorkerPool(self.config.workers, source, self.settings)
        pending: deque[tuple[list[str], concurrent.futures.Future[DecodedChunk]]] = deque()
        clean = False
        try:
            for keys in chunks:
                pending.append((keys, pool.submit(keys)))
                while len(pending) >= self.config.in_flight:
                    self._emit_next(pending, pool, writer, stats, report)
            while pending:
                self._emit_next(pending, pool, writer, stats, report)
            clean = True
        finally:
            # After a failure do not wait for workers that may be stuck; cancel what has not started.
            pool.shutdown(wait=clean)

    def _emit_next(
        self, pending: deque[tuple[list[str], concurrent.futures.Future[DecodedChunk]]], pool: _WorkerPool,
        writer: ResultWriter, stats: RunStats, report: Progress,
    ) -> None:
        keys, future = pending.popleft()
        try:
            chunk = self._collect(future)
        except BrokenProcessPool:
            # Every chunk still in flight died with the pool; those that finished keep their results.
            lost = [keys]
            for other_keys, other in pending:
                if other.done() and other.exception() is None:
                    self._emit(other.result(), writer, stats, report)
                else:
                    lost.append(other_keys)
            pending.clear()
            log.warning("a decode worker died; decoding the %d chunks in flight again one image at a time",
                        len(lost))
            pool.restart()
            for chunk_keys in lost:
                self._emit(self._isolate(chunk_keys, pool), writer, stats, report)
            return
        self._emit(chunk, writer, stats, report)

    def _isolate(self, keys: list[str], pool: _WorkerPool) -> DecodedChunk:
        """Decode keys one per task, so that an image that kills its worker is known and gets an error row."""
        parts: list[DecodedChunk] = []
        for key in keys:
            try:
                parts.append(self._collect(pool.submit([key])))
                pool.deaths_in_a_row = 0
            except BrokenProcessPool:
                pool.deaths_in_a_row += 1
                log.error("%s: %s", key, WORKER_DIED)
                if pool.deaths_in_a_row >= _MAX_DEATHS_IN_A_ROW:
                    raise WorkerError(
                        f"{pool.deaths_in_a_row} images in a row each killed a fresh decode worker (last {key}); "
                        "the host, not the data, is the likely cause (memory limits, a broken OpenCV)"
                    ) from None
                parts.append(DecodedChunk((), None, ((key, WORKER_DIED),)))
                pool.restart()
        return merge_chunks(parts)

    def _collect(self, future: concurrent.futures.Future[DecodedChunk]) -> DecodedChunk:
        try:
            return future.result(timeout=self.config.chunk_timeout_s)
        except concurrent.futures.TimeoutError as exc:
            raise WorkerError(f"a decode chunk took longer than {self.config.chunk_timeout_s:.0f}s") from exc

    def score_chunk(self, chunk: DecodedChunk) -> list[ResultRow]:
        """Rows for one decoded chunk: errors as error rows, the batch through the model."""
        rows = [ResultRow.failed(key, reason, self.model) for key, reason in chunk.errors]
        if chunk.pixels is not None and chunk.keys:
            # The workers ran prepare_pixels; with normalize this is preprocess_batch, one path.
            batch = normalize(chunk.pixels, self.bundle.manifest.input)
            verdicts = self.decider.decide_outputs(self.runner.infer(batch), chunk.shapes or None)
            rows.extend(ResultRow.scored(k, v, self.model) for k, v in zip(chunk.keys, verdicts, strict=True))
        return rows

    def _emit(self, chunk: DecodedChunk, writer: ResultWriter, stats: RunStats, report: Progress) -> None:
        rows = self.score_chunk(chunk)
        writer.write(rows)
        for row in rows:
            stats.tally.add(row.verdict, row.label)
        report.advance(len(chunk.keys), len(chunk.errors))


def merge_chunks(parts: Sequence[DecodedChunk]) -> DecodedChunk:
    """One chunk from several, keys and pixels in the same order."""
    arrays = [p.pixels for p in parts if p.pixels is not None and p.keys]
    return DecodedChunk(
        tuple(k for p in parts for k in p.keys),
        np.concatenate(arrays) if arrays else None,
        tuple(e for p in parts for e in p.errors),
    )


class _WorkerPool:
    """The decode process pool, restartable after a worker death breaks it."""

    def __init__(self, workers: int, source: ImageSource, settings: DecodeSettings) -> None:
        self._workers = workers
        self._source = source
        self._settings = settings
        self.deaths_in_a_row = 0
        self._executor = self._start()

    def _start(self) -> concurrent.futures.ProcessPoolExecutor:
        context = multiprocessing.get_context(_start_method())
        if context.get_start_method() == "forkserver":
            # Workers fork with OpenCV, numpy and qcsight_core's image code already imported.
            context.set_forkserver_preload(["qcsight_batch.decode"])
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=self._workers, mp_context=context, initializer=init_worker,
            initargs=(self._source, self._settings, worker_environment()),
        )

    def submit(self, keys: list[str]) -> concurrent.futures.Future[DecodedChunk]:
        """The chunk's future; one that has already failed when a worker died since the last restart."""
        try:
            return self._executor.submit(decode_in_worker, keys)
        except BrokenProcessPool as exc:
            failed: concurrent.futures.Future[DecodedChunk] = concurrent.futures.Future()
            failed.set_exception(exc)
            return failed

    def restart(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._start()

    def shutdown(self, wait: bool) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=True)


def summarize(
    stats: RunStats, resumed: Tally, model: ModelInfo, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The run summary: counts over the whole output (resumed rows included), rates for this run."""
    total = resumed.merge(stats.tally)
    scored = total.rows - total.errors
    return {
        "rows": total.rows,
        "scored": scored,
        "errors": total.errors,
        "by_verdict": dict(sorted(total.by_verdict.items())),
        "by_class": dict(sorted(total.by_class.items())),
        "defect_rate": round(total.by_verdict[DEFECT] / scored, 6) if scored else None,
        "resumed_rows": resumed.rows,
        "this_run": {
            "rows": stats.tally.rows,
            "errors": stats.tally.errors,
            "elapsed_s": round(stats.elapsed_s, 3),
            "images_per_s": round(stats.images_per_s, 2),
        },
        "model": {"name": model.name, "version": model.version, "precision": model.precision},
        **(extra or {}),
    }
