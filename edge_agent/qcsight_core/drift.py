"""Input statistics and drift (PSI) against a bundle's reference histograms, defined once.

The device measures brightness and confidence of what it sees; training stores the same
measures of its validation data as the bundle manifest's ``reference``::

    "reference": {"confidence": {"edges": [...], "counts": [...]},
                  "brightness": {"edges": [...], "counts": [...]}}

Both ends must compute them the same way, so both call this module: statistics are taken on
the preprocessed pixels (prepare_pixels output, model input size), which makes them
independent of the camera's resolution.

For an anomaly bundle the verdict's confidence is the normalised anomaly score (1.0 is the
threshold), and training stores that score's histogram over held-out good parts as the
"confidence" reference, so the same PSI watches the score distribution of good parts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from qcsight_core.errors import BundleSchemaError

# An empty bin would make PSI infinite, so proportions are floored. The floor was a fixed 1e-4: then every
# bin that a short window missed by chance cost e*ln(e/1e-4) (0.4 for e=0.05), and 80 frames drawn from the
# reference itself read as drift (PSI 0.6-2.0 in the demo, threshold 0.25). Now the floor is half a sample
# of the smaller histogram, 0.5/min(n, m): below what either side can resolve, a bin is "empty" on both.
PSI_FLOOR_SAMPLES = 0.5
REFERENCE_KEYS = ("confidence", "brightness")


@dataclass(frozen=True)
class InputStats:
    """Brightness (mean grey level 0..255), contrast (grey standard deviation) and
    sharpness (variance of the Laplacian) of one image at model input size."""

    brightness: float
    contrast: float
    sharpness: float


def input_statistics(pixels: np.ndarray, color: str) -> InputStats:
    """Statistics of prepare_pixels() output (uint8 HxWxC in the spec's colour order)."""
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        code = cv2.COLOR_RGB2GRAY if color == "RGB" else cv2.COLOR_BGR2GRAY
        grey = cv2.cvtColor(pixels, code)
    else:
        grey = pixels.reshape(pixels.shape[0], pixels.shape[1])
    mean, std = cv2.meanStdDev(grey)
    # float32 holds a 3x3 Laplacian of uint8 exactly; meanStdDev is one fast pass (numpy's var is three).
    _, lap_std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F))
    return InputStats(float(mean[0, 0]), float(std[0, 0]), float(lap_std[0, 0]) ** 2)


@dataclass(frozen=True)
class Histogram:
    """Fixed bin edges and counts; values outside the edges fall in the first or last bin."""

    edges: tuple[float, ...]
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.edges) < 2 or len(self.counts) != len(self.edges) - 1:
            raise BundleSchemaError(
                f"reference histogram: {len(self.edges)} edges need {max(len(self.edges) - 1, 1)} counts, "
                f"got {len(self.counts)}"
            )
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise BundleSchemaError("reference histogram: edges must increase strictly")
        if any(c < 0 for c in self.counts):
            raise BundleSchemaError("reference histogram: counts must be 0 or more")

    def to_dict(self) -> dict[str, list[float] | list[int]]:
        return {"edges": list(self.edges), "counts": list(self.counts)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str = "reference") -> Histogram:
        try:
            return cls(tuple(float(e) for e in data["edges"]), tuple(int(c) for c in data["counts"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleSchemaError(f"{name}: expected {{'edges': [...], 'counts': [...]}}: {exc}") from exc


def bin_index(edges: Sequence[float] | np.ndarray, values: np.ndarray | float) -> np.ndarray:
    """The bin of each value, np.histogram's rule ([a, b), the last bin closed), clipped to the ends."""
    inner = np.asarray(edges, dtype=np.float64)[1:-1]
    index: np.ndarray = np.searchsorted(inner, np.asarray(values, dtype=np.float64), side="right")
    return index


def histogram(values: Sequence[float] | np.ndarray, edges: Sequence[float]) -> Histogram:
    """Counts of values over edges (what training writes as a reference)."""
    counts = np.bincount(bin_index(edges, np.asarray(values, dtype=np.float64)), minlength=len(edges) - 1)
    return Histogram(tuple(float(e) for e in edges), tuple(int(c) for c in counts))


def psi(expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray,
        floor_samples: float = PSI_FLOOR_SAMPLES) -> float:
    """Population stability index of actual counts against expected counts over the same bins.

    PSI = sum((a_i - e_i) * ln(a_i / e_i)) over bin proportions. Both arguments are counts, not
    proportions: each proportion is floored at floor_samples / min(n_expected, n_actual), half a sample
    of the smaller side, because a proportion finer than one sample is not measured (a window of 80
    frames that missed a bin holding 5 % of the reference says "under 1/80", not "1e-4").

    Rule of thumb: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 a real shift. Sampling noise alone
    still gives about (occupied bins - 1) * (1/n + 1/m) on average (a chi-square): 80 frames drawn
    from the demo's 36-image confidence reference (11 occupied bins of 20) read over 0.25 in about 1 %
    of windows (tests/edge/test_metrics.py; 24 % with the old floor), and the policy wants several such
    windows in a row. A reference of m images is itself a sample: it adds (bins - 1) / m, 10/36 = 0.28
    for a 36-image one, so a reference should hold a few hundred images.
    """
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape or e.sum() <= 0 or a.sum() <= 0:
        raise ValueError("psi needs two non-empty histograms over the same bins")
    if floor_samples <= 0:
        raise ValueError(f"psi floor_samples={floor_samples!r}: must be above 0 (an empty bin has no logarithm)")
    floor = floor_samples / min(e.sum(), a.sum())
    e = np.maximum(e / e.sum(), floor)
    a = np.maximum(a / a.sum(), floor)
    value = float(np.sum((a - e) * np.log(a / e)))
    return value if math.isfinite(value) else 0.0


def reference_histograms(reference: Mapping[str, Any]) -> dict[str, Histogram]:
    """The reference histograms a manifest carries (missing keys are simply absent)."""
    return {key: Histogram.from_dict(reference[key], f"reference.{key}") for key in REFERENCE_KEYS
            if isinstance(reference.get(key), Mapping)}
