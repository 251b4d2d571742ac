"""Fixtures for the batch tests: a tiny real bundle and folders of real image files, good, defect and broken."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from qcsight_core.bundle import Bundle
from tests.helpers.images import truncate, write_image
from tests.helpers.models import make_tiny_bundle

BRIGHT, DARK = 220, 30  # the tiny model calls bright images "spot" (a defect) and dark ones "good"


@dataclass(frozen=True)
class ImageSet:
    """A folder of images and what each file should score as."""

    root: Path
    expected: dict[str, str]  # path -> verdict ("good", "defect" or "error")

    def of(self, verdict: str) -> list[str]:
        return sorted(k for k, v in self.expected.items() if v == verdict)


def make_images(root: Path, count: int = 24, broken: bool = True, size: tuple[int, int] = (48, 64)) -> ImageSet:
    """count images in two sub-folders, alternating dark (good) and bright (defect), JPEG and PNG.

    With broken, adds a truncated JPEG, a text file named .jpg, an empty .png and a .txt file.
    """
    expected: dict[str, str] = {}
    for i in range(count):
        bright = i % 2 == 0
        suffix = ".png" if i % 3 == 0 else ".jpg"
        path = write_image(root / f"part{i % 2}" / f"img{i:04d}{suffix}", BRIGHT if bright else DARK, size, seed=i)
        expected[str(path)] = "defect" if bright else "good"
    if broken:
        cut = truncate(write_image(root / "broken" / "cut.jpg", BRIGHT, size))
        fake = root / "broken" / "fake.jpg"
        fake.write_text("this is not a JPEG")
        empty = root / "broken" / "empty.png"
        empty.write_bytes(b"")
        notes = root / "notes.txt"
        notes.write_text("line 7 shift notes")
        for path in (cut, fake, empty, notes):
            expected[str(path)] = "error"
    return ImageSet(root, expected)


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    return make_tiny_bundle(tmp_path / "bundle")


@pytest.fixture
def images(tmp_path: Path) -> ImageSet:
    return make_images(tmp_path / "images")
