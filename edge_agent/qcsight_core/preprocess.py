"""The one preprocessing path: any-size grey/BGR uint8 images to the model's NCHW float32 input.

Training's evaluation, the export parity gate, batch scoring and the device all call this,
so what the device computes is what was measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from qcsight_core.checks import check_choice, check_int, check_number
from qcsight_core.errors import ConfigError, PreprocessError

COLOR_ORDERS = ("RGB", "BGR", "GRAY")
RESIZE_RULES = ("stretch", "shorter_side_crop", "letterbox")
INTERPOLATIONS = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA, "nearest": cv2.INTER_NEAREST}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes the model input; stored in the bundle manifest under "input".

    Attributes:
        height: model input height in pixels.
        width: model input width in pixels.
        color: channel order the model expects: RGB, BGR or GRAY (one channel).
        resize: "stretch" (resize to height x width), "shorter_side_crop" (resize the shorter
            side to size / crop_fraction, then centre-crop) or "letterbox" (keep the aspect
            ratio, pad with pad_value).
        crop_fraction: for shorter_side_crop, the fraction of the resized image kept.
        interpolation: "linear", "area" or "nearest".
        mean: per-channel mean on the 0..1 scale, subtracted after scaling.
        std: per-channel standard deviation on the 0..1 scale.
        pad_value: grey level (0..255) used by letterbox.
    """

    height: int = 224
    width: int = 224
    color: str = "RGB"
    resize: str = "stretch"
    crop_fraction: float = 1.0
    interpolation: str = "linear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    pad_value: int = 0
    _scale: np.ndarray = field(init=False, repr=False, compare=False)
    _shift: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            object.__setattr__(self, name, check_int(f"input.{name}", getattr(self, name), 8, 8192))
        check_choice("input.color", self.color, COLOR_ORDERS)
        check_choice("input.resize", self.resize, RESIZE_RULES)
        check_choice("input.interpolation", self.interpolation, INTERPOLATIONS)
        object.__setattr__(self, "crop_fraction", check_number("input.crop_fraction", self.crop_fraction, 0.1, 1.0))
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(
                "input.mean/std", (self.mean, self.std), f"{self.channels} value(s) each for color {self.color}"
            )
        if any(s <= 0 for s in self.std):
            raise ConfigError("input.std", self.std, "positive numbers")
        # out = (x / 255 - mean) / std == x * scale + shift, precomputed once.
        std = np.asarray(self.std, dtype=np.float32)
        object.__setattr__(self, "_scale", (1.0 / (255.0 * std)).astype(np.float32))
        object.__setattr__(self, "_shift", (-np.asarray(self.mean, dtype=np.float32) / std).astype(np.float32))

    @property
    def channels(self) -> int:
        return 1 if self.color == "GRAY" else 3

    def to_dict(self) -> dict[str, Any]:
        return {
            "height": self.height,
            "width": self.width,
            "channels": self.channels,
            "color": self.color,
            "resize": self.resize,
            "crop_fraction": self.crop_fraction,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "pad_value": self.pad_value,
            "layout": "NCHW",
            "dtype": "float32",
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        try:
            return cls(
                height=int(data["height"]),
                width=int(data["width"]),
                color=str(data["color"]),
                resize=str(data.get("resize", "stretch")),
                crop_fraction=float(data.get("crop_fraction", 1.0)),
                interpolation=str(data.get("interpolation", "linear")),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
                pad_value=int(data.get("pad_value", 0)),
            )
        except KeyError as exc:
            raise ConfigError(f"input.{exc.args[0]}", None, "required") from exc


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
    if pixels.ndim in (3, 4) and pixels.shape[-1] == spec._scale.size:
        # Straight into the channel-first output, one channel at a time: the same float32
        # multiply-then-add as below, bit for bit, without the float HWC temporaries and the
        # transposing copy (several times faster; batch scoring spends its CPU here).
        batch = pixels if pixels.ndim == 4 else pixels[None]
        out = np.empty((batch.shape[0], batch.shape[3], *batch.shape[1:3]), dtype=np.float32)
        for channel in range(batch.shape[3]):
            np.multiply(batch[..., channel], spec._scale[channel], out=out[:, channel], dtype=np.float32)
            out[:, channel] += spec._shift[channel]
        return out if pixels.ndim == 4 else out[0]
    scaled = pixels.astype(np.float32) * spec._scale + spec._shift
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
