"""Alert thumbnails that fit one IoT Core message (a 128 KiB payload), whatever the picture holds."""

from __future__ import annotations

import base64
import math
from typing import Any

import cv2
import numpy as np

from qcsight_core.imageio import encode_jpeg

# IoT Core refuses a publish whose payload exceeds 128 KiB (Greengrass's PublishToIoTCore too);
# every device message is built to fit it, whichever broker is in front.
IOT_CORE_MAX_PAYLOAD = 128 * 1024
# What an alert needs besides its thumbnail, for the configuration check: envelope, ids, the
# verdict and its scores (about 30 bytes a class), the source name and the image reference.
ALERT_RESERVE = 16 * 1024
THUMBNAIL_BUDGET = IOT_CORE_MAX_PAYLOAD - ALERT_RESERVE
MIN_SIDE = 16
# When a thumbnail is over its budget: this quality first, then halve the side, down to MIN_SIDE.
SHRINK_QUALITY = 60
_FIELDS = 64  # {"format":"jpeg","width":…,"height":…,"data":""} around the base64 text


def thumbnail(image: np.ndarray, max_side: int, quality: int) -> dict[str, Any]:
    """A JPEG no larger than max_side on its longer side, base64, as the alert's `thumbnail` object."""
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    small = image
    if scale < 1.0:
        small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    data = encode_jpeg(small, quality)
    return {"format": "jpeg", "width": int(small.shape[1]), "height": int(small.shape[0]),
            "data": base64.b64encode(data).decode("ascii")}


def encoded_size(thumb: dict[str, Any]) -> int:
    """Bytes the thumbnail object adds to an alert's JSON."""
    return len(thumb["data"]) + _FIELDS


def fit_thumbnail(image: np.ndarray, max_side: int, quality: int, budget: int) -> tuple[dict[str, Any] | None, bool]:
    """The thumbnail as configured, or shrunk until it takes at most ``budget`` bytes of the alert.

    Returns:
        (thumbnail, shrunk): thumbnail is None when not even a MIN_SIDE one fits (the alert goes
        without it); shrunk says the configured size or quality was given up.
    """
    side = max_side
    thumb = thumbnail(image, side, quality)
    if encoded_size(thumb) <= budget:
        return thumb, False
    quality = min(quality, SHRINK_QUALITY)
    while True:
        thumb = thumbnail(image, side, quality)
        if encoded_size(thumb) <= budget:
            return thumb, True
        if side <= MIN_SIDE:
            return None, True
        side = max(MIN_SIDE, side // 2)


def worst_case_size(max_side: int, quality: int) -> int:
    """Bytes a max_side x max_side thumbnail of random noise (JPEG's worst case) adds to an alert."""
    noise = np.random.default_rng(0).integers(0, 256, (max_side, max_side, 3), dtype=np.uint8)
    return encoded_size(thumbnail(noise, max_side, quality))


def largest_side_that_fits(max_side: int, quality: int, budget: int = THUMBNAIL_BUDGET) -> int:
    """About the largest side whose worst-case thumbnail at quality fits budget (JPEG size grows with the area)."""
    side = max_side
    size = worst_case_size(side, quality)
    if size > budget:
        side = max(MIN_SIDE, int(side * math.sqrt(budget / size)))
    while side > MIN_SIDE and worst_case_size(side, quality) > budget:
        side = max(MIN_SIDE, int(side * 0.95))
    return side
