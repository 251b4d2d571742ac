"""The edge agent: wires source, pipeline, model hot swap, outputs, outbox and sender; runs until told to stop."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from qcsight_core import messages
from qcsight_core.errors import ConfigError, QcsightError
from qcsight_edge.capture import FrameSource, open_source
from qcsight_edge.clock import Clock, SystemClock
from qcsight_edge.config import AgentConfig, TransportConfig, load_config
from qcsight_edge.errors import EdgeError, PublishError
from qcsight_edge.imagestore import ImageStore
from qcsight_edge.line_signal import LineSignal, make_line_signal, warn_if_key_exposed
from qcsight_edge.metrics import MetricsRecorder, MetricsWindow
from qcsight_edge.models import LoadedModel, ModelManager, Rejected, load_model
from qcsight_edge.outbox import Outbox
from qcsight_edge.outputs import MessageSink, VerdictOutputs
from qcsight_edge.pipeline import Pipeline
from qcsight_edge.publisher import Publisher
from qcsight_edge.sender import OutboxSender
from qcsight_edge.uploader import ImageUploader, make_uploader

log = logging.getLogger(__name__)

ConfigPoll = Callable[[], AgentConfig | None]


class ModelListener(Protocol):
    """Told when a requested bundle was swapped in or refused (the Greengrass model slot answers from these)."""

    def model_loaded(self, bundle: Path) -> None: ...

    def model_rejected(self, bundle: Path, reason: str) -> None: ...


@dataclass
class AgentParts:
    """The I/O the agent runs on; build_parts() makes them from a configuration, tests inject their own."""

    source: FrameSource
    outbox: Outbox
    line_signal: LineSignal
    image_store: ImageStore | None
    publisher: Publisher | None = None
    uploader: ImageUploader | None = None
    closers: list[Callable[[], None]] = field(default_factory=list)


class Agent:
    """Runs one camera line: start(), then tick() periodically (run() does both), then stop().

    Args:
        config: the validated configuration.
        parts: source, outbox, line signal, image store and (optional) publisher.
        clock: time for windows, heartbeats and message timestamps.
        loader: loads and warms a bundle (replaceable for the benchmark).
        config_poll: returns a new configuration when it changed (file watcher); None when not.
    """

    def __init__(self, config: AgentConfig, parts: AgentParts, clock: Clock | None = None,
                 loader: Callable[..., LoadedModel] = load_model, config_poll: ConfigPoll | None = None) -> None:
        self.config = config
        self.parts = parts
        self.clock: Clock = clock or SystemClock()
        self._loader = loader
        self._config_poll = config_poll
        self._state = "starting"
        self._started_at = self.clock.monotonic()
        self._config_lock = threading.Lock()
        self.sender: OutboxSender | None = None
        self.sink = MessageSink(parts.outbox, config.thing_name, self.clock, on_stored=self._wake_sender)
        self.models: ModelManager | None = None
        self.metrics: MetricsRecorder | None = None
        self.pipeline: Pipeline | None = None
        self.outputs: VerdictOutputs | None = None
        self._next_heartbeat = 0.0
        self._next_config_check = 0.0
        self._next_lost_report = 0.0
        self._stopped = False
        self.model_listeners: list[ModelListener] = []

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Load the model, announce the start, start sending and judging.

        Raises:
            QcsightError: the configured bundle cannot be loaded (a status `error` is stored first).
        """
        try:
            model = self._loader(self.config.model)
        except QcsightError as exc:
            self._state = "failed"
            self.status("error", error=f"model bundle {self.config.model.bundle}: {exc}")
            reason = str(exc)
            self._tell_listeners(lambda listener: listener.model_rejected(self.config.model.bundle, reason))
            raise
        self._tell_listeners(lambda listener: listener.model_loaded(model.source))
        self.models = ModelManager(model, self.config.model, self._model_rejected, self._loader)
        self.metrics = MetricsRecorder(self.clock, self.config.metrics.reservoir_size, model.reference)
        self.outputs = VerdictOutputs(self.sink, self.parts.line_signal, self.parts.image_store, self.config.alerts,
                                      self.config.line_signal, self.clock, uploader=self.parts.uploader)
        self.pipeline = Pipeline(self.parts.source, self.models, self.outputs, self.metrics, self.clock,
                                 self.config.roi, self.config.queue_size, on_model_change=self._model_changed)
        self._state = "running"
        self.status("start", detail={"config": self.config.redacted_dict()})
        now = self.clock.monotonic()
        self._next_heartbeat = now + self.config.metrics.heartbeat_s
        self._next_config_check = now + self.config.config_reload_s
        self.outputs.start()
        if self.parts.uploader is not None:
            self.parts.uploader.start()
        self.pipeline.start()
        self._connect_transport()
        log.info("agent %s running: model %s %s (%s), source %s", self.config.thing_name, model.name, model.version,
                 model.runner.precision, self.config.source.kind)

    def _connect_transport(self) -> None:
        publisher = self.parts.publisher
        if publisher is None:
            log.info("transport none: messages stay in the outbox %s", self.config.outbox.path)
            return
        self.sender = OutboxSender(self.parts.outbox, publisher)
        self.sender.start()
        # Connecting can take connect_timeout_s when the broker is unreachable; neither the line nor a
        # SIGTERM waits for it. The sender backs off while offline and the outbox keeps every message.
        threading.Thread(target=self._connect, args=(publisher,), name="qcsight-connect", daemon=True).start()

    def _connect(self, publisher: Publisher) -> None:
        try:
            publisher.connect(self.config.transport.connect_timeout_s)
        except PublishError as exc:
            log.warning("transport %s not connected yet (%s); messages wait in the outbox",
                        self.config.transport.kind, exc)
        except Exception:  # a transport bug must not pass silently, nor end the agent
            log.exception("connecting the %s transport failed", self.config.transport.kind)
        else:
            log.info("transport %s connected", self.config.transport.kind)

    def _wake_sender(self) -> None:
        if self.sender is not None:
            self.sender.wake()

    def tick(self) -> None:
        """Close a due metrics window, send a due heartbeat, pick up a changed configuration."""
        if self.metrics is None:
            return
        now = self.clock.monotonic()
        if now - self.metrics.window_start >= self.config.metrics.window_s:
            self._emit_window(self.metrics.rotate())
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + self.config.metrics.heartbeat_s
            self.status("heartbeat")
        if self._config_poll is not None and self.config.config_reload_s > 0 and now >= self._next_config_check:
            self._next_config_check = now + self.config.config_reload_s
            self._poll_config()
        if now >= self._next_lost_report:
            # At the heartbeat's pace: a long outage with a full backlog evicts an image per alert, and a
            # status message per eviction would double the traffic. Unreported losses wait durably.
            self._next_lost_report = now + self.config.metrics.heartbeat_s
            self._report_lost_images()

    def _report_lost_images(self, batches: int = 4) -> None:
        """Name each image that will never be uploaded (evicted, refused) in a status message, once.

        The cloud otherwise could not tell an image still on its way from one that is not coming.
        Up to 50 images per message; marked reported only after the status is stored (a crash in
        between names them again).
        """
        uploader = self.parts.uploader
        if uploader is None:
            return
        for _ in range(batches):
            try:
                lost = uploader.take_lost()
            except EdgeError as exc:
                log.warning("lost images cannot be read from the upload queue: %s", exc)
                return
            if not lost:
                return
            kinds = sorted({item.kind for item in lost})
            error = (f"{len(lost)} image(s) will not be uploaded ({', '.join(kinds)}); last reason: "
                     f"{lost[-1].reason}")
            images = [{"alert_id": item.alert_id, "image_ref": item.uri, "kind": item.kind, "reason": item.reason}
                      for item in lost]
            if not self.status("error", error=error, detail={"images_lost": images}):
                return
            uploader.mark_reported(lost)

    def run(self, stop: threading.Event, tick_s: float = 0.2) -> int:
        """start(), tick until `stop` is set or the source ends, then stop(); returns the exit code."""
        try:
            self.start()
            assert self.pipeline is not None
            while not stop.wait(tick_s):
                self.tick()
                if self.pipeline.finished:
                    break
        finally:
            self.stop()
        return 1 if self.pipeline.fatal is not None else 0

    def stop(self) -> bool:
        """Finish the frame in flight, store the last window and a stop status, flush the outbox until the deadline.

        Returns True when the outbox was fully delivered (or there is no transport) in time;
        whatever was not delivered stays in the outbox file for the next start.
        """
        if self._stopped:
            return True
        self._stopped = True
        self._state = "stopping"
        deadline = self.config.stop_deadline_s
        if self.pipeline is not None and not self.pipeline.stop(timeout_s=max(1.0, deadline / 2)):
            log.error("the capture or inference thread did not stop in time")
        if self.outputs is not None:
            self.outputs.close(timeout_s=max(1.0, deadline / 2))
        self._report_lost_images()
        if self.metrics is not None:
            self._emit_window(self.metrics.rotate())
        fatal = self.pipeline.fatal if self.pipeline is not None else None
        self._state = "stopped"
        self.status("stop", error=None if fatal is None else f"{type(fatal).__name__}: {fatal}")
        delivered = True
        if self.sender is not None:
            delivered = self.sender.stop(deadline)
            left = self.parts.outbox.depth
            if delivered:
                log.info("outbox flushed")
            else:
                log.warning("stop deadline %.1fs reached: %d messages stay in the outbox for the next start",
                            deadline, left)
        if self.parts.uploader is not None:
            # It uploaded while the sender flushed; an upload still running is cut off and stays queued.
            self.parts.uploader.stop(2.0)
        self._close_parts()
        return delivered

    def _close_parts(self) -> None:
        for close, what in ((self.parts.line_signal.close, "line signal"),
                            (lambda: self.parts.publisher.close(2.0) if self.parts.publisher else None, "transport"),
                            (lambda: self.parts.uploader.close() if self.parts.uploader else None, "image uploader"),
                            *((c, "resource") for c in self.parts.closers),
                            (self.parts.outbox.close, "outbox")):
            try:
                close()
            except Exception as exc:  # stopping goes on whatever one part does
                log.warning("closing the %s: %s", what, exc)

    # ---------------------------------------------------------------- models and configuration

    def apply_config(self, new: AgentConfig) -> None:
        """Take a changed configuration: a new bundle/precision is hot-swapped; other changes need a restart."""
        with self._config_lock:
            old = self.config
            if new == old:
                return
            if not old.hot_fields_equal(new):
                changed = sorted(k for k, v in new.to_dict().items() if v != old.to_dict().get(k) and k != "model")
                log.warning("configuration changes to %s take effect after a restart", ", ".join(changed))
            if new.model != old.model and self.models is not None:
                self.models.request(new.model)
            self.config = old if self.models is None else _with_model(old, new)

    def _poll_config(self) -> None:
        assert self._config_poll is not None
        try:
            new = self._config_poll()
            if new is not None:
                self.apply_config(new)
        except ConfigError as exc:
            log.error("changed configuration refused, keeping the running one: %s", exc)
            self.status("error", error=f"configuration refused: {exc}")
        except Exception as exc:  # the reload loop's boundary: no file, however broken, stops a running line
            log.exception("reading the changed configuration failed, keeping the running one")
            self.status("error", error=f"configuration refused: {type(exc).__name__}: {exc}")

    def _model_rejected(self, rejected: Rejected) -> None:
        self.status("model_rejected", error=rejected.error, detail={"bundle": str(rejected.source)})
        self._tell_listeners(lambda listener: listener.model_rejected(rejected.source, rejected.error))

    def _model_changed(self, old: LoadedModel, new: LoadedModel) -> None:
        # A window belongs to one model: drift is measured against that model's reference.
        assert self.metrics is not None
        window = self.metrics.rotate(new.reference)
        self._emit_window(window, model=old.ident, skip_empty=True)
        self.status("model_change", detail={"previous": old.ident, "bundle": str(new.source),
                                            "precision": new.runner.precision})
        self._tell_listeners(lambda listener: listener.model_loaded(new.source))

    def _tell_listeners(self, call: Callable[[ModelListener], None]) -> None:
        for listener in list(self.model_listeners):
            try:
                call(listener)
            except Exception:  # a listener must not break the swap or the loader thread
                log.exception("a model listener failed")

    # ---------------------------------------------------------------- messages

    def current_model(self) -> LoadedModel | None:
        if self.pipeline is not None:
            return self.pipeline.active_model
        return None if self.models is None else self.models.current

    def _emit_window(self, window: MetricsWindow, model: dict[str, str] | None = None,
                     skip_empty: bool = False) -> None:
        if skip_empty and window.frames == 0 and window.errors == 0 and window.dropped == 0:
            return
        current = self.current_model()
        ident = model or (current.ident if current else {"name": "none", "version": "none"})
        try:
            self.sink.emit(messages.METRICS, window.body(self.clock.monotonic(), self.clock.time(), ident))
        except QcsightError as exc:
            log.error("metrics window not stored: %s", exc)

    def status(self, event: str, error: str | None = None, detail: dict[str, Any] | None = None) -> bool:
        """Store one qcsight.status/1 message (start, stop, model_change, model_rejected, error, heartbeat).

        Returns whether it was stored.
        """
        body: dict[str, Any] = {
            "event": event,
            "state": self._state,
            "uptime_s": round(self.clock.monotonic() - self._started_at, 3),
            "detail": {**self.status_detail(), **(detail or {})},
        }
        model = self.current_model()
        if model is not None:
            body["model"] = model.ident
        try:
            body["outbox"] = self.parts.outbox.stats().for_status()
        except EdgeError as exc:
            log.warning("outbox statistics unavailable: %s", exc)
        if error is not None:
            body["error"] = error
        try:
            self.sink.emit(messages.STATUS, body)
        except QcsightError as exc:
            log.error("status %s not stored: %s", event, exc)
            return False
        return True

    def status_detail(self) -> dict[str, Any]:
        """The ``detail`` object of every status message: source, frames, alerts, images, transport."""
        detail: dict[str, Any] = {"source": self.parts.source.stats()}
        if self.pipeline is not None:
            detail["frames"] = self.pipeline.snapshot()
        if self.outputs is not None:
            detail["alerts"] = self.outputs.stats()
        if self.parts.image_store is not None:
            stats = self.parts.image_store.stats()
            detail["images"] = {"files": stats.files, "bytes": stats.bytes, "evicted": stats.evicted}
        if self.parts.uploader is not None:
            detail["uploads"] = self.parts.uploader.stats()
        if self.sender is not None:
            sender = self.sender.stats()
            detail["transport"] = {"kind": self.config.transport.kind, "connected": sender.connected,
                                   "sent": sender.sent, "failed": sender.failed, "last_error": sender.last_error}
        return detail


