"""A fitted memory-bank model to a verified anomaly bundle, all or nothing.

export_anomaly_bundle, into a hidden staging directory beside output_dir:

1. Size plan: the bundle must stay within max_bundle_mb (default 50 MB, what a device
   component download and an edge disk take without fuss). When the estimate is over, the
   bank is stored in float16 (cast to float32 inside the graph), and if that is not enough,
   cut to the greedy prefix that fits; the manifest says which.
2. model.onnx: ONE graph holding backbone and bank: input "input" (NxCxHxW) -> "score" (N,
   raw image score) and "score_map" (Nxhxw, raw patch scores); dynamic batch; onnx.checker.
3. Validation through qcsight_core (read_image -> preprocess_batch -> OnnxRunner.infer), and
   the parity gate: PyTorch on the same decoded images must agree within parity_tolerance
   (relative to the largest score) on image scores and maps, or ParityError.
4. The threshold (qcsight_train.anomaly.threshold) on the validation raw scores: its raw value
   is the runtime's score_scale, so the device's scores read 1.0 at the threshold.
5. model.int8.onnx: static INT8 QDQ of the backbone's convolutions (the distances stay float),
   kept only if the validation image AUROC drops by at most max_auroc_drop (0.005); with no
   labelled validation defects AUROC cannot be measured and INT8 is dropped. INT8 gets its own
   score_scale by the same rule on its own scores.
6. Reference histograms for on-device drift: the normalised score and the brightness of
   the held-out good images.
7. config.json and manifest.json (every sha256); the real size is checked against the bound.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qcsight_core import anomaly
from qcsight_core.bundle import Bundle, DecisionPolicy, Manifest, ModelFile, load_bundle, pack_bundle, write_bundle
from qcsight_core.checks import check_number
from qcsight_core.drift import histogram, input_statistics
from qcsight_core.errors import ConfigError, PreprocessError
from qcsight_core.imageio import read_image
from qcsight_core.preprocess import PreprocessSpec, prepare_pixels, preprocess, preprocess_batch
from qcsight_core.runner import OnnxRunner, RunnerOptions
from qcsight_train.anomaly.features import PatchEmbedding
from qcsight_train.anomaly.metrics import roc_auc
from qcsight_train.anomaly.model import FitResult, MemoryBankModel, build_model, raw_scores
from qcsight_train.anomaly.threshold import RULES, AnomalyThreshold, choose_threshold
from qcsight_train.config import MAX_FALSE_REJECT
from qcsight_train.errors import ExportError, ParityError
from qcsight_train.evaluate import Unreadable, decode_batches
from qcsight_train.export import (
    BRIGHTNESS_EDGES,
    CONFIG_FILE,
    EXPORTER_LOGGERS,
    INPUT_NAME,
    INT8_FILE,
    NEO_ONNX_FILE,
    NEO_ONNX_FORMAT,
    NEO_PARITY_IMAGES,
    ONNX_FILE,
    TARBALL_NAME,
    export_neo_onnx,
    quiet_loggers,
    staged_bundle,
    write_config,
)
from qcsight_train.metrics import json_safe

log = logging.getLogger(__name__)

GOOD, ANOMALY = "good", anomaly.SCORE_NAME
# The reference "confidence" histogram of an anomaly bundle: the normalised score in 0.1 steps
# up to 2 (twice the threshold); anything higher falls in the last bin.
SCORE_EDGES = tuple(float(v) for v in np.linspace(0.0, 2.0, 21))
_MB = 1024 * 1024
# Manifest, config and ONNX framing beside the weights and the bank, generously.
_OVERHEAD_BYTES = 256 * 1024
_PROGRESS_S = 30.0


@dataclass(frozen=True)
class AnomalyExportOptions:
    """Gates and knobs of export_anomaly_bundle.

    Attributes:
        max_bundle_mb: the bound on the bundle's files, in MiB (see the module docstring).
        parity_tolerance: the largest |PyTorch - ONNX Runtime| difference allowed, as a fraction
            of the largest PyTorch score over the compared images.
        parity_images: held-out images compared.
        max_auroc_drop: INT8 is kept when its validation image AUROC is at most this below FP32's.
        calibration_images: training images calibrating INT8.
        threshold_rule: false_reject (on good validation images) or defect_recall.
        false_reject_rate: the share of good validation images allowed over the threshold.
        target_recall: the defect recall for threshold_rule defect_recall.
        max_false_reject: under defect_recall, the share of good validation images the threshold may
            flag; a recall threshold over it rises to it, with a warning (1 keeps the recall target).
        review_fraction: the share of good validation images the uncertain band may hold.
        uncertain_floor: the band never reaches below this x the threshold.
        opset: ONNX opset.
        batch_size: images per inference call (the distance matrix is images x patches x bank).
        pack: also write model.tar.gz beside output_dir.
    """

    max_bundle_mb: float = 50.0
    parity_tolerance: float = 1e-3
    parity_images: int = 64
    max_auroc_drop: float = 0.005
    calibration_images: int = 64
    threshold_rule: str = "false_reject"
    false_reject_rate: float = 0.01
    target_recall: float = 0.99
    max_false_reject: float = MAX_FALSE_REJECT
    review_fraction: float = 0.05
    uncertain_floor: float = 0.5
    opset: int = 18
    batch_size: int = 8
    pack: bool = True

    def __post_init__(self) -> None:
        if not 1.0 <= self.max_bundle_mb <= 4096.0:
            raise ConfigError("max_bundle_mb", self.max_bundle_mb, "from 1 to 4096 MiB")
        if not 0.0 < self.parity_tolerance < 1.0:
            raise ConfigError("export.parity_tolerance", self.parity_tolerance, "a fraction in (0, 1)")
        if self.threshold_rule not in RULES:
            raise ConfigError("threshold_rule", self.threshold_rule, f"one of {', '.join(RULES)}")
        if not 0.0 <= self.false_reject_rate < 1.0:
            raise ConfigError("false_reject_rate", self.false_reject_rate, "a fraction from 0 to below 1")
        check_number("export.max_false_reject", self.max_false_reject, 0.0, 1.0)
        for name in ("parity_images", "calibration_images", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"export.{name}", getattr(self, name), "at least 1")


@dataclass(frozen=True)
class BankPlan:
    """How the bank is stored to keep the bundle within its bound.

    Attributes:
        size: bank patches kept (a greedy prefix of the fitted bank).
        dtype: float32 or float16 (stored; the graph computes in float32).
        estimated_bytes: the bundle's estimated size with this plan.
        reason: why the plan differs from the fitted bank, or "" when it does not.
    """

    size: int
    dtype: str
    estimated_bytes: int
    reason: str = ""


def plan_bank(trunk_bytes: int, bank_size: int, dim: int, max_bytes: int, *, int8: bool,
              neo: bool = False) -> BankPlan:
    """Full float32 bank when it fits; else float16; else the greedy prefix that fits in float16.

    The estimate counts the backbone once in float32, with INT8 once more at a quarter, with the
    Neo ONNX (model.neo.onnx, a second float32 graph) once more in full, and the bank once per graph.
    """
    graphs = 1 + int8 + neo
    fixed = trunk_bytes + (trunk_bytes // 4 if int8 else 0) + (trunk_bytes if neo else 0) + _OVERHEAD_BYTES

    def size_of(rows: int, width: int) -> int:
        return fixed + graphs * rows * dim * width

    if size_of(bank_size, 4) <= max_bytes:
        return BankPlan(bank_size, "float32", size_of(bank_size, 4))
    if size_of(bank_size, 2) <= max_bytes:
        return BankPlan(bank_size, "float16", size_of(bank_size, 2),
                        f"a float32 bank ({size_of(bank_size, 4) / _MB:.1f} MiB estimated) is over the bound: "
                        "stored in float16")
    rows = (max_bytes - fixed) // (graphs * dim * 2)
    if rows < 1:
        raise ExportError(f"the backbone alone ({fixed / _MB:.1f} MiB) is over the bundle bound "
                          f"{max_bytes / _MB:.1f} MiB; raise --max-bundle-mb or choose a smaller --arch")
    return BankPlan(int(rows), "float16", size_of(int(rows), 2),
                    f"a float16 bank of {bank_size} ({size_of(bank_size, 2) / _MB:.1f} MiB estimated) is over the "
                    f"bound: cut to its first {rows} patches (a greedy k-center prefix is itself a coreset)")


@dataclass
class _Scored:
    """Validation raw outputs per runtime, in input order of the readable images."""

    paths: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    brightness: list[float] = field(default_factory=list)
    scores: dict[str, list[np.ndarray]] = field(default_factory=dict)
    torch_scores: list[np.ndarray] = field(default_factory=list)
    torch_maps: list[np.ndarray] = field(default_factory=list)
    onnx_maps: list[np.ndarray] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)

    def raw(self, precision: str) -> np.ndarray:
        return np.concatenate(self.scores[precision]) if self.scores.get(precision) else np.zeros(0)


def export_anomaly_bundle(
    embedding: PatchEmbedding,
    fit: FitResult,
    *,
    output_dir: Path,
    spec: PreprocessSpec,
    architecture: str,
    name: str,
    version: str,
    run_id: str,
    data_fingerprint: str,
    validation: Sequence[tuple[str, bool]],
    calibration_paths: Sequence[str],
    int8: bool = True,
    neo_onnx: bool = False,
    describe: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    options: AnomalyExportOptions | None = None,
) -> Bundle:
    """Export a fitted bank and its backbone into a verified anomaly bundle at output_dir.

    Args:
        embedding: the patch embedding the bank was fitted with.
        fit: the fitted bank (qcsight_train.anomaly.model.fit_bank).
        output_dir: the bundle directory; absent, empty, or an earlier bundle (replaced).
        spec: the preprocessing the bank was fitted with.
        architecture, name, version, run_id, data_fingerprint: recorded in the manifest.
        validation: held-out (path, is_defect): parity, threshold, INT8 gate, drift reference.
        calibration_paths: images for INT8 calibration (good training images).
        int8: try INT8 (kept only when it passes its gate).
        neo_onnx: also write model.neo.onnx (IR 7, opset 12, batch 1: what SageMaker Neo compiles), kept only
            when ONNX Runtime gives model.onnx's scores and maps on validation images; counted in the size bound.
        describe: the method's settings, recorded as the manifest's extra.anomaly.
        config: the resolved training configuration, written as config.json.
        options: gates and knobs.

    Raises:
        ParityError: ONNX Runtime on qcsight_core preprocessing disagrees with PyTorch.
        ExportError: export failed, no validation image is readable, or the bundle is over its bound.
    """
    options = options or AnomalyExportOptions()
    output_dir = Path(output_dir)
    if not any(not defect for _, defect in validation):
        raise ExportError("validation holds no good image: the threshold is chosen on held-out good images")
    with staged_bundle(output_dir) as staging, tempfile.TemporaryDirectory(prefix="qcsight-export-") as scratch:
        job = _AnomalyExport(embedding, fit, staging, Path(scratch), spec, options)
        manifest = job.run(validation, calibration_paths, int8=int8, neo_onnx=neo_onnx, base=Manifest(
            name=name, version=version, architecture=architecture, classes=(GOOD, ANOMALY),
            defect_classes=(ANOMALY,), input=spec, task="anomaly", output=anomaly.OUTPUT_KIND,
            models=(ModelFile(ONNX_FILE),), data_fingerprint=data_fingerprint, run_id=run_id,
            extra={"anomaly": dict(describe or {})}))
        if config is not None:
            write_config(staging / CONFIG_FILE, config)
        write_bundle(staging, manifest)
        total = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
        if total > options.max_bundle_mb * _MB:
            raise ExportError(f"the bundle is {total / _MB:.1f} MiB, over the bound of {options.max_bundle_mb:g} MiB")
    if options.pack:
        log.info("packed %s", pack_bundle(output_dir, output_dir.parent / TARBALL_NAME))
    bundle = load_bundle(output_dir)
    log.info("anomaly bundle %s %s written to %s (%s)", name, version, output_dir,
             ", ".join(m.file for m in bundle.manifest.models))
    return bundle


class _AnomalyExport:
    """One export's steps in order, sharing the staging directory and what earlier steps measured."""

    def __init__(self, embedding: PatchEmbedding, fit: FitResult, staging: Path, scratch: Path,
                 spec: PreprocessSpec, options: AnomalyExportOptions) -> None:
        self.embedding = embedding
        self.fit = fit
        self.staging = staging
        self.scratch = scratch
        self.spec = spec
        self.options = options
        self.warnings: list[str] = []

    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)

    def run(self, validation: Sequence[tuple[str, bool]], calibration_paths: Sequence[str], *, int8: bool,
            base: Manifest, neo_onnx: bool = False) -> Manifest:
        trunk_bytes = sum(p.numel() * p.element_size() for p in self.embedding.parameters())
        trunk_bytes += sum(b.numel() * b.element_size() for b in self.embedding.buffers())
        fitted, dim = int(self.fit.bank.shape[0]), int(self.fit.bank.shape[1])
        plan = plan_bank(trunk_bytes, fitted, dim, int(self.options.max_bundle_mb * _MB), int8=int8, neo=neo_onnx)
        if plan.reason:
            self._warn(plan.reason)
        model = build_model(self.embedding, self.fit, plan.size, float16_bank=plan.dtype == "float16")
        details = export_graph(model, self.staging / ONNX_FILE, (self.spec.channels, self.spec.height,
                                                                self.spec.width), self.options.opset)
        if plan.dtype == "float16":
            store_bank_float16(self.staging / ONNX_FILE, model)
        int8_record: dict[str, Any] = {"kept": False, "reason": "not requested"}
        entries = [ModelFile(ONNX_FILE, details=details)]
        if int8:
            int8_entry, int8_record = self._quantize(calibration_paths)
            if int8_entry is not None:
                entries.append(int8_entry)
        scored = self._score(validation, replace(base, models=tuple(entries)), model)
        parity = self._parity(scored)
        neo_record: dict[str, Any] = {"written": False, "reason": "not requested"}
        if neo_onnx:
            neo_entry, neo_record = self._neo_onnx(model, scored, float16_bank=plan.dtype == "float16")
            if neo_entry is not None:
                entries.append(neo_entry)
        is_defect = np.array([label == ANOMALY for label in scored.labels])
        fp32_raw = scored.raw("fp32")
        threshold = self._threshold(fp32_raw, is_defect)
        fp32_auroc = roc_auc(is_defect, fp32_raw)
        entries[0] = replace(entries[0], details={**entries[0].details, anomaly.SCORE_SCALE_KEY: threshold.raw})
        int8_at = next((i for i, e in enumerate(entries) if e.precision == "int8"), None)
        if int8_at is not None:
            kept, int8_record = self._int8_verdict(scored, is_defect, fp32_auroc, int8_record)
            if kept is None:
                entries.pop(int8_at)
                (self.staging / INT8_FILE).unlink(missing_ok=True)
            else:
                entries[int8_at] = replace(entries[int8_at], details={**entries[int8_at].details, **kept})
        entries = [replace(e, details={**e.details, anomaly.SCORE_SCALE_KEY: threshold.raw})
                   if e.format == NEO_ONNX_FORMAT else e for e in entries]
        good = ~is_defect
        normalised = fp32_raw / threshold.raw
        bank = {"fitted": fitted, "size": plan.size, "dim": dim, "dtype": plan.dtype,
                "bytes": plan.size * dim * (2 if plan.dtype == "float16" else 4),
                "training_patches": self.fit.patches, "coreset_candidates": self.fit.candidates,
                "grid": list(self.fit.grid), "reason": plan.reason or None}
        sizes = {"bound_mib": self.options.max_bundle_mb, "estimated_mib": plan.estimated_bytes / _MB,
                 **{f"{e.precision}_graph_mib": (self.staging / e.file).stat().st_size / _MB for e in entries}}
        metrics = {
            "validation": {"images": len(scored.paths), "good_images": int(good.sum()),
                           "defect_images": int(is_defect.sum()), "image_auroc": fp32_auroc,
                           "unreadable": len(scored.unreadable)},
            "parity": parity, "threshold": threshold.record, "int8": int8_record, "neo_onnx": neo_record,
            "bank": bank, "size": sizes,
            "warnings": self.warnings,
        }
        reference = {
            "confidence": histogram(normalised[good], SCORE_EDGES).to_dict(),
            "brightness": histogram(np.asarray(scored.brightness)[good], BRIGHTNESS_EDGES).to_dict(),
            "images": int(good.sum()),
            "source": "validation good images (confidence = the normalised anomaly score)",
        }
        policy = DecisionPolicy(defect_threshold=1.0, uncertain_threshold=threshold.uncertain,
                                target_defect_recall=(self.options.target_recall
                                                      if threshold.record.get("rule_requested") == "defect_recall"
                                                      and "fallback" not in threshold.record else None))
        extra = {"anomaly": {**dict(base.extra.get("anomaly", {})), "bank": bank,
                             "score_map": {"height": self.fit.grid[0], "width": self.fit.grid[1],
                                           "smoothing_sigma_px": anomaly.SMOOTHING_SIGMA}}}
        return replace(base, decision=policy, models=tuple(entries), metrics=json_safe(metrics),
                       reference=reference, extra=json_safe(extra),
                       created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def _neo_onnx(self, model: MemoryBankModel, scored: _Scored, *,
                  float16_bank: bool) -> tuple[ModelFile | None, dict[str, Any]]:
        """model.neo.onnx (IR 7, opset 12, batch 1) for SageMaker Neo, checked against model.onnx with ONNX Runtime.

        The same backbone and bank as model.onnx (the bank stored as model.onnx stores it), raw
        score and map out: the manifest's score_scale divides them as it does model.onnx's.
        """
        import onnxruntime as ort

        path = self.staging / NEO_ONNX_FILE
        shape = (self.spec.channels, self.spec.height, self.spec.width)
        try:
            details = export_neo_onnx(model, path, shape, (anomaly.SCORE_OUTPUT, anomaly.MAP_OUTPUT))
            if float16_bank:
                store_bank_float16(path, model)
        except ExportError as exc:
            path.unlink(missing_ok=True)
            self._warn(f"{NEO_ONNX_FILE} not written: {exc}")
            return None, {"written": False, "reason": str(exc)}
        paths = list(scored.paths[:NEO_PARITY_IMAGES])
        session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
        got = [session.run(None, {INPUT_NAME: preprocess(read_image(p), self.spec)}) for p in paths]
        got_scores = np.array([float(np.ravel(score)[0]) for score, _ in got])
        want_scores = scored.raw("fp32")[: len(paths)]
        scale = max(float(np.abs(want_scores).max()), 1e-12) if paths else 1.0
        score_diff = float(np.abs(got_scores - want_scores).max()) if paths else 0.0
        map_diff = 0.0
        if scored.onnx_maps and paths:
            want_maps = np.concatenate(scored.onnx_maps)[: len(paths)]
            got_maps = np.concatenate([np.asarray(m, dtype=np.float64).reshape(1, *want_maps.shape[1:])
                                       for _, m in got])[: want_maps.shape[0]]
            map_diff = float(np.abs(got_maps - want_maps[: got_maps.shape[0]]).max())
        tolerance = self.options.parity_tolerance
        record = {"written": True, "images": len(paths), "max_abs_score_diff_vs_fp32": score_diff,
                  "max_abs_map_diff_vs_fp32": map_diff, "relative_to": scale, "tolerance": tolerance, **details}
        if max(score_diff, map_diff) > tolerance * scale:
            path.unlink(missing_ok=True)
            self._warn(f"{NEO_ONNX_FILE} not written: it differs from model.onnx by {max(score_diff, map_diff):.3g} "
                       f"(> {tolerance:g} x {scale:.3g}) on {len(paths)} validation images")
            return None, {**record, "written": False, "reason": "parity with model.onnx failed"}
        log.info("%s: IR %d opset %d, parity with model.onnx on %d images: max |Δscore| %.3g, max |Δmap| %.3g",
                 NEO_ONNX_FILE, details["ir_version"], details["opset"], len(paths), score_diff, map_diff)
        entry = ModelFile(NEO_ONNX_FILE, format=NEO_ONNX_FORMAT, precision="fp32", runtime="sagemaker-neo",
                          details={**details, "max_abs_score_diff_vs_fp32": score_diff, "parity_images": len(paths)})
        return entry, record

    def _quantize(self, calibration_paths: Sequence[str]) -> tuple[ModelFile | None, dict[str, Any]]:
        if not calibration_paths:
            self._warn("INT8 dropped: no calibration images were given")
            return None, {"kept": False, "reason": "no calibration images"}
        try:
            used, kept_float = quantize_backbone(self.staging / ONNX_FILE, self.staging / INT8_FILE,
                                                 calibration_paths, self.spec, self.scratch,
                                                 limit=self.options.calibration_images)
        except ExportError as exc:
            (self.staging / INT8_FILE).unlink(missing_ok=True)
            self._warn(f"INT8 dropped: {exc}")
            return None, {"kept": False, "reason": f"quantisation failed: {exc}"}
        details = {"quantization": INT8_SCHEME, "calibration_images": used, "float_nodes": kept_float}
        return ModelFile(INT8_FILE, precision="int8", details=details), {"calibration_images": used}

    def _score(self, validation: Sequence[tuple[str, bool]], probe: Manifest, model: MemoryBankModel) -> _Scored:
        """Raw validation outputs of every runtime through qcsight_core, and PyTorch's on the first images."""
        runners = {entry.precision: OnnxRunner(Bundle(self.staging, probe),
                                               RunnerOptions(precision=entry.precision, warmup_runs=0))
                   for entry in probe.models}
        scored = _Scored(scores={name: [] for name in runners})
        pairs = [(path, ANOMALY if defect else GOOD) for path, defect in validation]
        log.info("scoring %d validation images (ONNX %s; PyTorch on the first %d)", len(pairs), " + ".join(runners),
                 min(len(pairs), self.options.parity_images))
        last_report = time.monotonic()
        for batch, images in decode_batches(pairs, self.options.batch_size, scored.unreadable):
            if time.monotonic() - last_report >= _PROGRESS_S:
                log.info("validation: %d/%d images scored", len(scored.paths) + len(scored.unreadable), len(pairs))
                last_report = time.monotonic()
            kept, kept_images = [], []
            for (path, label), image in zip(batch, images, strict=True):
                try:
                    pixels = prepare_pixels(image, self.spec)
                except PreprocessError as exc:
                    scored.unreadable.append(Unreadable(path, label, str(exc)))
                    continue
                kept.append((path, label))
                kept_images.append(image)
                scored.brightness.append(input_statistics(pixels, self.spec.color).brightness)
            if not kept:
                continue
            tensor = preprocess_batch(kept_images, self.spec)
            room = self.options.parity_images - sum(map(len, scored.torch_scores))
            for precision, runner in runners.items():
                outputs = runner.infer(tensor)
                scored.scores[precision].append(outputs.scores[:, 0].astype(np.float64))
                if precision == "fp32" and room > 0 and outputs.maps is not None:
                    scored.onnx_maps.append(outputs.maps[:room].astype(np.float64))
            if room > 0:
                torch_score, torch_map = raw_scores(model, tensor[:room])
                scored.torch_scores.append(torch_score)
                scored.torch_maps.append(torch_map)
            scored.paths.extend(p for p, _ in kept)
            scored.labels.extend(label for _, label in kept)
        if not scored.paths:
            first = scored.unreadable[0] if scored.unreadable else None
            raise ExportError(f"none of the {len(pairs)} validation images could be read"
                              + (f" (first: {first.path}: {first.reason})" if first else ""))
        for bad in scored.unreadable[:20]:
            self.warnings.append(f"validation image {bad.path} unreadable: {bad.reason}")
        return scored

    def _parity(self, scored: _Scored) -> dict[str, Any]:
        torch_scores = np.concatenate(scored.torch_scores)
        count = torch_scores.size
        onnx_scores = scored.raw("fp32")[:count]
        torch_maps = np.concatenate(scored.torch_maps)
        onnx_maps = np.concatenate(scored.onnx_maps)[:count]
        scale = max(float(np.abs(torch_scores).max()), 1e-12)
        score_diff = float(np.abs(torch_scores - onnx_scores).max())
        map_diff = float(np.abs(torch_maps - onnx_maps).max())
        tolerance = self.options.parity_tolerance
        record = {"images": count, "max_abs_score_diff": score_diff, "max_abs_map_diff": map_diff,
                  "relative_to": scale, "max_relative_diff": max(score_diff, map_diff) / scale,
                  "tolerance": tolerance,
                  "compared": "PyTorch on qcsight_core preprocessing vs ONNX Runtime (read_image -> "
                              "preprocess_batch -> OnnxRunner.infer), raw scores and maps"}
        log.info("parity gate: %d images, max |Δscore| %.3g, max |Δmap| %.3g (largest score %.3g, tolerance %g)",
                 count, score_diff, map_diff, scale, tolerance)
        if max(score_diff, map_diff) <= tolerance * scale:
            return record
        row = int(np.abs(torch_scores - onnx_scores).argmax())
        raise ParityError(
            f"parity gate failed on {count} held-out image(s): max |Δscore| {score_diff:.3g}, max |Δmap| "
            f"{map_diff:.3g} > {tolerance:g} x the largest score {scale:.3g} (worst image {scored.paths[row]}). "
            "No bundle was written.", max_abs_diff=max(score_diff, map_diff), tolerance=tolerance * scale)

    def _threshold(self, raw: np.ndarray, is_defect: np.ndarray) -> AnomalyThreshold:
        o = self.options
        threshold = choose_threshold(raw, is_defect, rule=o.threshold_rule, false_reject_rate=o.false_reject_rate,
                                     target_recall=o.target_recall, review_fraction=o.review_fraction,
                                     uncertain_floor=o.uncertain_floor, max_false_reject=o.max_false_reject)
        for key in ("fallback", "false_reject_warning"):
            if key in threshold.record:
                self._warn(threshold.record[key])
        log.info("threshold: raw %.4g (%s); normalised uncertain band from %.3f", threshold.raw,
                 threshold.record["rule"], threshold.uncertain)
        return threshold

    def _int8_verdict(self, scored: _Scored, is_defect: np.ndarray, fp32_auroc: float | None,
                      record: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """INT8's details when kept (its own score_scale), else None; and the record either way."""
        int8_raw = scored.raw("int8")
        int8_auroc = roc_auc(is_defect, int8_raw)
        allowed = self.options.max_auroc_drop
        numbers = {"image_auroc_fp32": fp32_auroc, "image_auroc_int8": int8_auroc, "max_auroc_drop": allowed,
                   "validation_images": int(is_defect.size), "validation_defects": int(is_defect.sum())}
        if fp32_auroc is None or int8_auroc is None:
            reason = "validation holds no labelled defect, so image AUROC (the INT8 gate) cannot be measured"
            self._warn(f"INT8 dropped: {reason}")
            return None, {**record, **numbers, "kept": False, "reason": reason}
        drop = fp32_auroc - int8_auroc
        kept = drop <= allowed
        reason = (f"validation image AUROC drop {drop:.4f} {'<=' if kept else '>'} allowed {allowed:g} "
                  f"(fp32 {fp32_auroc:.4f}, int8 {int8_auroc:.4f})")
        record = {**record, **numbers, "auroc_drop": drop, "kept": kept, "reason": reason}
        if not kept:
            self._warn(f"INT8 dropped: {reason}")
            return None, record
        threshold = self._threshold(int8_raw, is_defect)
        record["threshold"] = threshold.record
        log.info("INT8 kept: %s", reason)
        return {anomaly.SCORE_SCALE_KEY: threshold.raw, "image_auroc": int8_auroc, "auroc_drop": drop}, record


INT8_SCHEME = ("static QDQ (onnxruntime.quantization.quantize_static after quant_pre_process) of the backbone's "
               "convolutions only: per-channel symmetric int8 weights, uint8 activations, MinMax calibration on "
               "good training images; the first convolution, the projection and the bank distances stay float")


def quantize_backbone(fp32_path: Path, int8_path: Path, calibration_paths: Sequence[str], spec: PreprocessSpec,
                      scratch: Path, *, limit: int) -> tuple[int, list[str]]:
    """Quantise the backbone's convolutions to INT8 QDQ; returns (calibration images used, nodes kept float)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from qcsight_train.quantize import ImageCalibrationReader

    reader = ImageCalibrationReader(calibration_paths, spec, INPUT_NAME, batch_size=8, limit=limit)
    prepared = scratch / "model.prep.onnx"
    try:
        # onnxruntime's symbolic shape inference fails on the exporter's Reshape of the score map
        # ('NoneType' object is not iterable in 1.32); ONNX's own shape inference handles it.
        quant_pre_process(os.fspath(fp32_path), os.fspath(prepared), skip_symbolic_shape=True)
        graph = onnx.load(os.fspath(prepared)).graph
        # The stem sees raw pixels and costs little in float (as for classifiers).
        first_conv = [n.name for n in graph.node if n.op_type == "Conv"][:1]
        quantize_static(os.fspath(prepared), os.fspath(int8_path), reader, quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["Conv"],
                        nodes_to_exclude=first_conv)
    except Exception as exc:  # onnxruntime.quantization raises untyped errors
        int8_path.unlink(missing_ok=True)
        if reader.paths and len(reader.skipped) == len(reader.paths):
            raise ExportError(f"none of the {len(reader.paths)} calibration images could be read") from exc
        raise ExportError(f"{fp32_path.name}: INT8 quantisation failed: {exc}") from exc
    log.info("quantised the backbone to INT8 with %d calibration images", reader.used)
    return reader.used, first_conv


def export_graph(model: MemoryBankModel, path: Path, input_shape: tuple[int, int, int], opset: int) -> dict[str, Any]:
    """One self-contained ONNX file: input -> (score, score_map), dynamic batch; checked; returns manifest details.

    The dynamo exporter, as for classifiers (qcsight_train.export.export_onnx), with an example
    batch of 2 because torch.export specialises a dimension of size 1.
    """
    import onnx

    example = torch.zeros(2, *input_shape)
    try:
        with quiet_loggers(EXPORTER_LOGGERS):
            torch.onnx.export(model, (example,), os.fspath(path), dynamo=True, external_data=False,
                              input_names=[INPUT_NAME], output_names=[anomaly.SCORE_OUTPUT, anomaly.MAP_OUTPUT],
                              opset_version=opset, dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                              verbose=False)
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(f"torch.onnx.export (dynamo, opset {opset}) failed: {exc}") from exc
    try:
        onnx.checker.check_model(os.fspath(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path}: onnx.checker rejects the exported model: {exc}") from exc
    proto = onnx.load(os.fspath(path), load_external_data=False)
    ops = sorted({n.op_type for n in proto.graph.node})
    if "Loop" in ops or "Scan" in ops:
        raise ExportError(f"{path}: the graph holds a loop ({ops}); the distances must be one matrix product")
    outputs = [o.name for o in proto.graph.output]
    log.info("exported %s: outputs %s, %d nodes", path.name, outputs, len(proto.graph.node))
    return {"opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            "exporter": f"torch.onnx dynamo (torch {torch.__version__})", "input_name": INPUT_NAME,
            "outputs": outputs, "batch_axis": "batch"}


def store_bank_float16(path: Path, model: MemoryBankModel) -> None:
    """Rewrite the graph so the bank's initializer is float16, cast to float32 where it is used."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(os.fspath(path))
    bank = model.bank_t.numpy()
    target = next((t for t in proto.graph.initializer if tuple(t.dims) == bank.shape
                   and np.array_equal(numpy_helper.to_array(t), bank)), None)
    if target is None:
        raise ExportError(f"{path}: the bank's initializer was not found in the exported graph")
    half = numpy_helper.from_array(bank.astype(np.float16), target.name + "_fp16")
    proto.graph.initializer.remove(target)
    proto.graph.initializer.append(half)
    proto.graph.node.insert(0, helper.make_node("Cast", [half.name], [target.name], to=TensorProto.FLOAT,
                                                name="bank_to_float32"))
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, os.fspath(path))
