"""Synthetic surface-defect pictures with pixel masks, drawn from a seeded generator, reproducible.

Rendered here for the agent's synthetic camera (the demo); qcsight_data.synth writes them out as
a labelled dataset.

Four surface families (brushed metal, cast, woven, wood-like) under a random lighting
gradient and sensor noise, each image with its own texture, brightness, contrast and tint.
Defects (scratch, crack, spot, dent, missing region) vary in place, size and contrast, and
change an image's mean brightness far less than brightness varies between images, so a
brightness rule cannot separate good from defective while a small CNN can.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from qcsight_core.errors import ConfigError

GOOD_CLASS = "good"
DEFECT_CLASSES = ("scratch", "crack", "spot", "dent", "missing")
DEFAULT_CLASSES = (GOOD_CLASS, *DEFECT_CLASSES)
SURFACES = ("brushed", "cast", "woven", "wood")
# Bump when the pictures for a given seed change, so a stored fingerprint can be explained.
GENERATOR_VERSION = 1
# Tints (B, G, R multipliers) per surface; jittered per image.
_TINTS = {"brushed": (1.04, 1.0, 0.95), "cast": (1.0, 1.0, 1.0), "woven": (0.9, 1.0, 1.05), "wood": (0.62, 0.84, 1.08)}

Array = np.ndarray


@dataclass(frozen=True)
class SynthImage:
    """One generated picture: BGR uint8 pixels, its class, surface and defect mask (None for good)."""

    image: Array
    label: str
    surface: str
    mask: Array | None


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[Array, Array]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> Array:
    low = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC))


def _fbm(rng: np.random.Generator, size: int, octaves: Sequence[int], persistence: float = 0.55) -> Array:
    total = np.zeros((size, size), np.float32)
    amplitude = 1.0
    for cells in octaves:
        total += amplitude * _smooth_noise(rng, size, max(2, min(cells, size)))
        amplitude *= persistence
    return total


def _standardise(texture: Array) -> Array:
    return np.asarray((texture - texture.mean()) / (texture.std() + 1e-6), np.float32)


def _rotated(size: int, angle: float) -> tuple[Array, Array]:
    yy, xx = _grid(size)
    c, s = math.cos(angle), math.sin(angle)
    return xx * c + yy * s, -xx * s + yy * c


def _line_kernel(length: int, angle: float) -> Array:
    kernel = np.zeros((length, length), np.float32)
    half = (length - 1) / 2
    dx, dy = half * math.cos(angle), half * math.sin(angle)
    cv2.line(kernel, (round(half - dx), round(half - dy)), (round(half + dx), round(half + dy)), 1.0, 1)
    return np.asarray(kernel / kernel.sum(), np.float32)


def _brushed(rng: np.random.Generator, size: int) -> Array:
    angle = rng.uniform(0, math.pi)
    length = int(rng.integers(size // 6, size // 3)) | 1
    streaks = cv2.filter2D(rng.standard_normal((size, size)).astype(np.float32), -1, _line_kernel(length, angle),
                           borderType=cv2.BORDER_REFLECT)
    sheen = _fbm(rng, size, (3, 6))
    return _standardise(_standardise(streaks) + rng.uniform(0.2, 0.8) * _standardise(sheen))


def _cast(rng: np.random.Generator, size: int) -> Array:
    grain = _fbm(rng, size, (4, 8, 16, 32, max(2, size // 2)), rng.uniform(0.5, 0.8))
    pits = cv2.GaussianBlur((rng.random((size, size)) < rng.uniform(0.002, 0.01)).astype(np.float32), (3, 3), 0.7)
    return _standardise(_standardise(grain) - 2.0 * pits)


def _woven(rng: np.random.Generator, size: int) -> Array:
    period = rng.uniform(5.0, 12.0)
    u, v = _rotated(size, rng.uniform(0, math.pi / 2))
    over = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    warp = np.sin(np.pi * np.mod(u / period, 1.0))
    weft = np.sin(np.pi * np.mod(v / period, 1.0))
    weave = np.where(over, warp, weft) + 0.35 * _smooth_noise(rng, size, max(2, size // 4))
    return _standardise(weave.astype(np.float32))


def _wood(rng: np.random.Generator, size: int) -> Array:
    angle = rng.uniform(0, math.pi)
    u, v = _rotated(size, angle)
    period = rng.uniform(7.0, 18.0)
    warp = _fbm(rng, size, (2, 4, 8)) * rng.uniform(3.0, 8.0)
    rings = np.sin(2 * np.pi * (v + warp + 0.002 * (u - size / 2) ** 2) / period)
    grain = cv2.filter2D(rng.standard_normal((size, size)).astype(np.float32), -1,
                         _line_kernel(int(size // 5) | 1, angle), borderType=cv2.BORDER_REFLECT)
    return _standardise(rings.astype(np.float32) + 0.6 * _standardise(grain))


_SURFACE_MAKERS: dict[str, Callable[[np.random.Generator, int], Array]] = {
    "brushed": _brushed, "cast": _cast, "woven": _woven, "wood": _wood,
}


def _stroke(points: Array, size: int, thickness: int) -> Array:
    canvas = np.zeros((size, size), np.uint8)
    cv2.polylines(canvas, [np.round(points).astype(np.int32).reshape(-1, 1, 2)], False, 255, thickness, cv2.LINE_AA)
    return canvas.astype(np.float32) / 255.0


def _scratch(rng: np.random.Generator, size: int, contrast: float) -> tuple[Array, Array]:
    start = rng.uniform(0.1, 0.9, 2) * size
    angle = rng.uniform(0, 2 * math.pi)
    length = rng.uniform(0.25, 0.7) * size
    steps = int(rng.integers(3, 6))
    angles = angle + np.cumsum(rng.normal(0, 0.12, steps))
    deltas = np.stack([np.cos(angles), np.sin(angles)], 1) * (length / steps)
    points = np.vstack([start, start + np.cumsum(deltas, 0)])
    soft = _stroke(points, size, int(rng.integers(1, 4)))
    fade = np.clip(0.75 + 0.35 * _smooth_noise(rng, size, 4), 0.5, 1.0)
    sign = 1.0 if rng.random() < 0.6 else -1.0
    amplitude = sign * (contrast * rng.uniform(1.5, 2.5) + rng.uniform(30, 55))
    return amplitude * soft * fade, soft > 0.3


def _crack(rng: np.random.Generator, size: int, contrast: float) -> tuple[Array, Array]:
    soft = np.zeros((size, size), np.float32)
    start = rng.uniform(0.15, 0.85, 2) * size
    heading = rng.uniform(0, 2 * math.pi)
    for branch in range(int(rng.integers(1, 4))):
        steps = int(rng.integers(12, 30)) if branch == 0 else int(rng.integers(5, 14))
        turns = heading + np.cumsum(rng.normal(0, 0.45, steps))
        lengths = rng.uniform(1.5, 3.5, steps) * size / 128
        points = start + np.cumsum(np.stack([np.cos(turns), np.sin(turns)], 1) * lengths[:, None], 0)
        points = np.vstack([start, points])
        soft = np.maximum(soft, _stroke(points, size, 1 if branch else int(rng.integers(1, 3))))
        start = points[int(rng.integers(1, len(points)))]
        heading = turns[-1] + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.2)
    amplitude = -(contrast * rng.uniform(1.0, 1.8) + rng.uniform(20, 45))
    return amplitude * soft, soft > 0.3


def _ellipse_distance(rng: np.random.Generator, size: int, radius: float) -> Array:
    yy, xx = _grid(size)
    cy, cx = rng.uniform(0.15, 0.85, 2) * size
    angle = rng.uniform(0, math.pi)
    a, b = radius * rng.uniform(0.7, 1.3), radius * rng.uniform(0.5, 1.0)
    c, s = math.cos(angle), math.sin(angle)
    du, dv = (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c
    return np.asarray(np.sqrt((du / a) ** 2 + (dv / b) ** 2))


def _spot(rng: np.random.Generator, size: int, contrast: float) -> tuple[Array, Array]:
    distance = _ellipse_distance(rng, size, rng.uniform(0.06, 0.14) * size)
    edge = 1.0 - distance + 0.35 * _smooth_noise(rng, size, max(2, size // 12))
    soft = np.clip(edge * rng.uniform(2.0, 5.0), 0.0, 1.0)
    sign = -1.0 if rng.random() < 0.7 else 1.0
    amplitude = sign * (contrast * rng.uniform(1.0, 1.8) + rng.uniform(20, 40))
    return amplitude * soft, soft > 0.5


def _dent(rng: np.random.Generator, size: int, contrast: float) -> tuple[Array, Array]:
    yy, xx = _grid(size)
    radius = rng.uniform(0.06, 0.14) * size
    cy, cx = rng.uniform(0.15, 0.85, 2) * size
    sigma = radius / 2
    height = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    light = rng.uniform(0, 2 * math.pi)
    # A dent is lit on one flank and shaded on the other: it barely moves the mean brightness.
    shading = ((xx - cx) * math.cos(light) + (yy - cy) * math.sin(light)) / sigma * height
    shading /= np.abs(shading).max() + 1e-6
    amplitude = contrast * rng.uniform(1.2, 2.2) + rng.uniform(25, 45)
    return (amplitude * shading).astype(np.float32), height > math.exp(-2.0)


def _missing_region(rng: np.random.Generator, size: int) -> Array:
    radius = rng.uniform(0.08, 0.18) * size
    if rng.random() < 0.5:  # a chipped edge: centred on the border
        along, side = rng.uniform(0.15, 0.85) * size, int(rng.integers(0, 4))
        centre = [(along, 0.0), (along, size - 1.0), (0.0, along), (size - 1.0, along)][side]
        radius *= 1.4
    else:
        centre = tuple(rng.uniform(0.2, 0.8, 2) * size)
    corners = int(rng.integers(5, 9))
    # Evenly spread corners (jittered), so the polygon surrounds its centre and half of it is in view.
    angles = (np.arange(corners) + rng.uniform(-0.35, 0.35, corners)) * (2 * math.pi / corners) + rng.uniform(0, 6.3)
    radii = radius * rng.uniform(0.6, 1.2, corners)
    points = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1)
    region = np.zeros((size, size), np.uint8)
    cv2.fillPoly(region, [np.round(points).astype(np.int32)], 255, cv2.LINE_AA)
    return region.astype(np.float32) / 255.0


_ADDITIVE_DEFECTS: dict[str, Callable[[np.random.Generator, int, float], tuple[Array, Array]]] = {
    "scratch": _scratch, "crack": _crack, "spot": _spot, "dent": _dent,
}


def render(rng: np.random.Generator, label: str, size: int = 128, surface: str | None = None) -> SynthImage:
    """Draw one image of the given class from rng (see module docstring).

    The part (surface, brightness, lighting, noise) and the defect come from separate streams
    spawned from rng, so one rng state renders the same part with or without each defect.
    """
    part_rng, defect_rng = rng.spawn(2)
    surface = surface or str(SURFACES[int(part_rng.integers(len(SURFACES)))])
    texture = _SURFACE_MAKERS[surface](part_rng, size)
    base = part_rng.uniform(60, 190)
    contrast = part_rng.uniform(6, 22)
    albedo = base + contrast * texture
    mask: Array | None = None
    if label in _ADDITIVE_DEFECTS:
        delta, region = _ADDITIVE_DEFECTS[label](defect_rng, size, contrast)
        albedo = albedo + delta
        mask = region
    elif label == "missing":
        soft = _missing_region(defect_rng, size)
        sign = 1.0 if (defect_rng.random() < 0.5 and base < 170) or base < 90 else -1.0
        fill = np.clip(base + sign * defect_rng.uniform(45, 100), 5, 250)
        hole = fill + 3.0 * _smooth_noise(defect_rng, size, 8)
        albedo = albedo * (1 - soft) + hole * soft
        mask = soft > 0.5
    elif label != GOOD_CLASS:
        raise ConfigError("classes", label, f"one of {', '.join(DEFAULT_CLASSES)}")
    yy, xx = _grid(size)
    direction = part_rng.uniform(0, 2 * math.pi)
    ramp = ((xx - size / 2) * math.cos(direction) + (yy - size / 2) * math.sin(direction)) / size
    lit = albedo * (1.0 + part_rng.uniform(0.0, 0.45) * ramp)
    tint = np.asarray(_TINTS[surface], np.float32) * part_rng.uniform(0.93, 1.07, 3).astype(np.float32)
    noise = part_rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(part_rng.uniform(1.5, 5.0))
    colour = lit[:, :, None] * tint + noise
    image = np.clip(colour + 0.5, 0, 255).astype(np.uint8)
    mask_u8 = None if mask is None else (mask.astype(np.uint8) * 255)
    return SynthImage(image, label, surface, mask_u8)