def _with_model(old: AgentConfig, new: AgentConfig) -> AgentConfig:
    return replace(old, model=new.model)


# -------------------------------------------------------------------- building from configuration


def build_parts(config: AgentConfig, publisher: Publisher | None = None) -> AgentParts:
    """Open the source, outbox, image store, line signal and (unless given) the transport a configuration names.

    Raises:
        QcsightError: something named in the configuration cannot be opened.
    """
    outbox = Outbox(config.outbox.path, max_messages=config.outbox.max_messages, max_bytes=config.outbox.max_bytes)
    uploader: ImageUploader | None = None
    try:
        store = ImageStore(config.image_store.dir, config.image_store.max_bytes, config.image_store.jpeg_quality)
        uploader = make_uploader(config)
        source = open_source(config.source)
        if publisher is None:
            publisher = make_transport(config.thing_name, config.transport)
        line_signal = make_line_signal(config.thing_name, config.line_signal)
    except BaseException:
        if uploader is not None:
            uploader.close()
        outbox.close()
        raise
    return AgentParts(source=source, outbox=outbox, line_signal=line_signal, image_store=store, publisher=publisher,
                      uploader=uploader)


def make_transport(thing: str, transport: TransportConfig) -> Publisher | None:
    """An MQTT publisher for mqtt5/mqtt311, None for none; ipc is built by the CLI from its Greengrass session."""
    if transport.kind == "none":
        return None
    if transport.kind == "ipc":
        raise ConfigError("transport.kind", "ipc", "used only with --greengrass (the nucleus's IPC socket)")
    from qcsight_edge.mqtt import make_publisher

    settings = replace(transport, thing_name=thing, protocol=transport.kind)
    settings.check_files()
    warn_if_key_exposed(settings.key, "transport.key")
    return make_publisher(settings)


class FileConfigWatcher:
    """Re-reads the YAML file when its mtime or size changed; raises ConfigError for an invalid new version."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mark = self._stat()

    def _stat(self) -> tuple[int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def __call__(self) -> AgentConfig | None:
        mark = self._stat()
        if mark is None or mark == self._mark:
            return None
        self._mark = mark
        log.info("configuration %s changed; reloading", self.path)
        return load_config(self.path)

