"""Synthetic defect datasets: qcsight_core.synth's pictures written as folder-per-class PNGs with defect masks.

The same seed writes byte-identical files, whatever the number of worker threads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from qcsight_core.checks import check_int
from qcsight_core.errors import ConfigError, DataError
from qcsight_core.synth import DEFAULT_CLASSES, GENERATOR_VERSION, GOOD_CLASS, SURFACES, render
from qcsight_data.dataset import MASKS_DIR, DatasetIndex, Sample

CONFIG_NAME = "synth.json"
_WINDOW = 64
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1]  # level 1: half the time of 3, 1% larger

Progress = Callable[[int, int], None]


def _check_arguments(output: Path, count: int, size: int, classes: Sequence[str]) -> None:
    check_int("count", count, 1)
    check_int("size", size, 32, 2048)
    unknown = [c for c in classes if c not in DEFAULT_CLASSES]
    if unknown or not classes or len(set(classes)) != len(classes):
        raise ConfigError("classes", list(classes), f"distinct names from {', '.join(DEFAULT_CLASSES)}")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise DataError(f"{output}: exists and is not an empty directory; choose a new output directory")


def generate(
    output: Path,
    count: int,
    seed: int,
    size: int = 128,
    classes: Sequence[str] = DEFAULT_CLASSES,
    progress: Progress | None = None,
    workers: int | None = None,
) -> DatasetIndex:
    """Write count images, folder per class, with masks for defects; return their index.

    Image i has class classes[i % len(classes)] and is drawn from its own generator seeded by
    (seed, i), so the same seed writes byte-identical files (whatever the number of workers)
    and a larger count extends a smaller one. Files: ``output/<class>/<class>_<i>.png`` (BGR)
    and, for defects, ``output/masks/<class>/<class>_<i>.png`` (0/255 grey);
    ``output/synth.json`` records the parameters.

    Args:
        workers: threads drawing and encoding images (OpenCV and numpy release the GIL);
            default: the number of CPUs, at most 8.

    Raises:
        ConfigError: count, size or classes are not allowed.
        DataError: output exists and is not empty.
    """
    output = Path(output)
    _check_arguments(output, count, size, classes)
    for label in classes:
        (output / label).mkdir(parents=True, exist_ok=True)
        if label != GOOD_CLASS:
            (output / MASKS_DIR / label).mkdir(parents=True, exist_ok=True)

    def make(i: int) -> Sample:
        label = classes[i % len(classes)]
        picture = render(np.random.default_rng([seed, i]), label, size)
        name = f"{label}_{i:06d}.png"
        path = output / label / name
        _write_png(path, picture.image)
        if picture.mask is not None:
            _write_png(output / MASKS_DIR / label / name, picture.mask)
        absolute = os.path.normpath(os.path.abspath(path))
        return Sample(absolute, label, absolute)

    samples: list[Sample] = []
    threads = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="qcsight-synth") as pool:
        # Submitted a window at a time, so the pool's queue stays bounded whatever the count.
        for start in range(0, count, _WINDOW):
            for sample in pool.map(make, range(start, min(count, start + _WINDOW))):
                samples.append(sample)
                if progress is not None:
                    progress(len(samples), count)
    config = {"generator": "qcsight.synth", "version": GENERATOR_VERSION, "seed": seed, "count": count,
              "size": size, "classes": list(classes), "surfaces": list(SURFACES)}
    (output / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    samples.sort(key=lambda s: (s.label, s.path))
    root = os.path.normpath(os.path.abspath(output))
    return DatasetIndex(tuple(samples), tuple(sorted(classes)), (), str(output), root, "folder")


def _write_png(path: Path, pixels: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", pixels, _PNG_PARAMS)
    if not ok:
        raise DataError(f"{path}: PNG encoding failed")
    path.write_bytes(encoded.tobytes())
