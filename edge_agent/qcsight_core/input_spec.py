"""What the model expects as input (the manifest's "input"): size, colour order, resize rule, mean/std.

Only the description, validated; qcsight_core.preprocess does the pixels. Kept free of numpy and
OpenCV at import so that reading a bundle's manifest (qcsight_core.bundle) needs neither: the cloud's
deploy function verifies and repackages bundles with the Lambda runtime's standard library.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qcsight_core.checks import check_choice, check_int, check_number
from qcsight_core.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

COLOR_ORDERS = ("RGB", "BGR", "GRAY")
RESIZE_RULES = ("stretch", "shorter_side_crop", "letterbox")
INTERPOLATIONS = ("linear", "area", "nearest")  # qcsight_core.preprocess maps them to OpenCV's flags
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

    @functools.cached_property
    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, shift) with (x / 255 - mean) / std == x * scale + shift, computed once per spec.

        Computed on first use rather than in __post_init__, so that reading a manifest needs no numpy.
        """
        import numpy as np

        std = np.asarray(self.std, dtype=np.float32)
        scale = (1.0 / (255.0 * std)).astype(np.float32)
        shift = (-np.asarray(self.mean, dtype=np.float32) / std).astype(np.float32)
        return scale, shift

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
