"""Evaluation plots (confusion matrix, ROC, precision-recall) as PNG files.

matplotlib is imported inside each function and drawn on an explicit Agg canvas, never
through pyplot: no global backend switch, no GUI, safe in a headless training container.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CONFUSION_PNG = "confusion_matrix.png"
ROC_PNG = "roc.png"
PR_PNG = "pr.png"
_DPI = 110


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def plot_confusion_matrix(path: Path, matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> Path:
    """Counts with each row shaded by its share of the true class, so small classes stay visible."""
    import numpy as np

    counts = np.asarray(matrix, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=np.float64), where=rows > 0)
    size = max(4.0, 0.6 * len(classes) + 2.5)
    figure = _figure(size, size)
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of true class")
    ticks = range(len(classes))
    axes.set_xticks(ticks, labels=list(classes), rotation=45, ha="right")
    axes.set_yticks(ticks, labels=list(classes))
    axes.set_xlabel("top-1 class")
    axes.set_ylabel("true class")
    for i in ticks:
        for j in ticks:
            axes.text(j, i, str(counts[i, j]), ha="center", va="center",
                      color="white" if shares[i, j] > 0.5 else "black")
    axes.set_title("Confusion matrix")
    figure.tight_layout()
    return _save(figure, path)


def _no_curve(figure: Figure, why: str) -> None:
    axes = figure.axes[0]
    axes.text(0.5, 0.5, why, ha="center", va="center", wrap=True)


def plot_roc(path: Path, binary: Mapping[str, Any], operating: Mapping[str, Any]) -> Path:
    """Defect-vs-good ROC with the operating point for the target recall marked."""
    figure = _figure(5, 5)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    if binary.get("roc_auc") is None:
        _no_curve(figure, "ROC undefined: the set needs both defect and good images")
    else:
        axes.plot(binary["roc"]["fpr"], binary["roc"]["tpr"], label=f"ROC (AUC {binary['roc_auc']:.3f})")
        if operating.get("false_reject_rate") is not None and operating.get("defect_recall") is not None:
            axes.scatter([operating["false_reject_rate"]], [operating["defect_recall"]], color="red", zorder=3,
                         label=f"threshold {operating['threshold']:.3g} (recall {operating['defect_recall']:.3f})")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("false-reject rate (good parts called defect)")
    axes.set_ylabel("defect recall")
    axes.set_title("Defect vs good: ROC")
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    return _save(figure, path)


def plot_pr(path: Path, binary: Mapping[str, Any], operating: Mapping[str, Any]) -> Path:
    """Defect-vs-good precision-recall curve with the operating point marked."""
    figure = _figure(5, 5)
    axes = figure.add_subplot()
    if binary.get("pr_auc") is None:
        _no_curve(figure, "precision-recall undefined: the set has no defect images")
    else:
        pr = binary["pr"]
        # Start at recall 0 with the first precision, as the curve is usually drawn.
        axes.step([0.0, *pr["recall"]], [pr["precision"][0], *pr["precision"]], where="post",
                  label=f"PR (AP {binary['pr_auc']:.3f})")
        total = binary["positives"] + binary["negatives"]
        axes.axhline(binary["positives"] / total, linestyle=":", color="grey", label="defect share")
        threshold = operating.get("threshold")
        if threshold is not None and pr["thresholds"]:
            # The curve point at the operating threshold: the last threshold still >= it.
            index = max(i for i, t in enumerate(pr["thresholds"]) if t >= threshold)
            axes.scatter([pr["recall"][index]], [pr["precision"][index]], color="red", zorder=3,
                         label=f"threshold {threshold:.3g}")
    axes.set_xlim(0, 1.02)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("defect recall")
    axes.set_ylabel("precision")
    axes.set_title("Defect vs good: precision-recall")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower left", fontsize="small")
    figure.tight_layout()
    return _save(figure, path)
