"""What the agent says about each verdict: the line's reject signal (line_signal.py), and alerts, metrics and status
into the durable outbox."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import cv2
import numpy as np

from qcsight_core import anomaly, messages
from qcsight_core.errors import QcsightError
from qcsight_core.topics import topic
from qcsight_core.verdict import DEFECT, UNCERTAIN, Verdict
from qcsight_edge.clock import Clock, iso_utc
from qcsight_edge.config import AlertConfig, LineSignalConfig
from qcsight_edge.errors import ImageNotQueuedError, OutboxError, UploadQueueError
from qcsight_edge.imagestore import ImageStore
from qcsight_edge.line_signal import LineSignal, line_payload
from qcsight_edge.queues import BoundedQueue
from qcsight_edge.ratelimit import RateLimitedLog
from qcsight_edge.redact import printable
from qcsight_edge.thumbnails import IOT_CORE_MAX_PAYLOAD, encoded_size, fit_thumbnail

if TYPE_CHECKING:
    from qcsight_edge.capture import Frame
    from qcsight_edge.models import LoadedModel
    from qcsight_edge.pipeline import Judgement
    from qcsight_edge.uploader import ImageUploader
    from qcsight_edge.uploadqueue import QueuedImage

log = logging.getLogger(__name__)

_ALERT_NAMESPACE = uuid.UUID("5b0f3a52-2d7e-4c1b-9a55-7c1e0f9d6a10")
# The envelope's share of an alert (schema, message id, a thing name of up to 128 characters, seq, time).
ENVELOPE_RESERVE = 512
KIND_BY_SCHEMA = {messages.METRICS: "metrics", messages.ALERT: "alerts", messages.STATUS: "status"}


class MessageStore(Protocol):
    """The part of qcsight_edge.outbox.Outbox the agent writes through."""

    def put(self, topic: str, kind: str, build: Callable[[int], tuple[str, bytes]]) -> tuple[int, bool]: ...


class MessageSink:
    """Builds each message (envelope with the outbox's next seq), validates it and stores it in the outbox.

    Nothing goes to the network from here: the sender drains the outbox. Seq and message are
    stored in one outbox transaction, so seq order is storage order whichever thread emits, and
    a message that fails validation uses no seq.
    """

    def __init__(self, outbox: MessageStore, thing: str, clock: Clock,
                 on_stored: Callable[[], None] | None = None) -> None:
        self.outbox = outbox
        self.thing = thing
        self.clock = clock
        self.on_stored = on_stored
        self._lock = threading.Lock()
        self.emitted: dict[str, int] = {"metrics": 0, "alerts": 0, "status": 0}
        self.dropped = 0

    def emit(self, schema: str, body: Mapping[str, Any], message_id: str | None = None) -> dict[str, Any]:
        """Store one message; returns it as stored. Raises MessageError if body breaks the schema.

        ``message_id`` replaces the envelope's random one, for a message that must keep its id if
        it is built again (an alert for a part judged again after a crash: the cloud drops it).
        """
        kind = KIND_BY_SCHEMA[schema]
        built: dict[str, Any] = {}

        def build(seq: int) -> tuple[str, bytes]:
            message = messages.envelope(schema, self.thing, seq)
            if message_id is not None:
                message["message_id"] = message_id
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


def alert_ids(thing: str, frame_id: str) -> tuple[str, str]:
    """(message_id, alert_id) of the alert for one frame: derived from the frame id, so the same part judged
    again after a crash (the hot folder's frame ids are stable) makes an alert the cloud drops as a duplicate."""
    return (uuid.uuid5(_ALERT_NAMESPACE, f"message/{thing}/{frame_id}").hex,
            uuid.uuid5(_ALERT_NAMESPACE, f"alert/{thing}/{frame_id}").hex)


def alert_body(frame_id: str, source_ref: str, verdict: Verdict, classes: tuple[str, ...], model: Mapping[str, str],
               thumb: Mapping[str, Any] | None, image_ref: str | None, alert_id: str | None = None,
               image_sha256: str | None = None) -> dict[str, Any]:
    """The qcsight.alert/1 fields after the envelope (an anomaly verdict adds its box)."""
    body: dict[str, Any] = {
        "alert_id": alert_id or messages.new_message_id(),
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
        if image_sha256 is not None:
            body["image_sha256"] = image_sha256
    if verdict.box is not None:
        body["box"] = verdict.box.to_dict()
    return body


Finish = Callable[["Frame", bool], None]


@dataclass
class _PendingAlert:
    """An alert owed for one judged frame; the frame is finished (``finish``) only once the alert is stored."""

    frame: Frame
    judgement: Judgement
    model: LoadedModel
    finish: Finish
    image_ref: str | None = None
    image_sha256: str | None = None
    image_saved: bool = False
    jpeg: bytes | None = None
    queued: QueuedImage | None = None


class VerdictOutputs:
    """For each judged frame: the reject signal to the line, then (for alerts) the stored image and the alert.

    The line signal goes first and directly, because the part is moving. Alerts (JPEG encoding of
    the full frame for the image store, the thumbnail, a synced outbox commit) are built on their
    own thread after start(), so a run of defects does not slow the line down; the hand-over
    queue is bounded and waits when full (an alert is never dropped). The full frame is kept in
    the image store, the thumbnail shows what the model judged (the ROI crop).

    Zero loss: a frame is finished (the hot folder moves its file to done/) only after its alert
    is committed to the outbox, so a kill at any moment leaves the part either in the inbox (read
    again on the next start) or with its alert stored. An outbox that cannot store (a full disk)
    is retried with backoff while the part stays unfinished and ``stats()["waiting"]`` says so;
    at stop, alerts still unstored leave their parts unfinished for the next start. With an
    ``uploader``, the full image is committed to the upload queue before the alert, which then
    names the object it will be (``image_ref``) and its sha256; the same rules hold for that queue.
    """

    def __init__(self, sink: MessageSink, line_signal: LineSignal, image_store: ImageStore | None,
                 alerts: AlertConfig, line: LineSignalConfig, clock: Clock, queue_size: int = 16,
                 retry_initial_s: float = 0.2, retry_max_s: float = 5.0,
                 uploader: ImageUploader | None = None) -> None:
        self.sink = sink
        self.line_signal = line_signal
        self.image_store = image_store
        self.uploader = uploader
        self.alerts = alerts
        self.line = line
        self.clock = clock
        self.signals = 0
        self.alert_count = 0
        self.alert_failures = 0
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._warn = RateLimitedLog(log)
        self._queue: BoundedQueue[_PendingAlert] = BoundedQueue(queue_size)
        self._pending = 0
        self._waiting = 0
        self._abandoned = 0
        self._last_error: str | None = None
        self._thumbnails_shrunk = 0
        self._thumbnails_dropped = 0
        self._images_not_queued = 0
        self._idle = threading.Condition()
        self._stop = threading.Event()
        self._abandon = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Build alerts on a background thread from now on (without it they are built inline)."""
        self._stop.clear()
        self._abandon.clear()
        self._thread = threading.Thread(target=self._alert_loop, name="qcsight-alerts", daemon=True)
        self._thread.start()

    def stats(self) -> dict[str, Any]:
        """For status: alerts stored, failed, waiting for the outbox, left unstored at stop; thumbnails cut;
        images too large for the upload queue (their alerts went without)."""
        with self._idle:
            return {"stored": self.alert_count, "failed": self.alert_failures, "waiting": self._waiting,
                    "abandoned": self._abandoned, "last_error": self._last_error,
                    "thumbnails_shrunk": self._thumbnails_shrunk, "thumbnails_dropped": self._thumbnails_dropped,
                    "images_not_queued": self._images_not_queued}

    def on_verdict(self, frame: Frame, judgement: Judgement, model: LoadedModel, finish: Finish) -> None:
        verdict = judgement.verdict
        if verdict.status == DEFECT or (verdict.status == UNCERTAIN and self.line.on_uncertain):
            try:
                self.line_signal.reject(line_payload(frame.frame_id, frame.source_ref, verdict, model.version,
                                                     self.clock))
                self.signals += 1
            except Exception as exc:  # the line signal must never stop judging
                self._warn.warning("line-signal", "line signal failed: %s", exc)
        if verdict.status == DEFECT or (verdict.status == UNCERTAIN and self.alerts.on_uncertain):
            self._submit(_PendingAlert(frame, judgement, model, finish))
        else:
            finish(frame, True)

    def _submit(self, item: _PendingAlert) -> None:
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._deliver(item, retry=False)
            return
        with self._idle:
            self._pending += 1
        while not self._queue.put_wait(item, 0.5):
            if self._abandon.is_set() or not thread.is_alive():
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()
                if self._abandon.is_set():
                    self._gave_up(item, "stopping")
                else:  # the worker ended (stopping): build it here rather than lose it
                    self._deliver(item, retry=False)
                return

    def _alert_loop(self) -> None:
        while not (self._stop.is_set() and not len(self._queue)):
            item = self._queue.get(0.2)
            if item is None:
                continue
            try:
                self._deliver(item, retry=not self._abandon.is_set())
            except Exception:  # never lose the thread: the next alert must still go out
                log.exception("building the alert for frame %s failed", item.frame.frame_id)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Wait until every submitted alert is stored; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending <= 0, timeout_s)

    def close(self, timeout_s: float) -> bool:
        """Store the alerts still queued (up to timeout_s), then end the thread.

        Alerts the outbox still refuses at the deadline are not stored: their parts stay unfinished.
        """
        flushed = self.flush(timeout_s)
        self._stop.set()
        if not flushed:
            self._abandon.set()  # stop retrying: one more attempt each, then leave the parts unfinished
        if self._thread is not None:
            self._thread.join(max(0.5, timeout_s))
        if not flushed:
            log.error("%d alerts were not stored before the deadline; their parts stay unfinished", self._pending)
        return flushed

    def _deliver(self, item: _PendingAlert, retry: bool) -> None:
        """Store the alert, then finish the frame; while the outbox cannot store, retry with backoff (if retry)."""
        delay = self._retry_initial_s
        failing = False
        try:
            while True:
                try:
                    self._store(item)
                except (OutboxError, UploadQueueError) as exc:  # cannot write now (a full disk): keep the part, retry
                    if not failing:
                        failing = True
                        with self._idle:
                            self._waiting += 1
                    with self._idle:
                        self._last_error = str(exc)
                    self._warn.warning("alert-unstored", "alert for frame %s (%s) not stored: %s; the part stays "
                                       "unfinished", item.frame.frame_id, printable(item.frame.source_ref), exc)
                    if not retry or self._abandon.wait(delay):
                        self._gave_up(item, str(exc))
                        return
                    delay = min(delay * 2, self._retry_max_s)
                    continue
                except QcsightError as exc:  # the alert itself is broken (it fails validation): retrying cannot help
                    with self._idle:
                        self.alert_failures += 1
                        self._last_error = str(exc)
                    log.error("alert for frame %s (%s) cannot be built: %s; the part goes to failed",
                              item.frame.frame_id, printable(item.frame.source_ref), exc)
                    item.finish(item.frame, False)
                    return
                item.finish(item.frame, True)
                return
        finally:
            if failing:
                with self._idle:
                    self._waiting -= 1

    def _gave_up(self, item: _PendingAlert, reason: str) -> None:
        with self._idle:
            self._abandoned += 1
        log.error("alert for frame %s (%s) not stored (%s): the part stays unfinished and is judged again on the "
                  "next start", item.frame.frame_id, printable(item.frame.source_ref), reason)

    def _save_image(self, item: _PendingAlert) -> None:
        """Keep the full frame in the local store (once: a retry keeps what it saved) and encode it for the upload."""
        frame = item.frame
        item.image_saved = True
        if self.image_store is None or frame.image is None:
            return
        try:
            item.jpeg = self.image_store.encode(frame.image)
            item.image_ref = self.image_store.save_jpeg(frame.frame_id, item.jpeg)
        except QcsightError as exc:
            self._warn.warning("image-store", "alert %s: full image not kept locally: %s", frame.frame_id, exc)

    def _overlay(self, judgement: Judgement, model: LoadedModel) -> np.ndarray | None:
        """An anomaly verdict's score map blended over the judged region (None for classifiers)."""
        verdict = judgement.verdict
        if verdict.anomaly_map is None:
            return None
        try:
            return anomaly.overlay(judgement.judged, verdict.anomaly_map, model.bundle.manifest.input,
                                   verdict.box, max_side=self.alerts.thumbnail_max_side)
        except (QcsightError, cv2.error, ValueError) as exc:  # the alert goes out without its overlay
            self._warn.warning("overlay", "alert sent without its overlay: %s", exc)
            return None

    def _queue_image(self, item: _PendingAlert, alert_id: str) -> None:
        """Commit the JPEG to the upload queue before the alert; UploadQueueError (a full disk) is retried."""
        assert self.uploader is not None and item.jpeg is not None
        try:
            item.queued = self.uploader.submit(alert_id, self.clock.time(), item.jpeg)
        except ImageNotQueuedError as exc:
            item.jpeg = None  # never fits: the alert goes with the local reference only
            with self._idle:
                self._images_not_queued += 1
            self._warn.warning("image-not-queued", "alert %s goes without an uploaded image: %s",
                               item.frame.frame_id, exc)

    def _store(self, item: _PendingAlert) -> None:
        frame, judgement, model = item.frame, item.judgement, item.model
        if not item.image_saved:
            self._save_image(item)
        message_id, alert_id = alert_ids(self.sink.thing, frame.frame_id)
        if self.uploader is not None and item.queued is None and item.jpeg is not None:
            self._queue_image(item, alert_id)
        image_ref, image_sha256 = item.image_ref, None
        if item.queued is not None:
            image_ref, image_sha256 = item.queued.uri, item.queued.sha256
        elif image_ref is not None and item.jpeg is not None:
            image_sha256 = hashlib.sha256(item.jpeg).hexdigest()
        body = alert_body(frame.frame_id, frame.source_ref, judgement.verdict, model.bundle.manifest.classes,
                          model.ident, None, image_ref, alert_id, image_sha256)
        budget = IOT_CORE_MAX_PAYLOAD - ENVELOPE_RESERVE - len(json.dumps(body, separators=(",", ":")))
        thumb, shrunk = fit_thumbnail(judgement.judged, self.alerts.thumbnail_max_side,
                                      self.alerts.thumbnail_quality, budget)
        if thumb is not None:
            body["thumbnail"] = thumb
        with self._idle:
            self._thumbnails_shrunk += shrunk and thumb is not None
            self._thumbnails_dropped += thumb is None
        if thumb is None:
            self._warn.warning("thumbnail-dropped", "alert for frame %s goes without its thumbnail: it cannot fit "
                               "IoT Core's %d-byte payload limit", frame.frame_id, IOT_CORE_MAX_PAYLOAD)
        picture = self._overlay(judgement, model)
        if picture is not None:
            # The overlay takes what the thumbnail left of the payload budget, shrunk like it, or goes.
            left = budget - (encoded_size(thumb) if thumb is not None else 0)
            overlay, _ = fit_thumbnail(picture, self.alerts.thumbnail_max_side, self.alerts.thumbnail_quality, left)
            if overlay is not None:
                body["overlay"] = overlay
            else:
                self._warn.warning("overlay-dropped", "alert for frame %s goes without its overlay: it cannot fit "
                                   "IoT Core's %d-byte payload limit", frame.frame_id, IOT_CORE_MAX_PAYLOAD)
        self.sink.emit(messages.ALERT, body, message_id)
        with self._idle:
            self.alert_count += 1
