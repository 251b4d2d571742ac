"""The outbox sender: one thread that drains the durable outbox to a Publisher, acking rows only on success.

At most ``window`` publishes are in flight at once. A row leaves the outbox only after its
publish future succeeded (PUBACK); a failure or a future that takes longer than
``ack_timeout_s`` returns the row to the queue, so delivery is at least once and the cloud
drops duplicates by message id. While the transport is offline (it reconnects by itself) the
sender backs off with jitter instead of spinning; after a refused publish it backs off too, so a
message the broker keeps refusing cannot turn into a busy loop. A message that can never be
delivered (a payload over IoT Core's 128 KiB, or a permanent refusal such as PUBACK
NOT_AUTHORIZED) is moved to the outbox's dead letters with the reason, so it cannot hold up the
messages behind it.
"""

from __future__ import annotations

import logging
import random
import threading
from concurrent.futures import Future
from dataclasses import dataclass

from qcsight_core.checks import check_int, check_number
from qcsight_core.errors import ConfigError
from qcsight_edge.clock import Backoff, Clock, SystemClock
from qcsight_edge.errors import NotConnectedError, PublishRejectedError
from qcsight_edge.outbox import Outbox, OutboxMessage
from qcsight_edge.publisher import Publisher
from qcsight_edge.thumbnails import IOT_CORE_MAX_PAYLOAD

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SenderSettings:
    """Tuning of the drain loop.

    Attributes:
        window: publishes awaiting PUBACK at once (keep it at or below the transport's max_in_flight).
        ack_timeout_s: a publish not settled within this is treated as failed and its row retried.
        idle_poll_s: how often an idle sender looks for new rows when nobody calls ``wake()``.
        backoff_min_s, backoff_max_s: bounds of the jittered exponential backoff while offline or refused.
        max_payload_bytes: a larger message is never sent (IoT Core would refuse it): it is dead-lettered.
    """

    window: int = 32
    ack_timeout_s: float = 30.0
    idle_poll_s: float = 0.2
    backoff_min_s: float = 0.05
    backoff_max_s: float = 5.0
    max_payload_bytes: int = IOT_CORE_MAX_PAYLOAD

    def __post_init__(self) -> None:
        _exactly(int, "sender.window", self.window)
        check_int("sender.window", self.window, 1, 10_000)
        for name, low in (("ack_timeout_s", 0.01), ("idle_poll_s", 0.001), ("backoff_min_s", 0.001)):
            _exactly(float, f"sender.{name}", getattr(self, name))
            check_number(f"sender.{name}", getattr(self, name), low, 3600)
        _exactly(float, "sender.backoff_max_s", self.backoff_max_s)
        check_number("sender.backoff_max_s", self.backoff_max_s, self.backoff_min_s, 3600)
        _exactly(int, "sender.max_payload_bytes", self.max_payload_bytes)
        check_int("sender.max_payload_bytes", self.max_payload_bytes, 1, 256 * 1024**2)


def _exactly(kind: type, name: str, value: object) -> None:
    """Settings built in code take numbers, not the text a configuration file may hold."""
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ConfigError(name, value, "an integer" if kind is int else "a number")


@dataclass(frozen=True)
class SenderStats:
    """Counters since this sender started (the outbox keeps the lifetime ones)."""

    sent: int
    failed: int
    timed_out: int
    in_flight: int
    connected: bool
    last_error: str | None
    running: bool
    dead_lettered: int = 0


@dataclass
class _InFlight:
    message: OutboxMessage
    future: Future[None]
    since: float


