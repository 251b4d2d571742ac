"""The pipeline on a real ONNX model: queue overflow, corrupt frames, ROI, model hot swap between frames."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from qcsight_core.errors import BundleIntegrityError, QcsightError
from qcsight_edge.capture import Frame, OpenCvCamera
from qcsight_edge.clock import ManualClock, SystemClock
from qcsight_edge.config import ModelConfig, Roi, SourceConfig
from qcsight_edge.metrics import MetricsRecorder
from qcsight_edge.models import LoadedModel, ModelManager, Rejected, load_model
from qcsight_edge.pipeline import FrameQueue, Judgement, Pipeline
from tests.edge.agent_helpers import write_video
from tests.helpers.models import make_tiny_bundle
from tests.helpers.wait import eventually


class Collect:
    """A VerdictSink that keeps what it is given; can hold the inference thread to make it fall behind."""

    def __init__(self) -> None:
        self.items: list[tuple[Frame, Judgement, LoadedModel]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.holding = threading.Event()

    def on_verdict(self, frame: Frame, judgement: Judgement, model: LoadedModel,
                   finish: Callable[[Frame, bool], None]) -> None:
        self.items.append((frame, judgement, model))
        finish(frame, True)
        if not self.hold.is_set():
            self.holding.set()
            assert self.hold.wait(10.0)


class NullSource:
    lossless = False
    exhausted = False

    def __init__(self) -> None:
        self.finished: list[tuple[str, bool]] = []

    def read(self, timeout_s: float) -> Frame | None:
        time.sleep(timeout_s)
        return None

    def finish(self, frame: Frame, ok: bool) -> None:
        self.finished.append((frame.frame_id, ok))

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, object]:
        return {}


def model_at(path: Path, version: str = "1") -> LoadedModel:
    make_tiny_bundle(path, version=version)
    return load_model(ModelConfig(bundle=path, warmup_runs=0, intra_op_threads=1))


def grey(value: int, shape: tuple[int, ...] = (48, 64, 3)) -> np.ndarray:
    return np.full(shape, value, np.uint8)


@pytest.fixture
def tiny(tmp_path: Path) -> LoadedModel:
    return model_at(tmp_path / "v1")


def make_pipeline(model: LoadedModel, source: object, sink: Collect, clock: object = None, **kw: object) -> Pipeline:
    clock = clock or ManualClock()
    models = ModelManager(model, ModelConfig(bundle=model.source), on_rejected=kw.pop("on_rejected", print))  # type: ignore[arg-type]
    metrics = MetricsRecorder(clock, 64, model.reference)  # type: ignore[arg-type]
    return Pipeline(source, models, sink, metrics, clock, **kw)  # type: ignore[arg-type]


def test_queue_drops_the_oldest_and_counts() -> None:
    queue = FrameQueue(2)
    frames = [Frame(str(i), grey(0), "t") for i in range(5)]
    dropped = [queue.put(f) for f in frames]
    assert [d.frame_id if d else None for d in dropped] == [None, None, "0", "1", "2"]
    assert queue.dropped == 3
    assert [queue.get(0.01).frame_id for _ in range(2)] == ["3", "4"]  # type: ignore[union-attr]
    assert queue.get(0.01) is None
    assert queue.put_wait(frames[0], 0.01) and queue.put_wait(frames[1], 0.01)
    assert not queue.put_wait(frames[2], 0.05)  # lossless: waits for room, never drops


def test_when_inference_falls_behind_the_oldest_frames_are_dropped(tmp_path: Path, tiny: LoadedModel) -> None:
    values = list(range(0, 250, 5))  # 50 frames, each a distinct grey
    video = write_video(tmp_path / "line.avi", values)
    source = OpenCvCamera(SourceConfig(kind="camera", uri=str(video), max_fps=0))
    sink = Collect()
    sink.hold.clear()  # the first verdict blocks inference until the camera has given every frame
    pipeline = make_pipeline(tiny, source, sink, clock=SystemClock(), queue_size=2)
    cv2.setNumThreads(2)
    pipeline.start()
    assert cv2.getNumThreads() == 1  # the stage threads are the parallelism, not OpenCV's pool
    assert sink.holding.wait(10.0)
    eventually(lambda: source.exhausted, 10.0, message="the camera did not give every frame")
    sink.hold.set()
    eventually(lambda: pipeline.finished, 10.0, message="the pipeline did not finish")
    judged = [round(float(frame.image.mean()) / 5) * 5 for frame, _, _ in sink.items if frame.image is not None]
    # The early frames already past the queue (in the model, prepared, being prepared), then the
    # two newest the queue kept: everything between was dropped, oldest first.
    assert judged[-2:] == [240, 245] and 2 <= len(judged) <= 5
    assert judged == sorted(judged) and all(v < 240 for v in judged[:-2])
    assert pipeline.counters.captured == 50 and pipeline.counters.dropped == 50 - len(judged) >= 45
    window = pipeline.metrics.rotate()
    assert window.dropped == 50 - len(judged) and window.frames == len(judged)


def test_corrupt_frames_are_counted_not_fatal(tiny: LoadedModel) -> None:
    source, sink = NullSource(), Collect()
    pipeline = make_pipeline(tiny, source, sink)
    bad = [
        Frame("undecodable", None, "002.jpg", error="002.jpg: truncated JPEG (no end-of-image marker)"),
        Frame("empty", np.zeros((0, 10, 3), np.uint8), "cam"),
        Frame("float", np.zeros((8, 8, 3), np.float32), "cam"),
        Frame("planes", np.zeros((8, 8, 5), np.uint8), "cam"),
    ]
    for frame in bad:
        assert pipeline.process(frame) is None
    good = pipeline.process(Frame("ok", grey(240), "cam"))
    assert good is not None and good.verdict.status == "defect"
    assert pipeline.counters.errors == 4 and pipeline.counters.judged == 1
    assert source.finished == [(f.frame_id, False) for f in bad] + [("ok", True)]
    window = pipeline.metrics.rotate()
    assert window.errors == 4 and window.frames == 1


def test_roi_crops_before_preprocessing(tiny: LoadedModel) -> None:
    image = grey(10, (100, 100, 3))
    image[20:50, 60:90] = 250  # a bright patch on a dark part
    whole = make_pipeline(tiny, NullSource(), Collect()).process(Frame("a", image, "cam"))
    cropped = make_pipeline(tiny, NullSource(), Collect(), roi=Roi(60, 20, 30, 30)).process(Frame("b", image, "cam"))
    assert whole is not None and whole.verdict.status == "good"
    assert cropped is not None and cropped.verdict.status == "defect" and cropped.judged.shape == (30, 30, 3)
    outside = make_pipeline(tiny, NullSource(), Collect(), roi=Roi(500, 500, 10, 10))
    assert outside.process(Frame("c", image, "cam")) is None and outside.counters.errors == 1


def test_hot_swap_happens_between_frames_and_a_tampered_bundle_is_refused(tmp_path: Path,
                                                                          tiny: LoadedModel) -> None:
    changes: list[tuple[str, str]] = []
    rejected: list[Rejected] = []
    sink = Collect()
    pipeline = make_pipeline(tiny, NullSource(), sink, on_rejected=rejected.append,
                             on_model_change=lambda old, new: changes.append((old.version, new.version)))
    pipeline.process(Frame("1", grey(200), "cam"))

    good = tmp_path / "v2"
    make_tiny_bundle(good, version="2")
    pipeline.models.request(ModelConfig(bundle=good, warmup_runs=1))
    assert pipeline.models.wait_idle(10.0)
    assert pipeline.active_model.version == "1"  # loaded and warmed, not yet swapped: no frame since
    pipeline.process(Frame("2", grey(200), "cam"))
    assert changes == [("1", "2")]
    assert [model.version for _, _, model in sink.items] == ["1", "2"]

    tampered = tmp_path / "v3"
    make_tiny_bundle(tampered, version="3")
    with (tampered / "model.onnx").open("ab") as handle:
        handle.write(b"\x00")
    pipeline.models.request(ModelConfig(bundle=tampered))
    assert pipeline.models.wait_idle(10.0)
    pipeline.process(Frame("3", grey(200), "cam"))
    assert [model.version for _, _, model in sink.items] == ["1", "2", "2"]
    assert len(rejected) == 1 and rejected[0].source == tampered
    assert "sha256" in rejected[0].error and "tampered" in rejected[0].error
    assert changes == [("1", "2")]


def test_load_model_refuses_a_tampered_bundle(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path / "b")
    (tmp_path / "b" / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(BundleIntegrityError):
        load_model(ModelConfig(bundle=tmp_path / "b"))


def int8_bundle(directory: Path) -> Path:
    """The tiny bundle plus a real static INT8 (QDQ) model quantized by ONNX Runtime, listed in the manifest."""
    from dataclasses import replace

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from qcsight_core.bundle import ModelFile, write_bundle
    from qcsight_core.preprocess import preprocess

    bundle = make_tiny_bundle(directory)

    class Calibration(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            spec = bundle.manifest.input  # calibrate on what the device feeds it: preprocessed parts, dark to bright
            self.batches = iter([{"input": preprocess(grey(v), spec)} for v in range(0, 256, 15)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(str(directory / "model.onnx"), str(directory / "model.int8.onnx"), Calibration(),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    models = (*bundle.manifest.models, ModelFile("model.int8.onnx", precision="int8"))
    write_bundle(directory, replace(bundle.manifest, models=models))
    return directory


def test_int8_runs_when_the_bundle_has_it_and_the_config_allows(tmp_path: Path) -> None:
    path = int8_bundle(tmp_path / "b")
    auto = load_model(ModelConfig(bundle=path, precision="auto", warmup_runs=1))
    fp32 = load_model(ModelConfig(bundle=path, precision="fp32", warmup_runs=1))
    assert (auto.runner.precision, auto.runner.model_path.name) == ("int8", "model.int8.onnx")
    assert (fp32.runner.precision, fp32.runner.model_path.name) == ("fp32", "model.onnx")
    for value in (20, 240):
        image = grey(value)
        assert pipeline_verdict(auto, image) == pipeline_verdict(fp32, image)
    plain = model_at(tmp_path / "plain")
    assert plain.runner.precision == "fp32"  # auto without an INT8 file
    with pytest.raises(QcsightError, match="int8"):
        load_model(ModelConfig(bundle=tmp_path / "plain", precision="int8"))


def pipeline_verdict(model: LoadedModel, image: np.ndarray) -> str:
    judgement = make_pipeline(model, NullSource(), Collect()).process(Frame("x", image, "cam"))
    assert judgement is not None
    return judgement.verdict.status


def test_a_defect_type_model_alerts_on_every_frame_with_its_class(tmp_path: Path) -> None:
    """No good class (sorting defects already found): each frame is a defect named by class, and the alert
    the agent publishes for it is a valid qcsight.alert/1 message, which is what the review app reads."""
    from qcsight_core import messages
    from qcsight_core.bundle import DecisionPolicy
    from qcsight_edge.outputs import alert_body
    from qcsight_edge.pipeline import judge

    types = ("crack", "pit", "scale")
    make_tiny_bundle(tmp_path / "sorter", classes=types, defect_classes=types,
                     decision=DecisionPolicy(defect_threshold=0.0, uncertain_threshold=0.0))
    model = load_model(ModelConfig(bundle=tmp_path / "sorter", warmup_runs=0, intra_op_threads=1))
    for value, named in ((20, "crack"), (240, "scale")):
        verdict = judge(model, grey(value), None).verdict
        assert (verdict.status, verdict.label) == ("defect", named)
        body = alert_body("f", "cam", verdict, model.bundle.manifest.classes, {"name": "tiny", "version": "1"},
                          None, None)
        decoded = messages.decode(messages.encode({**messages.envelope(messages.ALERT, "line-1", 0), **body}))
        assert decoded["verdict"]["label"] == named and set(decoded["verdict"]["scores"]) == set(types)
