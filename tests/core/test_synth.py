"""Synthetic defect pictures: masks that cover the defect, defects a brightness rule cannot see."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from qcsight_core.synth import DEFAULT_CLASSES, DEFECT_CLASSES, GOOD_CLASS, SURFACES, render


@pytest.mark.parametrize("label", DEFECT_CLASSES)
def test_mask_covers_the_defect_and_the_defect_is_visible(label: str) -> None:
    # One rng state renders the same part with and without the defect; the difference is the defect.
    for k in range(12):
        good = render(np.random.default_rng([3, k]), GOOD_CLASS, 128)
        bad = render(np.random.default_rng([3, k]), label, 128)
        assert bad.surface == good.surface and bad.mask is not None and good.mask is None
        diff = np.abs(bad.image.astype(np.float32) - good.image.astype(np.float32)).mean(axis=2)
        inside = bad.mask > 0
        near = cv2.dilate(bad.mask, np.ones((7, 7), np.uint8)) > 0
        assert 0.001 < inside.mean() < 0.15, "defect area"
        assert diff[near].sum() / diff.sum() > 0.8, "change outside the mask"
        assert diff[inside].mean() > 12, "defect too faint to see"


def test_surfaces_vary_per_image_and_a_brightness_rule_cannot_find_defects() -> None:
    means, defective, surfaces = [], [], set()
    for k in range(300):
        label = DEFAULT_CLASSES[k % len(DEFAULT_CLASSES)]
        picture = render(np.random.default_rng([11, k]), label, 64)
        means.append(float(picture.image.mean()))
        defective.append(label != GOOD_CLASS)
        surfaces.add(picture.surface)
    m, y = np.asarray(means), np.asarray(defective)
    assert surfaces == set(SURFACES)
    assert m.std() > 20  # brightness varies between parts far more than a defect moves it
    best = 0.0
    for threshold in np.unique(m):
        above = m >= threshold
        balanced = (above[y].mean() + (~above[~y]).mean()) / 2
        best = max(best, balanced, 1 - balanced)
    assert best < 0.7
