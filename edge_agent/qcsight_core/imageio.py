"""Decoding image files and bytes into OpenCV arrays, refusing truncated, oversized or non-image data.

Every decode in qcsight goes through decode_image: the agent's hot folder, the batch
workers, the Batch Transform handler, evaluation and dataset indexing. It reads the image's
size from its header first (PNG IHDR, JPEG SOFn, BMP, TIFF, WebP, PNM; parsed here, a few
bytes each) and refuses a picture whose decoded size exceeds the pixel budget before OpenCV
allocates anything: a 48 KB PNG can declare 20000x20000 pixels and costs 1.2 GB to decode.
Data whose format cannot be recognised from its signature is refused rather than handed to
OpenCV, whose own limit (2^30 pixels, 3 GB for BGR) is far too high for a device.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from qcsight_core.errors import ImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WebP", "PNM")

# 64 Mi pixels (67.1 MP): above the largest common machine-vision sensors (61 MP, 9568x6380)
# and 8K frames (33 MP), so no real part image is refused, while one decode stays at most
# 192 MiB as 8-bit BGR (384 MiB for 16-bit RGBA): two decode workers and two server slots
# together stay under 1 GiB, where OpenCV's own limit (2^30 pixels) allows 3 GiB per image.
DEFAULT_MAX_PIXELS = 1 << 26

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNM = re.compile(rb"P([1-6])(?:\s+|#[^\n]*\n)+(\d+)(?:\s+|#[^\n]*\n)+(\d+)\s")
# Start-of-frame markers that carry the image size (all but DHT/JPG/DAC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_TIFF_WIDTH, _TIFF_LENGTH = 256, 257
_TIFF_IFD_LIMIT = 4096  # entries in the first directory; real files have tens
_REDUCED_FLAGS = {
    (2, False): cv2.IMREAD_REDUCED_COLOR_2,
    (4, False): cv2.IMREAD_REDUCED_COLOR_4,
    (8, False): cv2.IMREAD_REDUCED_COLOR_8,
    (2, True): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    (4, True): cv2.IMREAD_REDUCED_GRAYSCALE_4,
    (8, True): cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header declares: its format and size in pixels."""

    format: str
    height: int
    width: int

    @property
    def pixels(self) -> int:
        return self.height * self.width


def is_image_path(path: str | Path) -> bool:
    """True when the file name has an image suffix qcsight reads."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def sniff_format(data: bytes) -> str | None:
    """The format named by the data's signature (one of FORMATS), or None for anything else."""
    if data.startswith(_JPEG_SOI):
        return "JPEG"
    if data.startswith(_PNG_SIGNATURE):
        return "PNG"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] in _TIFF_SIGNATURES:
        return "TIFF"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "WebP"
    if len(data) >= 2 and data[0:1] == b"P" and data[1:2] in b"123456":
        return "PNM"
    return None


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
        if marker == 0xDA:  # start of scan before any frame header: not a JPEG libjpeg decodes
            return None
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _SOF_MARKERS and pos + 9 <= len(data):
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return int(height), int(width)
        pos += 2 + length
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    # IHDR must be the first chunk: 4-byte length, b"IHDR", width, height (big-endian).
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return height, width


def _bmp_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 26:
        return None
    (header_size,) = struct.unpack("<I", data[14:18])
    if header_size == 12:  # BITMAPCOREHEADER: unsigned 16-bit sides
        width, height = struct.unpack("<HH", data[18:22])
        return height, width
    if header_size < 40:
        return None
    width, height = struct.unpack("<ii", data[18:26])  # a negative height is a top-down bitmap
    return abs(height), abs(width)


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    try:
        if big:  # BigTIFF: 8-byte offsets and counts, 20-byte entries
            (offset,) = struct.unpack(order + "Q", data[8:16])
            (count,) = struct.unpack(order + "Q", data[offset : offset + 8])
            start, entry_size = offset + 8, 20
        else:
            (offset,) = struct.unpack(order + "I", data[4:8])
            (count,) = struct.unpack(order + "H", data[offset : offset + 2])
            start, entry_size = offset + 2, 12
    except struct.error:
        return None
    sides: dict[int, int] = {}
    for index in range(min(count, _TIFF_IFD_LIMIT)):
        entry = data[start + index * entry_size : start + (index + 1) * entry_size]
        if len(entry) < entry_size:
            return None
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag not in (_TIFF_WIDTH, _TIFF_LENGTH):
            continue
        value = entry[12:] if big else entry[8:]
        formats = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8 (BigTIFF)
        if kind not in formats:
            return None
        size = struct.calcsize(formats[kind])
        sides[tag] = int(struct.unpack(order + formats[kind], value[:size])[0])
    if _TIFF_WIDTH not in sides or _TIFF_LENGTH not in sides:
        return None
    return sides[_TIFF_LENGTH], sides[_TIFF_WIDTH]


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:  # extended: 24-bit canvas width-1 and height-1
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return height, width
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:  # lossless: 14-bit sides - 1
        bits = int.from_bytes(data[21:25], "little")
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":  # lossy key frame
        width, height = struct.unpack("<HH", data[26:30])
        return height & 0x3FFF, width & 0x3FFF
    return None


