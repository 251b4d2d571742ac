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
        max_abs_diff: the largest |probability difference| over every image and class (None
            when the two paths could not even be compared, e.g. different input shapes).
        tolerance: the largest difference allowed.
        mismatched: (image, torch class, onnx class) for every image whose predicted class differs.
    """

    def __init__(self, message: str, *, max_abs_diff: float | None = None, tolerance: float | None = None,
                 mismatched: Sequence[tuple[str, str, str]] = ()) -> None:
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance
        self.mismatched = list(mismatched)
        super().__init__(message)


class EvaluationError(TrainError):
    """A bundle could not be evaluated (no readable labelled images, unknown labels)."""
