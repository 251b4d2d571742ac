"""The local image store: a byte cap, oldest evicted first and counted, files from an earlier run included."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from qcsight_core.imageio import encode_jpeg, read_image
from qcsight_edge.imagestore import ImageStore, ImageStoreError

IMAGE = np.random.default_rng(0).integers(0, 256, size=(64, 80, 3), dtype=np.uint8)


def test_cap_evicts_the_oldest_and_counts(tmp_path: Path) -> None:
    size = len(encode_jpeg(IMAGE, 90))
    store = ImageStore(tmp_path / "images", max_bytes=3 * size + size // 2, jpeg_quality=90)
    refs = [store.save(f"frame-{i}", IMAGE) for i in range(5)]
    assert refs == [f"frame-{i}.jpg" for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == refs[2:]
    stats = store.stats()
    assert (stats.files, stats.bytes, stats.evicted) == (3, 3 * size, 2)
    assert read_image(tmp_path / "images" / refs[-1]).shape == IMAGE.shape


def test_files_from_an_earlier_run_count_towards_the_cap(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    size = len(encode_jpeg(IMAGE, 90))
    first = ImageStore(folder, max_bytes=2 * size, jpeg_quality=90)
    first.save("old-a", IMAGE)
    first.save("old-b", IMAGE)
    os.utime(folder / "old-a.jpg", ns=(1_000_000_000, 1_000_000_000))
    os.utime(folder / "old-b.jpg", ns=(2_000_000_000, 2_000_000_000))
    second = ImageStore(folder, max_bytes=2 * size, jpeg_quality=90)
    assert second.stats().bytes == 2 * size
    second.save("new", IMAGE)
    assert sorted(p.name for p in folder.iterdir()) == ["new.jpg", "old-b.jpg"]
    assert second.stats().evicted == 1


def test_unsafe_ids_stay_inside_the_store_and_oversize_is_refused(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", max_bytes=1024 * 1024)
    ref = store.save("../../etc/passwd", IMAGE)
    assert "/" not in ref and (tmp_path / "images" / ref).is_file()
    tiny = ImageStore(tmp_path / "tiny", max_bytes=1024)
    with pytest.raises(ImageStoreError, match="more than the whole store"):
        tiny.save("big", IMAGE)
