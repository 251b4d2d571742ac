"""Decoding image files and bytes into OpenCV arrays, refusing truncated or non-image data."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np

from qcsight_core.errors import ImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"
# Start-of-frame markers that carry the image size (all but DHT/JPG/DAC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_REDUCED_FLAGS = {
    (2, False): cv2.IMREAD_REDUCED_COLOR_2,
    (4, False): cv2.IMREAD_REDUCED_COLOR_4,
    (8, False): cv2.IMREAD_REDUCED_COLOR_8,
    (2, True): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    (4, True): cv2.IMREAD_REDUCED_GRAYSCALE_4,
    (8, True): cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


def is_image_path(path: str | Path) -> bool:
    """True when the file name has an image suffix qcsight reads."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, or None when the data is not a readable JPEG."""
    if not data.startswith(_JPEG_SOI):
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _SOF_MARKERS and pos + 9 <= len(data):
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return int(height), int(width)
        pos += 2 + length
    return None


def _check_complete(data: bytes, source: str) -> None:
    if data.startswith(_JPEG_SOI):
        if _JPEG_EOI not in data[-64:]:
            raise ImageError(source, "truncated JPEG (no end-of-image marker)")
    elif data.startswith(_PNG_SIGNATURE) and _PNG_IEND not in data[-64:]:
        raise ImageError(source, "truncated PNG (no IEND chunk)")


def _reduction(data: bytes, min_side: int | None) -> int:
    if not min_side:
        return 1
    size = jpeg_size(data)
    if size is None:
        return 1
    shorter = min(size)
    for factor in (8, 4, 2):
        if shorter // factor >= min_side:
            return factor
    return 1


def decode_image(
    data: bytes, source: str = "<bytes>", *, min_side: int | None = None, grayscale: bool = False
) -> np.ndarray:
    """Decode encoded image bytes to uint8: HxW for grey sources, HxWx3 BGR otherwise.

    Args:
        data: the encoded file contents.
        source: a name for error messages (a path or key).
        min_side: when set and the data is a JPEG much larger than this, decode at 1/2, 1/4
            or 1/8 resolution so that the shorter side stays >= min_side.
        grayscale: with min_side, whether the reduced decode should be grey.

    Raises:
        ImageError: empty, truncated or undecodable data.
    """
    if not data:
        raise ImageError(source, "empty file")
    _check_complete(data, source)
    buffer = np.frombuffer(data, dtype=np.uint8)
    factor = _reduction(data, min_side)
    flags = _REDUCED_FLAGS[(factor, grayscale)] if factor > 1 else cv2.IMREAD_ANYCOLOR
    image = cv2.imdecode(buffer, flags)
    if image is None:
        raise ImageError(source, "not a decodable image")
    if image.dtype != np.uint8:
        raise ImageError(source, f"unsupported pixel type {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    return image


def read_image(path: str | Path, *, min_side: int | None = None, grayscale: bool = False) -> np.ndarray:
    """Read and decode one image file (see decode_image)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(str(path), f"cannot read file: {exc.strerror or exc}") from exc
    return decode_image(data, str(path), min_side=min_side, grayscale=grayscale)


def encode_jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    """Encode a uint8 grey or BGR image as JPEG bytes."""
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ImageError("<array>", "JPEG encoding failed")
    return encoded.tobytes()