class OutboxSender:
    """Drains ``outbox`` to ``publisher`` on its own thread until ``stop()``.

    Args:
        outbox: the durable outbox (also written to by the pipeline thread).
        publisher: any transport; connecting it is the caller's job (the transport reconnects itself).
        settings: window, timeouts and backoff.
        clock: time source for timeouts and backoff waits (tests inject one).
        rng: jitter source (tests inject a seeded one).
    """

    def __init__(self, outbox: Outbox, publisher: Publisher, settings: SenderSettings | None = None, *,
                 clock: Clock | None = None, rng: random.Random | None = None,
                 name: str = "qcsight-outbox-sender") -> None:
        self.outbox = outbox
        self.publisher = publisher
        self.settings = settings or SenderSettings()
        self._clock: Clock = clock or SystemClock()
        self._backoff = Backoff(self.settings.backoff_min_s, self.settings.backoff_max_s, rng or random.Random())
        self._name = name
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._in_flight: dict[int, _InFlight] = {}
        self._stop_at: float | None = None
        self._drained = False
        self._retry_at = 0.0
        self._offline_logged = False
        self._sent = 0
        self._failed = 0
        self._timed_out = 0
        self._dead_lettered = 0
        self._last_error: str | None = None

    # ------------------------------------------------------------ control

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop_at = None
            self._drained = False
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def wake(self) -> None:
        """Look at the outbox now (call after enqueue for the lowest latency; otherwise it polls)."""
        self._wake.set()

    def stop(self, deadline_s: float) -> bool:
        """Keep sending until the outbox is empty or ``deadline_s`` passed, then end the thread.

        Returns:
            True when everything stored was acknowledged before the deadline. Rows still in
            flight at the deadline stay in the outbox and are sent by the next run.
        """
        with self._lock:
            thread = self._thread
            self._stop_at = self._clock.monotonic() + max(deadline_s, 0.0)
        self._wake.set()
        if thread is None:
            return self.outbox.depth == 0
        # The loop checks the deadline between steps; a step (one SQLite commit, one claim) is short.
        thread.join(max(deadline_s, 0.0) + 2.0)
        if thread.is_alive():
            log.error("outbox sender did not stop within %.1fs", deadline_s + 2.0)
            return False
        return self._drained

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def stats(self) -> SenderStats:
        with self._lock:
            return SenderStats(sent=self._sent, failed=self._failed, timed_out=self._timed_out,
                               in_flight=len(self._in_flight), connected=self.publisher.connected,
                               last_error=self._last_error, running=self.running,
                               dead_lettered=self._dead_lettered)

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        log.info("outbox sender started (window %d)", self.settings.window)
        try:
            while True:
                self._wake.clear()
                try:
                    wait_s = self._step()
                except Exception as exc:  # the thread must survive anything: log, count, back off
                    log.exception("outbox sender step failed")
                    self._note_failure(f"{type(exc).__name__}: {exc}", 0)
                    wait_s = self._backoff.next()
                if wait_s is None:
                    break
                if wait_s > 0:
                    self._clock.wait(self._wake, wait_s)
        finally:
            self._abandon_in_flight()
            log.info("outbox sender stopped (sent %d, failed %d, %d left in the outbox)",
                     self._sent, self._failed, self.outbox.depth)

    def _step(self) -> float | None:
        """One pass: settle finished publishes, send more; returns how long to wait (None: exit)."""
        now = self._clock.monotonic()
        self._reap(now)
        stop_at = self._stop_at
        if stop_at is not None:
            if not self._in_flight and self.outbox.pending == 0:
                self._drained = self.outbox.depth == 0
                return None
            if now >= stop_at:
                return None
        if not self.publisher.connected:
            if not self._offline_logged:
                log.warning("outbox sender: transport offline; %d messages wait in the outbox", self.outbox.depth)
                self._offline_logged = True
            return self._capped(self._backoff.next(), now)
        if self._offline_logged:
            log.info("outbox sender: transport back online; draining %d messages", self.outbox.depth)
            self._offline_logged = False
        if now < self._retry_at:
            return self._capped(self._retry_at - now, now)
        free = self.settings.window - len(self._in_flight)
        sent_any = False
        if free > 0:
            too_large: list[tuple[int, str]] = []
            for message in self.outbox.claim(free):
                if len(message.payload) > self.settings.max_payload_bytes:
                    too_large.append((message.row_id, f"payload of {len(message.payload)} bytes, more than the "
                                      f"{self.settings.max_payload_bytes} the broker takes"))
                    continue
                self._send(message, now)
                sent_any = True
            if too_large:
                self._dead_letter(too_large)
                sent_any = True  # look again at once: the queue moved
        if sent_any:
            return 0.0
        if self._in_flight:
            # Wake on the next settled future (its callback sets the event) or the oldest timeout.
            oldest = min(item.since for item in self._in_flight.values())
            return self._capped(max(oldest + self.settings.ack_timeout_s - now, 0.001), now)
        return self._capped(self.settings.idle_poll_s, now)

    def _capped(self, wait_s: float, now: float) -> float:
        stop_at = self._stop_at
        return wait_s if stop_at is None else max(min(wait_s, stop_at - now), 0.0)

    def _send(self, message: OutboxMessage, now: float) -> None:
        try:
            future = self.publisher.publish(message.topic, message.payload, 1)
        except Exception as exc:  # a transport must return a failed future, but never trust that
            future = Future()
            future.set_exception(exc)
        with self._lock:
            self._in_flight[message.row_id] = _InFlight(message, future, now)
        future.add_done_callback(self._on_done)

    def _on_done(self, _future: Future[None]) -> None:
        # Runs on the transport's callback thread: only wake the sender, never touch SQLite here.
        self._wake.set()

    def _reap(self, now: float) -> None:
        acked: list[int] = []
        failed: list[tuple[int, str, BaseException | None]] = []
        with self._lock:
            for row_id, item in list(self._in_flight.items()):
                if item.future.done():
                    exc = item.future.exception()
                    if exc is None:
                        acked.append(row_id)
                    else:
                        failed.append((row_id, item.message.topic, exc))
                    del self._in_flight[row_id]
                elif now - item.since >= self.settings.ack_timeout_s:
                    failed.append((row_id, item.message.topic, None))
                    del self._in_flight[row_id]
        if acked:
            self.outbox.ack(acked)
            with self._lock:
                self._sent += len(acked)
            self._backoff.reset()
            self._retry_at = 0.0
        permanent = [(row_id, f"{type(exc).__name__}: {exc}") for row_id, _, exc in failed
                     if isinstance(exc, PublishRejectedError) and exc.permanent]
        if permanent:
            self._dead_letter(permanent)
            failed = [item for item in failed if not (isinstance(item[2], PublishRejectedError)
                                                      and item[2].permanent)]
        if failed:
            self.outbox.release(row_id for row_id, _, _ in failed)
            self._record_failures(failed, now)

    def _dead_letter(self, refused: list[tuple[int, str]]) -> None:
        moved = self.outbox.dead_letter(refused)
        with self._lock:
            self._dead_lettered += moved
            self._last_error = refused[-1][1]
        log.error("outbox sender: %d messages can never be delivered, moved to the dead letters: %s",
                  moved, refused[-1][1])

    def _record_failures(self, failed: list[tuple[int, str, BaseException | None]], now: float) -> None:
        timed_out = sum(1 for _, _, exc in failed if exc is None)
        _, topic, exc = failed[-1]
        reason = (f"no PUBACK for {topic} within {self.settings.ack_timeout_s:g}s" if exc is None
                  else f"{type(exc).__name__}: {exc}")
        self._note_failure(reason, timed_out, count=len(failed))
        if all(isinstance(e, NotConnectedError) for _, _, e in failed):
            log.info("outbox sender: %d publishes failed while the connection dropped; they will be retried",
                     len(failed))
            return  # the offline backoff takes over
        level = logging.WARNING if any(isinstance(e, PublishRejectedError) for _, _, e in failed) else logging.INFO
        log.log(level, "outbox sender: %d publishes failed (%s); retrying with backoff", len(failed), reason)
        self._retry_at = now + self._backoff.next()

    def _note_failure(self, reason: str, timed_out: int, count: int = 1) -> None:
        with self._lock:
            self._failed += count
            self._timed_out += timed_out
            self._last_error = reason

    def _abandon_in_flight(self) -> None:
        """Give unsettled rows back to the outbox so a later sender (or restart) sends them."""
        try:
            self._reap(self._clock.monotonic())
        except Exception:
            log.exception("outbox sender: settling the last publishes failed")
        with self._lock:
            rows = list(self._in_flight)
            self._in_flight.clear()
        try:
            self.outbox.release(rows)
        except Exception:
            log.exception("outbox sender: could not release %d in-flight rows", len(rows))
