"""ONNX Runtime inference for a bundle: session options, warm-up, FP32/INT8 choice."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcsight_core import anomaly
from qcsight_core.bundle import Bundle
from qcsight_core.checks import check_choice, check_int
from qcsight_core.errors import RunnerError
from qcsight_core.verdict import softmax

log = logging.getLogger(__name__)

PRECISION_CHOICES = ("fp32", "int8", "auto")


@dataclass(frozen=True)
class RunnerOptions:
    """Runtime settings.

    Attributes:
        precision: fp32, int8, or auto (int8 when the bundle has it).
        intra_op_threads: threads inside one operator; 0 lets ONNX Runtime decide.
        inter_op_threads: threads across operators (1 = sequential execution).
        warmup_runs: inferences run at load so the first real frame is not slow.
        providers: ONNX Runtime execution providers, in order of preference.
    """

    precision: str = "fp32"
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    warmup_runs: int = 2
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def __post_init__(self) -> None:
        check_choice("precision", self.precision, PRECISION_CHOICES)
        for name in ("intra_op_threads", "inter_op_threads", "warmup_runs"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), 0))


@dataclass(frozen=True)
class RunOutputs:
    """What one batch produced.

    Attributes:
        scores: NxK class probabilities (classification), or Nx1 normalised anomaly scores
            (anomaly bundles: 1.0 is the decision threshold).
        maps: NxHxW normalised anomaly score maps (anomaly bundles), else None.
    """

    scores: np.ndarray
    maps: np.ndarray | None = None


class OnnxRunner:
    """Runs a bundle's ONNX model on NCHW float32 batches.

    run() returns what the Decider decides on: class probabilities, or for an anomaly bundle
    the Nx1 normalised image scores. infer() also returns an anomaly bundle's score maps.
    """

    def __init__(self, bundle: Bundle, options: RunnerOptions | None = None) -> None:
        import onnxruntime as ort

        self.options = options or RunnerOptions()
        self.bundle = bundle
        self.precision = self._resolve_precision(bundle, self.options.precision)
        self.model_path: Path = bundle.model_path(self.precision)
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = self.options.intra_op_threads
        session_options.inter_op_num_threads = self.options.inter_op_threads
        session_options.log_severity_level = 3
        available = set(ort.get_available_providers())
        providers = [p for p in self.options.providers if p in available] or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(os.fspath(self.model_path), session_options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise RunnerError(f"{self.model_path}: ONNX Runtime cannot load the model: {exc}") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise RunnerError(f"{self.model_path}: expected one input, found {len(inputs)}")
        self.input_name = inputs[0].name
        spec = bundle.manifest.input
        self.input_shape = (spec.channels, spec.height, spec.width)
        self._logits = bundle.manifest.output == "logits"
        self.anomaly = bundle.manifest.task == "anomaly"
        self._outputs: list[str] | None = None
        self._scale = 1.0
        if self.anomaly:
            self._outputs = [anomaly.SCORE_OUTPUT, anomaly.MAP_OUTPUT]
            names = {o.name for o in self.session.get_outputs()}
            if not set(self._outputs) <= names:
                raise RunnerError(f"{self.model_path}: an anomaly model must return {self._outputs}, "
                                  f"it returns {sorted(names)}")
            entry = bundle.manifest.model(self.precision)
            self._scale = anomaly.score_scale(entry.details if entry is not None else {})
        for _ in range(self.options.warmup_runs):
            self.run(np.zeros((1, *self.input_shape), dtype=np.float32))
        log.info("loaded %s (%s, %s)", self.model_path.name, self.precision, ",".join(providers))

    @staticmethod
    def _resolve_precision(bundle: Bundle, precision: str) -> str:
        if precision == "auto":
            return "int8" if bundle.manifest.model("int8") else "fp32"
        return precision

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 NxCxHxW -> float32 NxK class probabilities (anomaly bundles: Nx1 normalised scores)."""
        return self.infer(batch).scores

    def infer(self, batch: np.ndarray) -> RunOutputs:
        """float32 NxCxHxW -> the scores, and for an anomaly bundle the normalised score maps."""
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise RunnerError(f"input batch shape {batch.shape} does not match the model's (N, {self.input_shape})")
        try:
            outputs = self.session.run(self._outputs, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})
        except Exception as exc:
            raise RunnerError(f"{self.model_path}: inference failed: {exc}") from exc
        if self.anomaly:
            scores, maps = (np.asarray(o, dtype=np.float32) / np.float32(self._scale) for o in outputs)
            return RunOutputs(scores.reshape(len(batch), 1), maps.reshape(len(batch), *maps.shape[-2:]))
        (output,) = outputs
        output = np.asarray(output, dtype=np.float32)
        return RunOutputs(softmax(output) if self._logits else output)
