"""Static INT8 (QDQ) quantisation of a bundle's FP32 ONNX model, calibrated on images through qcsight_core."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from qcsight_core.errors import ImageError, PreprocessError
from qcsight_core.imageio import read_image
from qcsight_core.preprocess import PreprocessSpec, preprocess_batch
from qcsight_train.errors import ExportError

log = logging.getLogger(__name__)

QUANTIZATION_SCHEME = (
    "static QDQ (onnxruntime.quantization.quantize_static after quant_pre_process): per-channel symmetric int8 "
    "weights, uint8 activations, MinMax calibration; the first convolution, the classifier and the final "
    "Softmax stay float"
)
# MinMax keeps every intermediate output of every calibration batch in memory (about 12 MB per
# image for efficientnet_lite0 at 96 px, ~65 MB at 224 px), so the number of calibration images
# is what bounds memory. ONNX Runtime's own bound, extra_options CalibMaxIntermediateOutputs,
# is not used: in onnxruntime 1.32 MinMaxCalibrater.clear_collected_data discards the collected
# batches without merging their ranges, so calibration silently used only the last partial chunk
# (and failed with "No data is collected" when the batch count was a multiple of the bound).


class ImageCalibrationReader(CalibrationDataReader):  # type: ignore[misc]
    """Feeds calibration images to the quantiser, decoded and preprocessed exactly as the device does.

    Unreadable images are skipped with a warning (and counted), never fatal.
    """

    def __init__(self, paths: Sequence[str], spec: PreprocessSpec, input_name: str, *, batch_size: int = 8,
                 limit: int = 256) -> None:
        self.paths = list(paths)[:limit]
        self.spec = spec
        self.input_name = input_name
        self.batch_size = batch_size
        self.used = 0
        self.skipped: list[tuple[str, str]] = []
        self._batches = self._iterate()

    def _iterate(self) -> Iterator[dict[str, np.ndarray]]:
        images: list[np.ndarray] = []
        for path in self.paths:
            try:
                images.append(read_image(path))
            except ImageError as exc:
                log.warning("calibration image %s skipped: %s", path, exc.reason)
                self.skipped.append((path, exc.reason))
                continue
            if len(images) == self.batch_size:
                yield self._batch(images)
                images = []
        if images:
            yield self._batch(images)

    def _batch(self, images: list[np.ndarray]) -> dict[str, np.ndarray]:
        try:
            tensor = preprocess_batch(images, self.spec)
        except PreprocessError as exc:
            raise ExportError(f"calibration images cannot be preprocessed: {exc}") from exc
        self.used += len(images)
        return {self.input_name: tensor}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


@dataclass(frozen=True)
class QuantizationResult:
    """What quantize_int8 produced.

    Attributes:
        path: the INT8 model file.
        calibration_images: images that went into calibration.
        skipped: calibration images that could not be read, with the reason.
    """

    path: Path
    calibration_images: int
    skipped: tuple[tuple[str, str], ...]
    kept_float: tuple[str, ...] = ()


def float_nodes(model: onnx.ModelProto) -> list[str]:
    """The nodes left in float: the first convolution, the classifier and the final Softmax.

    The first and last layers are the ones INT8 hurts most (the stem sees raw pixels, the
    classifier's outputs are the logits themselves) and cost little to keep in float. On the
    validation splits of three trained efficientnet_lite0 models (magnetic tile, magnetic tile
    under torchrun, elpv) this took the mean accuracy drop from 1.3 to 0.6 points.

    A network too small to have anything between the two (one convolution and a classifier)
    is quantised whole, or there would be nothing left for INT8 to do.
    """
    nodes = list(model.graph.node)  # ONNX keeps nodes in topological order
    compute = [n.name for n in nodes if n.op_type in ("Conv", "Gemm", "MatMul")]
    first_conv = next((n.name for n in nodes if n.op_type == "Conv"), None)
    classifier = next((n.name for n in reversed(nodes) if n.op_type in ("Gemm", "MatMul")), None)
    softmax = [n.name for n in nodes if n.op_type == "Softmax"]
    edges = [name for name in (first_conv, classifier) if name]
    if len(set(compute) - set(edges)) == 0:
        edges = []
    return [*edges, *softmax]


def quantize_int8(fp32_path: Path, int8_path: Path, calibration_paths: Sequence[str], spec: PreprocessSpec, *,
                  scratch_dir: Path, batch_size: int = 8, limit: int = 256) -> QuantizationResult:
    """Quantise an FP32 ONNX classifier to static INT8 QDQ.

    Args:
        fp32_path: the FP32 model (single file, dynamic batch, Softmax at the end).
        int8_path: where to write the INT8 model.
        calibration_paths: images representative of the line (typically the training images).
        spec: the bundle's preprocessing.
        scratch_dir: for the pre-processed intermediate model; never the bundle directory, whose
            every file would be hashed into the manifest.
        batch_size: calibration images per batch.
        limit: calibration images used at most (the first ones given).

    Raises:
        ExportError: no calibration image could be read, or ONNX Runtime's quantiser failed.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(os.fspath(fp32_path), load_external_data=False)
    input_name = model.graph.input[0].name
    reader = ImageCalibrationReader(calibration_paths, spec, input_name, batch_size=batch_size, limit=limit)
    prepared = scratch_dir / "model.prep.onnx"
    try:
        # Shape inference and graph optimisation first, as ONNX Runtime recommends: without it
        # some tensors have no known shape and are left unquantised.
        quant_pre_process(os.fspath(fp32_path), os.fspath(prepared))
        # Node names are those of the prepared graph, which is what the quantiser walks.
        keep_float = float_nodes(onnx.load(os.fspath(prepared)))
        quantize_static(
            os.fspath(prepared),
            os.fspath(int8_path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # A quantised Softmax output would step probabilities by 1/256 and make the
            # operating threshold coarse; it stays float, with the stem and the classifier.
            nodes_to_exclude=keep_float,
        )
    except ExportError:
        raise
    except Exception as exc:  # onnxruntime.quantization raises untyped errors
        int8_path.unlink(missing_ok=True)
        if reader.used == 0:
            raise ExportError(f"none of the {len(reader.paths)} calibration images could be read") from exc
        raise ExportError(f"{fp32_path}: INT8 quantisation failed: {exc}") from exc
    log.info("quantised %s to INT8 with %d calibration images (%d unreadable); float: %s", fp32_path.name,
             reader.used, len(reader.skipped), ", ".join(keep_float))
    return QuantizationResult(int8_path, reader.used, tuple(reader.skipped), tuple(keep_float))
