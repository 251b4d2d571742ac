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


def _conv_classifier(path: Path) -> Path:
    """input -> Conv -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> Softmax."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)

    def init(name: str, shape: tuple[int, ...]) -> object:
        return numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="body", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="pool"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], name="classifier", transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny-conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 3])],
        [init("w1", (8, 3, 3, 3)), init("b1", (8,)), init("w2", (8, 8, 3, 3)), init("b2", (8,)),
         init("w3", (3, 8)), init("b3", (3,))])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_stem_and_classifier_stay_float_and_the_body_is_int8(tmp_path: Path) -> None:
    import onnx

    from qcsight_train.quantize import float_nodes

    fp32 = _conv_classifier(tmp_path / "conv.onnx")
    assert float_nodes(onnx.load(str(fp32))) == ["stem", "classifier", "softmax"]
    # With nothing between stem and classifier, everything but the Softmax is quantised.
    model = onnx.load(str(fp32))
    body = next(n for n in model.graph.node if n.name == "body")
    body.op_type, body.input[:] = "Identity", ["r1"]
    assert float_nodes(model) == ["softmax"]

    spec = make_tiny_bundle(tmp_path / "b", size=32).manifest.input
    paths = [str(write_image(tmp_path / "cal" / f"{i}.png", value=20 * i % 256, seed=i)) for i in range(16)]
    result = quantize_int8(fp32, tmp_path / "int8.onnx", paths, spec, scratch_dir=tmp_path, batch_size=8, limit=64)

    assert result.kept_float == ("stem", "classifier", "softmax")
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    produced_by = {out: node for node in graph.node for out in node.output}
    by_name = {node.name: node for node in graph.node}

    def int8_weights(name: str) -> bool:
        weight = by_name[name].input[1]
        return weight in produced_by and produced_by[weight].op_type == "DequantizeLinear"

    # The stem and the classifier keep their float weights; the convolution in between has int8 ones.
    assert not int8_weights("stem") and not int8_weights("classifier")
    assert int8_weights("body")
    assert produced_by["c1"] is by_name["stem"] and by_name["stem"].input[0] == "input"  # raw pixels, float
    batch = preprocess_batch([read_back(p) for p in paths[:8]], spec)
    out_fp32 = ort.InferenceSession(str(fp32)).run(None, {"input": batch})[0]
    out_int8 = ort.InferenceSession(str(tmp_path / "int8.onnx")).run(None, {"input": batch})[0]
    assert np.abs(out_fp32 - out_int8).max() < 0.05
