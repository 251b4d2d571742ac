"""A tiny, real ONNX classifier bundle built with onnx.helper (no torch).

The model averages each input channel over the image and applies a fixed linear layer
and a softmax, so its answer is predictable: bright images score as the defect class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from qcsight_core.bundle import Bundle, DecisionPolicy, Manifest, ModelFile, write_bundle
from qcsight_core.preprocess import PreprocessSpec


def tiny_onnx_model(path: Path, channels: int, num_classes: int, weight: np.ndarray, bias: np.ndarray,
                    opset: int = 17) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, "H", "W"])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", num_classes])
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "W", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    inits = [
        numpy_helper.from_array(weight.astype(np.float32), "W"),
        numpy_helper.from_array(bias.astype(np.float32), "B"),
    ]
    graph = helper.make_graph(nodes, "qcsight_tiny", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def make_tiny_bundle(
    directory: Path,
    classes: Sequence[str] = ("good", "scratch", "spot"),
    defect_classes: Sequence[str] = ("scratch", "spot"),
    size: int = 32,
    color: str = "RGB",
    version: str = "1",
    decision: DecisionPolicy | None = None,
    name: str = "tiny",
) -> Bundle:
    """Write a verified bundle whose defect score rises with image brightness.

    With ImageNet mean/std a black image gives normalised values near -2 and a white one
    near +2.5; class 0 (good) wins on dark images, the last class on bright ones.
    """
    directory.mkdir(parents=True, exist_ok=True)
    spec = PreprocessSpec(height=size, width=size, color=color) if color != "GRAY" else PreprocessSpec(
        height=size, width=size, color="GRAY", mean=(0.5,), std=(0.25,))
    k = len(classes)
    slopes = np.linspace(-2.0, 2.0, k)
    weight = np.tile(slopes / spec.channels, (spec.channels, 1))
    bias = np.zeros(k)
    tiny_onnx_model(directory / "model.onnx", spec.channels, k, weight, bias)
    manifest = Manifest(
        name=name,
        version=version,
        architecture="tiny-gap-linear",
        classes=tuple(classes),
        defect_classes=tuple(defect_classes),
        input=spec,
        decision=decision or DecisionPolicy(defect_threshold=0.5, uncertain_threshold=0.5),
        models=(ModelFile("model.onnx", details={"opset": 17}),),
        data_fingerprint="test",
        run_id="test-run",
        reference={
            "confidence": {"edges": np.linspace(0, 1, 11).tolist(), "counts": [1] * 10},
            "brightness": {"edges": np.linspace(0, 255, 11).tolist(), "counts": [1] * 10},
        },
    )
    return write_bundle(directory, manifest)


def make_unloadable_bundle(directory: Path, version: str = "9", name: str = "tiny") -> Bundle:
    """A bundle that verifies (every file matches its sha256) but whose model ONNX Runtime cannot load.

    What a training bug or a bad conversion ships: transport checks pass, the agent's load and
    warm-up do not.
    """
    bundle = make_tiny_bundle(directory, version=version, name=name)
    (directory / "model.onnx").write_bytes(b"this is not an ONNX model")
    return write_bundle(directory, bundle.manifest)


def tiny_anomaly_model(path: Path, channels: int = 3, cell: int = 4, offset: float = 3.0, opset: int = 17) -> Path:
    """An ONNX graph with an anomaly bundle's outputs: the raw score map is the channel mean of the
    normalised input averaged over cell x cell blocks, plus offset (so positive); the score is its max."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, "H", "W"])
    score = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])
    score_map = helper.make_tensor_value_info("score_map", TensorProto.FLOAT, ["N", "h", "w"])
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["grey"], axes=[1], keepdims=1),
        helper.make_node("AveragePool", ["grey"], ["cells"], kernel_shape=[cell, cell], strides=[cell, cell]),
        helper.make_node("Add", ["cells", "offset"], ["shifted"]),
        helper.make_node("Squeeze", ["shifted", "axis1"], ["score_map"]),
        helper.make_node("ReduceMax", ["score_map"], ["score"], axes=[1, 2], keepdims=0),
    ]
    inits = [numpy_helper.from_array(np.array(offset, dtype=np.float32), "offset"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1")]
    graph = helper.make_graph(nodes, "qcsight_tiny_anomaly", [x], [score, score_map], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def make_tiny_anomaly_bundle(directory: Path, size: int = 32, score_scale: float = 4.0,
                             uncertain: float = 0.8, resize: str = "stretch", name: str = "tiny-anomaly") -> Bundle:
    """A verified anomaly bundle whose score rises with brightness: a bright patch is a hot region.

    A mid-grey image scores about offset + 0.2 = 3.2 raw, a white patch about 5.6 raw, so with
    score_scale 4 the first normalises to 0.8 and the second to 1.4.
    """
    from qcsight_core.anomaly import OUTPUT_KIND, SCORE_SCALE_KEY

    directory.mkdir(parents=True, exist_ok=True)
    tiny_anomaly_model(directory / "model.onnx")
    manifest = Manifest(
        name=name, version="1", architecture="tiny-mean-pool", classes=("good", "anomaly"),
        defect_classes=("anomaly",), input=PreprocessSpec(height=size, width=size, color="RGB", resize=resize),
        decision=DecisionPolicy(defect_threshold=1.0, uncertain_threshold=uncertain), task="anomaly",
        output=OUTPUT_KIND, models=(ModelFile("model.onnx", details={SCORE_SCALE_KEY: score_scale}),),
        data_fingerprint="test", run_id="test-run",
        reference={"confidence": {"edges": np.linspace(0, 2, 21).tolist(), "counts": [1] * 20},
                   "brightness": {"edges": np.linspace(0, 255, 11).tolist(), "counts": [1] * 10}},
    )
    return write_bundle(directory, manifest)
