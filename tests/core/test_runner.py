"""OnnxRunner on a real (tiny) ONNX model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qcsight_core.bundle import Bundle
from qcsight_core.errors import BundleFileMissingError, ConfigError, RunnerError
from qcsight_core.preprocess import preprocess_batch
from qcsight_core.runner import OnnxRunner, RunnerOptions
from qcsight_core.verdict import Decider


def test_dark_is_good_and_bright_is_a_defect(tiny_bundle: Bundle) -> None:
    runner = OnnxRunner(tiny_bundle, RunnerOptions(intra_op_threads=1))
    images = [np.full((40, 60, 3), v, np.uint8) for v in (0, 255)]
    probs = runner.run(preprocess_batch(images, tiny_bundle.manifest.input))
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    verdicts = Decider(tiny_bundle.manifest).decide_batch(probs)
    assert [v.status for v in verdicts] == ["good", "defect"]
    assert verdicts[1].label == "spot"


def test_wrong_input_shape_is_a_runner_error(tiny_bundle: Bundle) -> None:
    runner = OnnxRunner(tiny_bundle, RunnerOptions(warmup_runs=0))
    with pytest.raises(RunnerError, match="does not match"):
        runner.run(np.zeros((1, 1, 32, 32), np.float32))


def test_int8_requested_but_absent(tiny_bundle: Bundle) -> None:
    with pytest.raises(BundleFileMissingError, match="no int8 ONNX model"):
        OnnxRunner(tiny_bundle, RunnerOptions(precision="int8"))
    assert OnnxRunner(tiny_bundle, RunnerOptions(precision="auto")).precision == "fp32"
    with pytest.raises(ConfigError, match="precision"):
        RunnerOptions(precision="fp16")


def test_garbage_model_file_is_a_runner_error(tmp_path: Path, tiny_bundle: Bundle) -> None:
    (tiny_bundle.path / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(RunnerError, match="cannot load"):
        OnnxRunner(tiny_bundle)
