"""What the agent says: the line's reject signal (local), and alerts/metrics/status into the durable outbox."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol

import cv2
import numpy as np

from qcsight_core import anomaly, messages
from qcsight_core.errors import QcsightError
from qcsight_core.imageio import encode_jpeg
from qcsight_core.topics import line_signal_topic, topic
from qcsight_core.verdict import DEFECT, UNCERTAIN, Verdict
from qcsight_edge.clock import Clock, iso_utc
from qcsight_edge.config import AlertConfig, LineSignalConfig
from qcsight_edge.imagestore import ImageStore
from qcsight_edge.publisher import Publisher
from qcsight_edge.queues import BoundedQueue

if TYPE_CHECKING:
    from qcsight_edge.capture import Frame
    from qcsight_edge.models import LoadedModel
    from qcsight_edge.pipeline import Judgement

log = logging.getLogger(__name__)

KIND_BY_SCHEMA = {messages.METRICS: "metrics", messages.ALERT: "alerts", messages.STATUS: "status"}


class Outbox(Protocol):
    """The part of qcsight_edge.outbox.Outbox the agent writes through."""

    def put(self, topic: str, kind: str, build: Callable[[int], tuple[str, bytes]]) -> tuple[int, bool]: ...


class MessageSink:
    """Builds each message (envelope with the outbox's next seq), validates it and stores it in the outbox.

    Nothing goes to the network from here: the sender drains the outbox. Seq and message are
    stored in one outbox transaction, so seq order is storage order whichever thread emits, and
    a message that fails validation uses no seq.
    """

    def __init__(self, outbox: Outbox, thing: str, clock: Clock, on_stored: Callable[[], None] | None = None) -> None:
        self.outbox = outbox
        self.thing = thing
        self.clock = clock
        self.on_stored = on_stored
        self._lock = threading.Lock()
        self.emitted: dict[str, int] = {"metrics": 0, "alerts": 0, "status": 0}
        self.dropped = 0

    def emit(self, schema: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Store one message; returns it as stored. Raises MessageError if body breaks the schema."""
        kind = KIND_BY_SCHEMA[schema]
        built: dict[str, Any] = {}

        def build(seq: int) -> tuple[str, bytes]:
            message = messages.envelope(schema, self.thing, seq)
            message["time"] = iso_utc(self.clock.time())
            message.update(body)
            built.update(message)
            return message["message_id"], messages.encode(message)

        _, stored = self.outbox.put(topic(self.thing, kind), kind, build)
        with self._lock:
            if stored:
                self.emitted[kind] += 1
            else:
                self.dropped += 1
        if stored and self.on_stored is not None:
            self.on_stored()
        return built


class LineSignal(Protocol):
    """Tells the line controller to reject a part; must return quickly (it runs on the inference thread)."""

    def reject(self, payload: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class CallbackLineSignal:
    """Calls a function for each reject: a GPIO driver, a PLC client, or a test's list."""

    def __init__(self, callback: Callable[[Mapping[str, Any]], None]) -> None:
        self._callback = callback

    def reject(self, payload: Mapping[str, Any]) -> None:
        self._callback(payload)

    def close(self) -> None:
        pass


class LogLineSignal:
    """Writes each reject to the log (the stand-in when no line controller is wired)."""

    def reject(self, payload: Mapping[str, Any]) -> None:
        log.info("REJECT frame=%s status=%s label=%s score=%.3f", payload.get("frame_id"), payload.get("status"),
                 payload.get("label"), float(payload.get("score", 0.0)))

    def close(self) -> None:
        pass


class PublisherLineSignal:
    """Publishes each reject on the local line topic through a Publisher (a broker on the line's network).

    Delivery is QoS 1 but not awaited: a reject that cannot be delivered within its moment is
    useless to the line, so failures are logged and counted, never queued for later.
    """

    def __init__(self, publisher: Publisher, thing: str, connect_timeout_s: float = 5.0) -> None:
        self._publisher = publisher
        self.topic = line_signal_topic(thing)
        self.failed = 0
        self._connect_timeout_s = connect_timeout_s

    def reject(self, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        try:
            future = self._publisher.publish(self.topic, data, 1)
        except Exception as exc:  # a transport's error must not stop inference
            self._failed(exc)
            return
        future.add_done_callback(self._done)

    def _done(self, future: Future[None]) -> None:
        exc = future.exception()
        if exc is not None:
            self._failed(exc)

    def _failed(self, exc: BaseException) -> None:
        self.failed += 1
        log.warning("line signal on %s not delivered: %s", self.topic, exc)

    def close(self) -> None:
        self._publisher.close(self._connect_timeout_s)


def line_payload(frame_id: str, source_ref: str, verdict: Verdict, model_version: str, clock: Clock) -> dict[str, Any]:
    return {"frame_id": frame_id, "source": source_ref, "reject": True, "status": verdict.status,
            "label": verdict.label, "score": round(verdict.score, 6), "model_version": model_version,
            "time": iso_utc(clock.time())}


def thumbnail(image: np.ndarray, max_side: int, quality: int) -> dict[str, Any]:
    """A JPEG no larger than max_side on its longer side, base64, as the alert's `thumbnail` object."""
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    small = image
    if scale < 1.0:
        small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    data = encode_jpeg(small, quality)
    return {"format": "jpeg", "width": int(small.shape[1]), "height": int(small.shape[0]),
            "data": base64.b64encode(data).decode("ascii")}


def alert_body(frame_id: str, source_ref: str, verdict: Verdict, classes: tuple[str, ...], model: Mapping[str, str],
               thumb: Mapping[str, Any] | None, image_ref: str | None,
               overlay: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The qcsight.alert/1 fields after the envelope (box and overlay: anomaly bundles)."""
    body: dict[str, Any] = {
        "alert_id": messages.new_message_id(),
        "frame_id": frame_id,
        "source": source_ref,
        "model": dict(model),
        "verdict": {"status": verdict.status, "label": verdict.label, "score": round(verdict.score, 6),
                    "confidence": round(verdict.confidence, 6), "scores": verdict.scores(classes)},
    }
    if thumb is not None:
        body["thumbnail"] = dict(thumb)
    if image_ref is not None:
        body["image_ref"] = image_ref
    if verdict.box is not None:
        body["box"] = verdict.box.to_dict()
    if overlay is not None:
        body["overlay"] = dict(overlay)
    return body


class RateLimitedLog:
    """At most one log record per key per interval, with how many were suppressed."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._logger = logger
        self._interval = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -1e9) < self._interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        suffix = f" ({suppressed} similar suppressed)" if suppressed else ""
        self._logger.warning(message + suffix, *args)


class VerdictOutputs:
    """For each judged frame: the reject signal to the line, then (for alerts) the stored image and the alert.

    The line signal goes first and directly, because the part is moving. Alerts (JPEG encoding of
    the full frame for the image store, the thumbnail, a synced outbox commit) are built on their
    own thread after start(), so a run of defects does not slow the line down; the hand-over
    queue is bounded and waits when full (an alert is never dropped). The full frame is kept in
    the image store, the thumbnail shows what the model judged (the ROI crop).
    """

    def __init__(self, sink: MessageSink, line_signal: LineSignal, image_store: ImageStore | None,
                 alerts: AlertConfig, line: LineSignalConfig, clock: Clock, queue_size: int = 16) -> None:
        self.sink = sink
        self.line_signal = line_signal
        self.image_store = image_store
        self.alerts = alerts
        self.line = line
        self.clock = clock
        self.signals = 0
        self.alert_count = 0
        self.alert_failures = 0
        self._warn = RateLimitedLog(log)
        self._queue: BoundedQueue[tuple[Frame, Judgement, LoadedModel]] = BoundedQueue(queue_size)
        self._pending = 0
        self._idle = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Build alerts on a background thread from now on (without it they are built inline)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._alert_loop, name="qcsight-alerts", daemon=True)
        self._thread.start()

    def on_verdict(self, frame: Frame, judgement: Judgement, model: LoadedModel) -> None:
        verdict = judgement.verdict
        if verdict.status == DEFECT or (verdict.status == UNCERTAIN and self.line.on_uncertain):
            try:
                self.line_signal.reject(line_payload(frame.frame_id, frame.source_ref, verdict, model.version,
                                                     self.clock))
                self.signals += 1
            except Exception as exc:  # the line signal must never stop judging
                self._warn.warning("line-signal", "line signal failed: %s", exc)
        if verdict.status == DEFECT or (verdict.status == UNCERTAIN and self.alerts.on_uncertain):
            self._submit((frame, judgement, model))

    def _submit(self, item: tuple[Frame, Judgement, LoadedModel]) -> None:
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._alert(*item)
            return
        with self._idle:
            self._pending += 1
        while not self._queue.put_wait(item, 0.5):
            if not thread.is_alive():  # the worker ended (stopping): build it here rather than lose it
                with self._idle:
                    self._pending -= 1
                self._alert(*item)
                return

    def _alert_loop(self) -> None:
        while not (self._stop.is_set() and not len(self._queue)):
            item = self._queue.get(0.2)
            if item is None:
                continue
            try:
                self._alert(*item)
            except Exception:  # never lose the thread: the next alert must still go out
                log.exception("building the alert for frame %s failed", item[0].frame_id)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every submitted alert is stored; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending <= 0, timeout_s)

    def close(self, timeout_s: float) -> bool:
        """Store the alerts still queued (up to timeout_s), then end the thread."""
        flushed = self.flush(timeout_s)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(0.5, timeout_s))
        if not flushed:
            log.error("%d alerts were not stored before the deadline", self._pending)
        return flushed

    def _overlay(self, judgement: Judgement, model: LoadedModel) -> dict[str, Any] | None:
        """An anomaly verdict's score map over the judged region, as a thumbnail (None for classifiers)."""
        verdict = judgement.verdict
        if verdict.anomaly_map is None:
            return None
        side = self.alerts.thumbnail_max_side
        try:
            picture = anomaly.overlay(judgement.judged, verdict.anomaly_map, model.bundle.manifest.input,
                                      verdict.box, max_side=side)
            return thumbnail(picture, side, self.alerts.thumbnail_quality)
        except (QcsightError, cv2.error, ValueError) as exc:  # the alert goes out without its overlay
            self._warn.warning("overlay", "alert sent without its overlay: %s", exc)
            return None

    def _alert(self, frame: Frame, judgement: Judgement, model: LoadedModel) -> None:
        image_ref = None
        if self.image_store is not None and frame.image is not None:
            try:
                image_ref = self.image_store.save(frame.frame_id, frame.image)
            except QcsightError as exc:
                self._warn.warning("image-store", "alert %s sent without its image: %s", frame.frame_id, exc)
        try:
            thumb = thumbnail(judgement.judged, self.alerts.thumbnail_max_side, self.alerts.thumbnail_quality)
            body = alert_body(frame.frame_id, frame.source_ref, judgement.verdict, model.bundle.manifest.classes,
                              model.ident, thumb, image_ref, self._overlay(judgement, model))
            self.sink.emit(messages.ALERT, body)
            self.alert_count += 1
        except QcsightError as exc:
            self.alert_failures += 1
            log.error("alert for frame %s not stored: %s", frame.frame_id, exc)
