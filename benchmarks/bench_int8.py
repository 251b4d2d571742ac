"""INT8 against FP32 for a finished training run: validation accuracy and batch-1 latency, in one run.

Re-quantises the run's FP32 `bundle/model.onnx` with `qcsight_train.quantize.quantize_int8` (the
export's own code, so the current quantisation scheme), calibrated on the same training images
the export uses, then scores the run's validation split with both models through qcsight_core
preprocessing and times batch-1 inference on one ONNX Runtime thread. The run directory is
what `qcsight train --output` wrote (config.yaml, bundle/).

    .venv/bin/python benchmarks/bench_int8.py runs/mt runs/elpv
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import yaml

from qcsight_core.bundle import load_bundle
from qcsight_core.imageio import read_image
from qcsight_core.preprocess import preprocess_batch
from qcsight_train.config import build_config
from qcsight_train.data import load_data
from qcsight_train.quantize import quantize_int8
from qcsight_train.run import calibration_paths


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    session = _session(path, 2)
    name = session.get_inputs()[0].name
    probs = np.concatenate([session.run(None, {name: x[i:i + 32]})[0] for i in range(0, len(x), 32)])
    return float((probs.argmax(axis=1) == y).mean())


def _latency_ms(path: Path, x: np.ndarray, runs: int = 60) -> float:
    session = _session(path, 1)
    name = session.get_inputs()[0].name
    for i in range(5):
        session.run(None, {name: x[i % len(x):i % len(x) + 1]})
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for i in range(runs):
            session.run(None, {name: x[i % len(x):i % len(x) + 1]})
        best = min(best, (time.perf_counter() - start) / runs * 1000)
    return best


def measure(run: Path, calibration_images: int) -> dict[str, Any]:
    cfg = build_config(yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")))
    with tempfile.TemporaryDirectory(prefix="qcsight-bench-int8-") as tmp:
        scratch = Path(tmp)
        splits = load_data(cfg, scratch / "cache")
        bundle = load_bundle(run / "bundle")
        spec = bundle.manifest.input
        fp32 = run / "bundle" / "model.onnx"
        result = quantize_int8(fp32, scratch / "model.int8.onnx", calibration_paths(splits.train, calibration_images),
                               spec, scratch_dir=scratch)
        val = [(s.path, splits.classes.index(s.label)) for s in splits.val]
        x = preprocess_batch([read_image(p) for p, _ in val], spec)
        y = np.array([label for _, label in val])
        acc_fp32, acc_int8 = _accuracy(fp32, x, y), _accuracy(result.path, x, y)
        lat_fp32, lat_int8 = _latency_ms(fp32, x), _latency_ms(result.path, x)
    return {"run": str(run), "validation_images": len(val), "calibration_images": result.calibration_images,
            "float_nodes": list(result.kept_float), "accuracy_fp32": round(acc_fp32, 4),
            "accuracy_int8": round(acc_int8, 4), "drop_points": round(100 * (acc_fp32 - acc_int8), 2),
            "latency_ms_fp32": round(lat_fp32, 2), "latency_ms_int8": round(lat_int8, 2),
            "speedup": round(lat_fp32 / lat_int8, 2)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="`qcsight train --output` directories")
    parser.add_argument("--calibration-images", type=int, default=64, help="as `qcsight train` (default 64)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    results = []
    for run in args.runs:
        if not (run / "config.yaml").is_file() or not (run / "bundle" / "model.onnx").is_file():
            parser.error(f"{run}: not a finished training run (needs config.yaml and bundle/model.onnx)")
        results.append(measure(run, args.calibration_images))
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
