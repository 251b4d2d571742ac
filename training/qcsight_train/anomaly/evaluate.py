"""Evaluating an anomaly bundle through the device's path: image and pixel figures, plots, overlays, report.md.

Every image goes read_image -> preprocess_batch -> OnnxRunner.infer (normalised scores and
maps) -> qcsight_core.anomaly (the map on the image's geometry, the box), the code the device
and batch scoring run. Pixel figures compare that heat with the masks at a working size
(longer side at most PIXEL_SIDE, masks resized nearest), as anomaly benchmarks score at about
the model's input size; a defect image without a mask is left out of them (and counted).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from qcsight_core import anomaly
from qcsight_core.bundle import Bundle
from qcsight_core.errors import ImageError, PreprocessError
from qcsight_core.imageio import read_image
from qcsight_core.preprocess import preprocess_batch
from qcsight_core.runner import OnnxRunner, RunnerOptions
from qcsight_core.verdict import Decider
from qcsight_data.dataset import DatasetIndex
from qcsight_train.anomaly.metrics import MAX_FPR, image_figures, pro_auc, roc_auc
from qcsight_train.errors import EvaluationError
from qcsight_train.evaluate import Unreadable, decode_batches
from qcsight_train.metrics import binary_curves, json_safe

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
ROC_PNG = "roc.png"
HISTOGRAM_PNG = "score_histogram.png"
GALLERY_PNG = "worst_overlays.png"
OVERLAYS_DIR = "overlays"
PIXEL_SIDE = 256
_PROGRESS_S = 30.0

MaskLookup = Callable[[str], Path | None]


@dataclass(frozen=True)
class LabelledImage:
    """One evaluation image: its path, its class, whether that class is a defect."""

    path: str
    label: str
    is_defect: bool


@dataclass
class _Collected:
    images: list[LabelledImage] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)
    boxes: list[anomaly.Box] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    heats: list[np.ndarray] = field(default_factory=list)
    missing_masks: int = 0
    unreadable: list[Unreadable] = field(default_factory=list)


def _working_size(shape: Sequence[int]) -> tuple[int, int]:
    h, w = int(shape[0]), int(shape[1])
    scale = min(1.0, PIXEL_SIDE / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _mask(path: Path | None, size: tuple[int, int]) -> np.ndarray | None:
    if path is None:
        return None
    try:
        raw = read_image(str(path))
    except ImageError as exc:
        log.warning("mask %s unreadable: %s", path, exc.reason)
        return None
    grey = raw if raw.ndim == 2 else cv2.cvtColor(raw, cv2.COLOR_BGR2GRAY)
    return np.asarray(cv2.resize(grey, (size[1], size[0]), interpolation=cv2.INTER_NEAREST) > 127)


def _collect(bundle: Bundle, images: Sequence[LabelledImage], masks: MaskLookup, precision: str,
             batch_size: int) -> _Collected:
    runner = OnnxRunner(bundle, RunnerOptions(precision=precision, warmup_runs=0))
    spec = bundle.manifest.input
    by_path = {item.path: item for item in images}
    out = _Collected()
    pairs = [(item.path, item.label) for item in images]
    last_report = time.monotonic()
    for batch, decoded in decode_batches(pairs, batch_size, out.unreadable):
        if time.monotonic() - last_report >= _PROGRESS_S:
            log.info("evaluation: %d/%d images scored", len(out.images) + len(out.unreadable), len(pairs))
            last_report = time.monotonic()
        try:
            outputs = runner.infer(preprocess_batch(decoded, spec))
        except PreprocessError as exc:
            out.unreadable.extend(Unreadable(p, label, str(exc)) for p, label in batch)
            continue
        if outputs.maps is None:
            raise EvaluationError(f"{bundle.path}: not an anomaly bundle (its model returns no score map)")
        for (path, _), image, score, score_map in zip(batch, decoded, outputs.scores[:, 0], outputs.maps,
                                                      strict=True):
            item = by_path[path]
            size = _working_size(image.shape)
            mask = _mask(masks(path), size) if item.is_defect else np.zeros(size, dtype=bool)
            out.images.append(item)
            out.scores.append(float(score))
            out.maps.append(score_map)
            out.boxes.append(anomaly.image_box(score_map, spec, image.shape))
            if mask is None:
                out.missing_masks += 1
                continue
            out.masks.append(mask)
            out.heats.append(anomaly.image_heatmap(score_map, spec, image.shape, size))
    return out


def evaluate_anomaly_bundle(bundle: Bundle, images: Sequence[LabelledImage], output_dir: Path, *,
                            masks: MaskLookup = lambda path: None, precision: str = "fp32", batch_size: int = 8,
                            gallery: int = 12) -> dict[str, Any]:
    """Score an anomaly bundle on labelled images; write metrics.json, plots, overlays and report.md.

    Args:
        bundle: a verified anomaly bundle.
        images: the evaluation images (good and defect).
        output_dir: created if missing; files there are overwritten.
        masks: image path -> its defect mask file (None when it has none).
        precision: fp32 or int8.
        batch_size: images per inference call.
        gallery: how many worst images get an overlay (half false alarms, half misses).

    Raises:
        EvaluationError: no images, none readable, or not an anomaly bundle.
    """
    if not images:
        raise EvaluationError("no images to evaluate")
    manifest = bundle.manifest
    collected = _collect(bundle, images, masks, precision, batch_size)
    if not collected.images:
        raise EvaluationError(f"none of the {len(images)} images could be read")
    is_defect = np.array([item.is_defect for item in collected.images])
    scores = np.array(collected.scores)
    decider = Decider(manifest)
    verdicts = decider.decide_batch(scores[:, None])
    figures = image_figures(is_defect, scores, manifest.decision.defect_threshold)
    pixel: dict[str, Any] = {"images": len(collected.masks), "defect_images_without_mask": collected.missing_masks,
                             "pixel_auroc": None, "pro": None, "max_fpr": MAX_FPR, "working_side": PIXEL_SIDE}
    has_regions = any(m.any() for m in collected.masks)
    if has_regions:
        flat_masks = np.concatenate([m.ravel() for m in collected.masks])
        pixel["pixel_auroc"] = roc_auc(flat_masks, np.concatenate([h.ravel() for h in collected.heats]))
        pixel["pro"] = pro_auc(collected.masks, collected.heats)
    binary = binary_curves(is_defect, scores)
    per_class: dict[str, dict[str, Any]] = {}
    for label in sorted({item.label for item in collected.images}):
        rows = np.array([item.label == label for item in collected.images])
        flagged = scores[rows] >= manifest.decision.defect_threshold
        per_class[label] = {"images": int(rows.sum()), "flagged": int(flagged.sum()),
                            "mean_score": float(scores[rows].mean())}
    output_dir.mkdir(parents=True, exist_ok=True)
    worst = _worst(collected, is_defect, scores, gallery)
    plots = _plots(output_dir, binary, figures, scores, is_defect, collected, worst, bundle)
    metrics = json_safe({
        "bundle": {"name": manifest.name, "version": manifest.version, "path": str(bundle.path),
                   "precision": precision},
        "images": len(collected.images),
        "image": {"auroc": roc_auc(is_defect, scores), "pr_auc": binary["pr_auc"],
                  "defect_images": int(is_defect.sum()), "good_images": int((~is_defect).sum())},
        "at_threshold": {**figures, "uncertain_threshold": manifest.decision.uncertain_threshold,
                         "verdicts": dict(Counter(v.status for v in verdicts))},
        "pixel": pixel,
        "per_class": per_class,
        "worst": [{"path": collected.images[i].path, "label": collected.images[i].label, "score": float(scores[i]),
                   "box": collected.boxes[i].to_dict()} for i in worst],
        "unreadable": [u.to_dict() for u in collected.unreadable],
        "plots": plots,
    })
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (output_dir / REPORT_FILE).write_text(render_report(metrics, manifest.extra.get("anomaly", {})), encoding="utf-8")
    log.info("evaluated %s %s on %d images: image AUROC %s, pixel AUROC %s, PRO %s; wrote %s", manifest.name,
             manifest.version, len(collected.images), _fmt(metrics["image"]["auroc"]), _fmt(pixel["pixel_auroc"]),
             _fmt(pixel["pro"]), output_dir)
    return dict(metrics)


def _worst(collected: _Collected, is_defect: np.ndarray, scores: np.ndarray, count: int) -> list[int]:
    """The highest-scoring good images (false alarms first) and the lowest-scoring defects (misses first)."""
    good = [int(i) for i in np.flatnonzero(~is_defect)[np.argsort(-scores[~is_defect])]]
    bad = [int(i) for i in np.flatnonzero(is_defect)[np.argsort(scores[is_defect])]]
    half = count // 2
    chosen = good[:half] + bad[: count - min(half, len(good))]
    return chosen[:count]


def _plots(output_dir: Path, binary: Mapping[str, Any], figures: Mapping[str, Any], scores: np.ndarray,
           is_defect: np.ndarray, collected: _Collected, worst: Sequence[int], bundle: Bundle) -> list[str]:
    from qcsight_train import plots

    operating = {"threshold": figures["threshold"], "defect_recall": figures["defect_recall"],
                 "false_reject_rate": figures["false_reject_rate"]}
    written = [plots.plot_roc(output_dir / ROC_PNG, binary, operating).name,
               plot_histogram(output_dir / HISTOGRAM_PNG, scores, is_defect, figures["threshold"]).name]
    overlays = output_dir / OVERLAYS_DIR
    overlays.mkdir(exist_ok=True)
    tiles: list[tuple[np.ndarray, str]] = []
    for rank, index in enumerate(worst):
        item = collected.images[index]
        try:
            image = read_image(item.path)
        except ImageError:
            continue
        picture = anomaly.overlay(image, collected.maps[index], bundle.manifest.input, collected.boxes[index],
                                  max_side=320)
        name = f"{rank:02d}_{item.label}_{Path(item.path).stem}.png"
        cv2.imwrite(str(overlays / name), picture)
        tiles.append((picture, f"{item.label} {scores[index]:.2f}"))
    if tiles:
        written.append(plot_gallery(output_dir / GALLERY_PNG, tiles).name)
    return written


def plot_histogram(path: Path, scores: np.ndarray, is_defect: np.ndarray, threshold: float) -> Path:
    """Normalised score histograms of good and defect images, with the threshold."""
    from qcsight_train.plots import _figure, _save

    figure = _figure(6, 4)
    axes = figure.add_subplot()
    top = max(2.0, float(np.quantile(scores, 0.99)) * 1.05) if scores.size else 2.0
    bins = np.linspace(0.0, top, 41).tolist()
    clipped = np.minimum(scores, top)
    axes.hist(clipped[~is_defect], bins=bins, alpha=0.6, label=f"good ({int((~is_defect).sum())})", color="tab:blue")
    if is_defect.any():
        axes.hist(clipped[is_defect], bins=bins, alpha=0.6, label=f"defect ({int(is_defect.sum())})", color="tab:red")
    axes.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}")
    axes.set_xlabel("normalised anomaly score (1.0 = threshold)")
    axes.set_ylabel("images")
    axes.set_title("Anomaly scores: good vs defect")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return _save(figure, path)


def plot_gallery(path: Path, tiles: Sequence[tuple[np.ndarray, str]], columns: int = 4) -> Path:
    """A grid of BGR overlays with captions."""
    from qcsight_train.plots import _figure, _save

    rows = -(-len(tiles) // columns)
    figure = _figure(3.0 * columns, 3.0 * rows)
    for i, (picture, caption) in enumerate(tiles):
        axes = figure.add_subplot(rows, columns, i + 1)
        axes.imshow(cv2.cvtColor(picture, cv2.COLOR_BGR2RGB))
        axes.set_title(caption, fontsize="small")
        axes.axis("off")
    figure.suptitle("Worst: highest-scoring good parts, lowest-scoring defects (score 1.0 = threshold)")
    figure.tight_layout()
    return _save(figure, path)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_report(metrics: Mapping[str, Any], method: Mapping[str, Any]) -> str:
    """The Markdown report: image and pixel figures, the figures at the threshold, per class, the worst images."""
    image, pixel, at = metrics["image"], metrics["pixel"], metrics["at_threshold"]
    bundle = metrics["bundle"]
    bank = method.get("bank", {})
    lines = [
        f"# Anomaly evaluation of {bundle['name']} {bundle['version']} ({bundle['precision']})",
        "",
        f"{metrics['images']} images ({image['good_images']} good, {image['defect_images']} defect) scored through "
        "qcsight_core (read_image → preprocess_batch → OnnxRunner.infer → qcsight_core.anomaly); "
        f"{len(metrics['unreadable'])} unreadable. Scores are normalised: 1.0 is the bundle's threshold.",
        "",
        f"Method: {method.get('method', 'memory bank')}, backbone {method.get('backbone', '?')}, bank "
        f"{bank.get('size', '?')} patches x {bank.get('dim', '?')} dims ({bank.get('dtype', '?')}).",
        "",
        "| figure | value |",
        "|---|---|",
        f"| image AUROC | {_fmt(image['auroc'])} |",
        f"| image average precision | {_fmt(image['pr_auc'])} |",
        f"| pixel AUROC | {_fmt(pixel['pixel_auroc'])} |",
        f"| PRO (FPR ≤ {pixel['max_fpr']}, normalised) | {_fmt(pixel['pro'])} |",
        f"| defect recall at 1.0 | {_fmt(at['defect_recall'])} |",
        f"| precision at 1.0 | {_fmt(at['precision'])} |",
        f"| F1 at 1.0 | {_fmt(at['f1'])} |",
        f"| false-reject rate at 1.0 (good parts flagged) | {_fmt(at['false_reject_rate'])} |",
        f"| uncertain band | [{_fmt(at['uncertain_threshold'], 3)}, 1.0) |",
        "",
        f"Pixel figures on {pixel['images']} images at a longer side of at most {pixel['working_side']} px; "
        f"{pixel['defect_images_without_mask']} defect image(s) had no mask.",
        "",
        "## Per class",
        "",
        "| class | images | flagged at 1.0 | mean score |",
        "|---|---|---|---|",
        *(f"| {name} | {row['images']} | {row['flagged']} | {row['mean_score']:.3f} |"
          for name, row in metrics["per_class"].items()),
        "",
        "## Worst images",
        "",
        f"![score histogram]({HISTOGRAM_PNG}) ![ROC]({ROC_PNG})",
        "",
        f"![worst overlays]({GALLERY_PNG})",
        "",
        "| image | class | score | box (x0, y0, x1, y1) |",
        "|---|---|---|---|",
        *(f"| {Path(row['path']).name} | {row['label']} | {row['score']:.3f} | "
          f"{row['box']['x0']:.2f}, {row['box']['y0']:.2f}, {row['box']['x1']:.2f}, {row['box']['y1']:.2f} |"
          for row in metrics["worst"]),
        "",
    ]
    return "\n".join(lines)


def evaluate_dataset(bundle: Bundle, index: DatasetIndex, output_dir: Path, *, precision: str = "fp32",
                     batch_size: int = 8) -> int:
    """`qcsight evaluate` on an anomaly bundle: classes named like good are good, the rest defects; masks
    from DATA/masks/<class>/. Prints the figures; returns the exit code."""
    from qcsight_train.anomaly.data import mask_path
    from qcsight_train.config import GOOD_NAMES

    good = {c for c in index.classes if c.lower() in GOOD_NAMES}
    if not good:
        raise EvaluationError(f"{index.source}: no class named like good ({', '.join(GOOD_NAMES)}) among "
                              f"{list(index.classes)}: an anomaly bundle is evaluated against good parts")
    by_path = {s.path: s for s in index.samples}
    root = Path(index.root)
    metrics = evaluate_anomaly_bundle(
        bundle, [LabelledImage(s.path, s.label, s.label not in good) for s in index.samples], output_dir,
        masks=lambda path: mask_path(by_path[path], root), precision=precision, batch_size=batch_size)
    image, pixel, at = metrics["image"], metrics["pixel"], metrics["at_threshold"]
    print(f"{metrics['images']} images ({len(metrics['unreadable'])} unreadable): image AUROC {_fmt(image['auroc'])}, "
          f"pixel AUROC {_fmt(pixel['pixel_auroc'])}, PRO {_fmt(pixel['pro'])}")
    print(f"at the threshold (1.0): defect recall {_fmt(at['defect_recall'])}, F1 {_fmt(at['f1'])}, "
          f"false-reject rate {_fmt(at['false_reject_rate'])}")
    print(f"wrote {output_dir / METRICS_FILE}, {', '.join(metrics['plots'])} and {output_dir / REPORT_FILE}")
    return 0
