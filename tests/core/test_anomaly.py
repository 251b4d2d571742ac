"""Anomaly bundles on the device side: normalised scores, verdicts, the box and heat on the judged image, overlays."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from qcsight_core import anomaly, messages
from qcsight_core.bundle import DecisionPolicy, Manifest, ModelFile, load_bundle
from qcsight_core.errors import BundleSchemaError, MessageError
from qcsight_core.preprocess import PreprocessSpec, prepare_pixels, preprocess, preprocess_batch
from qcsight_core.runner import OnnxRunner
from qcsight_core.verdict import DEFECT, GOOD, UNCERTAIN, Decider
from tests.helpers.models import make_tiny_anomaly_bundle

GREY = 128


def _part(shape: tuple[int, int], patch: tuple[int, int, int, int] | None) -> np.ndarray:
    """A mid-grey BGR image with an optional white rectangle (x0, y0, x1, y1)."""
    image = np.full((*shape, 3), GREY, np.uint8)
    if patch is not None:
        x0, y0, x1, y1 = patch
        image[y0:y1, x0:x1] = 255
    return image


def test_runner_divides_by_the_score_scale_and_returns_maps(tmp_path: Path) -> None:
    bundle = make_tiny_anomaly_bundle(tmp_path / "b", score_scale=4.0)
    runner = OnnxRunner(bundle)
    batch = preprocess_batch([_part((64, 64), None), _part((64, 64), (40, 8, 56, 24))], bundle.manifest.input)
    outputs = runner.infer(batch)
    raw = bundle.path / "model.onnx"
    import onnxruntime as ort

    raw_score, raw_map = ort.InferenceSession(str(raw)).run(None, {"input": batch})
    np.testing.assert_allclose(outputs.scores[:, 0], raw_score / 4.0, rtol=1e-6)
    np.testing.assert_allclose(outputs.maps, raw_map / 4.0, rtol=1e-6)
    assert outputs.maps.shape == (2, 8, 8)
    np.testing.assert_array_equal(runner.run(batch), outputs.scores)  # what the classifier callers get


def test_verdicts_on_the_normalised_scale_with_band_box_and_named_score(tmp_path: Path) -> None:
    bundle = make_tiny_anomaly_bundle(tmp_path / "b", score_scale=4.0, uncertain=0.8)
    decider = Decider(bundle.manifest)
    good, hot = decider.decide_batch(np.array([[0.5], [1.0]]))
    assert (good.status, good.label, hot.status, hot.label) == (GOOD, "good", DEFECT, "anomaly")
    assert decider.decide(np.array([0.9])).status == UNCERTAIN
    assert hot.scores(bundle.manifest.classes) == {"anomaly": 1.0}
    assert hot.confidence == hot.score == 1.0  # the metrics' confidence quantiles and drift read this score

    runner = OnnxRunner(bundle)
    image = _part((48, 96), (60, 8, 76, 24))
    (verdict,) = decider.decide_outputs(runner.infer(preprocess(image, bundle.manifest.input)), [image.shape])
    assert verdict.status == DEFECT and verdict.anomaly_map is not None and verdict.box is not None
    # The white patch covers x 60..76 of 96 and y 8..24 of 48; the 4-px cells and blur blur it a little.
    box = verdict.box
    assert box.x0 == pytest.approx(60 / 96, abs=0.1) and box.x1 == pytest.approx(76 / 96, abs=0.1)
    assert box.y0 == pytest.approx(8 / 48, abs=0.15) and box.y1 == pytest.approx(24 / 48, abs=0.15)
    (unboxed,) = decider.decide_outputs(runner.infer(preprocess(image, bundle.manifest.input)))
    assert unboxed.box is None and unboxed.anomaly_map is not None


@pytest.mark.parametrize("resize", ["stretch", "shorter_side_crop", "letterbox"])
@pytest.mark.parametrize("shape", [(60, 100), (100, 60), (64, 64)])
@pytest.mark.parametrize("size", [(48, 48), (96, 160)])  # HxW: content wide enough for sigma 4 px
def test_box_maps_back_through_each_resize_rule(resize: str, shape: tuple[int, int], size: tuple[int, int]) -> None:
    """A map hot exactly where prepare_pixels put a rectangle comes back as that rectangle on the image."""
    spec = PreprocessSpec(height=size[0], width=size[1], resize=resize)
    h, w = shape
    rect = (w // 2, h // 3, w // 2 + w // 4, h // 3 + h // 4)
    pixels = prepare_pixels(_part(shape, rect), spec)[:, :, 0]
    hot = (pixels > 200).astype(np.float32)
    box = anomaly.image_box(hot * 2.0, spec, (h, w, 3))
    expected = (rect[0] / w, rect[1] / h, rect[2] / w, rect[3] / h)
    got = (box.x0, box.y0, box.x1, box.y1)
    # The Gaussian smoothing (sigma 4 px of a 48-px input) widens the half-maximum a little.
    np.testing.assert_allclose(got, expected, atol=0.09)
    assert box.peak > 1.0


@pytest.mark.parametrize("size", [(48, 48), (32, 80), (80, 32), (224, 560)])
@pytest.mark.parametrize("shape", [(60, 100), (100, 60), (500, 1254), (33, 7), (1, 1)])
def test_letterbox_placement_is_where_preprocess_puts_the_image(size: tuple[int, int],
                                                                shape: tuple[int, int]) -> None:
    """The content box the heat is searched in is exactly the non-padded part of the model input (HxW inputs too)."""
    spec = PreprocessSpec(height=size[0], width=size[1], resize="letterbox")
    pixels = prepare_pixels(np.full((*shape, 3), 255, np.uint8), spec)[:, :, 0]
    rows, cols = np.nonzero(pixels == 255)
    drawn = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    where = anomaly.placement(spec, shape)
    assert where.content == drawn
    assert where.scale_x * (drawn[2] - drawn[0]) == pytest.approx(shape[1])
    assert where.scale_y * (drawn[3] - drawn[1]) == pytest.approx(shape[0])


def test_image_heatmap_is_the_input_heat_on_the_image_geometry() -> None:
    spec = PreprocessSpec(height=32, width=32, resize="letterbox")
    cells = np.zeros((8, 8), np.float32)
    cells[3:5, 3:5] = 2.0  # the middle of the model input: the middle of the image too
    heat = anomaly.image_heatmap(cells, spec, (40, 80, 3))
    assert heat.shape == (40, 80)
    y, x = np.unravel_index(int(heat.argmax()), heat.shape)
    assert abs(y - 20) <= 3 and abs(x - 40) <= 3
    small = anomaly.image_heatmap(cells, spec, (40, 80, 3), (20, 40))
    assert small.shape == (20, 40)


def test_hottest_box_takes_the_region_around_the_peak_above_half_way_from_the_median() -> None:
    heat = np.full((40, 40), 0.5, np.float32)
    heat[5:10, 5:15] = 1.2  # a weaker blob
    heat[20:30, 22:26] = 2.0  # the hottest one
    x0, y0, x1, y1, peak = anomaly.hottest_box(heat)
    assert (x0, y0, x1, y1, peak) == (22, 20, 26, 30, 2.0)
    assert anomaly.hottest_box(heat, (0, 0, 20, 20))[:4] == (5, 5, 15, 10)


def test_overlay_is_bgr_at_the_requested_size_with_the_box_drawn() -> None:
    spec = PreprocessSpec(height=32, width=32)
    cells = np.zeros((8, 8), np.float32)
    cells[0:2, 6:8] = 2.0
    grey = np.full((100, 200), 90, np.uint8)
    box = anomaly.image_box(cells, spec, grey.shape)
    picture = anomaly.overlay(grey, cells, spec, box, max_side=100)
    assert picture.shape == (50, 100, 3) and picture.dtype == np.uint8
    x0, y0, x1, _ = box.pixels(100, 50)
    assert (picture[y0, x0:x1] == 255).all()  # the white frame
    # The hot corner is red (JET at the top of the scale), the cold rest blue-tinted.
    b, _, r = picture[5, 95].astype(int)
    assert r > b
    b, _, r = picture[45, 5].astype(int)
    assert b > r


def test_alert_carries_box_and_overlay_compatibly() -> None:
    message = {
        **messages.envelope(messages.ALERT, "line-1", 1), "alert_id": "a", "frame_id": "f",
        "model": {"name": "m", "version": "1"},
        "verdict": {"status": "defect", "label": "anomaly", "score": 1.4, "confidence": 1.4,
                    "scores": {"anomaly": 1.4}},
        "box": anomaly.Box(0.1, 0.2, 0.3, 0.4, 1.4).to_dict(),
        "overlay": {"format": "jpeg", "width": 8, "height": 8, "data": "AAAA"},
    }
    assert messages.decode(messages.encode(message)) == message
    broken = {**message, "box": {"x0": "left", "y0": 0, "x1": 1, "y1": 1}}
    with pytest.raises(MessageError, match=r"message\.box\.x0"):
        messages.validate(broken)
    # A reader that knows nothing of box/overlay ignores them: validate checks known fields only.
    older = {k: v for k, v in message.items() if k not in ("box", "overlay")}
    messages.validate(older)


def test_manifest_output_must_match_the_task(tmp_path: Path) -> None:
    bundle = make_tiny_anomaly_bundle(tmp_path / "b")
    assert load_bundle(bundle.path).manifest.task == "anomaly"
    spec = PreprocessSpec(height=32, width=32)
    with pytest.raises(BundleSchemaError, match="anomaly_score"):
        Manifest(name="n", version="1", architecture="a", classes=("good", "anomaly"), defect_classes=("anomaly",),
                 input=spec, task="anomaly", output="probabilities")
    with pytest.raises(BundleSchemaError, match="probabilities"):
        Manifest(name="n", version="1", architecture="a", classes=("good", "x"), defect_classes=("x",),
                 input=spec, output=anomaly.OUTPUT_KIND)


def test_a_bad_score_scale_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(BundleSchemaError, match="score_scale"):
        anomaly.score_scale(ModelFile("model.onnx", details={"score_scale": 0}).details)
    assert anomaly.score_scale({}) == 1.0
    assert DecisionPolicy(defect_threshold=1.0, uncertain_threshold=0.6).defect_threshold == 1.0


def test_colorize_uses_one_fixed_scale() -> None:
    low, mid, high = anomaly.colorize(np.array([[0.0, 1.0, 5.0]], np.float32))[0]
    assert low[0] > low[2] and high[2] > high[0]  # blue at 0, red at and above OVERLAY_MAX
    # The threshold (1.0) sits in the middle of the colormap, whatever the image.
    assert tuple(mid) == tuple(cv2.applyColorMap(np.array([[127]], np.uint8), cv2.COLORMAP_JET)[0, 0])
