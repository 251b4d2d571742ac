"""The reject signal to the line controller: local, immediate, never through the cloud.

One family: the `LineSignal` protocol, its kinds (none, log, mqtt: a publish on
``qcsight/<thing>/line/reject`` to the line's broker; a callback for a GPIO driver or a test), the
payload, and `make_line_signal`, which builds the configured one.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from qcsight_core.topics import line_signal_topic
from qcsight_core.verdict import Verdict
from qcsight_edge.clock import Clock, iso_utc
from qcsight_edge.config import LineSignalConfig
from qcsight_edge.errors import PublishError
from qcsight_edge.publisher import Publisher

log = logging.getLogger(__name__)


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


class NoLineSignal:
    """kind: none."""

    def reject(self, payload: Any) -> None:
        pass

    def close(self) -> None:
        pass


def make_line_signal(thing: str, line: LineSignalConfig) -> LineSignal:
    """The configured line signal; an mqtt one is connecting (it keeps reconnecting) when returned."""
    if line.kind == "none":
        return NoLineSignal()
    if line.kind == "log":
        return LogLineSignal()
    from qcsight_edge.mqtt import make_publisher

    settings = replace(line, thing_name=thing, protocol="mqtt5", client_id=line.client_id or f"{thing}-line")
    settings.check_files()
    warn_if_key_exposed(settings.key, "line_signal.key")
    publisher = make_publisher(settings)
    try:
        publisher.connect(5.0)
    except PublishError as exc:
        log.warning("line signal broker %s:%d not reachable yet (%s); it keeps reconnecting",
                    line.endpoint, line.port, exc)
    return PublisherLineSignal(publisher, thing)


def warn_if_key_exposed(key: Path | None, field: str) -> None:
    """Log a warning when the private key file can be read (or written) by its group or by others."""
    if key is None:
        return
    try:
        mode = stat.S_IMODE(os.stat(key).st_mode)
    except OSError:
        return  # check_files has already refused a key that cannot be read
    if mode & 0o077:
        log.warning("%s %s is accessible to its group or others (mode %04o): anyone on this device could act as "
                    "the thing; chmod 600 it", field, key, mode)
