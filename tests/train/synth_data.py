"""Small synthetic defect datasets for the training tests (qcsight_core.synth: real PNG files, seeded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qcsight_core.synth import generate

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
