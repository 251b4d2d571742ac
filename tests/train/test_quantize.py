"""Static INT8 calibration uses every calibration image, whatever the batch count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from qcsight_core.preprocess import preprocess_batch
from qcsight_train.quantize import quantize_int8
from tests.helpers.images import read_back, write_image
from tests.helpers.models import make_tiny_bundle


# 32 images in batches of 8 is 4 batches: the count at which onnxruntime 1.32's own
# CalibMaxIntermediateOutputs=4 discarded everything ("No data is collected").
@pytest.mark.parametrize("count", [32, 13])
def test_every_calibration_image_is_used(tmp_path: Path, count: int) -> None:
    bundle = make_tiny_bundle(tmp_path / "b", size=32)
    paths = [str(write_image(tmp_path / "cal" / f"{i}.png", value=8 * i % 256, seed=i)) for i in range(count)]
    result = quantize_int8(bundle.path / "model.onnx", tmp_path / "int8.onnx", paths, bundle.manifest.input,
                           scratch_dir=tmp_path, batch_size=8, limit=64)
    assert result.calibration_images == count and result.skipped == ()
    batch = preprocess_batch([read_back(p) for p in paths[:8]], bundle.manifest.input)
    fp32 = ort.InferenceSession(str(bundle.path / "model.onnx")).run(None, {"input": batch})[0]
    int8 = ort.InferenceSession(str(tmp_path / "int8.onnx")).run(None, {"input": batch})[0]
    assert np.abs(fp32 - int8).max() < 0.05
