"""Metrics windows: contents of a hand-built window, PSI against a hand-computed case, bounded reservoirs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qcsight_core import messages
from qcsight_core.drift import InputStats, bin_index, histogram, input_statistics, psi
from qcsight_edge.clock import ManualClock
from qcsight_edge.metrics import MetricsRecorder, MetricsWindow, Reservoir

REFERENCE = {
    "confidence": {"edges": [0.0, 0.25, 0.5, 0.75, 1.0], "counts": [1, 1, 1, 1]},
    "brightness": {"edges": [0.0, 100.0, 200.0, 255.0], "counts": [0, 5, 5]},
}


def test_psi_matches_a_hand_computed_case() -> None:
    # Reference: 4 equal bins (0.25 each). Observed counts 2,1,1,0 -> 0.5, 0.25, 0.25, 0, the empty bin floored
    # at half a sample of the smaller side: 0.5 / min(4, 4) = 0.125.
    expected = 0.25 * math.log(0.5 / 0.25) + 0.0 + 0.0 + (0.125 - 0.25) * math.log(0.125 / 0.25)
    assert psi([1, 1, 1, 1], [2, 1, 1, 0]) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(0.375 * math.log(2), rel=1e-12)
    assert psi([5, 5], [50, 50]) == pytest.approx(0.0)
    # The floor follows the smaller histogram: a reference of 1,000 with an empty bin against 100 frames.
    e, a = [0.5 / 100, 0.505, 0.495], [0.01, 0.49, 0.5]
    by_hand = sum((ai - ei) * math.log(ai / ei) for ai, ei in zip(a, e, strict=True))
    assert psi([0, 505, 495], [1, 49, 50]) == pytest.approx(by_hand, rel=1e-9)
    with pytest.raises(ValueError):
        psi([1, 1], [0, 0])
    with pytest.raises(ValueError, match="floor_samples"):
        psi([1, 1], [1, 1], floor_samples=0)


# The demo bundle's reference (20 bins over 0..1 and 0..255, its 36 validation images); 8 and 10 bins occupied.
DEMO_CONFIDENCE = [0, 0, 0, 3, 13, 6, 3, 2, 2, 0, 1, 0, 0, 1, 1, 0, 3, 0, 1, 0]
DEMO_BRIGHTNESS = [0, 0, 0, 0, 4, 4, 5, 4, 0, 4, 2, 5, 2, 3, 3, 0, 0, 0, 0, 0]


@pytest.mark.parametrize(("reference", "frames", "share"), [
    # Sampling noise alone is about a chi-square with (occupied bins - 1) degrees of freedom over n: mean
    # 10/80 = 0.125 for the confidence reference's 11 occupied bins, 9/100 for the brightness one's 10;
    # 95th percentiles 18.3/80 = 0.23 and 16.9/100 = 0.17. Measured with these draws: 1.4 % and 0.5 % of
    # windows over 0.25 (the policy then wants more windows in a row); with the old floor of 1e-4, 24 % and 1.5 %.
    (DEMO_CONFIDENCE, 80, 0.98),
    (DEMO_BRIGHTNESS, 100, 0.99),
])
def test_psi_of_a_window_drawn_from_the_reference_stays_under_the_threshold(reference: list[int], frames: int,
                                                                           share: float) -> None:
    p = np.asarray(reference, dtype=np.float64) / sum(reference)
    rng = np.random.default_rng(0)
    values = np.array([psi(reference, rng.multinomial(frames, p)) for _ in range(1000)])
    assert np.mean(values < 0.25) >= share


def test_psi_still_sees_a_real_shift_in_one_short_window() -> None:
    rng = np.random.default_rng(1)
    # The demo's drift: the lighting drops to 45 %, moving every part's brightness 3-10 bins down.
    edges = np.linspace(0.0, 255.0, 21)
    centres = (edges[:-1] + edges[1:]) / 2
    parts = rng.choice(centres, size=80, p=np.asarray(DEMO_BRIGHTNESS) / sum(DEMO_BRIGHTNESS))
    assert psi(DEMO_BRIGHTNESS, histogram(parts * 0.45, edges).counts) > 2.0
    # A histogram moved by one bin, drawn 80 times: still far over 0.25 every time.
    shifted = np.roll(np.asarray(DEMO_CONFIDENCE, dtype=np.float64), 1)
    draws = [psi(DEMO_CONFIDENCE, rng.multinomial(80, shifted / shifted.sum())) for _ in range(200)]
    assert min(draws) > 0.25


def test_binning_follows_numpy_histogram_and_clips_outliers() -> None:
    edges = [0.0, 0.25, 0.5, 0.75, 1.0]
    values = np.array([-3.0, 0.0, 0.25, 0.49, 0.5, 0.99, 1.0, 7.0])
    assert bin_index(edges, values).tolist() == [0, 0, 1, 1, 2, 3, 3, 3]
    inside = values[(values >= 0) & (values <= 1)]
    assert list(histogram(inside, edges).counts) == np.histogram(inside, edges)[0].tolist()


def test_input_statistics_by_hand() -> None:
    flat = np.full((16, 16, 3), 77, np.uint8)
    assert input_statistics(flat, "RGB") == InputStats(77.0, 0.0, 0.0)
    board = ((np.indices((16, 16)).sum(axis=0) % 2) * 255).astype(np.uint8)[:, :, None]
    stats = input_statistics(board, "GRAY")
    assert stats.brightness == pytest.approx(127.5)
    assert stats.contrast == pytest.approx(127.5)
    # Laplacian of a 1-pixel checkerboard is +-4*255 everywhere (reflect-101 borders keep the pattern).
    assert stats.sharpness == pytest.approx((4 * 255) ** 2)


def test_window_contents_by_hand() -> None:
    window = MetricsWindow(start_mono=10.0, start_wall=1_700_000_000.0, reference=REFERENCE, reservoir_size=16)
    rows = [  # status, label, confidence, latency s, brightness
        ("good", "good", 0.1, 0.010, 50.0),
        ("defect", "scratch", 0.2, 0.020, 150.0),
        ("defect", "spot", 0.3, 0.030, 150.0),
        ("uncertain", "spot", 0.6, 0.040, 250.0),
    ]
    for status, label, confidence, latency, brightness in rows:
        window.record(status, label, confidence, latency, InputStats(brightness, 10.0, 100.0))
    window.errors += 2
    window.dropped += 3
    body = window.body(end_mono=70.0, end_wall=1_700_000_060.0, model={"name": "tiny", "version": "7"})

    assert body["window"] == {"start": "2023-11-14T22:13:20.000Z", "end": "2023-11-14T22:14:20.000Z", "seconds": 60.0}
    assert body["counts"] == {"frames": 4, "good": 1, "defect": 2, "uncertain": 1, "dropped": 3, "errors": 2}
    assert body["by_class"] == {"good": 1, "scratch": 1, "spot": 2}
    assert body["defect_rate"] == 0.5
    conf = np.array([0.1, 0.2, 0.3, 0.6])
    assert body["confidence"] == pytest.approx({"p05": np.quantile(conf, 0.05), "p50": 0.25,
                                                "p95": np.quantile(conf, 0.95)}, abs=1e-6)
    assert body["latency_ms"] == pytest.approx({"p50": 25.0, "p95": 38.5, "p99": 39.7})
    assert body["input"] == {"brightness": 150.0, "contrast": 10.0, "sharpness": 100.0}
    # confidence: counts 2,1,1,0 over 4 equal reference bins -> the hand-computed PSI above.
    assert body["drift"]["confidence_psi"] == pytest.approx(0.375 * math.log(2), abs=1e-6)
    # brightness: reference 0, 5, 5; observed 1, 2, 1 -> .25, .5, .25; the floor is 0.5 / min(10, 4).
    e = [0.125, 0.5, 0.5]
    a = [0.25, 0.5, 0.25]
    by_hand = sum((ai - ei) * math.log(ai / ei) for ai, ei in zip(a, e, strict=True))
    assert body["drift"]["brightness_psi"] == pytest.approx(by_hand, abs=1e-6)
    message = {**messages.envelope(messages.METRICS, "line1", 1), **body}
    assert messages.validate(message) == messages.METRICS


def test_empty_window_is_valid_and_reports_no_drift() -> None:
    window = MetricsWindow(0.0, 1_700_000_000.0, REFERENCE)
    body = window.body(60.0, 1_700_000_060.0, {"name": "m", "version": "1"})
    assert body["counts"]["frames"] == 0 and body["defect_rate"] == 0.0 and body["drift"] == {}
    messages.validate({**messages.envelope(messages.METRICS, "line1", 1), **body})


def test_reservoir_is_bounded_and_exact_while_small() -> None:
    small = Reservoir(8)
    for v in (5.0, 1.0, 3.0):
        small.add(v)
    assert small.quantiles((0.5,)) == (3.0,)
    big = Reservoir(256, seed=1)
    values = np.random.default_rng(0).random(200_000)
    for v in values:
        big.add(float(v))
    assert big.values().shape == (256,) and big.seen == 200_000
    p50, p99 = big.quantiles((0.5, 0.99))
    assert abs(p50 - 0.5) < 0.1 and p99 > 0.9


def test_recorder_rotates_windows_on_the_clock() -> None:
    clock = ManualClock()
    recorder = MetricsRecorder(clock, 32, REFERENCE)
    recorder.record("good", "good", 0.9, 0.01, InputStats(100, 1, 1))
    clock.advance(60)
    first = recorder.rotate()
    assert first.frames == 1 and first.start_mono == 0.0
    assert recorder.window_start == 60.0
    recorder.dropped(2)
    second = recorder.rotate({})
    assert second.dropped == 2 and second.reference == REFERENCE
    assert recorder.rotate().reference == {}


def test_window_bins_values_on_edges_as_histogram_does() -> None:
    values = [0.0, 0.25, 0.25, 0.5, 0.75, 1.0, 1.0, -0.5, 2.0]
    window = MetricsWindow(0.0, 1_700_000_000.0, REFERENCE)
    for v in values:
        window.record("good", "good", v, 0.001, InputStats(100.0, 1.0, 1.0))
    body = window.body(1.0, 1_700_000_001.0, {"name": "m", "version": "1"})
    edges = REFERENCE["confidence"]["edges"]
    expected = psi(REFERENCE["confidence"]["counts"], histogram(np.clip(values, 0, 1), edges).counts)
    assert body["drift"]["confidence_psi"] == pytest.approx(expected, abs=1e-6)
