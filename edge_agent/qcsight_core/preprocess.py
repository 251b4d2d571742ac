"""The one preprocessing path: any-size grey/BGR uint8 images to the model's NCHW float32 input.

Training's evaluation, the export parity gate, batch scoring and the device all call this,
so what the device computes is what was measured.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from qcsight_core.errors import PreprocessError
from qcsight_core.input_spec import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "PreprocessSpec", "letterbox_box", "normalize",
           "prepare_pixels", "preprocess", "preprocess_batch", "scale_factors"]
# The spec's interpolation names (qcsight_core.input_spec) as OpenCV's flags.
INTERPOLATIONS = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA, "nearest": cv2.INTER_NEAREST}


def _to_color(image: np.ndarray, color: str) -> np.ndarray:
    if image.dtype != np.uint8:
        raise PreprocessError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        if color == "GRAY":
            return image
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)  # grey->3 channels: order is irrelevant
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise PreprocessError(f"expected HxW or HxWx3 (BGR) image, got shape {image.shape}")
    if image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if color == "GRAY":
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if color == "RGB":
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image


def _resize(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    h, w = image.shape[:2]
    if h < 1 or w < 1:
        raise PreprocessError(f"empty image of shape {image.shape}")
    interp = INTERPOLATIONS[spec.interpolation]
    if spec.resize == "stretch":
        if (h, w) == (spec.height, spec.width):
            return image
        return cv2.resize(image, (spec.width, spec.height), interpolation=interp)
    if spec.resize == "shorter_side_crop":
        scale = max(spec.height, spec.width) / spec.crop_fraction / min(h, w)
        new_h, new_w = max(spec.height, round(h * scale)), max(spec.width, round(w * scale))
        resized = cv2.resize(image, (new_w, new_h), interpolation=interp)
        top, left = (new_h - spec.height) // 2, (new_w - spec.width) // 2
        return resized[top : top + spec.height, left : left + spec.width]
    new_h, new_w, top, left = letterbox_box(h, w, spec.height, spec.width)
    resized = image if (new_h, new_w) == (h, w) else cv2.resize(image, (new_w, new_h), interpolation=interp)
    canvas = np.full((spec.height, spec.width, *resized.shape[2:]), spec.pad_value, dtype=np.uint8)
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas


def letterbox_box(h: int, w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Where letterbox puts an h x w image in a height x width input: (new_h, new_w, top, left).

    One scale for both axes, the largest that fits (min(height/h, width/w)); sides rounded to
    whole pixels (at least 1); the image centred, an odd padding's extra pixel at the bottom/right.
    """
    scale = min(height / h, width / w)
    new_h, new_w = min(height, max(1, round(h * scale))), min(width, max(1, round(w * scale)))
    return new_h, new_w, (height - new_h) // 2, (width - new_w) // 2


def scale_factors(h: int, w: int, spec: PreprocessSpec) -> tuple[float, float]:
    """How many model pixels one image pixel becomes, vertically and horizontally, under spec's resize rule."""
    if spec.resize == "stretch":
        return spec.height / h, spec.width / w
    if spec.resize == "shorter_side_crop":
        scale = max(spec.height, spec.width) / spec.crop_fraction / min(h, w)
        new_h, new_w = max(spec.height, round(h * scale)), max(spec.width, round(w * scale))
        return new_h / h, new_w / w
    new_h, new_w, _, _ = letterbox_box(h, w, spec.height, spec.width)
    return new_h / h, new_w / w


def prepare_pixels(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Colour conversion and geometry only: uint8 HxWxC (C = spec.channels) at the model size.

    Training augments this output; everything else feeds it to normalize().
    """
    pixels = _resize(_to_color(image, spec.color), spec)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return np.ascontiguousarray(pixels)


def normalize(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 HxWxC (or NxHxWxC) at model size to float32 CxHxW (or NxCxHxW), scaled by mean/std."""
    scale, shift = spec.affine
    if pixels.ndim in (3, 4) and pixels.shape[-1] == scale.size:
        # Straight into the channel-first output, one channel at a time: the same float32
        # multiply-then-add as below, bit for bit, without the float HWC temporaries and the
        # transposing copy (several times faster; batch scoring spends its CPU here).
        batch = pixels if pixels.ndim == 4 else pixels[None]
        out = np.empty((batch.shape[0], batch.shape[3], *batch.shape[1:3]), dtype=np.float32)
        for channel in range(batch.shape[3]):
            np.multiply(batch[..., channel], scale[channel], out=out[:, channel], dtype=np.float32)
            out[:, channel] += shift[channel]
        return out if pixels.ndim == 4 else out[0]
    scaled = pixels.astype(np.float32) * scale + shift
    if scaled.ndim == 3:
        return np.ascontiguousarray(scaled.transpose(2, 0, 1))
    return np.ascontiguousarray(scaled.transpose(0, 3, 1, 2))


def preprocess(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """One uint8 image (HxW grey or HxWx3 BGR, any size) to a float32 1xCxHxW batch."""
    return normalize(prepare_pixels(image, spec), spec)[None]


def preprocess_batch(images: Sequence[np.ndarray], spec: PreprocessSpec) -> np.ndarray:
    """Several uint8 images of any sizes to one float32 NxCxHxW batch."""
    if not images:
        raise PreprocessError("empty batch")
    return normalize(np.stack([prepare_pixels(image, spec) for image in images]), spec)
