"""Train-time augmentation for inspection images (albumentations 2.x), applied to uint8 pixels at model size.

The pipeline sits between qcsight_core.preprocess.prepare_pixels and normalize, so geometry
and colour conversion are exactly what the device does and augmentation only perturbs them.
Everything is mild: a defect is often a few pixels, and a heavy crop or blur erases the label.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np

from qcsight_train.config import AugmentConfig


class Augment(Protocol):
    """A seeded per-image augmentation of a uint8 HxWxC array."""

    def __call__(self, pixels: np.ndarray, seed: int) -> np.ndarray: ...


class AlbumentationsAugment:
    """Wraps an albumentations Compose; reseeded per image so results depend only on (seed, epoch, index)."""

    def __init__(self, config: AugmentConfig) -> None:
        self.config = config
        self._compose = build_pipeline(config)

    def __call__(self, pixels: np.ndarray, seed: int) -> np.ndarray:
        self._compose.set_random_seed(seed)
        out: np.ndarray = self._compose(image=pixels)["image"]
        return np.ascontiguousarray(out)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers receive a pickled copy; rebuilding there is cheap and always picklable.
        return {"config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.config = state["config"]
        self._compose = build_pipeline(self.config)


def build_pipeline(config: AugmentConfig) -> Any:
    """The albumentations Compose for config (imported here: only training needs albumentations)."""
    # albumentations otherwise asks PyPI for a newer version at import, which fails offline.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations as A
    import cv2

    steps: list[Any] = []
    if config.hflip:
        steps.append(A.HorizontalFlip(p=0.5))
    if config.vflip:
        steps.append(A.VerticalFlip(p=0.5))
    if config.rot90:
        steps.append(A.RandomRotate90(p=0.5))
    if config.affine_p > 0:
        steps.append(A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05),
                              rotate=(-config.affine_degrees, config.affine_degrees),
                              border_mode=cv2.BORDER_REFLECT_101, p=config.affine_p))
    if config.brightness > 0:
        steps.append(A.RandomBrightnessContrast(brightness_limit=config.brightness, contrast_limit=config.brightness,
                                                p=0.8))
    if config.gamma > 0:
        low, high = round(100 * (1 - config.gamma)), round(100 * (1 + config.gamma))
        steps.append(A.RandomGamma(gamma_limit=(low, high), p=0.5))
    if config.blur_p > 0:
        steps.append(A.OneOf([A.GaussianBlur(blur_limit=(3, 5), p=1.0), A.MotionBlur(blur_limit=(3, 5), p=1.0)],
                             p=config.blur_p))
    if config.noise_p > 0:
        steps.append(A.GaussNoise(std_range=(0.01, 0.05), p=config.noise_p))
    if config.dropout_p > 0:
        steps.append(A.CoarseDropout(num_holes_range=(1, 2), hole_height_range=(0.05, 0.12),
                                     hole_width_range=(0.05, 0.12), fill=0, p=config.dropout_p))
    return A.Compose(steps, seed=0)
