"""The qcsight_train exception hierarchy, rooted in qcsight_core.errors.QcsightError.

Add new training errors here; keep existing names stable, other modules catch them.
"""

from __future__ import annotations

from collections.abc import Sequence

from qcsight_core.errors import QcsightError


class TrainError(QcsightError):
    """Training, evaluation or export failed for a reason qcsight can name."""


class ExportError(TrainError):
    """A trained model could not be turned into a bundle (ONNX export, check, quantisation, TorchScript)."""


class ParityError(ExportError):
    """The exported ONNX model, fed by qcsight_core preprocessing, disagrees with PyTorch.

    Attributes:
        max_abs_diff: the largest |probability difference| over every image and class.
        tolerance: the largest difference allowed.
        mismatched: (image, torch class, onnx class) for every image whose predicted class differs.
    """

    def __init__(self, max_abs_diff: float, tolerance: float, mismatched: Sequence[tuple[str, str, str]],
                 images: int) -> None:
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance
        self.mismatched = list(mismatched)
        self.images = images
        shown = "; ".join(f"{name}: torch={t} onnx={o}" for name, t, o in self.mismatched[:5])
        more = f" (+{len(self.mismatched) - 5} more)" if len(self.mismatched) > 5 else ""
        classes = f"{len(self.mismatched)} predicted class(es) differ: {shown}{more}" if self.mismatched else (
            "predicted classes agree")
        super().__init__(
            f"parity gate failed on {images} held-out image(s): max |Δprob| = {max_abs_diff:.3g} "
            f"(allowed {tolerance:.3g}); {classes}. A preprocessing mismatch between training and "
            "qcsight_core (colour order, resize rule, mean/std) is the usual cause."
        )


class EvaluationError(TrainError):
    """A bundle could not be evaluated (no readable labelled images, unknown labels)."""
