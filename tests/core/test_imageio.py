"""Image decoding refuses truncated and non-image data and reduces large JPEGs on request."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from qcsight_core.errors import ImageError
from qcsight_core.imageio import decode_image, encode_jpeg, jpeg_size, read_image
from tests.helpers.images import truncate, write_image


def test_grey_stays_grey_and_colour_is_bgr(tmp_path: Path) -> None:
    assert read_image(write_image(tmp_path / "g.png", color=False)).shape == (48, 64)
    assert read_image(write_image(tmp_path / "c.png", color=True)).shape == (48, 64, 3)


def test_truncated_jpeg_and_png_are_refused(tmp_path: Path) -> None:
    jpg = truncate(write_image(tmp_path / "a.jpg", size=(200, 200)))
    with pytest.raises(ImageError, match=r"a\.jpg: truncated JPEG"):
        read_image(jpg)
    png = truncate(write_image(tmp_path / "a.png"))
    with pytest.raises(ImageError, match="truncated PNG"):
        read_image(png)


def test_text_named_png_empty_file_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("this is not an image")
    with pytest.raises(ImageError, match=r"notes\.png: not a decodable image"):
        read_image(tmp_path / "notes.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        read_image(tmp_path / "empty.jpg")
    with pytest.raises(ImageError, match="cannot read file"):
        read_image(tmp_path / "missing.jpg")


def test_reduced_decode_of_a_large_jpeg() -> None:
    image = np.random.default_rng(0).integers(0, 256, (1024, 1280, 3), dtype=np.uint8)
    data = encode_jpeg(image)
    assert jpeg_size(data) == (1024, 1280)
    assert decode_image(data, min_side=224).shape == (256, 320, 3)  # 1/4 keeps >= 224
    assert decode_image(data, min_side=500).shape == (512, 640, 3)
    assert decode_image(data, min_side=600).shape == (1024, 1280, 3)
    assert decode_image(data, min_side=1000).shape == (1024, 1280, 3)
    assert decode_image(data, min_side=100, grayscale=True).shape == (128, 160)
    ok, png = cv2.imencode(".png", image[:64, :64])
    assert ok and jpeg_size(png.tobytes()) is None
