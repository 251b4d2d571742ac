"""Capture -> bounded frame queue -> ROI crop + preprocess -> ONNX Runtime -> verdict -> outputs.

Three threads: capture (reads the source), prepare (crop, preprocess, input statistics) and
inference (run, decide, hand on). Preparing the next frame while the current one is in ONNX
Runtime keeps the model busy; only frames about to be judged are prepared, because the
drop-oldest queue sits before the prepare stage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import cv2
import numpy as np

from qcsight_core.drift import InputStats, input_statistics
from qcsight_core.errors import QcsightError
from qcsight_core.preprocess import PreprocessSpec, normalize, prepare_pixels
from qcsight_core.verdict import Verdict
from qcsight_edge.capture import Frame, FrameSource
from qcsight_edge.clock import Clock
from qcsight_edge.config import Roi
from qcsight_edge.metrics import MetricsRecorder
from qcsight_edge.models import LoadedModel, ModelManager
from qcsight_edge.queues import BoundedQueue
from qcsight_edge.ratelimit import RateLimitedLog
from qcsight_edge.redact import printable

log = logging.getLogger(__name__)

T = TypeVar("T")
FrameQueue = BoundedQueue[Frame]


@dataclass(frozen=True)
class Prepared:
    """A frame made ready for one preprocessing spec: the region the model sees, its statistics, its input batch."""

    frame: Frame
    spec: PreprocessSpec
    region: np.ndarray
    stats: InputStats
    batch: np.ndarray


@dataclass(frozen=True)
class Unreadable:
    """A frame that cannot be prepared (no image, a crop outside it, a decoder error), and why."""

    frame: Frame
    error: str


@dataclass(frozen=True)
class Judgement:
    """What one frame became: the verdict, the statistics of what the model saw, and that image."""

    verdict: Verdict
    stats: InputStats
    judged: np.ndarray


def crop(image: np.ndarray, roi: Roi | None) -> np.ndarray:
    """The ROI of image (clipped to the frame); raises QcsightError when nothing of it is inside."""
    if roi is None:
        return image
    h, w = image.shape[:2]
    x0, y0 = min(roi.x, w), min(roi.y, h)
    x1, y1 = min(roi.x + roi.width, w), min(roi.y + roi.height, h)
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise QcsightError(f"roi {roi.x},{roi.y} {roi.width}x{roi.height} lies outside the {w}x{h} frame")
    return image[y0:y1, x0:x1]


def prepare(frame: Frame, spec: PreprocessSpec, roi: Roi | None) -> Prepared | Unreadable:
    """Crop and preprocess (the one qcsight_core path); a corrupt frame comes back Unreadable, never raises."""
    if frame.image is None:
        return Unreadable(frame, frame.error or "no image")
    try:
        region = crop(frame.image, roi)
        pixels = prepare_pixels(region, spec)
        stats = input_statistics(pixels, spec.color)
        batch = normalize(pixels, spec)[None]
    except (QcsightError, cv2.error, ValueError) as exc:
        return Unreadable(frame, str(exc))
    return Prepared(frame, spec, region, stats, batch)


def judge(model: LoadedModel, image: np.ndarray, roi: Roi | None) -> Judgement:
    """Crop, preprocess, run and decide one image (raises QcsightError when it cannot)."""
    ready = prepare(Frame("-", image, "-"), model.bundle.manifest.input, roi)
    if isinstance(ready, Unreadable):
        raise QcsightError(ready.error)
    return _run(model, ready)


def _run(model: LoadedModel, ready: Prepared) -> Judgement:
    # decide_outputs: an anomaly bundle's verdict also carries its score map and the box on the judged region.
    (verdict,) = model.decider.decide_outputs(model.runner.infer(ready.batch), [ready.region.shape])
    return Judgement(verdict, ready.stats, ready.region)


class VerdictSink(Protocol):
    """Where judged frames go (alerts, line signal, image store).

    The sink owns finishing the frame: it calls ``finish(frame, True)`` once everything owed for
    it is durable (its alert committed to the outbox), possibly later and on another thread. A
    frame never finished stays with its source (the hot folder reads the file again on the next
    start), so a crash in between loses nothing.
    """

    def on_verdict(self, frame: Frame, judgement: Judgement, model: LoadedModel,
                   finish: Callable[[Frame, bool], None]) -> None: ...


@dataclass
class PipelineCounters:
    captured: int = 0
    judged: int = 0
    errors: int = 0
    dropped: int = 0


class Pipeline:
    """Runs one source through the current model on three threads (capture, prepare, inference).

    Args:
        source: the frame source.
        models: the running model and its hot swap.
        sink: receives every judged frame.
        metrics: the current metrics window.
        clock: time for latencies.
        roi: the crop applied before preprocessing.
        queue_size: frames waiting for inference at most (one more may be prepared, one in the model).
        on_model_change: called on the inference thread right after a new model was swapped in,
            with the old and the new model, before the next frame is judged.
        read_timeout_s: the longest one source read or queue wait blocks, which bounds how fast
            stop() is noticed.
    """

    def __init__(self, source: FrameSource, models: ModelManager, sink: VerdictSink, metrics: MetricsRecorder,
                 clock: Clock, roi: Roi | None = None, queue_size: int = 4,
                 on_model_change: Callable[[LoadedModel, LoadedModel], None] | None = None,
                 read_timeout_s: float = 0.2) -> None:
        self.source = source
        self.models = models
        self.sink = sink
        self.metrics = metrics
        self.clock = clock
        self.roi = roi
        self.queue: BoundedQueue[Frame] = BoundedQueue(queue_size)
        self._ready: BoundedQueue[Prepared | Unreadable] = BoundedQueue(1)
        self.counters = PipelineCounters()
        self._on_model_change = on_model_change
        self._read_timeout_s = read_timeout_s
        self._stop = threading.Event()
        self._capture_done = threading.Event()
        self._prepare_done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._counter_lock = threading.Lock()
        self._warn = RateLimitedLog(log)
        self._active = models.current
        self.fatal: BaseException | None = None

    # ---------------------------------------------------------------- one frame

    def process(self, frame: Frame) -> Judgement | None:
        """Judge one frame and hand it on; corrupt frames and failures are counted, never raised."""
        self.swap_if_ready()
        return self._judge(prepare(frame, self._active.bundle.manifest.input, self.roi))

    def _judge(self, ready: Prepared | Unreadable) -> Judgement | None:
        model = self._active
        spec = model.bundle.manifest.input
        if isinstance(ready, Prepared) and ready.spec != spec:
            ready = prepare(ready.frame, spec, self.roi)  # prepared for the model that was just replaced
        frame = ready.frame
        if isinstance(ready, Unreadable):
            self._failed(frame, ready.error)
            return None
        try:
            judgement = _run(model, ready)
        except (QcsightError, ValueError) as exc:
            self._failed(frame, str(exc))
            return None
        latency = max(0.0, self.clock.monotonic() - frame.captured_at)
        verdict = judgement.verdict
        self.metrics.record(verdict.status, verdict.label, verdict.confidence, latency, judgement.stats)
        with self._counter_lock:
            self.counters.judged += 1
        self.sink.on_verdict(frame, judgement, model, self.source.finish)
        return judgement

    @property
    def active_model(self) -> LoadedModel:
        """The model judging frames now (the manager's current one is swapped in only between frames)."""
        return self._active

    def swap_if_ready(self) -> None:
        """Make a newly loaded model the active one; called only between frames (on the inference thread)."""
        new = self.models.take_pending()
        if new is not None:
            old, self._active = self._active, new
            log.info("model swapped: %s %s -> %s %s", old.name, old.version, new.name, new.version)
            if self._on_model_change is not None:
                self._on_model_change(old, new)

    def _failed(self, frame: Frame, reason: str) -> None:
        self.metrics.error()
        with self._counter_lock:
            self.counters.errors += 1
        self._warn.warning("frame-error", "frame %s from %s not judged: %s", frame.frame_id,
                           printable(frame.source_ref), printable(reason))
        self.source.finish(frame, False)

    # ---------------------------------------------------------------- threads

    def start(self) -> None:
        # The stages are the parallelism: OpenCV's own thread pool would split each frame's resize
        # across the cores that capture and inference are using, adding synchronisation for
        # nothing (measured: 0.6 ms of CPU per frame, a fifth of the pipeline, in benchmarks/bench_agent.py).
        cv2.setNumThreads(1)
        self._threads = [
            threading.Thread(target=self._guard, args=(self._capture_loop,), name="qcsight-capture", daemon=True),
            threading.Thread(target=self._guard, args=(self._prepare_loop,), name="qcsight-prepare", daemon=True),
            threading.Thread(target=self._guard, args=(self._inference_loop,), name="qcsight-inference", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _guard(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException as exc:  # a bug must stop the agent visibly, not leave a silent thread behind
            log.exception("%s failed", threading.current_thread().name)
            self.fatal = exc
            self._stop.set()

    def _capture_loop(self) -> None:
        try:
            while not self._stop.is_set() and not self.source.exhausted:
                frame = self.source.read(self._read_timeout_s)
                if frame is None:
                    continue
                frame = replace(frame, captured_at=self.clock.monotonic())
                with self._counter_lock:
                    self.counters.captured += 1
                if self.source.lossless:
                    if not self._put_wait(self.queue, frame):
                        return  # stopping: the file stays where it is and is read on the next start
                    continue
                dropped = self.queue.put(frame)
                if dropped is not None:
                    self.metrics.dropped()
                    with self._counter_lock:
                        self.counters.dropped += 1
                    self.source.finish(dropped, False)
        finally:
            self._capture_done.set()

    def _put_wait(self, queue: BoundedQueue[T], item: T) -> bool:
        while not queue.put_wait(item, self._read_timeout_s):
            if self._stop.is_set():
                return False
        return True

    def _prepare_loop(self) -> None:
        try:
            while not self._stop.is_set():
                frame = self.queue.get(self._read_timeout_s)
                if frame is None:
                    if self._capture_done.is_set() and not len(self.queue):
                        return
                    continue
                # Read once: the inference thread may swap models meanwhile and re-prepares if so.
                spec = self._active.bundle.manifest.input
                if not self._put_wait(self._ready, prepare(frame, spec, self.roi)):
                    return
        finally:
            self._prepare_done.set()

    def _inference_loop(self) -> None:
        while not self._stop.is_set():
            ready = self._ready.get(self._read_timeout_s)
            if ready is None:
                if self._prepare_done.is_set() and not len(self._ready):
                    return
                self.swap_if_ready()  # an idle line still gets (and announces) its new model
                continue
            self.swap_if_ready()
            self._judge(ready)

    @property
    def finished(self) -> bool:
        """True when every thread ended (stopped, the source is exhausted and drained, or a fatal error)."""
        return bool(self._threads) and not any(t.is_alive() for t in self._threads)

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop reading, finish the frame in flight, and join; frames still queued are not judged.

        Returns False if a thread did not end within timeout_s (a source read stuck in a driver).
        """
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        leftover = len(self.queue.drain()) + len(self._ready.drain())
        if leftover:
            log.info("stopping: %d queued frames not judged", leftover)
        self.source.close()
        return not any(t.is_alive() for t in self._threads)

    def snapshot(self) -> dict[str, Any]:
        with self._counter_lock:
            return {"captured": self.counters.captured, "judged": self.counters.judged,
                    "errors": self.counters.errors, "dropped": self.counters.dropped,
                    "queued": len(self.queue) + len(self._ready)}
