"""Anomaly bundles on the device: the graph's outputs, the score map brought back to the image, its box, overlays.

An anomaly bundle's ONNX graph returns, per image, a raw image score and a raw patch score
map (nearest-neighbour distances to a memory bank of good patches, one value per feature
cell). The manifest's runtime entry carries ``score_scale``, the raw score at the decision
threshold; OnnxRunner divides both outputs by it, so 1.0 is the threshold on every anomaly
bundle (operators read one scale) and a map value above 1 marks a patch as anomalous as
the whole image would be.

Localisation (numpy/OpenCV only, no torch):

1. ``input_heatmap``: the map upsampled (bilinear) to the model input and smoothed with a
   Gaussian of sigma 4 px at input scale (what PatchCore does), so one hot cell becomes a
   blob rather than a square.
2. ``hottest_box``: the connected region around the peak where the heat is at least half way
   from the image's median (its background) to the peak: a full width at half maximum
   that needs no absolute level, so it works for faint and strong anomalies alike.
3. ``image_box`` / ``image_heatmap``: the inverse of qcsight_core.preprocess's resize rule
   (stretch, shorter_side_crop, letterbox) maps them back onto the image the model judged.
   Boxes are relative (0..1 of the image's width and height), so they hold at any
   resolution: a batch worker that decoded a JPEG at 1/4 size gives the box of the original.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from qcsight_core.bundle import ANOMALY_OUTPUT
from qcsight_core.errors import BundleSchemaError, PreprocessError
from qcsight_core.preprocess import PreprocessSpec, letterbox_box

SCORE_OUTPUT = "score"
MAP_OUTPUT = "score_map"
OUTPUT_KIND = ANOMALY_OUTPUT  # the model output the manifest names for an anomaly model
SCORE_NAME = "anomaly"
SCORE_SCALE_KEY = "score_scale"
# PatchCore smooths its upsampled map with sigma 4 px at input scale (Roth et al. 2022).
SMOOTHING_SIGMA = 4.0
# The overlay's colour scale: 0 is blue, the threshold (1.0) the middle of the colormap, 2 and above red.
OVERLAY_MAX = 2.0
OVERLAY_ALPHA = 0.45


@dataclass(frozen=True)
class Box:
    """The hottest region of an image, relative to the image the model judged.

    Attributes:
        x0: left edge, 0..1 of the image width.
        y0: top edge, 0..1 of the image height.
        x1: right edge (exclusive), 0..1.
        y1: bottom edge (exclusive), 0..1.
        peak: the highest normalised score in the smoothed map (1.0 = threshold).
    """

    x0: float
    y0: float
    x1: float
    y1: float
    peak: float

    def to_dict(self) -> dict[str, float]:
        return {"x0": round(self.x0, 4), "y0": round(self.y0, 4), "x1": round(self.x1, 4),
                "y1": round(self.y1, 4), "peak": round(self.peak, 6)}

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in pixels of an image of the given size (x1, y1 exclusive)."""
        return (int(np.floor(self.x0 * width)), int(np.floor(self.y0 * height)),
                int(np.ceil(self.x1 * width)), int(np.ceil(self.y1 * height)))


@dataclass(frozen=True)
class Placement:
    """Where an image of a given size sits in the model input after the resize rule.

    A model-input pixel (x, y) shows image pixel ((x - left) * scale_x, (y - top) * scale_y);
    content_* is the part of the model input that holds image content (letterbox pads).
    """

    left: float
    top: float
    scale_x: float
    scale_y: float
    content: tuple[int, int, int, int]  # x0, y0, x1, y1 in model-input pixels


def placement(spec: PreprocessSpec, image_shape: Sequence[int]) -> Placement:
    """The geometry qcsight_core.preprocess._resize applies to an image of image_shape (h, w, ...).

    Mirrors _resize rule for rule; tests/core/test_anomaly.py checks the two against each other.
    """
    h, w = int(image_shape[0]), int(image_shape[1])
    if h < 1 or w < 1:
        raise PreprocessError(f"empty image of shape {tuple(image_shape)}")
    if spec.resize == "stretch":
        return Placement(0.0, 0.0, w / spec.width, h / spec.height, (0, 0, spec.width, spec.height))
    if spec.resize == "shorter_side_crop":
        scale = max(spec.height, spec.width) / spec.crop_fraction / min(h, w)
        new_h, new_w = max(spec.height, round(h * scale)), max(spec.width, round(w * scale))
        top, left = (new_h - spec.height) // 2, (new_w - spec.width) // 2
        return Placement(-left, -top, w / new_w, h / new_h, (0, 0, spec.width, spec.height))
    new_h, new_w, top, left = letterbox_box(h, w, spec.height, spec.width)  # the very function _resize uses
    return Placement(left, top, w / new_w, h / new_h, (left, top, left + new_w, top + new_h))


