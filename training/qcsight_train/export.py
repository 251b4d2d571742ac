"""Turning a trained PyTorch classifier into a verified model bundle, all or nothing.

export_bundle writes, into a hidden staging directory beside output_dir:

1. model.onnx: FP32, Softmax inside the graph (the manifest's output is "probabilities"),
   dynamic batch axis, one self-contained file, checked with onnx.checker.
2. The parity gate: held-out images decoded once; PyTorch is fed by the training-time
   preprocessing, ONNX Runtime by qcsight_core (preprocess_batch -> OnnxRunner). Any class
   probability differing by more than 1e-4, or any differing predicted class, fails the
   export with ParityError: this is what catches a preprocessing mismatch between training
   and the device, not just exporter numerics.
3. Decision thresholds from the validation defect scores (verdict.Decider's definition).
4. model.int8.onnx: static INT8 QDQ, kept only if validation accuracy drops by at most
   one point; the verdict and the numbers are recorded either way.
5. model.torchscript.pt: traced, for SageMaker Neo.
6. Reference histograms (top-class confidence, input brightness) for on-device drift.
7. config.json (the resolved training configuration), manifest.json with every sha256.

Only when everything passed is the staging directory renamed to output_dir and packed as
a tarball (default: output_dir.parent / "model.tar.gz"). On any failure the staging
directory is removed and output_dir is left as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qcsight_core.bundle import (
    MANIFEST_NAME,
    Bundle,
    DecisionPolicy,
    Manifest,
    ModelFile,
    load_bundle,
    pack_bundle,
    write_bundle,
)
from qcsight_core.checks import check_int, check_number
from qcsight_core.drift import histogram
from qcsight_core.imageio import read_image
from qcsight_core.preprocess import PreprocessSpec, normalize, prepare_pixels, preprocess
from qcsight_core.runner import OnnxRunner, RunnerOptions
from qcsight_core.verdict import Decider
from qcsight_train.config import MAX_FALSE_REJECT
from qcsight_train.errors import EvaluationError, ExportError, ParityError
from qcsight_train.evaluate import ScoredImages, check_labels, labelled_pairs, score_images, summarise
from qcsight_train.metrics import (
    json_safe,
    rates_at_threshold,
    review_band,
    threshold_for_recall,
    threshold_warning,
    threshold_within_false_reject,
)

if TYPE_CHECKING:
    import torch

    from qcsight_data.dataset import Sample

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"
NEO_ONNX_FILE = "model.neo.onnx"
NEO_ONNX_FORMAT = "onnx-neo"  # its runtimes entry (qcsight_train.launch.neo looks for it)
# SageMaker Neo's newest ONNX is 1.7 (edge and cloud targets): IR version 7, operator sets up to 12.
NEO_ONNX_IR = 7
NEO_ONNX_OPSET = 12
NEO_PARITY_IMAGES = 32
CONFIG_FILE = "config.json"
TARBALL_NAME = "model.tar.gz"
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
CONFIDENCE_EDGES = tuple(float(v) for v in np.linspace(0.0, 1.0, 21))
BRIGHTNESS_EDGES = tuple(float(v) for v in np.linspace(0.0, 255.0, 21))
_LISTED_UNREADABLE = 20
EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")
UNCERTAIN_RULE = ("uncertain_threshold: the lowest score, not below uncertain_floor x defect_threshold, that keeps at "
                  "most review_fraction of validation good images in [uncertain_threshold, defect_threshold)")

TorchPreprocess = Callable[[np.ndarray], "torch.Tensor"]


@dataclass(frozen=True)
class ThresholdScores:
    """Labelled class probabilities to choose the decision thresholds on, instead of the exported model's
    validation scores: out-of-fold scores (every defect counts), or the selection run's validation scores
    when the exported model was refit on train+validation and validation is no longer held out from it.

    Attributes:
        labels: class name per image.
        probabilities: NxK class probabilities in the bundle's class order.
        source: what the scores are, recorded in the manifest.
    """

    labels: tuple[str, ...]
    probabilities: np.ndarray
    source: str


@dataclass(frozen=True)
class ExportOptions:
    """Gates and knobs of export_bundle; the defaults are the project's release gates.

    Attributes:
        parity_tolerance: the largest |probability difference| allowed between PyTorch and ONNX Runtime.
        parity_images: held-out images compared (the first readable ones of `validation`).
        max_int8_drop_points: INT8 is kept when its validation accuracy is at most this many
            percentage points below FP32. A negative value drops INT8 always (tests use it).
        calibration_images: calibration images used at most for INT8.
        review_fraction: the uncertain band (defect scores from uncertain_threshold up to the
            operating threshold, which go to an operator) is as wide as keeps at most this share
            of the validation good images in it. 0: a band holding no validation good image.
        uncertain_floor: the band never reaches below uncertain_floor x defect_threshold. 1.0: no band.
        default_threshold: the defect threshold used when validation holds no defect image.
        max_false_reject: the share of validation good images the defect threshold may reject; when the
            threshold for the recall target rejects more, it rises to this budget (with a warning).
        opset: ONNX opset requested from the exporter.
        batch_size: images per inference call during validation and calibration.
        tar_path: where to pack the bundle; None: output_dir.parent / "model.tar.gz".
        pack: whether to pack a tarball at all.
    """

    parity_tolerance: float = 1e-4
    parity_images: int = 256
    max_int8_drop_points: float = 1.0
    calibration_images: int = 64
    review_fraction: float = 0.05
    uncertain_floor: float = 0.5
    default_threshold: float = 0.5
    max_false_reject: float = MAX_FALSE_REJECT
    opset: int = 18
    batch_size: int = 32
    tar_path: Path | None = None
    pack: bool = True

    def __post_init__(self) -> None:
        check_number("export.parity_tolerance", self.parity_tolerance, 0.0, 1.0, open_low=True, open_high=True)
        for name in ("parity_images", "calibration_images", "batch_size"):
            check_int(f"export.{name}", getattr(self, name), 1)
        for name in ("review_fraction", "uncertain_floor", "default_threshold", "max_false_reject"):
            check_number(f"export.{name}", getattr(self, name), 0.0, 1.0)
        check_int("export.opset", self.opset, 13, 23)


def default_torch_preprocess(spec: PreprocessSpec) -> TorchPreprocess:
    """qcsight_core's prepare_pixels + normalize as a CxHxW tensor: training's evaluation transform."""
    import torch

    def run(image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(normalize(prepare_pixels(image, spec), spec))

    return run


def export_bundle(
    model: torch.nn.Module,
    *,
    output_dir: Path,
    spec: PreprocessSpec,
    classes: Sequence[str],
    defect_classes: Sequence[str],
    architecture: str,
    name: str,
    version: str,
    run_id: str,
    data_fingerprint: str,
    calibration_paths: Sequence[str],
    validation: Sequence[tuple[str, str]] | Sequence[Sample],
    target_defect_recall: float = 0.99,
    int8: bool = True,
    torchscript: bool = True,
    config: Mapping[str, Any] | None = None,
    torch_preprocess: TorchPreprocess | None = None,
    options: ExportOptions | None = None,
    threshold_scores: ThresholdScores | None = None,
    neo_onnx: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> Bundle:
    """Export a trained classifier into a verified bundle at output_dir (see the module docstring).

    Args:
        model: returns NxK logits for float32 NxCxHxW input normalised by spec; not modified
            (a CPU copy is exported).
        output_dir: the bundle directory; must be absent, empty, or an earlier bundle (replaced).
        spec: the preprocessing the model was trained with.
        classes: class names in the model's output order.
        defect_classes: which of them are defects.
        architecture, name, version, run_id, data_fingerprint: recorded in the manifest.
        calibration_paths: images for INT8 calibration (typically training images).
        validation: held-out (path, label) pairs or dataset Samples: the parity gate, the
            thresholds, INT8's accuracy check and the reference histograms use them.
        target_defect_recall: the defect recall the operating threshold is chosen for.
        int8: try static INT8 (kept only if accurate enough).
        torchscript: write the traced TorchScript artefact for Neo.
        config: the resolved training configuration, written as config.json.
        torch_preprocess: decoded BGR/grey uint8 image -> CxHxW float tensor, the preprocessing
            training evaluates with; default qcsight_core prepare_pixels + normalize.
        options: gates and knobs (ExportOptions()).
        threshold_scores: choose the thresholds on these instead of the validation scores.
        neo_onnx: also write model.neo.onnx (ONNX IR 7, opset 12: what SageMaker Neo accepts),
            parity-checked against the FP32 model with ONNX Runtime.
        extra: recorded under the manifest's "extra" (training facts such as refit, input-size choice).

    Returns:
        The bundle, loaded back from output_dir (hashes verified).

    Raises:
        ParityError: ONNX Runtime on qcsight_core preprocessing disagrees with PyTorch.
        ExportError: the model cannot be exported, no validation image is readable, or
            output_dir holds something that is not a bundle.
    """
    options = options or ExportOptions()
    output_dir = Path(output_dir)
    pairs = labelled_pairs(validation)
    if not pairs:
        raise ExportError("validation is empty: the parity gate and the thresholds need held-out images")
    if not 0.0 < target_defect_recall <= 1.0:
        raise ExportError(f"target_defect_recall={target_defect_recall!r}: a recall in (0, 1]")
    base = Manifest(name=name, version=version, architecture=architecture, classes=tuple(classes),
                    defect_classes=tuple(defect_classes), input=spec, models=(ModelFile(ONNX_FILE),),
                    data_fingerprint=data_fingerprint, run_id=run_id, extra=dict(extra or {}))
    try:
        check_labels(pairs, base.classes, "validation")
    except EvaluationError as exc:
        raise ExportError(str(exc)) from exc
    with staged_bundle(output_dir) as staging, tempfile.TemporaryDirectory(prefix="qcsight-export-") as scratch:
        job = _Export(model, staging, Path(scratch), base, pairs, options,
                      torch_preprocess or default_torch_preprocess(spec), threshold_scores)
        manifest = job.run(calibration_paths, target_defect_recall, int8=int8, torchscript=torchscript,
                           neo_onnx=neo_onnx)
        if config is not None:
            write_config(staging / CONFIG_FILE, config)
        write_bundle(staging, manifest)
    if options.pack:
        tarball = pack_bundle(output_dir, options.tar_path or output_dir.parent / TARBALL_NAME)
        log.info("packed %s", tarball)
    bundle = load_bundle(output_dir)
    log.info("bundle %s %s written to %s (%s)", name, version, output_dir,
             ", ".join(m.file for m in bundle.manifest.models))
    return bundle


@dataclass
class _TorchParity:
    """Collects PyTorch probabilities for the first `limit` validation images, via training preprocessing."""

    model: torch.nn.Module
    preprocess: TorchPreprocess
    expected_shape: tuple[int, int, int]
    limit: int
    paths: list[str] = field(default_factory=list)
    probabilities: list[np.ndarray] = field(default_factory=list)
    example: torch.Tensor | None = None

    def __call__(self, paths: Sequence[str], images: Sequence[np.ndarray]) -> None:
        import torch

        room = self.limit - len(self.paths)
        if room <= 0:
            return
        tensors = [torch.as_tensor(self.preprocess(image)) for image in images[:room]]
        for path, tensor in zip(paths, tensors, strict=False):
            if tuple(tensor.shape) != self.expected_shape:
                raise ParityError(
                    f"parity gate failed: the training-time preprocessing turns {path} into a tensor of shape "
                    f"{tuple(tensor.shape)}, but the bundle's input (qcsight_core) is {self.expected_shape}; "
                    "training and the device would not see the same pixels"
                )
        batch = torch.stack(tensors).to(torch.float32)
        with torch.inference_mode():
            self.probabilities.append(self.model(batch).numpy().astype(np.float64))
        if self.example is None:
            self.example = batch[:8].clone()
        self.paths.extend(paths[: len(tensors)])


def with_softmax(model: torch.nn.Module) -> torch.nn.Module:
    """A CPU float32 copy of the model followed by a Softmax over classes: what every artefact computes.

    The copy leaves the caller's model (maybe on a GPU, maybe still training) untouched, and
    the reference PyTorch numbers come from the same CPU float32 arithmetic ONNX Runtime uses.
    """
    import torch

    wrapped = torch.nn.Sequential(copy.deepcopy(model).to("cpu", torch.float32), torch.nn.Softmax(dim=1))
    return wrapped.eval()


class _Export:
    """One export: the steps in order, sharing the staging directory and what earlier steps measured."""

    def __init__(self, model: torch.nn.Module, staging: Path, scratch: Path, base: Manifest,
                 pairs: list[tuple[str, str]], options: ExportOptions, torch_preprocess: TorchPreprocess,
                 threshold_scores: ThresholdScores | None = None) -> None:
        self.model = with_softmax(model)
        self.threshold_scores = threshold_scores
        self.staging = staging
        self.scratch = scratch
        self.base = base
        self.pairs = pairs
        self.options = options
        self.torch_preprocess = torch_preprocess
        spec = base.input
        self.input_shape = (spec.channels, spec.height, spec.width)
        self.warnings: list[str] = []

    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)

    def run(self, calibration_paths: Sequence[str], target_recall: float, *, int8: bool,
            torchscript: bool, neo_onnx: bool = False) -> Manifest:
        self._check_model_output()
        fp32_entry = ModelFile(ONNX_FILE, details=export_onnx(self.model, self.staging / ONNX_FILE,
                                                              self.input_shape, self.options.opset))
        int8_entry: ModelFile | None = None
        int8_record: dict[str, Any] = {"kept": False, "reason": "not requested"}
        if int8:
            int8_entry, int8_record = self._quantize(calibration_paths)
        entries = (fp32_entry,) if int8_entry is None else (fp32_entry, int8_entry)
        probe = replace(self.base, models=entries)
        runners = {entry.precision: OnnxRunner(Bundle(self.staging, probe),
                                               RunnerOptions(precision=entry.precision, warmup_runs=0))
                   for entry in entries}
        parity = _TorchParity(self.model, self.torch_preprocess, self.input_shape, self.options.parity_images)
        log.info("scoring %d validation images (ONNX %s; PyTorch on the first %d)", len(self.pairs),
                 " + ".join(runners), min(len(self.pairs), self.options.parity_images))
        scored = score_images(self.pairs, self.base.input, runners, batch_size=self.options.batch_size,
                              on_batch=parity)
        if not scored.paths:
            raise ExportError(f"none of the {len(self.pairs)} validation images could be read "
                              f"(first: {scored.unreadable[0].path}: {scored.unreadable[0].reason})")
        for bad in scored.unreadable[:_LISTED_UNREADABLE]:
            self.warnings.append(f"validation image {bad.path} unreadable: {bad.reason}")
        if len(scored.unreadable) > _LISTED_UNREADABLE:
            self.warnings.append(f"... and {len(scored.unreadable) - _LISTED_UNREADABLE} more unreadable "
                                 "validation images")
        parity_record = self._parity_gate(scored, parity)
        policy, threshold_record = self._decision_policy(scored, target_recall)
        decided = replace(self.base, decision=policy)
        fp32_summary = summarise(decided, scored.labels, scored.probabilities["fp32"], target_recall)
        if int8_entry is not None:
            int8_entry, int8_record = self._int8_verdict(decided, scored, fp32_summary, int8_entry, int8_record,
                                                         target_recall)
        models = [fp32_entry, *([int8_entry] if int8_entry is not None else [])]
        torchscript_record: dict[str, Any] = {"written": False, "reason": "not requested"}
        if torchscript:
            ts_entry, torchscript_record = self._torchscript(parity)
            if ts_entry is not None:
                models.append(ts_entry)
        neo_record: dict[str, Any] = {"written": False, "reason": "not requested"}
        if neo_onnx:
            neo_entry, neo_record = self._neo_onnx(scored)
            if neo_entry is not None:
                models.append(neo_entry)
        metrics = {
            "validation": _manifest_summary(fp32_summary, scored),
            "parity": parity_record,
            "threshold": threshold_record,
            "int8": int8_record,
            "torchscript": torchscript_record,
            "neo_onnx": neo_record,
            "warnings": self.warnings,
        }
        return replace(decided, models=tuple(models), metrics=json_safe(metrics),
                       reference=reference_histograms(scored.probabilities["fp32"], scored.brightness),
                       created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def _check_model_output(self) -> None:
        import torch

        with torch.inference_mode():
            try:
                out = self.model(torch.zeros(2, *self.input_shape))
            except Exception as exc:
                raise ExportError(f"{self.base.architecture}: the model cannot run on a 2x"
                                  f"{'x'.join(map(str, self.input_shape))} batch: {exc}") from exc
        if tuple(out.shape) != (2, len(self.base.classes)):
            raise ExportError(f"{self.base.architecture}: the model returns shape {tuple(out.shape)} for a batch of 2; "
                              f"expected (2, {len(self.base.classes)}) for classes {list(self.base.classes)}")

    def _quantize(self, calibration_paths: Sequence[str]) -> tuple[ModelFile | None, dict[str, Any]]:
        from qcsight_train.quantize import QUANTIZATION_SCHEME, quantize_int8

        if not calibration_paths:
            self._warn("INT8 dropped: no calibration images were given")
            return None, {"kept": False, "reason": "no calibration images"}
        try:
            result = quantize_int8(self.staging / ONNX_FILE, self.staging / INT8_FILE, calibration_paths,
                                   self.base.input, scratch_dir=self.scratch,
                                   batch_size=min(8, self.options.batch_size), limit=self.options.calibration_images)
        except ExportError as exc:
            (self.staging / INT8_FILE).unlink(missing_ok=True)
            self._warn(f"INT8 dropped: {exc}")
            return None, {"kept": False, "reason": f"quantisation failed: {exc}"}
        details = {"quantization": QUANTIZATION_SCHEME, "calibration_images": result.calibration_images,
                   "float_nodes": list(result.kept_float)}
        return ModelFile(INT8_FILE, precision="int8", details=details), {
            "calibration_images": result.calibration_images,
            "calibration_unreadable": len(result.skipped),
        }

    def _parity_gate(self, scored: ScoredImages, parity: _TorchParity) -> dict[str, Any]:
        count = len(parity.paths)
        if list(scored.paths[:count]) != parity.paths:
            raise ExportError("internal: PyTorch and ONNX parity rows are not aligned")
        torch_probs = np.concatenate(parity.probabilities)
        onnx_probs = scored.probabilities["fp32"][:count].astype(np.float64)
        diff = np.abs(torch_probs - onnx_probs)
        max_diff = float(diff.max())
        classes = self.base.classes
        torch_top, onnx_top = torch_probs.argmax(axis=1), onnx_probs.argmax(axis=1)
        tolerance = self.options.parity_tolerance
        rows = np.arange(count)
        # Two classes within the tolerance of each other on both sides are a numerical tie
        # (an untrained or zero-initialised head), not a disagreement about the image.
        tie = ((torch_probs[rows, torch_top] - torch_probs[rows, onnx_top] <= tolerance)
               & (onnx_probs[rows, onnx_top] - onnx_probs[rows, torch_top] <= tolerance))
        differ = torch_top != onnx_top
        mismatched = [(parity.paths[i], classes[int(torch_top[i])], classes[int(onnx_top[i])])
                      for i in np.flatnonzero(differ & ~tie)]
        record = {"images": count, "max_abs_diff": max_diff, "tolerance": tolerance,
                  "mismatched_classes": len(mismatched), "ties_within_tolerance": int((differ & tie).sum()),
                  "compared": "PyTorch on the training-time preprocessing vs ONNX Runtime on qcsight_core "
                              "(read_image -> preprocess_batch -> OnnxRunner)"}
        log.info("parity gate: %d images, max |Δprob| %.3g (tolerance %.3g), %d predicted classes differ", count,
                 max_diff, tolerance, len(mismatched))
        if max_diff <= tolerance and not mismatched:
            return record
        row, column = np.unravel_index(int(diff.argmax()), diff.shape)
        shown = "; ".join(f"{_short(p)}: torch={t} onnx={o}" for p, t, o in mismatched[:5])
        more = f" (+{len(mismatched) - 5} more)" if len(mismatched) > 5 else ""
        classes_text = (f"predicted classes differ on {len(mismatched)} image(s): {shown}{more}" if mismatched
                        else "predicted classes agree")
        raise ParityError(
            f"parity gate failed on {count} held-out image(s): max |Δprob| = {max_diff:.3g} > {tolerance:g} "
            f"(class {classes[int(column)]!r} of {parity.paths[int(row)]}); {classes_text}. PyTorch was fed the "
            "training-time preprocessing and ONNX Runtime qcsight_core's: a mismatch in colour order, resize "
            "rule or mean/std is the usual cause. No bundle was written.",
            max_abs_diff=max_diff, tolerance=tolerance, mismatched=mismatched,
        )

    def _decision_policy(self, scored: ScoredImages, target_recall: float) -> tuple[DecisionPolicy, dict[str, Any]]:
        if self.base.defect_types_only:
            # Every class is a defect type: every verdict is a defect, named by the top class.
            return DecisionPolicy(defect_threshold=0.0, uncertain_threshold=0.0), {
                "chosen": "none: every class is a defect type, every verdict is a defect named by its top class",
                "defect_threshold": 0.0, "uncertain_threshold": 0.0}
        defect_set = set(self.base.defect_classes)
        labels, probabilities, source = scored.labels, scored.probabilities["fp32"], "validation defect scores"
        if self.threshold_scores is not None:
            labels, probabilities = self.threshold_scores.labels, self.threshold_scores.probabilities
            source = self.threshold_scores.source
        is_defect = np.array([label in defect_set for label in labels])
        scores = Decider(self.base).defect_scores(probabilities)
        record: dict[str, Any] = {"target_defect_recall": target_recall, "source": source,
                                  "uncertain_rule": UNCERTAIN_RULE,
                                  "review_fraction": self.options.review_fraction,
                                  "uncertain_floor": self.options.uncertain_floor,
                                  "max_false_reject": self.options.max_false_reject}
        if not is_defect.any():
            threshold, false_reject = self.options.default_threshold, None
            self._warn(f"validation holds no defect image: defect threshold set to the default {threshold}, "
                       f"not chosen for recall {target_recall}")
            record["chosen"] = "default (no defect images in validation)"
        else:
            threshold, frr = threshold_for_recall(is_defect, scores, target_recall)
            # Summed float32 probabilities can exceed 1 by an ulp; the policy wants a probability.
            threshold = float(np.clip(threshold, 0.0, 1.0))
            false_reject = None if np.isnan(frr) else frr
            if false_reject is None:
                self._warn("validation holds no good image: the false-reject rate at the threshold is unknown")
            record["chosen"] = f"lowest threshold keeping defect recall >= {target_recall} on validation"
            if false_reject is not None and false_reject > self.options.max_false_reject:
                threshold, false_reject = self._within_budget(is_defect, scores, threshold, false_reject,
                                                              target_recall, record)
        floor = threshold * self.options.uncertain_floor
        # Without validation good images the band is the floor (nothing to budget).
        uncertain = review_band(is_defect, scores, threshold, self.options.review_fraction, floor)
        record.update(defect_threshold=threshold, uncertain_threshold=uncertain, false_reject_rate=false_reject,
                      defect_images=int(is_defect.sum()), good_images=int((~is_defect).sum()))
        if is_defect.any():
            at = rates_at_threshold(is_defect, scores, threshold)
            record.update(defect_recall=at["defect_recall"], defect_recall_ci95=at["defect_recall_ci95"],
                          false_reject_rate_ci95=at["false_reject_rate_ci95"])
            warning = threshold_warning(at["defect_images"], at["defect_recall"], at["defect_recall_ci95"],
                                        target_recall)
            if warning:
                self._warn(warning)
                record["warning"] = warning
        return DecisionPolicy(defect_threshold=threshold, uncertain_threshold=uncertain,
                              target_defect_recall=target_recall), record

    def _within_budget(self, is_defect: np.ndarray, scores: np.ndarray, recall_threshold: float,
                       recall_false_reject: float, target_recall: float,
                       record: dict[str, Any]) -> tuple[float, float]:
        """Raise a recall threshold that rejects more good parts than max_false_reject to the budget; warn."""
        budget = self.options.max_false_reject
        threshold = float(np.clip(threshold_within_false_reject(is_defect, scores, budget), 0.0, 1.0))
        at = rates_at_threshold(is_defect, scores, threshold)
        caught = round(at["defect_recall"] * at["defect_images"])
        warning = (f"the defect threshold for recall {target_recall} ({recall_threshold:.3f}) would reject "
                   f"{recall_false_reject:.0%} of the {at['good_images']} validation good images, over the budget "
                   f"of {budget:.0%} (--max-false-reject): it is {threshold:.3f} instead, which catches "
                   f"{caught} of {at['defect_images']} validation defects (recall {at['defect_recall']:.3f}) and "
                   f"rejects {at['false_reject_rate']:.0%} of good ones. Look at the defects scored like good "
                   "parts; --max-false-reject 1 keeps the recall target whatever it rejects")
        self._warn(warning)
        record.update(chosen=f"lowest threshold rejecting at most {budget} of validation good images: the one for "
                             f"recall {target_recall} rejected {recall_false_reject:.3f}",
                      false_reject_warning=warning,
                      recall_target_threshold={"threshold": recall_threshold,
                                               "false_reject_rate": recall_false_reject})
        return threshold, float(at["false_reject_rate"])

    def _int8_verdict(self, decided: Manifest, scored: ScoredImages, fp32_summary: Mapping[str, Any],
                      entry: ModelFile, record: dict[str, Any],
                      target_recall: float) -> tuple[ModelFile | None, dict[str, Any]]:
        """Keep INT8 only if the device's decisions with it lose at most max_int8_drop_points of accuracy."""
        int8_summary = summarise(decided, scored.labels, scored.probabilities["int8"], target_recall)
        fp32_acc = fp32_summary["classification"]["accuracy"]
        int8_acc = int8_summary["classification"]["accuracy"]
        drop = (fp32_acc - int8_acc) * 100.0
        allowed = self.options.max_int8_drop_points
        kept = drop <= allowed
        reason = (f"validation accuracy drop {drop:.2f} points {'<=' if kept else '>'} allowed {allowed:g} "
                  f"(fp32 {fp32_acc:.4f}, int8 {int8_acc:.4f}, {len(scored.paths)} images)")
        numbers = {"accuracy_fp32": fp32_acc, "accuracy_int8": int8_acc, "accuracy_drop_points": drop,
                   "max_drop_points": allowed,
                   "max_abs_prob_diff_vs_fp32": float(np.abs(scored.probabilities["int8"]
                                                             - scored.probabilities["fp32"]).max())}
        record = {**record, "kept": kept, "reason": reason, **numbers}
        if kept:
            log.info("INT8 kept: %s", reason)
            return replace(entry, details={**entry.details, **numbers}), record
        self._warn(f"INT8 dropped: {reason}")
        (self.staging / INT8_FILE).unlink(missing_ok=True)
        return None, record

    def _neo_onnx(self, scored: ScoredImages) -> tuple[ModelFile | None, dict[str, Any]]:
        """model.neo.onnx for SageMaker Neo, checked against the FP32 model on validation images with ONNX Runtime."""
        path = self.staging / NEO_ONNX_FILE
        try:
            details = export_neo_onnx(self.model, path, self.input_shape)
        except ExportError as exc:
            path.unlink(missing_ok=True)
            self._warn(f"{NEO_ONNX_FILE} not written: {exc}")
            return None, {"written": False, "reason": str(exc)}
        paths = list(scored.paths[:NEO_PARITY_IMAGES])
        import onnxruntime as ort

        session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
        got = np.concatenate([session.run(None, {INPUT_NAME: preprocess(read_image(p), self.base.input)})[0]
                              for p in paths])
        want = scored.probabilities["fp32"][: len(paths)]
        max_diff = float(np.abs(got.astype(np.float64) - want).max()) if paths else 0.0
        differ = int((got.argmax(axis=1) != want.argmax(axis=1)).sum()) if paths else 0
        record = {"written": True, "images": len(paths), "max_abs_diff_vs_fp32": max_diff,
                  "mismatched_classes": differ, "tolerance": self.options.parity_tolerance, **details}
        if max_diff > self.options.parity_tolerance or differ:
            path.unlink(missing_ok=True)
            self._warn(f"{NEO_ONNX_FILE} not written: it differs from model.onnx by {max_diff:.3g} on {len(paths)} "
                       f"validation images ({differ} predicted classes differ)")
            return None, {**record, "written": False, "reason": "parity with model.onnx failed"}
        log.info("%s: IR %d opset %d, parity with model.onnx on %d images: max |Δprob| %.3g", NEO_ONNX_FILE,
                 details["ir_version"], details["opset"], len(paths), max_diff)
        entry = ModelFile(NEO_ONNX_FILE, format=NEO_ONNX_FORMAT, precision="fp32", runtime="sagemaker-neo",
                          details={**details, "max_abs_diff_vs_fp32": max_diff, "parity_images": len(paths)})
        return entry, record

    def _torchscript(self, parity: _TorchParity) -> tuple[ModelFile | None, dict[str, Any]]:
        import torch

        example = parity.example if parity.example is not None else torch.zeros(1, *self.input_shape)
        path = self.staging / TORCHSCRIPT_FILE
        try:
            max_diff = export_torchscript(self.model, path, example)
        except Exception as exc:  # tracing fails in many model-specific ways; the ONNX bundle stands without it
            path.unlink(missing_ok=True)
            self._warn(f"TorchScript not written: tracing failed: {exc}")
            return None, {"written": False, "reason": f"tracing failed: {exc}"}
        if max_diff > self.options.parity_tolerance:
            path.unlink(missing_ok=True)
            self._warn(f"TorchScript not written: traced model differs from eager by {max_diff:.3g}")
            return None, {"written": False, "reason": f"traced output differs from eager by {max_diff:.3g}"}
        shape = [1, *self.input_shape]
        # torch_version: Neo loads the file with its own (older) PyTorch; qcsight_train.launch.neo compares the two.
        details = {"input_shape": shape, "data_input_config": {"input0": shape}, "framework": "PYTORCH",
                   "torch_version": torch.__version__.split("+")[0], "traced": True, "output": OUTPUT_NAME}
        return (ModelFile(TORCHSCRIPT_FILE, format="torchscript", precision="fp32", runtime="neo", details=details),
                {"written": True, "max_abs_diff_vs_eager": max_diff, "images": int(example.shape[0])})


