"""The input size from the data (qcsight_data.sizing), on images and masks written here."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from qcsight_core.preprocess import PreprocessSpec
from qcsight_data.sizing import MIN_DEFECT_PX, ImageSizes, defect_sides, largest_region_box, measure, recommend, report


def test_largest_region_box_ignores_the_smaller_blobs() -> None:
    mask = np.zeros((20, 30), np.uint8)
    mask[2:4, 2:4] = 255      # 2x2 speck
    mask[10:13, 5:25] = 255   # 3 rows x 20 columns: the defect
    assert largest_region_box(mask) == (3, 20)
    assert largest_region_box(np.zeros((5, 5), np.uint8)) is None


def test_defect_side_after_stretch_and_letterbox_by_hand() -> None:
    # A 3x20 defect in a 100x400 image. Stretch to 50x50: rows x0.5, columns x0.125 -> min(1.5, 2.5) = 1.5.
    sizes = ImageSizes(((100, 400),), ((100, 400, 3, 20),))
    stretch = PreprocessSpec(height=50, width=50)
    np.testing.assert_allclose(defect_sides(sizes, stretch), [1.5])
    # Letterbox to 64x256: one scale 0.64 -> min(1.92, 12.8) = 1.92.
    letterbox = PreprocessSpec(height=64, width=256, resize="letterbox")
    np.testing.assert_allclose(defect_sides(sizes, letterbox), [1.92])


def test_recommendation_keeps_a_long_part_long_and_grows_for_thin_defects() -> None:
    # 500x1254 strips (the hairline cracks): ratio 2.5 -> a wide input, not a 160x160 squeeze.
    strips = ImageSizes(tuple((500, 1254) for _ in range(10)))
    choice = recommend(strips)
    assert (choice.height, choice.width) == (224, 576) and choice.resize == "stretch"
    # Square images whose defects are 10 px wide in 600 px: at 224 they are 3.7 px, so the side grows
    # until the 10th percentile reaches MIN_DEFECT_PX = 7 (10 * s / 600 >= 7 -> s >= 420 -> 448).
    squares = ImageSizes(tuple((600, 600) for _ in range(10)), tuple((600, 600, 10, 80) for _ in range(10)))
    grown = recommend(squares)
    assert (grown.height, grown.width) == (448, 448)
    assert grown.defect_px["p10"] >= MIN_DEFECT_PX == 7.0
    # Thin defects in small images grow the input past the images' own size (no masks: never past it, below).
    small = recommend(ImageSizes(tuple((260, 260) for _ in range(10)), tuple((260, 260, 6, 80) for _ in range(10))))
    assert (small.height, small.width) == (320, 320)  # 6 * 320 / 260 = 7.4 px; 288 gives 6.6
    # 6 px defects in 600 px images would need 700: the side stops at MAX_SIDE 512, and the reasons say so.
    tiny = recommend(ImageSizes(tuple((600, 600) for _ in range(10)), tuple((600, 600, 6, 80) for _ in range(10))))
    assert (tiny.height, tiny.width) == (512, 512)
    assert any("not reached" in reason for reason in tiny.reasons)
    # Never above the images' own size: 100 px images stay at most 96 (the floor).
    assert recommend(ImageSizes(tuple((100, 100) for _ in range(4)))).height == 96
    # Wildly mixed shapes around a wide median letterbox.
    mixed = ImageSizes(((100, 150), (100, 300), (100, 250), (100, 600), (100, 200)))
    assert recommend(mixed).resize == "letterbox"


def test_measure_reads_images_and_masks_from_a_folder(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / "crack").mkdir(exist_ok=True)
        (tmp_path / "masks" / "crack").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "crack" / f"c{i}.png"), np.full((40, 80), 100, np.uint8))
        mask = np.zeros((40, 80), np.uint8)
        mask[10:12, 10:50] = 255
        cv2.imwrite(str(tmp_path / "masks" / "crack" / f"c{i}.png"), mask)
    samples = [(str(tmp_path / "crack" / f"c{i}.png"), "crack") for i in range(3)]
    sizes = measure(samples, tmp_path)
    assert sizes.shapes == ((40, 80),) * 3 and sizes.defects == ((40, 80, 2, 40),) * 3
    lines = report(sizes, recommend(sizes))
    # 2 px defects in 40 px images: grown past the images' size until they are 7 px (2 * 160 / 40 = 8).
    assert any(line.startswith("recommended input: --img-size 160x320") for line in lines)
