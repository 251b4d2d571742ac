"""Evaluating a bundle on labelled images through the device's own path, with metrics, plots and a report.

Every image goes imageio.read_image -> preprocess.preprocess_batch -> runner.OnnxRunner ->
verdict.Decider, the code the device and batch scoring run, so the numbers here are what the
device will do. Export uses the same scoring loop for its validation pass.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qcsight_core.bundle import Bundle, Manifest
from qcsight_core.drift import input_statistics
from qcsight_core.errors import ImageError, PreprocessError
from qcsight_core.imageio import read_image
from qcsight_core.preprocess import PreprocessSpec, prepare_pixels, preprocess_batch
from qcsight_core.runner import OnnxRunner, RunnerOptions
from qcsight_core.verdict import STATUSES, Decider
from qcsight_train.errors import EvaluationError
from qcsight_train.metrics import (
    binary_curves,
    classification_metrics,
    json_safe,
    rates_at_threshold,
    threshold_for_recall,
)

if TYPE_CHECKING:
    from qcsight_data.dataset import Sample

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
DEFAULT_BATCH = 32
_PROGRESS_EVERY = 20  # batches between progress lines


@dataclass(frozen=True)
class Unreadable:
    """An image that could not be decoded or preprocessed; reported, never fatal."""

    path: str
    label: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "label": self.label, "reason": self.reason}


@dataclass(frozen=True)
class ScoredImages:
    """Model outputs for the readable images of a labelled set.

    Attributes:
        paths: image paths, in input order (unreadable ones left out).
        labels: their true labels.
        probabilities: runner name -> NxK class probabilities (same row order as paths).
        brightness: mean grey level 0..255 of each image, measured as the device measures it
            (qcsight_core.drift.input_statistics on prepare_pixels output).
        unreadable: the images left out, with the reason.
    """

    paths: tuple[str, ...]
    labels: tuple[str, ...]
    probabilities: Mapping[str, np.ndarray]
    brightness: np.ndarray
    unreadable: tuple[Unreadable, ...]


BatchHook = Callable[[Sequence[str], Sequence[np.ndarray]], None]


def labelled_pairs(samples: Sequence[Sample] | Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """(path, label) pairs from dataset Samples or from (path, label) tuples."""
    pairs: list[tuple[str, str]] = []
    for item in samples:
        if isinstance(item, tuple | list):
            path, label = item[0], item[1]
        else:
            path, label = item.path, item.label
        pairs.append((str(path), str(label)))
    return pairs


def decode_batches(pairs: Sequence[tuple[str, str]], batch_size: int,
                   unreadable: list[Unreadable]) -> Iterator[tuple[list[tuple[str, str]], list[np.ndarray]]]:
    """Decoded images in batches; undecodable files are appended to unreadable and skipped."""
    batch: list[tuple[str, str]] = []
    images: list[np.ndarray] = []
    for path, label in pairs:
        try:
            images.append(read_image(path))
        except ImageError as exc:
            log.warning("unreadable image %s: %s", path, exc.reason)
            unreadable.append(Unreadable(path, label, exc.reason))
            continue
        batch.append((path, label))
        if len(batch) == batch_size:
            yield batch, images
            batch, images = [], []
    if batch:
        yield batch, images


def score_images(pairs: Sequence[tuple[str, str]], spec: PreprocessSpec, runners: Mapping[str, OnnxRunner], *,
                 batch_size: int = DEFAULT_BATCH, on_batch: BatchHook | None = None) -> ScoredImages:
    """Run every runner over the images through qcsight_core preprocessing.

    Args:
        pairs: (path, label) for each image.
        spec: the bundle's preprocessing.
        runners: name -> runner; each gets the same preprocessed batches.
        batch_size: images per inference call.
        on_batch: called with each batch's paths and decoded images (export's PyTorch parity
            pass reads the same decoded images through the training-time preprocessing).
    """
    unreadable: list[Unreadable] = []
    paths: list[str] = []
    labels: list[str] = []
    brightness: list[float] = []
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in runners}
    total_batches = -(-len(pairs) // batch_size)
    for number, (batch, images) in enumerate(decode_batches(pairs, batch_size, unreadable), start=1):
        kept, kept_images, stats = [], [], []
        for (path, label), image in zip(batch, images, strict=True):
            try:
                pixels = prepare_pixels(image, spec)
            except PreprocessError as exc:
                unreadable.append(Unreadable(path, label, str(exc)))
                continue
            kept.append((path, label))
            kept_images.append(image)
            stats.append(input_statistics(pixels, spec.color).brightness)
        if not kept:
            continue
        tensor = preprocess_batch(kept_images, spec)
        for name, runner in runners.items():
            outputs[name].append(runner.run(tensor))
        if on_batch is not None:
            on_batch([p for p, _ in kept], kept_images)
        paths.extend(p for p, _ in kept)
        labels.extend(label for _, label in kept)
        brightness.extend(stats)
        if number % _PROGRESS_EVERY == 0:
            log.info("scored %d/%d images", len(paths) + len(unreadable), len(pairs))
    probabilities = {name: (np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32))
                     for name, chunks in outputs.items()}
    if total_batches >= _PROGRESS_EVERY:
        log.info("scored %d images, %d unreadable", len(paths), len(unreadable))
    return ScoredImages(tuple(paths), tuple(labels), probabilities, np.asarray(brightness, dtype=np.float64),
                        tuple(unreadable))


def check_labels(pairs: Sequence[tuple[str, str]], classes: Sequence[str], what: str) -> None:
    """Refuse labels the model does not know, naming them."""
    unknown = sorted({label for _, label in pairs} - set(classes))
    if unknown:
        raise EvaluationError(f"{what}: labels {unknown} are not among the bundle's classes {list(classes)}")


def summarise(manifest: Manifest, labels: Sequence[str], probs: np.ndarray,
              target_defect_recall: float) -> dict[str, Any]:
    """Metrics of a bundle's outputs on labelled images.

    "classification" scores the classifier's top-1 class (argmax), whatever the decision
    policy; "named" scores the class the device names in its verdict (verdict.Decider under the
    manifest's policy: an uncertain verdict names the top defect class). The binary metrics
    score the defect score, at the bundle's thresholds and at the threshold that reaches
    target_defect_recall on these images.
    """
    decider = Decider(manifest)
    verdicts = decider.decide_batch(probs)
    classes = manifest.classes
    true_idx = np.array([classes.index(label) for label in labels], dtype=np.int64)
    named = np.array([classes.index(v.label) for v in verdicts], dtype=np.int64)
    is_defect = np.isin(true_idx, [classes.index(c) for c in manifest.defect_classes])
    scores = decider.defect_scores(probs)
    statuses = Counter(v.status for v in verdicts)
    summary: dict[str, Any] = {
        "images": len(labels),
        "classification": classification_metrics(true_idx, np.asarray(probs).argmax(axis=1), classes),
        "named": classification_metrics(true_idx, named, classes),
        "verdicts": {status: int(statuses.get(status, 0)) for status in STATUSES},
        "binary": binary_curves(is_defect, scores),
        "at_bundle_threshold": {
            **rates_at_threshold(is_defect, scores, manifest.decision.defect_threshold),
            "uncertain_threshold": manifest.decision.uncertain_threshold,
            "uncertain_rate": float(statuses.get("uncertain", 0) / len(labels)),
            **_uncertain_rates(is_defect, scores, manifest),
        },
    }
    operating: dict[str, Any] = {"target_defect_recall": target_defect_recall}
    if is_defect.any():
        threshold, frr = threshold_for_recall(is_defect, scores, target_defect_recall)
        operating.update(rates_at_threshold(is_defect, scores, threshold))
        operating["false_reject_rate"] = None if np.isnan(frr) else frr
    else:
        operating.update(threshold=None, defect_recall=None, false_reject_rate=None,
                         note="no defect images: no threshold can be chosen for a defect recall")
    summary["operating_point"] = operating
    return summary


def _uncertain_rates(is_defect: np.ndarray, scores: np.ndarray, manifest: Manifest) -> dict[str, float | None]:
    """How the uncertain band splits: good parts sent to review, defects that reach only the band."""
    policy = manifest.decision
    in_band = (scores >= policy.uncertain_threshold) & (scores < policy.defect_threshold)
    good, defect = ~is_defect, is_defect
    return {"good_to_review_rate": float(in_band[good].mean()) if good.any() else None,
            "defect_to_review_rate": float(in_band[defect].mean()) if defect.any() else None}


def _worst(scored: ScoredImages, probs: np.ndarray, manifest: Manifest, limit: int) -> list[dict[str, Any]]:
    """Misclassified images (top-1 class wrong), the most confidently wrong first (lowest p(true class))."""
    verdicts = Decider(manifest).decide_batch(probs)
    top1 = np.asarray(probs).argmax(axis=1)
    rows: list[dict[str, Any]] = []
    for i, (path, label, verdict) in enumerate(zip(scored.paths, scored.labels, verdicts, strict=True)):
        predicted = manifest.classes[int(top1[i])]
        if predicted != label:
            rows.append({"path": path, "label": label, "predicted": predicted, "status": verdict.status,
                         "p_true": float(probs[i, manifest.classes.index(label)]),
                         "confidence": verdict.confidence, "defect_score": verdict.score})
    rows.sort(key=lambda row: row["p_true"])
    return rows[:limit]


def evaluate_bundle(bundle: Bundle, samples: Sequence[Sample] | Sequence[tuple[str, str]], output_dir: Path, *,
                    target_defect_recall: float = 0.99, precision: str = "fp32", batch_size: int = DEFAULT_BATCH,
                    worst: int = 20, skipped: Sequence[Unreadable] = ()) -> dict[str, Any]:
    """Score a bundle on labelled images and write metrics.json, three PNG plots and report.md.

    Args:
        bundle: a loaded (verified) bundle.
        samples: dataset Samples or (path, label) pairs.
        output_dir: created if missing; files there are overwritten.
        target_defect_recall: the recall for which the operating threshold is reported.
        precision: "fp32" or "int8" (the bundle must carry that model).
        batch_size: images per inference call.
        worst: how many misclassified images report.md lists.
        skipped: entries the dataset loader already left out, reported with the unreadable ones.

    Returns:
        The metrics written to metrics.json.

    Raises:
        EvaluationError: no samples, no readable image, or labels the bundle does not know.
    """
    manifest = bundle.manifest
    pairs = labelled_pairs(samples)
    if not pairs:
        raise EvaluationError("no labelled images to evaluate")
    check_labels(pairs, manifest.classes, "evaluation set")
    runner = OnnxRunner(bundle, RunnerOptions(precision=precision, warmup_runs=0))
    scored = score_images(pairs, manifest.input, {precision: runner}, batch_size=batch_size)
    unreadable = [*skipped, *scored.unreadable]
    if not scored.paths:
        raise EvaluationError(f"none of the {len(pairs)} images could be read (first: {unreadable[0].reason})")
    probs = scored.probabilities[precision]
    summary = summarise(manifest, scored.labels, probs, target_defect_recall)
    output_dir.mkdir(parents=True, exist_ok=True)
    plots = _write_plots(output_dir, summary, manifest)
    metrics = {
        "bundle": {"name": manifest.name, "version": manifest.version, "path": str(bundle.path),
                   "precision": runner.precision, "model_file": runner.model_path.name},
        **summary,
        "unreadable": [u.to_dict() for u in unreadable],
        "plots": plots,
    }
    metrics = dict(json_safe(metrics))
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    report = render_report(metrics, _worst(scored, probs, manifest, worst), manifest)
    (output_dir / REPORT_FILE).write_text(report, encoding="utf-8")
    log.info("evaluated %s %s on %d images (%d unreadable): accuracy %.4f, wrote %s", manifest.name,
             manifest.version, len(scored.paths), len(unreadable), summary["classification"]["accuracy"], output_dir)
    return metrics


def _write_plots(output_dir: Path, summary: Mapping[str, Any], manifest: Manifest) -> list[str]:
    from qcsight_train import plots

    binary = summary["binary"]
    operating = summary["operating_point"]
    written = [
        plots.plot_confusion_matrix(output_dir / plots.CONFUSION_PNG, summary["classification"]["confusion_matrix"],
                                    manifest.classes),
        plots.plot_roc(output_dir / plots.ROC_PNG, binary, operating),
        plots.plot_pr(output_dir / plots.PR_PNG, binary, operating),
    ]
    return [p.name for p in written]


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _interval(bounds: Sequence[float] | None, count: int | None) -> str:
    """" (95 % CI low-high, n images)" for a rate, or nothing when it has no interval."""
    return "" if not bounds else f" (95 % CI {bounds[0]:.3f}-{bounds[1]:.3f}, n={count})"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_report(metrics: Mapping[str, Any], worst: Sequence[Mapping[str, Any]], manifest: Manifest) -> str:
    """The Markdown report: summary, per-class table, confusion matrix, operating point, worst images."""
    cls = metrics["classification"]
    binary = metrics["binary"]
    op = metrics["operating_point"]
    at_bundle = metrics["at_bundle_threshold"]
    bundle = metrics["bundle"]
    lines = [
        f"# Evaluation of {bundle['name']} {bundle['version']} ({bundle['precision']})",
        "",
        f"{metrics['images']} images scored through qcsight_core (read_image → preprocess_batch → OnnxRunner → "
        f"Decider); {len(metrics['unreadable'])} unreadable.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| accuracy (top-1 class) | {_fmt(cls['accuracy'])} |",
        f"| balanced accuracy | {_fmt(cls['balanced_accuracy'])} |",
        f"| macro F1 | {_fmt(cls['macro_f1'])} |",
        f"| accuracy of the class the verdict names | {_fmt(metrics['named']['accuracy'])} |",
        f"| defect-vs-good ROC AUC | {_fmt(binary['roc_auc'])} |",
        f"| defect-vs-good PR AUC (average precision) | {_fmt(binary['pr_auc'])} |",
        f"| threshold for defect recall {_fmt(op['target_defect_recall'], 3)} | {_fmt(op['threshold'])} |",
        f"| false-reject rate of good parts there | {_fmt(op['false_reject_rate'])} |",
        f"| bundle threshold {_fmt(at_bundle['threshold'])}: defect recall | {_fmt(at_bundle['defect_recall'])}"
        f"{_interval(at_bundle.get('defect_recall_ci95'), at_bundle.get('defect_images'))} |",
        f"| bundle threshold: false-reject rate | {_fmt(at_bundle['false_reject_rate'])}"
        f"{_interval(at_bundle.get('false_reject_rate_ci95'), at_bundle.get('good_images'))} |",
        f"| verdicts good / defect / uncertain | {' / '.join(str(metrics['verdicts'][s]) for s in STATUSES)} |",
        f"| uncertain band from {_fmt(at_bundle['uncertain_threshold'])}: good parts sent to review | "
        f"{_fmt(at_bundle['good_to_review_rate'])} |",
        f"| defects caught only by the uncertain band | {_fmt(at_bundle['defect_to_review_rate'])} |",
        "",
        "## Per class",
        "",
        "| class | defect | precision | recall | F1 | support |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in cls["per_class"].items():
        flag = "yes" if name in manifest.defect_classes else ""
        lines.append(f"| {_cell(name)} | {flag} | {_fmt(row['precision'])} | {_fmt(row['recall'])} | "
                     f"{_fmt(row['f1'])} | {row['support']} |")
    lines += ["", "## Confusion matrix (rows: true class, columns: top-1 class)", "",
              "| true \\ top-1 | " + " | ".join(_cell(c) for c in cls["classes"]) + " |",
              "|---" * (len(cls["classes"]) + 1) + "|"]
    for name, row in zip(cls["classes"], cls["confusion_matrix"], strict=True):
        lines.append(f"| {_cell(name)} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", *(f"![{Path(p).stem}]({p})" for p in metrics["plots"]), "",
              f"## Worst misclassified images ({len(worst)} shown, lowest probability of the true class first)", ""]
    if worst:
        lines += ["| image | true | top-1 | verdict | p(true) | defect score |", "|---|---|---|---|---|---|"]
        lines += [f"| {_cell(r['path'])} | {_cell(r['label'])} | {_cell(r['predicted'])} | {r['status']} | "
                  f"{_fmt(r['p_true'])} | {_fmt(r['defect_score'])} |" for r in worst]
    else:
        lines.append("None: every image's top-1 class is right.")
    lines += ["", f"## Unreadable images ({len(metrics['unreadable'])})", ""]
    if metrics["unreadable"]:
        lines += ["| image | label | reason |", "|---|---|---|"]
        lines += [f"| {_cell(u['path'])} | {_cell(u['label'])} | {_cell(u['reason'])} |"
                  for u in metrics["unreadable"]]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"
