"""Synthetic defect datasets: reproducible bytes, folder layout and masks the folder loader agrees with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qcsight_core.errors import ConfigError, DataError
from qcsight_core.imageio import read_image
from qcsight_core.synth import DEFAULT_CLASSES, GOOD_CLASS
from qcsight_data.dataset import load_index
from qcsight_data.synth import generate


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_writes_byte_identical_files_whatever_the_workers_and_a_larger_count_extends(tmp_path: Path) -> None:
    first = generate(tmp_path / "a", 18, seed=7, size=64, workers=3)
    generate(tmp_path / "b", 18, seed=7, size=64, workers=1)
    generate(tmp_path / "c", 18, seed=8, size=64)
    generate(tmp_path / "d", 24, seed=7, size=64)

    a, b, c, d = (tree_bytes(tmp_path / n) for n in "abcd")
    assert a == b
    assert len(a) == 18 + 15 + 1  # images, masks for the 15 defect images, synth.json
    images = [name for name in a if name.endswith(".png")]
    assert all(a[name] != c[name] for name in images)
    assert all(a[name] == d[name] for name in images)
    assert json.loads(a["synth.json"])["seed"] == 7
    assert first.counts() == {"": dict.fromkeys(sorted(DEFAULT_CLASSES), 3)}


def test_folder_layout_masks_and_index_agree_with_the_folder_loader(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    progress: list[tuple[int, int]] = []
    index = generate(out, 12, seed=1, size=96, progress=lambda done, total: progress.append((done, total)))

    assert progress[-1] == (12, 12)
    loaded = load_index(out)
    assert loaded.samples == index.samples and loaded.classes == index.classes and loaded.skipped == ()
    for sample in index.samples:
        image = read_image(sample.path)
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        mask_path = out / "masks" / sample.label / Path(sample.path).name
        if sample.label == GOOD_CLASS:
            assert not mask_path.exists()
            continue
        mask = read_image(mask_path)
        assert mask.shape == (96, 96)
        assert set(np.unique(mask).tolist()) == {0, 255}, sample.path


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="count"):
        generate(tmp_path / "x", 0, seed=1)
    with pytest.raises(ConfigError, match="classes"):
        generate(tmp_path / "x", 4, seed=1, classes=("good", "rust"))
    with pytest.raises(ConfigError, match="size"):
        generate(tmp_path / "x", 4, seed=1, size=8)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file.txt").write_text("keep me")
    with pytest.raises(DataError, match="not an empty directory"):
        generate(tmp_path / "used", 4, seed=1)
    assert (tmp_path / "used" / "file.txt").read_text() == "keep me"
    index = generate(tmp_path / "two", 4, seed=1, classes=("good", "crack"))
    assert index.classes == ("crack", "good") and not (tmp_path / "two" / "masks" / "good").exists()