def _pnm_size(data: bytes) -> tuple[int, int] | None:
    match = _PNM.match(data[:1024])
    if match is None:
        return None
    return int(match.group(3)), int(match.group(2))


_SIZE_READERS = {"JPEG": jpeg_size, "PNG": _png_size, "BMP": _bmp_size, "TIFF": _tiff_size,
                 "WebP": _webp_size, "PNM": _pnm_size}


def read_header(data: bytes) -> ImageHeader | None:
    """The format and size the data's header declares, without decoding; None when it cannot be read."""
    kind = sniff_format(data)
    if kind is None:
        return None
    size = _SIZE_READERS[kind](data)
    if size is None:
        return None
    return ImageHeader(kind, *size)


def _check_complete(data: bytes, source: str) -> None:
    if data.startswith(_JPEG_SOI):
        if _JPEG_EOI not in data[-64:]:
            raise ImageError(source, "truncated JPEG (no end-of-image marker)")
    elif data.startswith(_PNG_SIGNATURE) and _PNG_IEND not in data[-64:]:
        raise ImageError(source, "truncated PNG (no IEND chunk)")


def _reduction(header: ImageHeader, min_side: int | None) -> int:
    if not min_side or header.format != "JPEG":
        return 1
    shorter = min(header.height, header.width)
    for factor in (8, 4, 2):
        if shorter // factor >= min_side:
            return factor
    return 1


def checked_header(data: bytes, source: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                   min_side: int | None = None) -> tuple[ImageHeader, int]:
    """The data's header and the JPEG reduction factor, refusing what must not be decoded.

    Refuses unknown formats, unreadable or empty headers, and images whose decoded size
    (after the 1/2, 1/4 or 1/8 JPEG reduction that min_side allows) exceeds max_pixels.
    """
    kind = sniff_format(data)
    if kind is None:
        raise ImageError(source, f"not a decodable image (no {', '.join(FORMATS)} signature)")
    header = read_header(data)
    if header is None:
        raise ImageError(source, f"not a decodable image (unreadable {kind} header)")
    if header.height < 1 or header.width < 1:
        raise ImageError(source, f"{kind} header declares an empty {header.width}x{header.height} image")
    factor = _reduction(header, min_side)
    decoded = -(-header.height // factor) * -(-header.width // factor)
    if decoded > max_pixels:
        reduced = f" ({decoded:,} at 1/{factor} size)" if factor > 1 else ""
        raise ImageError(
            source,
            f"{kind} header declares {header.width}x{header.height} pixels{reduced}, over the pixel budget of "
            f"{max_pixels:,} ({max_pixels / 1e6:.1f} MP; checked before decoding, raise max_pixels to allow more)",
        )
    return header, factor


def decode_image(
    data: bytes,
    source: str = "<bytes>",
    *,
    min_side: int | None = None,
    grayscale: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode encoded image bytes to uint8: HxW for grey sources, HxWx3 BGR otherwise.

    Args:
        data: the encoded file contents.
        source: a name for error messages (a path or key).
        min_side: when set and the data is a JPEG much larger than this, decode at 1/2, 1/4
            or 1/8 resolution so that the shorter side stays >= min_side.
        grayscale: with min_side, whether the reduced decode should be grey.
        max_pixels: the pixel budget, checked from the header before anything is decoded.

    Raises:
        ImageError: empty, truncated, unrecognised, oversized or undecodable data; any
            OpenCV failure while decoding is one too.
    """
    if not data:
        raise ImageError(source, "empty file")
    _check_complete(data, source)
    header, factor = checked_header(data, source, max_pixels, min_side)
    flags = _REDUCED_FLAGS[(factor, grayscale)] if factor > 1 else cv2.IMREAD_ANYCOLOR
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as exc:
        # err and func only: the exception's text carries OpenCV's build path.
        raise ImageError(source, f"not a decodable image (OpenCV {exc.func or 'imdecode'}: {exc.err})") from exc
    except MemoryError as exc:
        raise ImageError(source, f"not enough memory to decode {header.width}x{header.height} pixels") from exc
    if image is None:
        raise ImageError(source, "not a decodable image")
    if image.dtype != np.uint8:
        raise ImageError(source, f"unsupported pixel type {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    return image


def read_image(
    path: str | Path, *, min_side: int | None = None, grayscale: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Read and decode one image file (see decode_image)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(str(path), f"cannot read file: {exc.strerror or exc}") from exc
    return decode_image(data, str(path), min_side=min_side, grayscale=grayscale, max_pixels=max_pixels)


def encode_jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    """Encode a uint8 grey or BGR image as JPEG bytes."""
    try:
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    except cv2.error as exc:
        raise ImageError("<array>", f"JPEG encoding failed (OpenCV {exc.func or 'imencode'}: {exc.err})") from exc
    if not ok:
        raise ImageError("<array>", "JPEG encoding failed")
    return encoded.tobytes()
