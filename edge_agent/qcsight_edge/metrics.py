"""Windowed metrics (qcsight.metrics/1 bodies) in bounded memory: counts, reservoirs, fixed histograms."""

from __future__ import annotations

import bisect
import random
import threading
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from qcsight_core.drift import Histogram, InputStats, psi, reference_histograms
from qcsight_core.verdict import DEFECT, GOOD, UNCERTAIN
from qcsight_edge.clock import Clock, iso_utc


class Reservoir:
    """A uniform sample of at most `capacity` values from a stream (Vitter's algorithm R).

    Exact while fewer than capacity values were added, so small windows report exact quantiles.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.seen = 0
        self._values = np.empty(capacity, dtype=np.float64)
        self._rng = random.Random(seed)

    def add(self, value: float) -> None:
        if self.seen < self.capacity:
            self._values[self.seen] = value
        else:
            slot = self._rng.randrange(self.seen + 1)
            if slot < self.capacity:
                self._values[slot] = value
        self.seen += 1

    def values(self) -> np.ndarray:
        return self._values[: min(self.seen, self.capacity)]

    def quantiles(self, qs: tuple[float, ...]) -> tuple[float, ...]:
        data = self.values()
        if data.size == 0:
            return tuple(0.0 for _ in qs)
        return tuple(float(v) for v in np.quantile(data, qs))


class _Binned:
    """Counts over a reference histogram's edges, for PSI at the window's end."""

    def __init__(self, reference: Histogram) -> None:
        self.reference = reference
        self._inner = list(reference.edges[1:-1])
        self.counts = [0] * len(reference.counts)

    def add(self, value: float) -> None:
        # bisect_right on the inner edges is qcsight_core.drift.bin_index for one value, without numpy's
        # per-call overhead on the inference thread.
        self.counts[bisect.bisect_right(self._inner, value)] += 1

    def psi(self) -> float | None:
        if sum(self.counts) == 0 or sum(self.reference.counts) == 0:
            return None
        return psi(self.reference.counts, self.counts)


class MetricsWindow:
    """What one window saw; every structure is bounded whatever the frame rate."""

    def __init__(self, start_mono: float, start_wall: float, reference: Mapping[str, Any],
                 reservoir_size: int = 2048, seed: int = 0) -> None:
        self.start_mono = start_mono
        self.start_wall = start_wall
        self.counts: Counter[str] = Counter()
        self.by_class: Counter[str] = Counter()
        self.dropped = 0
        self.errors = 0
        self.confidence = Reservoir(reservoir_size, seed)
        self.latency = Reservoir(reservoir_size, seed + 1)
        self._input_sums = np.zeros(3, dtype=np.float64)
        self.reference = reference
        histograms = reference_histograms(reference)
        self._drift = {key: _Binned(h) for key, h in histograms.items()}

    @property
    def frames(self) -> int:
        return sum(self.counts.values())

    def record(self, status: str, label: str, confidence: float, latency_s: float, stats: InputStats) -> None:
        self.counts[status] += 1
        self.by_class[label] += 1
        self.confidence.add(confidence)
        self.latency.add(latency_s * 1000.0)
        self._input_sums += (stats.brightness, stats.contrast, stats.sharpness)
        if "confidence" in self._drift:
            self._drift["confidence"].add(confidence)
        if "brightness" in self._drift:
            self._drift["brightness"].add(stats.brightness)

    def body(self, end_mono: float, end_wall: float, model: Mapping[str, str]) -> dict[str, Any]:
        """The qcsight.metrics/1 fields after the envelope."""
        frames = self.frames
        means = self._input_sums / frames if frames else self._input_sums
        p05, c50, p95 = self.confidence.quantiles((0.05, 0.5, 0.95))
        l50, l95, l99 = self.latency.quantiles((0.5, 0.95, 0.99))
        drift: dict[str, float] = {}
        for key, binned in self._drift.items():
            value = binned.psi()
            if value is not None:
                drift[f"{key}_psi"] = round(value, 6)
        return {
            "window": {"start": iso_utc(self.start_wall), "end": iso_utc(end_wall),
                       "seconds": round(max(0.0, end_mono - self.start_mono), 3)},
            "model": dict(model),
            "counts": {"frames": frames, GOOD: self.counts[GOOD], DEFECT: self.counts[DEFECT],
                       UNCERTAIN: self.counts[UNCERTAIN], "dropped": self.dropped, "errors": self.errors},
            "by_class": dict(sorted(self.by_class.items())),
            "defect_rate": round(self.counts[DEFECT] / frames, 6) if frames else 0.0,
            "confidence": {"p05": round(p05, 6), "p50": round(c50, 6), "p95": round(p95, 6)},
            "latency_ms": {"p50": round(l50, 3), "p95": round(l95, 3), "p99": round(l99, 3)},
            "input": {"brightness": round(float(means[0]), 3), "contrast": round(float(means[1]), 3),
                      "sharpness": round(float(means[2]), 3)},
            "drift": drift,
        }


class MetricsRecorder:
    """The current window, shared by the inference thread (records) and the ticker (rotates)."""

    def __init__(self, clock: Clock, reservoir_size: int, reference: Mapping[str, Any]) -> None:
        self._clock = clock
        self._reservoir_size = reservoir_size
        self._lock = threading.Lock()
        self._seed = 0
        self._window = self._new(reference)

    def _new(self, reference: Mapping[str, Any]) -> MetricsWindow:
        self._seed += 2
        return MetricsWindow(self._clock.monotonic(), self._clock.time(), reference, self._reservoir_size, self._seed)

    def record(self, status: str, label: str, confidence: float, latency_s: float, stats: InputStats) -> None:
        with self._lock:
            self._window.record(status, label, confidence, latency_s, stats)

    def error(self, n: int = 1) -> None:
        with self._lock:
            self._window.errors += n

    def dropped(self, n: int = 1) -> None:
        with self._lock:
            self._window.dropped += n

    @property
    def window_start(self) -> float:
        with self._lock:
            return self._window.start_mono

    def rotate(self, reference: Mapping[str, Any] | None = None) -> MetricsWindow:
        """Close the current window and start the next (with a new model's reference, if given)."""
        with self._lock:
            closed = self._window
            self._window = self._new(closed.reference if reference is None else reference)
            return closed