def export_onnx(model: torch.nn.Module, path: Path, input_shape: tuple[int, int, int], opset: int) -> dict[str, Any]:
    """Export to one self-contained ONNX file with a dynamic batch axis; check it; return manifest details.

    torch 2.9+ defaults torch.onnx.export to the dynamo (torch.export) exporter, and the
    TorchScript-based one (dynamo=False) is deprecated and warns on every call. We choose
    dynamo deliberately: it is the maintained path, its batch axis is a real symbolic
    dimension (torch.export.Dim), and with external_data=False it writes a single file
    (models past protobuf's 2 GB limit then fail loudly, which no classifier here reaches).
    The example batch has 2 images because torch.export specialises a dimension of size 1.
    Opset 18 is run by every ONNX Runtime from 1.14 on.
    """
    import onnx
    import torch

    example = torch.zeros(2, *input_shape)
    before = set(path.parent.iterdir())
    try:
        with quiet_loggers(EXPORTER_LOGGERS):
            torch.onnx.export(model, (example,), os.fspath(path), dynamo=True, external_data=False,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},), verbose=False)
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(f"torch.onnx.export (dynamo, opset {opset}) failed: {exc}") from exc
    extra = sorted(p.name for p in set(path.parent.iterdir()) - before - {path})
    if extra:
        raise ExportError(f"{path}: the exporter wrote extra files {extra}; the bundle needs one self-contained file")
    try:
        onnx.checker.check_model(os.fspath(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path}: onnx.checker rejects the exported model: {exc}") from exc
    proto = onnx.load(os.fspath(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise ExportError(f"{path}: weights were saved as external data; the bundle needs one self-contained file")
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    batch_dim = inputs[0].type.tensor_type.shape.dim[0]
    if len(inputs) != 1 or batch_dim.HasField("dim_value") or not batch_dim.dim_param:
        raise ExportError(f"{path}: the exported input has no dynamic batch axis ({inputs[0].type.tensor_type})")
    actual_opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    log.info("exported %s (opset %d, dynamic batch %r)", path.name, actual_opset, batch_dim.dim_param)
    return {"opset": int(actual_opset), "exporter": f"torch.onnx dynamo (torch {torch.__version__})",
            "input_name": inputs[0].name, "output_name": proto.graph.output[0].name,
            "batch_axis": batch_dim.dim_param}


def export_neo_onnx(model: torch.nn.Module, path: Path, input_shape: tuple[int, int, int],
                    output_names: Sequence[str] = (OUTPUT_NAME,)) -> dict[str, Any]:
    """The ONNX file SageMaker Neo accepts: IR 7, opset 12, a fixed 1xCxHxW input (Neo compiles one shape).

    output_names: the graph's outputs (a classifier's probabilities; an anomaly graph's score and map).

    torch's dynamo exporter emits opset 18 and up only, so this uses the TorchScript-based
    exporter, which writes opset 12 and IR 7 natively (measured: efficientnet_lite0 and
    mobilenet_v3 export in 2-5 s and match eager PyTorch within 3e-7). It is deprecated in
    torch 2.9+ and warns on every call; when it goes, onnx.version_converter from the opset-18
    file is the fallback to try. The result is checked (onnx.checker, full) and its IR and opset
    verified, since Neo rejects newer ones rather than down-converting.
    """
    import onnx
    import torch

    example = torch.zeros(1, *input_shape)
    try:
        with warnings.catch_warnings(), quiet_loggers(EXPORTER_LOGGERS):
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            torch.onnx.export(model, (example,), os.fspath(path), dynamo=False, opset_version=NEO_ONNX_OPSET,
                              input_names=[INPUT_NAME], output_names=list(output_names), do_constant_folding=True)
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(f"torch.onnx.export (TorchScript exporter, opset {NEO_ONNX_OPSET}) failed: {exc}") from exc
    proto = onnx.load(os.fspath(path))
    if proto.ir_version > NEO_ONNX_IR:
        proto.ir_version = NEO_ONNX_IR
        onnx.save(proto, os.fspath(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejects the opset-{NEO_ONNX_OPSET} model: {exc}") from exc
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset > NEO_ONNX_OPSET:
        raise ExportError(f"the exporter wrote opset {opset}; Neo accepts up to {NEO_ONNX_OPSET}")
    shape = [1, *input_shape]
    return {"ir_version": int(proto.ir_version), "opset": int(opset), "onnx_version": "1.7",
            "input_name": INPUT_NAME, "output_name": output_names[0], "outputs": list(output_names),
            "input_shape": shape,
            "data_input_config": {INPUT_NAME: shape}, "framework": "ONNX",
            "exporter": f"torch.onnx TorchScript-based (torch {torch.__version__.split('+')[0]})"}


@contextmanager
def quiet_loggers(names: Sequence[str]) -> Iterator[None]:
    """Raise the given loggers to WARNING for a while: the exporter's optimiser logs every pass at INFO."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_torchscript(model: torch.nn.Module, path: Path, example: torch.Tensor) -> float:
    """Trace the model for SageMaker Neo, save it, load it back and return max |traced - eager| over example.

    Traced on one image, the 1xCxHxW shape Neo compiles for; each image of example is then
    run through the reloaded file one at a time.
    """
    import torch

    # Neo compiles PyTorch models only from traced TorchScript; torch 2.9+ marks torch.jit
    # deprecated with a FutureWarning on every call, which is no news to us here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(model, example[:1])  # type: ignore[no-untyped-call]
            torch.jit.save(traced, os.fspath(path))
            loaded = torch.jit.load(os.fspath(path), map_location="cpu")  # type: ignore[no-untyped-call]
            got = torch.cat([loaded(image[None]) for image in example])
            want = model(example)
    return float((got - want).abs().max())


def reference_histograms(probabilities: np.ndarray, brightness: np.ndarray) -> dict[str, Any]:
    """The manifest's reference: top-class confidence and input brightness over the validation images.

    Fixed edges (20 bins over 0..1 and 0..255) so the device's windows bin the same way;
    qcsight_core.drift computes both sides.
    """
    return {
        "confidence": histogram(np.asarray(probabilities).max(axis=1), CONFIDENCE_EDGES).to_dict(),
        "brightness": histogram(np.asarray(brightness), BRIGHTNESS_EDGES).to_dict(),
        "images": len(brightness),
        "source": "validation",
    }


def _short(path: str) -> str:
    """The class folder and file name: enough to find an image, short enough for an error message."""
    return "/".join(Path(path).parts[-2:])


def _manifest_summary(summary: Mapping[str, Any], scored: ScoredImages) -> dict[str, Any]:
    """The validation summary without the curves (the manifest keeps the areas, not every point)."""
    binary = summary["binary"]
    return {
        **{k: v for k, v in summary.items() if k != "binary"},
        "roc_auc": binary["roc_auc"],
        "pr_auc": binary["pr_auc"],
        "defect_images": binary["positives"],
        "good_images": binary["negatives"],
        "unreadable": len(scored.unreadable),
    }


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)


def write_config(path: Path, config: Mapping[str, Any]) -> None:
    """The run's resolved settings as sorted JSON, beside the manifest (`config.json`)."""
    path.write_text(json.dumps(json_safe(json.loads(json.dumps(dict(config), default=_json_default))), indent=2,
                               sort_keys=True) + "\n", encoding="utf-8")


def check_output_dir(output_dir: Path) -> None:
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise ExportError(f"{output_dir}: exists and is not a directory")
    if any(output_dir.iterdir()) and not (output_dir / MANIFEST_NAME).is_file():
        raise ExportError(f"{output_dir}: not empty and not a qcsight bundle; refusing to replace it")


@contextmanager
def staged_bundle(output_dir: Path) -> Iterator[Path]:
    """A staging directory beside output_dir, moved into its place only if the block ends without an error.

    A failed or interrupted export leaves output_dir as it was (an earlier bundle stays whole) and no
    partial directory behind.
    """
    check_output_dir(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would follow the rename and lock out the device's service user
        yield staging
        move_into_place(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def move_into_place(staging: Path, output_dir: Path) -> None:
    """Rename the finished staging directory to output_dir, replacing an empty dir or an earlier bundle."""
    check_output_dir(output_dir)
    old: Path | None = None
    if output_dir.exists():
        if any(output_dir.iterdir()):
            old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
            os.replace(output_dir, old)
        else:
            output_dir.rmdir()
    os.replace(staging, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
