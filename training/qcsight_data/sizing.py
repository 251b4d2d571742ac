"""The model input size from the data: image aspect ratios, defect sizes after the resize, a recommended size.

`qcsight data stats` prints what `measure` finds and `recommend` proposes; `qcsight train
--img-size auto` uses the same two functions, so the figure a user reads is the size trained.

The rule (`recommend`), with its reasons recorded beside the result:

1. Shape: the median width/height of the images. Within 1.25 of square the input is square;
   otherwise it keeps that ratio (capped at 4:1), each side a multiple of 32.
2. Scale without masks: the shorter model side is 224 (the resolution ImageNet backbones are
   pretrained at), but never more than the images' median shorter side (upsampling adds cost,
   not detail), and at least 96.
3. With masks (``masks/<class>/<stem>.png``, as the magnetic-tile set and `qcsight data synth`
   ship): the defect of each masked image is its largest connected region, and its size is
   the shorter side of its bounding box in model pixels after the resize. The shorter side
   grows from rule 2's value (up to 512, past the images' own median size if need be) until the
   10th-percentile defect is at least MIN_DEFECT_PX pixels across: after the stem and the first
   stage (stride 4) such a defect is still about two feature pixels wide; narrower, it is one
   or less, which is where small dark defects vanish. The figure was 4 until 3-fold
   cross-validation inside the magnetic-tile training images (issue 17, training/README.md)
   found the input it gives there (288 instead of 224) 0.031 macro-F1 better, every fold. Rule 2's
   cap at the median image size does not hold here: upsampling adds no detail, but it widens a
   thin defect in feature pixels, and 288 is above those images' median shorter side (269).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from qcsight_core.errors import ImageError
from qcsight_core.imageio import read_image
from qcsight_core.preprocess import PreprocessSpec, scale_factors

MASKS_DIR = "masks"
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".jpg")
MIN_DEFECT_PX = 7.0
SQUARE_WITHIN = 1.25
MAX_ASPECT = 4.0
BASE_SIDE = 224
MIN_SIDE = 96
MAX_SIDE = 512
STEP = 32
DEFAULT_LIMIT = 2000
_PERCENTILES = (0, 5, 10, 25, 50, 75, 90, 95, 100)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ImageSizes:
    """What `measure` read: every sampled image's shape and, where a mask exists, its defect's bounding box.

    Attributes:
        shapes: (height, width) of each image read.
        defects: (image height, image width, box height, box width) per masked defect image.
        unreadable: images or masks that could not be decoded.
        sampled_from: how many images the sample was drawn from.
    """

    shapes: tuple[tuple[int, int], ...]
    defects: tuple[tuple[int, int, int, int], ...] = ()
    unreadable: int = 0
    sampled_from: int = 0

    def aspect_ratios(self) -> np.ndarray:
        return np.array([w / h for h, w in self.shapes], dtype=np.float64)


@dataclass(frozen=True)
class Recommendation:
    """An input size and why.

    Attributes:
        height, width: the recommended model input.
        resize: the resize rule it assumes ("stretch" for a square input or shapes that agree,
            "letterbox" when the images' aspect ratios spread widely around a non-square median).
        reasons: one line per rule applied, with the figures that decided it.
        defect_px: percentiles of the defects' shorter side in model pixels at this size (empty without masks).
    """

    height: int
    width: int
    resize: str
    reasons: tuple[str, ...]
    defect_px: dict[str, float] = field(default_factory=dict)

    @property
    def size_text(self) -> str:
        return f"{self.height}x{self.width}"


def mask_path(image_path: str, label: str, root: str | Path) -> Path | None:
    """The mask of an image under root/masks/<class>/<stem>.<png|...>, if there is one."""
    folder = Path(root) / MASKS_DIR / label
    stem = Path(image_path).stem
    for suffix in MASK_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def largest_region_box(mask: np.ndarray) -> tuple[int, int] | None:
    """Height and width of the bounding box of the mask's largest connected region (None when empty)."""
    binary = (mask > 0).astype(np.uint8)
    if binary.ndim == 3:
        binary = binary.max(axis=2)
    count, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count <= 1:
        return None
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return int(stats[biggest, cv2.CC_STAT_HEIGHT]), int(stats[biggest, cv2.CC_STAT_WIDTH])


def measure(samples: Sequence[tuple[str, str]], root: str | Path | None, *, limit: int = DEFAULT_LIMIT,
            seed: int = 0, progress: Progress | None = None) -> ImageSizes:
    """Read up to limit (path, label) images (an even random sample beyond that) and their masks under root.

    Decoding is the cost: about 1 ms per 300x300 JPEG, so the default limit keeps this to seconds.
    """
    chosen = list(samples)
    if len(chosen) > limit:
        picks = np.random.default_rng(seed).choice(len(chosen), size=limit, replace=False)
        chosen = [chosen[i] for i in sorted(picks.tolist())]
    shapes: list[tuple[int, int]] = []
    defects: list[tuple[int, int, int, int]] = []
    unreadable = 0
    for done, (path, label) in enumerate(chosen, start=1):
        try:
            image = read_image(path)
        except ImageError:
            unreadable += 1
            continue
        h, w = image.shape[:2]
        shapes.append((h, w))
        found = mask_path(path, label, root) if root is not None else None
        if found is not None:
            mask = cv2.imread(os.fspath(found), cv2.IMREAD_GRAYSCALE)
            if mask is None:
                unreadable += 1
            else:
                box = largest_region_box(mask)
                if box is not None:
                    # A mask saved at another size than its image still scales to it.
                    sy, sx = h / mask.shape[0], w / mask.shape[1]
                    defects.append((h, w, max(1, round(box[0] * sy)), max(1, round(box[1] * sx))))
        if progress is not None:
            progress(done, len(chosen))
    return ImageSizes(tuple(shapes), tuple(defects), unreadable, len(samples))


def defect_sides(sizes: ImageSizes, spec: PreprocessSpec) -> np.ndarray:
    """Each masked defect's shorter bounding-box side in model pixels under spec's resize rule."""
    sides = []
    for h, w, box_h, box_w in sizes.defects:
        sy, sx = scale_factors(h, w, spec)
        sides.append(min(box_h * sy, box_w * sx))
    return np.array(sides, dtype=np.float64)


def percentiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    return {f"p{p}": float(np.percentile(values, p)) for p in _PERCENTILES}


def _round_step(value: float) -> int:
    return max(STEP, round(value / STEP) * STEP)


def _shape_for(short: int, ratio: float) -> tuple[int, int]:
    """(height, width) with the shorter side `short` and width/height close to ratio, sides multiples of 32."""
    if ratio >= 1.0:
        return short, min(_round_step(short * ratio), 1024)
    return min(_round_step(short / ratio), 1024), short


def recommend(sizes: ImageSizes, base: PreprocessSpec | None = None) -> Recommendation:
    """The input size the module docstring's rule gives for these images (and masks).

    Args:
        sizes: what measure() read.
        base: colour, interpolation and mean/std to assume (only the geometry is chosen here).

    Raises:
        ImageError: no image could be read.
    """
    if not sizes.shapes:
        raise ImageError("(dataset)", "no readable image to measure")
    ratios = sizes.aspect_ratios()
    median_ratio = float(np.median(ratios))
    reasons = []
    if 1 / SQUARE_WITHIN <= median_ratio <= SQUARE_WITHIN:
        ratio = 1.0
        reasons.append(f"median aspect ratio (width/height) {median_ratio:.2f} is within {SQUARE_WITHIN} of square: "
                       "a square input")
    else:
        ratio = min(max(median_ratio, 1 / MAX_ASPECT), MAX_ASPECT)
        reasons.append(f"median aspect ratio {median_ratio:.2f}: the input keeps it (sides multiples of {STEP})")
    spread = float(np.percentile(ratios, 90) / np.percentile(ratios, 10))
    resize = "stretch"
    if ratio != 1.0 and spread > SQUARE_WITHIN:
        resize = "letterbox"
        reasons.append(f"aspect ratios spread {spread:.2f}x (10th to 90th percentile) around a non-square median: "
                       "letterbox keeps each image's shape")
    native_short = float(np.median([min(h, w) for h, w in sizes.shapes]))
    ceiling = max(MIN_SIDE, min(MAX_SIDE, (int(native_short) // STEP) * STEP))
    short = max(MIN_SIDE, min(BASE_SIDE, ceiling))
    reasons.append(f"shorter side {short}: {BASE_SIDE} (ImageNet pretraining scale), at most the images' median "
                   f"shorter side {native_short:.0f} rounded down to {STEP}, at least {MIN_SIDE}")
    spec = _spec(base, *_shape_for(short, ratio), resize)
    sides = defect_sides(sizes, spec)
    if sides.size:
        while float(np.percentile(sides, 10)) < MIN_DEFECT_PX and short + STEP <= MAX_SIDE:
            short += STEP
            spec = _spec(base, *_shape_for(short, ratio), resize)
            sides = defect_sides(sizes, spec)
        p10 = float(np.percentile(sides, 10))
        verdict = "reached" if p10 >= MIN_DEFECT_PX else f"not reached below the ceiling {MAX_SIDE}"
        reasons.append(f"{sides.size} masked defects: 10th-percentile shorter side {p10:.1f} px at shorter side "
                       f"{short} (aim >= {MIN_DEFECT_PX:g} px: {verdict})")
    else:
        reasons.append("no masks found (masks/<class>/<stem>.png): defect sizes not checked")
    return Recommendation(spec.height, spec.width, resize, tuple(reasons), percentiles(sides))


def _spec(base: PreprocessSpec | None, height: int, width: int, resize: str) -> PreprocessSpec:
    template = base or PreprocessSpec()
    return PreprocessSpec(height=height, width=width, color=template.color, resize=resize,
                          interpolation=template.interpolation, mean=template.mean, std=template.std,
                          pad_value=template.pad_value)


def report(sizes: ImageSizes, recommendation: Recommendation) -> list[str]:
    """Lines for `qcsight data stats`: aspect ratios, image sizes, defect sizes after the resize, the size proposed."""
    ratios = sizes.aspect_ratios()
    heights = np.array([h for h, _ in sizes.shapes], dtype=np.float64)
    widths = np.array([w for _, w in sizes.shapes], dtype=np.float64)
    lines = [f"image sizes ({len(sizes.shapes)} read of {sizes.sampled_from}, {sizes.unreadable} unreadable):",
             "  " + _row("aspect w/h", percentiles(ratios), 2),
             "  " + _row("height px", percentiles(heights), 0),
             "  " + _row("width px", percentiles(widths), 0)]
    if recommendation.defect_px:
        lines.append(f"defects ({len(sizes.defects)} masks): shorter side of the largest region, in model pixels at "
                     f"{recommendation.size_text} ({recommendation.resize}):")
        lines.append("  " + _row("defect px", recommendation.defect_px, 1))
    lines.append(f"recommended input: --img-size {recommendation.size_text} --resize {recommendation.resize}")
    lines.extend(f"  - {reason}" for reason in recommendation.reasons)
    return lines


def _row(name: str, values: dict[str, float], digits: int) -> str:
    shown = ", ".join(f"{k} {v:.{digits}f}" for k, v in values.items() if k in ("p0", "p10", "p50", "p90", "p100"))
    return f"{name:<11} {shown}"


def to_dict(sizes: ImageSizes, recommendation: Recommendation) -> dict[str, Any]:
    """JSON-ready figures (the training summary and manifest keep them)."""
    return {"images": len(sizes.shapes), "sampled_from": sizes.sampled_from, "masked_defects": len(sizes.defects),
            "aspect_ratio": percentiles(sizes.aspect_ratios()), "height": recommendation.height,
            "width": recommendation.width, "resize": recommendation.resize, "defect_px": recommendation.defect_px,
            "reasons": list(recommendation.reasons), "rule_min_defect_px": MIN_DEFECT_PX,
            "median_shorter_side": float(np.median([min(h, w) for h, w in sizes.shapes])) if sizes.shapes else None}
