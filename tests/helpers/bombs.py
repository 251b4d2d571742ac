"""Hostile inputs built in memory: decompression bombs, headers that lie about their size, tar bombs.

Each builder returns real, well-formed bytes (valid chunk CRCs, a real deflate stream, a real
tar), so what refuses them is the size check, not a parse error.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

import cv2
import numpy as np


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit grey PNG of zeros: 20000x20000 is 48 KB on disk and 400 MB decoded (grey)."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


def png_header_claims(width: int, height: int) -> bytes:
    """A 68-byte-class PNG whose IHDR claims width x height with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 4))
            + _png_chunk(b"IEND", b""))


def jpeg_claims(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header (SOF0) is rewritten to declare width x height."""
    ok, encoded = cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))
    assert ok
    data = bytearray(encoded.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def encoded(ext: str, width: int, height: int, value: int = 128) -> bytes:
    """A real image file of the given size, encoded by OpenCV."""
    ok, data = cv2.imencode(ext, np.full((height, width, 3), value, np.uint8))
    assert ok
    return data.tobytes()


def tar_bomb(members: dict[str, int | bytes]) -> bytes:
    """A .tar.gz whose members are given bytes or that many zero bytes (compressing ~1000:1)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(content, int):
                info.size = content
                tar.addfile(info, _Zeros(content))
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


class _Zeros(io.RawIOBase):
    """size zero bytes, read without holding them all."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        count = min(len(buffer), self.left)
        buffer[:count] = b"\x00" * count
        self.left -= count
        return count
