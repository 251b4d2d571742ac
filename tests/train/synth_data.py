"""Small synthetic defect datasets for the training tests (qcsight_data.synth: real PNG files, seeded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qcsight_data.synth import generate

CLASSES = ("good", "scratch", "spot")
DEFECTS = ("scratch", "spot")
# Flags that keep a CLI training run small: 64 px, 2 epochs, no worker processes.
SMALL = ["--img-size", "64", "--batch-size", "8", "--epochs", "2", "--workers", "0", "--threads", "2"]
FAST_EXPORT = ["--int8", "false", "--torchscript", "false", "--neo-onnx", "false"]
# Random-init mobilenet_v3_small: the smallest torchvision backbone, no download needed.
MOBILENET = ["--arch", "mobilenet_v3_small", "--weights", "none"]
EPOCH_LINE = (r"epoch=(\d+)/(\d+) train_loss=\d+\.\d{4} val_loss=\d+\.\d{4} val_acc=\d\.\d{4} "
              r"val_macro_f1=\d\.\d{4} lr=\d+\.\d{6} images_per_s=\d+\.\d")


def make_dataset(root: Path, count: int = 24, seed: int = 1) -> Path:
    """count images of 64 px, classes good/scratch/spot in turn, folder per class."""
    generate(root, count, seed=seed, size=64, classes=CLASSES)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("synth") / "data")


def make_anomaly_dataset(root: Path, good: int = 36, defects: int = 8, size: int = 64, seed: int = 3,
                         surface: str = "cast", defect_classes: tuple[str, ...] = ("scratch", "spot")) -> Path:
    """One surface family (as one product line would be): root/good and root/<defect> PNGs, masks under root/masks.

    qcsight_core.synth's own renderer, seeded per image; the surface is fixed, so good parts
    vary only in texture, brightness and lighting, as on a line.
    """
    import cv2
    import numpy as np

    from qcsight_core.synth import render

    for index in range(good + defects * len(defect_classes)):
        label = "good" if index < good else defect_classes[(index - good) // defects]
        picture = render(np.random.default_rng([seed, index]), label, size, surface=surface)
        (root / label).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / label / f"{label}_{index:04d}.png"), picture.image)
        if picture.mask is not None:
            (root / "masks" / label).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "masks" / label / f"{label}_{index:04d}.png"), picture.mask)
    return root
