"""Preprocessing checked against values computed by hand on tiny images."""

from __future__ import annotations

import numpy as np
import pytest

from qcsight_core.errors import ConfigError, PreprocessError
from qcsight_core.preprocess import PreprocessSpec, prepare_pixels, preprocess, preprocess_batch


def test_bgr_to_rgb_scaling_by_hand() -> None:
    # A 1x1... image already at model size: only colour order and normalisation apply.
    spec = PreprocessSpec(height=8, width=8, color="RGB", mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    image = np.zeros((8, 8, 3), np.uint8)
    image[..., 0] = 255  # blue in OpenCV's BGR
    image[..., 1] = 51
    image[..., 2] = 102  # red
    out = preprocess(image, spec)
    assert out.shape == (1, 3, 8, 8) and out.dtype == np.float32
    # R = (102/255 - 0.5)/0.5 = -0.2; G = (51/255 - 0.25)/0.25 = -0.2; B = (255/255 - 0)/1 = 1
    np.testing.assert_allclose(out[0, :, 0, 0], [-0.2, -0.2, 1.0], atol=1e-6)
    assert np.all(out[0, 0] == out[0, 0, 0, 0])


def test_gray_model_from_bgr_and_gray_inputs() -> None:
    spec = PreprocessSpec(height=8, width=8, color="GRAY", mean=(0.5,), std=(0.5,))
    gray = np.full((8, 8), 255, np.uint8)
    np.testing.assert_allclose(preprocess(gray, spec), np.ones((1, 1, 8, 8)), atol=1e-6)
    bgr = np.full((8, 8, 3), 0, np.uint8)
    np.testing.assert_allclose(preprocess(bgr, spec), -np.ones((1, 1, 8, 8)), atol=1e-6)


def test_gray_input_to_rgb_model_replicates_channels() -> None:
    spec = PreprocessSpec(height=8, width=8)
    out = preprocess(np.full((8, 8), 128, np.uint8), spec)
    mean, std = np.array(spec.mean), np.array(spec.std)
    np.testing.assert_allclose(out[0, :, 3, 3], (128 / 255 - mean) / std, rtol=1e-5)


def test_stretch_resize_of_a_2x2_image() -> None:
    # Nearest-neighbour up-sampling of a 2x2 checkerboard to 8x8 gives 4x4 blocks.
    spec = PreprocessSpec(height=8, width=8, color="GRAY", interpolation="nearest", mean=(0.0,), std=(1.0,))
    image = np.array([[0, 255], [255, 0]], np.uint8)
    pixels = prepare_pixels(image, spec)[..., 0]
    expected = np.kron(np.array([[0, 255], [255, 0]]), np.ones((4, 4), int))
    np.testing.assert_array_equal(pixels, expected)
    # Linear down-sampling 16x16 -> 8x8 of a horizontal ramp averages pairs of columns.
    spec = PreprocessSpec(height=8, width=8, color="GRAY", interpolation="area", mean=(0.0,), std=(1.0,))
    ramp = np.tile((np.arange(16) * 10).astype(np.uint8), (16, 1))
    np.testing.assert_array_equal(prepare_pixels(ramp, spec)[0, :, 0], np.arange(8) * 20 + 5)


def test_shorter_side_crop_keeps_the_centre() -> None:
    # 8x16 image, left half 0, centre 100, right 200; crop 8x8 from the middle keeps 100 only.
    spec = PreprocessSpec(height=8, width=8, color="GRAY", resize="shorter_side_crop", interpolation="nearest",
                          mean=(0.0,), std=(1.0,))
    image = np.zeros((8, 16), np.uint8)
    image[:, 4:12] = 100
    image[:, 12:] = 200
    pixels = prepare_pixels(image, spec)[..., 0]
    assert pixels.shape == (8, 8)
    assert np.all(pixels == 100)


def test_letterbox_pads_with_the_pad_value() -> None:
    spec = PreprocessSpec(height=8, width=8, color="GRAY", resize="letterbox", interpolation="nearest",
                          mean=(0.0,), std=(1.0,), pad_value=7)
    image = np.full((4, 8), 50, np.uint8)  # wide: scaled 1x, padded top and bottom by 2
    pixels = prepare_pixels(image, spec)[..., 0]
    assert np.all(pixels[:2] == 7) and np.all(pixels[6:] == 7)
    assert np.all(pixels[2:6] == 50)


def test_batch_of_mixed_sizes_equals_single_calls() -> None:
    spec = PreprocessSpec(height=16, width=16)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), rng.integers(0, 256, (50, 17), dtype=np.uint8)]
    batch = preprocess_batch(images, spec)
    assert batch.shape == (2, 3, 16, 16)
    for i, image in enumerate(images):
        np.testing.assert_array_equal(batch[i], preprocess(image, spec)[0])


