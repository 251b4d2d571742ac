"""Image decoding refuses truncated, oversized and non-image data and reduces large JPEGs on request."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from qcsight_core.errors import ImageError
from qcsight_core.imageio import ImageHeader, decode_image, encode_jpeg, jpeg_size, read_header, read_image
from tests.helpers import bombs
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


# --- hostile headers: the size is read from the header and checked before OpenCV allocates anything ---


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif", ".webp", ".ppm"])
def test_header_size_matches_what_opencv_decodes(ext: str) -> None:
    data = bombs.encoded(ext, 123, 45)
    header = read_header(data)
    assert header is not None and (header.height, header.width) == decode_image(data).shape[:2]


def test_webp_lossless_and_extended_headers() -> None:
    ok, lossless = cv2.imencode(".webp", np.zeros((45, 123, 3), np.uint8), [cv2.IMWRITE_WEBP_QUALITY, 101])
    assert ok and read_header(lossless.tobytes()) == ImageHeader("WebP", 45, 123)
    # VP8X (extended) carries the canvas size as 24-bit width-1 and height-1.
    vp8x = b"RIFF" + struct.pack("<I", 30) + b"WEBPVP8X" + struct.pack("<I", 10) + b"\x10\x00\x00\x00"
    vp8x += (29999).to_bytes(3, "little") + (19999).to_bytes(3, "little")
    assert read_header(vp8x) == ImageHeader("WebP", 20000, 30000)


def test_big_endian_and_bigtiff_headers() -> None:
    entries = struct.pack(">HHIHH", 256, 3, 1, 30000, 0) + struct.pack(">HHII", 257, 4, 1, 20000)
    big_endian = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 2) + entries + b"\x00" * 4
    assert read_header(big_endian) == ImageHeader("TIFF", 20000, 30000)
    entries = struct.pack("<HHQQ", 256, 16, 1, 30000) + struct.pack("<HHQQ", 257, 4, 1, 20000)
    bigtiff = b"II+\x00" + struct.pack("<HHQ", 8, 0, 16) + struct.pack("<Q", 2) + entries + b"\x00" * 8
    assert read_header(bigtiff) == ImageHeader("TIFF", 20000, 30000)


def _bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(bombs.encoded(".bmp", 8, 8))
    data[18:26] = struct.pack("<ii", width, -height)  # top-down rows: a negative height
    return bytes(data)


@pytest.mark.parametrize(("name", "data", "size"), [
    ("PNG bomb (48 KB, valid deflate of zeros)", lambda: bombs.png_bomb(12000, 12000), "12000x12000"),
    ("PNG IHDR claiming 40000x40000", lambda: bombs.png_header_claims(40000, 40000), "40000x40000"),
    ("JPEG SOF claiming 30000x40000", lambda: bombs.jpeg_claims(30000, 40000), "30000x40000"),
    ("BMP claiming 30000x30000", lambda: _bmp_claiming(30000, 30000), "30000x30000"),
])
def test_oversized_headers_are_refused_before_decoding(name: str, data: Callable[[], bytes], size: str) -> None:
    with pytest.raises(ImageError, match=rf"declares {size} pixels, over the pixel budget of 67,108,864 \(67\.1 MP"):
        decode_image(data(), name)


def test_budget_is_configurable_and_applies_to_the_reduced_jpeg_size() -> None:
    data = bombs.encoded(".jpg", 640, 480)
    with pytest.raises(ImageError, match="pixel budget"):
        decode_image(data, max_pixels=640 * 480 - 1)
    # decoded at 1/4 size (160x120), the same file fits a budget far below its full size
    assert decode_image(data, min_side=100, max_pixels=160 * 120).shape == (120, 160, 3)


def test_opencv_errors_are_image_errors_without_build_paths() -> None:
    # Past our budget OpenCV's own limit (2^30 pixels) raises cv2.error: it must surface as ImageError.
    with pytest.raises(ImageError, match="not a decodable image") as info:
        decode_image(bombs.png_header_claims(40000, 40000), "huge.png", max_pixels=1 << 40)
    assert "/io/" not in str(info.value) and ".cpp" not in str(info.value)


def test_unknown_formats_and_broken_headers_are_refused() -> None:
    with pytest.raises(ImageError, match="no JPEG, PNG, BMP, TIFF, WebP, PNM signature"):
        decode_image(b"GIF89a" + b"\x00" * 64)
    with pytest.raises(ImageError, match="unreadable TIFF header"):
        decode_image(b"II*\x00" + struct.pack("<I", 1 << 30))
    with pytest.raises(ImageError, match="empty 0x0 image"):
        decode_image(bombs.png_header_claims(0, 0))
