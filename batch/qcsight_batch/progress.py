"""Progress of a scoring run: a tqdm bar on a terminal, periodic log lines otherwise, and a background counter for ETA.

Inputs are streamed, so the total is not known when scoring starts. A daemon thread counts
the keys in a second pass over the source (constant memory; for S3 it costs the LIST
requests again) and hands the total to the progress display once it has it; until then
the display shows counts and rate without an ETA.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, Protocol, TextIO

from qcsight_batch.sources import ImageSource

log = logging.getLogger(__name__)


class Progress(Protocol):
    """Where the scorer reports how far it has got."""

    def set_total(self, total: int) -> None: ...

    def advance(self, scored: int, errors: int) -> None: ...

    def close(self) -> None: ...


class NoProgress:
    """Reports nothing (library use, tests)."""

    def set_total(self, total: int) -> None:
        pass

    def advance(self, scored: int, errors: int) -> None:
        pass

    def close(self) -> None:
        pass


def _eta(done: int, total: int | None, rate: float) -> str:
    if total is None or rate <= 0 or done > total:
        return "ETA unknown"
    seconds = int((total - done) / rate)
    return f"ETA {seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LogProgress:
    """One log line every interval_s seconds: images done (of total), errors, rate, ETA."""

    def __init__(self, initial: int = 0, interval_s: float = 10.0, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._start = clock()
        self._last = self._start
        self._initial = initial
        self._done = 0
        self._errors = 0
        self._total: int | None = None
        self._interval = interval_s
        self._lock = threading.Lock()

    def set_total(self, total: int) -> None:
        with self._lock:
            self._total = total

    def advance(self, scored: int, errors: int) -> None:
        with self._lock:
            self._done += scored + errors
            self._errors += errors
            now = self._clock()
            if now - self._last >= self._interval:
                self._last = now
                self._log(now)

    def _log(self, now: float) -> None:
        rate = self._done / max(now - self._start, 1e-9)
        done = self._initial + self._done
        of = f"/{self._total}" if self._total is not None else ""
        log.info("%d%s images, %d errors, %.1f images/s, %s", done, of, self._errors, rate,
                 _eta(done, self._total, rate))

    def close(self) -> None:
        with self._lock:
            self._log(self._clock())


class BarProgress:
    """A tqdm bar with rate and ETA (once the total is known) on a terminal."""

    def __init__(self, initial: int = 0, stream: TextIO | None = None) -> None:
        from tqdm import tqdm

        self._bar = tqdm(initial=initial, unit="img", file=stream or sys.stderr, dynamic_ncols=True,
                         smoothing=0.1, desc="scoring")
        self._errors = 0
        self._lock = threading.Lock()

    def set_total(self, total: int) -> None:
        with self._lock:
            self._bar.total = total
            self._bar.refresh()

    def advance(self, scored: int, errors: int) -> None:
        with self._lock:
            if errors:
                self._errors += errors
                self._bar.set_postfix(errors=self._errors, refresh=False)
            self._bar.update(scored + errors)

    def close(self) -> None:
        with self._lock:
            self._bar.close()


def make_progress(initial: int, stream: TextIO | None = None, interval_s: float = 10.0) -> Progress:
    """A bar when stream (stderr) is a terminal and tqdm is installed, else log lines."""
    target = stream or sys.stderr
    if target.isatty():
        try:
            return BarProgress(initial, target)
        except ModuleNotFoundError:
            log.debug("tqdm is not installed; progress goes to the log")
    return LogProgress(initial, interval_s)


class KeyCounter:
    """Counts a source's keys on a daemon thread and reports the total to a Progress."""

    def __init__(self, source: ImageSource, progress: Progress) -> None:
        self._source = source
        self._progress = progress
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._count, name="qcsight-key-counter", daemon=True)

    def start(self) -> KeyCounter:
        self._thread.start()
        return self

    def _count(self) -> None:
        total = 0
        try:
            for _ in self._source.iter_keys():
                if self._stop.is_set():
                    return
                total += 1
        except Exception:  # counting is a nicety: never let it take the run down
            log.debug("counting the input failed; no ETA", exc_info=True)
            return
        self._progress.set_total(total)

    def stop(self, timeout_s: float = 1.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