def input_heatmap(score_map: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """A normalised hxw score map upsampled to the model input (HxW float32) and smoothed."""
    cells = np.asarray(score_map, dtype=np.float32)
    if cells.ndim != 2 or cells.size == 0:
        raise PreprocessError(f"expected a 2-D score map, got shape {cells.shape}")
    heat = cv2.resize(cells, (spec.width, spec.height), interpolation=cv2.INTER_LINEAR)
    return np.asarray(cv2.GaussianBlur(heat, (0, 0), SMOOTHING_SIGMA, borderType=cv2.BORDER_REFLECT))


def hottest_box(heat: np.ndarray, region: tuple[int, int, int, int] | None = None) -> tuple[int, int, int, int, float]:
    """(x0, y0, x1, y1, peak) of the hottest region of heat, in its pixels (x1, y1 exclusive).

    The region is the connected set of pixels around the peak whose heat is at least half way
    from the median to the peak. region (x0, y0, x1, y1) limits the search (letterbox padding
    holds no image and is left out).
    """
    x0, y0, x1, y1 = region or (0, 0, heat.shape[1], heat.shape[0])
    view = np.asarray(heat[y0:y1, x0:x1], dtype=np.float32)
    if view.size == 0:
        raise PreprocessError(f"empty heat region {region} in a map of shape {heat.shape}")
    peak_index = int(np.argmax(view))
    py, px = divmod(peak_index, view.shape[1])
    peak = float(view[py, px])
    level = (float(np.median(view)) + peak) / 2.0
    above = (view >= level).astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(above, connectivity=8)
    label = labels[py, px]
    left, top, width, height = (int(v) for v in stats[label, :4])
    return x0 + left, y0 + top, x0 + left + width, y0 + top + height, peak


def image_box(score_map: np.ndarray, spec: PreprocessSpec, image_shape: Sequence[int]) -> Box:
    """The hottest region of a normalised score map, relative to the image of image_shape the model judged."""
    where = placement(spec, image_shape)
    x0, y0, x1, y1, peak = hottest_box(input_heatmap(score_map, spec), where.content)
    h, w = int(image_shape[0]), int(image_shape[1])

    def along(value: float, offset: float, scale: float, size: int) -> float:
        return float(np.clip((value - offset) * scale / size, 0.0, 1.0))

    return Box(along(x0, where.left, where.scale_x, w), along(y0, where.top, where.scale_y, h),
               along(x1, where.left, where.scale_x, w), along(y1, where.top, where.scale_y, h), peak)


def image_heatmap(score_map: np.ndarray, spec: PreprocessSpec, image_shape: Sequence[int],
                  size: tuple[int, int] | None = None) -> np.ndarray:
    """The smoothed heat on the image's geometry: float32 of size (height, width) = size or image_shape[:2].

    Parts of the image the model never saw (cut by shorter_side_crop) get 0.
    """
    h, w = int(image_shape[0]), int(image_shape[1])
    out_h, out_w = size or (h, w)
    heat = input_heatmap(score_map, spec)
    where = placement(spec, image_shape)
    # The affine map from output pixels to model-input pixels (inverse of the resize rule).
    sx = w / out_w / where.scale_x
    sy = h / out_h / where.scale_y
    matrix = np.array([[sx, 0.0, where.left + 0.5 * sx - 0.5], [0.0, sy, where.top + 0.5 * sy - 0.5]],
                      dtype=np.float64)
    warped = cv2.warpAffine(heat, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    return np.asarray(warped, dtype=np.float32)


def colorize(heat: np.ndarray) -> np.ndarray:
    """BGR uint8 of a normalised heat map on the fixed overlay scale (0 blue, 1.0 mid, OVERLAY_MAX red)."""
    scaled = np.clip(np.asarray(heat, dtype=np.float32) / OVERLAY_MAX * 255.0, 0, 255).astype(np.uint8)
    return np.asarray(cv2.applyColorMap(scaled, cv2.COLORMAP_JET))


def overlay(image: np.ndarray, score_map: np.ndarray, spec: PreprocessSpec, box: Box | None = None,
            max_side: int | None = None) -> np.ndarray:
    """The image (BGR or grey uint8) with the heat blended in and the box drawn: BGR uint8.

    max_side scales the result down first (a thumbnail needs no full-resolution heat).
    """
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w)) if max_side else 1.0
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    base = image if scale == 1.0 else cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_AREA)
    if base.ndim == 2 or base.shape[2] == 1:
        base = cv2.cvtColor(base.reshape(out_h, out_w), cv2.COLOR_GRAY2BGR)
    elif base.shape[2] == 4:
        base = cv2.cvtColor(base, cv2.COLOR_BGRA2BGR)
    heat = image_heatmap(score_map, spec, image.shape, (out_h, out_w))
    blended = cv2.addWeighted(colorize(heat), OVERLAY_ALPHA, base, 1.0 - OVERLAY_ALPHA, 0.0)
    if box is not None:
        x0, y0, x1, y1 = box.pixels(out_w, out_h)
        thickness = max(1, round(max(out_w, out_h) / 200))
        cv2.rectangle(blended, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), (255, 255, 255), thickness)
    return np.asarray(blended)


def score_scale(details: Mapping[str, Any]) -> float:
    """The raw score at the threshold, from a runtime entry's details (1.0 when absent: raw scores)."""
    raw = details.get(SCORE_SCALE_KEY, 1.0)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = float("nan")
    if not np.isfinite(value) or value <= 0:
        raise BundleSchemaError(f"runtime {SCORE_SCALE_KEY}={raw!r}: expected a positive raw score")
    return value
