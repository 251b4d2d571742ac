"""Generated test images written to disk as real encoded files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def write_image(path: Path, value: int = 128, size: tuple[int, int] = (48, 64), color: bool = True,
                seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    shape = (*size, 3) if color else size
    noise = rng.integers(-10, 11, size=shape)
    image = np.clip(value + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"cannot write {path}")
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def read_back(path: str | Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_ANYCOLOR)
    if image is None:
        raise OSError(f"cannot read {path}")
    return image
