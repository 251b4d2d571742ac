"""The model slot: how the model component hands its bundle to the running agent, on both Greengrass nuclei.

The model ships as its own Greengrass component (com.qcsight.Model), so a new model is a new
component version. Greengrass nucleus lite resolves no recipe variable of another component
(``{com.qcsight.Model:artifacts:decompressedPath}`` fails in a lifecycle script:
aws-greengrass-lite ``modules/recipe-runner/src/runner.c``, ``substitute_escape``) and neither
nucleus interpolates variables inside component configuration by default, so the agent cannot be
told the model's path by either. Instead the model component's startup step offers its bundle in a
folder both components know (the model component's work folder), and the agent answers:

``<slot>/offer``
    written (atomically) by the model component's startup step: line 1 the bundle folder, line 2
    a nonce unique to this attempt.
``<slot>/answer``
    written (atomically) by the agent: ``accepted <nonce>`` or ``rejected <nonce>``, then the bundle
    folder, then the reason.
``<slot>/agent.pid``
    the running agent's process id; the startup step waits for an answer only while it is alive
    (otherwise the agent loads the offer when it starts, and fails to start if it cannot).

The agent loads, verifies and warms an offered bundle in the background and swaps it in between
frames (no frame is lost); a bundle it refuses is answered ``rejected`` with the reason, the
startup step exits non-zero, the nucleus marks the model component broken and a deployment with
``failureHandlingPolicy: ROLLBACK`` restores the previous version, whose startup step offers the
old bundle again. Both components must run as the same user (the nuclei's default).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qcsight_core.errors import ConfigError

log = logging.getLogger(__name__)

OFFER, ANSWER, PID = "offer", "answer", "agent.pid"


@dataclass(frozen=True)
class Offer:
    bundle: Path
    nonce: str

    def same_bundle(self, path: Path) -> bool:
        return os.path.normpath(self.bundle) == os.path.normpath(path)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class ModelSlot:
    """The agent's side of the slot folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def read_offer(self) -> Offer | None:
        try:
            lines = (self.folder / OFFER).read_text(encoding="utf-8").splitlines()
        except OSError:
            return None
        if len(lines) < 2 or not lines[0].strip():
            return None
        return Offer(Path(lines[0].strip()), lines[1].strip())

    def require_offer(self) -> Offer:
        """The current offer.

        Raises:
            ConfigError: nothing was offered (the model component is not deployed or has not started).
        """
        offer = self.read_offer()
        if offer is None:
            raise ConfigError("--model-slot", str(self.folder),
                              f"a folder where the model component offered its bundle ({OFFER} is missing: is "
                              "com.qcsight.Model deployed, and did its startup step run?)")
        return offer

    def answer(self, offer: Offer, accepted: bool, reason: str = "") -> None:
        verdict = "accepted" if accepted else "rejected"
        try:
            _write_atomically(self.folder / ANSWER, f"{verdict} {offer.nonce}\n{offer.bundle}\n{reason}\n")
        except OSError as exc:
            log.error("cannot answer the model offer in %s: %s", self.folder, exc)
            return
        log.info("model offer %s %s%s", offer.bundle, verdict, f": {reason}" if reason else "")

    def claim(self) -> None:
        """Record this process as the agent answering offers."""
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.folder / PID, f"{os.getpid()}\n")

    def release(self) -> None:
        with contextlib.suppress(OSError):
            if (self.folder / PID).read_text(encoding="utf-8").strip() == str(os.getpid()):
                (self.folder / PID).unlink()


class SlotWatcher:
    """Follows the offer file; hands each new offer to ``request`` and answers it from the model events.

    Args:
        slot: the slot folder.
        current: the offer the agent started with (already answered).
        request: asks the agent to load a bundle (``Agent.apply_config`` with the new path).
        running: the bundle folder the agent judges with now.
        poll_s: how often the offer file is read.
    """

    def __init__(self, slot: ModelSlot, current: Offer, request: Callable[[Path], None],
                 running: Callable[[], Path | None], poll_s: float = 0.2) -> None:
        self._slot = slot
        self._request = request
        self._running = running
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._seen = current
        self._pending: Offer | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="qcsight-model-slot", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def model_loaded(self, bundle: Path) -> None:
        """The agent swapped a bundle in: answer the offer that asked for it."""
        self._settle(bundle, True, "")

    def model_rejected(self, bundle: Path, reason: str) -> None:
        """The agent refused a bundle: answer the offer that asked for it, with the reason."""
        self._settle(bundle, False, reason)

    def _settle(self, bundle: Path, accepted: bool, reason: str) -> None:
        with self._lock:
            pending = self._pending
            if pending is None or not pending.same_bundle(bundle):
                return
            self._pending = None
        self._slot.answer(pending, accepted, reason)

    def _loop(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self._check()
            except Exception:  # the watcher must outlive one bad read
                log.exception("reading the model offer in %s", self._slot.folder)

    def _check(self) -> None:
        offer = self._slot.read_offer()
        if offer is None or offer == self._seen:
            return
        self._seen = offer
        running = self._running()
        if running is not None and offer.same_bundle(running):
            self._slot.answer(offer, True, "already running")  # a rollback re-offering the running model
            return
        log.info("model component offers %s: loading it in the background", offer.bundle)
        with self._lock:
            self._pending = offer
        self._request(offer.bundle)
