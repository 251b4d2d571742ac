"""Reproducible archives: the same files always pack to the same bytes, hence the same recipe Digest.

Zip entries are written in sorted order with one fixed timestamp and fixed permissions, so neither
the order a directory lists its files in nor their modification times reach the archive. The
timestamp is SOURCE_DATE_EPOCH when set (the reproducible-builds convention), else 1980-01-01, the
earliest a zip can hold.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path

from qcsight_gg.errors import BuildError

ZIP_EPOCH = 315532800  # 1980-01-01T00:00:00Z
_EXECUTABLE = 0o755
_REGULAR = 0o644


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH, clamped to what a zip can represent.

    Raises:
        BuildError: SOURCE_DATE_EPOCH is set but is not a whole number of seconds.
    """
    raw = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not raw:
        return ZIP_EPOCH
    if not raw.isdigit():
        raise BuildError(f"SOURCE_DATE_EPOCH={raw!r} is not a whole number of seconds since 1970")
    return max(int(raw), ZIP_EPOCH)


def _date_time(epoch: int) -> tuple[int, int, int, int, int, int]:
    t = time.gmtime(epoch)
    return (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)


def write_zip(target: Path, members: Iterable[tuple[str, Path]], compress: bool = True,
              executable: Iterable[str] = ()) -> Path:
    """Write (name in archive, file on disk) pairs as a reproducible zip; returns target.

    Args:
        compress: deflate members (level 9); False stores them (wheels are already compressed).
        executable: archive names given mode 755 (others 644).
    """
    stamp = _date_time(source_date_epoch())
    mode_x = set(executable)
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=method) as archive:
        for name, path in sorted(members, key=lambda member: member[0]):
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.compress_type = method
            info.create_system = 3  # unix, so the permissions below are read back everywhere
            info.external_attr = ((_EXECUTABLE if name in mode_x else _REGULAR) | 0o100000) << 16
            with path.open("rb") as src, archive.open(info, "w") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    tmp.replace(target)
    return target


def normalise_zip(path: Path) -> None:
    """Rewrite a zip (a wheel) in place with sorted entries and the fixed timestamp; contents unchanged.

    A wheel's RECORD lists hashes of the contents, which this does not touch; the .dist-info
    folder stays last, where installers expect it.
    """
    stamp = _date_time(source_date_epoch())
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(tmp, "w") as target:
        infos = sorted(source.infolist(), key=lambda i: (".dist-info/" in i.filename, i.filename))
        for old in infos:
            info = zipfile.ZipInfo(old.filename, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = ((_EXECUTABLE if old.external_attr >> 16 & 0o111 else _REGULAR) | 0o100000) << 16
            target.writestr(info, source.read(old), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    tmp.replace(path)


def sha256_file(path: Path) -> bytes:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.digest()


def artifact_digest(path: Path) -> str:
    """SHA-256 of a file, base64-encoded as Greengrass recipes record an artifact's Digest."""
    return base64.b64encode(sha256_file(path)).decode("ascii")