def test_bad_inputs_and_specs_are_refused() -> None:
    spec = PreprocessSpec(height=8, width=8)
    with pytest.raises(PreprocessError, match="uint8"):
        preprocess(np.zeros((8, 8), np.float32), spec)
    with pytest.raises(PreprocessError, match="shape"):
        preprocess(np.zeros((8, 8, 5), np.uint8), spec)
    with pytest.raises(PreprocessError, match="empty batch"):
        preprocess_batch([], spec)
    with pytest.raises(ConfigError, match=r"input\.color"):
        PreprocessSpec(color="YUV")
    with pytest.raises(ConfigError, match=r"input\.mean/std"):
        PreprocessSpec(color="GRAY")
    with pytest.raises(ConfigError, match=r"input\.height"):
        PreprocessSpec(height=2)


def test_spec_dict_round_trip() -> None:
    spec = PreprocessSpec(height=64, width=48, resize="letterbox", crop_fraction=0.9, pad_value=3)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec


def test_letterbox_tall_image_into_a_wide_input_by_hand() -> None:
    # 16x8 (tall) into 8 rows x 16 columns: scale min(8/16, 16/8) = 0.5 -> 8x4, centred in columns 6..9.
    spec = PreprocessSpec(height=8, width=16, color="GRAY", resize="letterbox", interpolation="area",
                          mean=(0.0,), std=(1.0,), pad_value=9)
    image = np.zeros((16, 8), np.uint8)
    image[:, 4:] = 200  # right half bright: area averaging of pairs keeps 0, 0 | 200, 200
    pixels = prepare_pixels(image, spec)[..., 0]
    expected = np.full((8, 16), 9)
    expected[:, 6:8] = 0
    expected[:, 8:10] = 200
    np.testing.assert_array_equal(pixels, expected)


def test_letterbox_odd_padding_and_geometry() -> None:
    from qcsight_core.preprocess import letterbox_box, scale_factors

    # 3x9 into 8x8: scale 8/9, 3*8/9 = 2.67 -> 3 rows, 8 columns; 5 rows of padding: 2 above, 3 below.
    assert letterbox_box(3, 9, 8, 8) == (3, 8, 2, 0)
    spec = PreprocessSpec(height=8, width=8, color="GRAY", resize="letterbox", interpolation="nearest",
                          mean=(0.0,), std=(1.0,), pad_value=1)
    pixels = prepare_pixels(np.full((3, 9), 77, np.uint8), spec)[..., 0]
    assert np.all(pixels[:2] == 1) and np.all(pixels[2:5] == 77) and np.all(pixels[5:] == 1)
    sy, sx = scale_factors(3, 9, spec)
    assert (sy, sx) == (1.0, 8 / 9)
    stretch = PreprocessSpec(height=8, width=16, color="GRAY", mean=(0.0,), std=(1.0,))
    assert scale_factors(4, 4, stretch) == (2.0, 4.0)


def test_letterbox_same_pixels_through_batch_and_single() -> None:
    spec = PreprocessSpec(height=16, width=40, resize="letterbox", pad_value=128)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (30, 20, 3), dtype=np.uint8), rng.integers(0, 256, (10, 50), dtype=np.uint8)]
    batch = preprocess_batch(images, spec)
    assert batch.shape == (2, 3, 16, 40)
    for i, image in enumerate(images):
        np.testing.assert_array_equal(batch[i], preprocess(image, spec)[0])
