"""Export of a real (tiny, trained) PyTorch model into a bundle: ONNX, parity gate, INT8, TorchScript, thresholds."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from qcsight_core.bundle import Bundle, load_bundle
from qcsight_core.imageio import read_image
from qcsight_core.preprocess import PreprocessSpec, normalize, prepare_pixels, preprocess_batch
from qcsight_core.runner import OnnxRunner, RunnerOptions
from qcsight_core.verdict import Decider
from qcsight_data.dataset import Sample
from qcsight_train.errors import ExportError, ParityError
from qcsight_train.export import ExportOptions, export_bundle, staged_bundle
from qcsight_train.metrics import threshold_for_recall
from tests.helpers.images import truncate
from tests.helpers.models import make_tiny_bundle

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.torch

CLASSES = ("good", "scratch", "spot")
DEFECTS = ("scratch", "spot")
# BGR colours: grey parts are good, reddish ones "scratch", bluish ones "spot". A model that
# learnt these confuses scratch and spot when fed BGR instead of RGB.
COLOURS = {"good": (128, 128, 128), "scratch": (70, 90, 190), "spot": (190, 90, 70)}
SPEC = PreprocessSpec(height=32, width=32, color="RGB")


def _part(path: Path, label: str, seed: int) -> str:
    rng = np.random.default_rng(seed)
    size = (48, 64) if seed % 2 else (40, 40)
    base = np.array(COLOURS[label], dtype=np.int64) + rng.integers(-25, 26, size=3)
    image = np.clip(base + rng.integers(-12, 13, size=(*size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return str(path)


def _tiny_net() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, len(CLASSES)),
    )


def _train(model: torch.nn.Module, pairs: list[tuple[str, str]]) -> torch.nn.Module:
    batch = torch.from_numpy(preprocess_batch([read_image(p) for p, _ in pairs], SPEC))
    target = torch.tensor([CLASSES.index(label) for _, label in pairs])
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(60):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(batch), target).backward()
        optimiser.step()
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny model gains nothing from threads, and on a shared 2-core runner OpenMP spinning makes it 10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass(frozen=True)
class Exported:
    model: torch.nn.Module
    bundle: Bundle
    validation: list[tuple[str, str]]
    calibration: list[str]
    broken: str
    config: dict[str, object]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, list[str], list[tuple[str, str]], str]:
    root = tmp_path_factory.mktemp("parts")
    train = [(_part(root / "train" / c / f"{i}.png", c, seed=100 * k + i), c)
             for k, c in enumerate(CLASSES) for i in range(8)]
    val = [(_part(root / "val" / c / f"{i}.png", c, seed=1000 + 100 * k + i), c)
           for k, c in enumerate(CLASSES) for i in range(4)]
    broken = str(truncate(Path(_part(root / "val" / "spot" / "broken.png", "spot", 7)), keep=0.5))
    torch.manual_seed(0)
    model = _train(_tiny_net(), train)
    return model, [p for p, _ in train], [*val, (broken, "spot")], broken


@pytest.fixture(scope="module")
def exported(data: tuple[torch.nn.Module, list[str], list[tuple[str, str]], str],
             tmp_path_factory: pytest.TempPathFactory) -> Exported:
    model, calibration, validation, broken = data
    out = tmp_path_factory.mktemp("export") / "bundle"
    config = {"arch": "tiny", "epochs": 3, "output": Path("/runs/x"), "classes": list(CLASSES)}
    bundle = export_bundle(model, output_dir=out, spec=SPEC, classes=CLASSES, defect_classes=DEFECTS,
                           architecture="tiny-conv", name="parts", version="7", run_id="run-1",
                           data_fingerprint="abc123", calibration_paths=calibration, validation=validation,
                           config=config)
    return Exported(model, bundle, validation, calibration, broken, config)


def _softmax_torch(model: torch.nn.Module, batch: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(model(torch.from_numpy(batch)), dim=1).numpy()


def _readable(validation: list[tuple[str, str]], broken: str) -> list[tuple[str, str]]:
    return [(p, label) for p, label in validation if p != broken]


def test_the_model_learnt_the_colours(exported: Exported) -> None:
    pairs = _readable(exported.validation, exported.broken)
    probs = _softmax_torch(exported.model, preprocess_batch([read_image(p) for p, _ in pairs], SPEC))
    assert [CLASSES[i] for i in probs.argmax(axis=1)] == [label for _, label in pairs]


def test_export_writes_a_bundle_that_load_bundle_verifies(exported: Exported) -> None:
    root = exported.bundle.path
    bundle = load_bundle(root)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["config.json", "manifest.json", "model.int8.onnx", "model.onnx", "model.torchscript.pt"]
    m = bundle.manifest
    assert (m.name, m.version, m.architecture, m.run_id, m.data_fingerprint) == ("parts", "7", "tiny-conv", "run-1",
                                                                                 "abc123")
    assert m.classes == CLASSES and m.defect_classes == DEFECTS and m.output == "probabilities"
    assert m.input == SPEC and m.created_at
    # The tarball lands beside the bundle directory and verifies too; no staging directory is left behind.
    assert sorted(p.name for p in root.parent.iterdir()) == ["bundle", "model.tar.gz"]
    assert load_bundle(root.parent / "model.tar.gz", extract_to=root.parent.parent / "unpacked").manifest == m
    assert json.loads((root / "config.json").read_text()) == {**exported.config, "output": "/runs/x"}


def test_onnx_is_one_file_with_softmax_and_a_dynamic_batch(exported: Exported) -> None:
    import onnx

    proto = onnx.load(str(exported.bundle.path / "model.onnx"))
    assert proto.graph.node[-1].op_type == "Softmax"
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    entry = exported.bundle.manifest.model("fp32")
    assert entry is not None and entry.details["opset"] == 18 and entry.details["output_name"] == "probabilities"
    runner = OnnxRunner(exported.bundle)
    for n in (1, 5):
        probs = runner.run(np.zeros((n, 3, 32, 32), dtype=np.float32))
        assert probs.shape == (n, 3) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_onnx_outputs_match_torch_through_qcsight_core(exported: Exported) -> None:
    pairs = _readable(exported.validation, exported.broken)
    batch = preprocess_batch([read_image(p) for p, _ in pairs], SPEC)
    onnx_probs = OnnxRunner(exported.bundle).run(batch)
    torch_probs = _softmax_torch(exported.model, batch)
    assert np.abs(onnx_probs - torch_probs).max() <= 1e-4
    assert (onnx_probs.argmax(axis=1) == torch_probs.argmax(axis=1)).all()
    parity = exported.bundle.manifest.metrics["parity"]
    assert parity["images"] == len(pairs) and parity["max_abs_diff"] <= 1e-4 and parity["mismatched_classes"] == 0


def test_int8_is_kept_and_the_reason_recorded(exported: Exported) -> None:
    m = exported.bundle.manifest
    record = m.metrics["int8"]
    assert record["kept"] is True
    assert record["accuracy_drop_points"] <= 1.0 and "<= allowed 1" in record["reason"]
    entry = m.model("int8")
    assert entry is not None and entry.file == "model.int8.onnx"
    assert entry.details["accuracy_drop_points"] == record["accuracy_drop_points"]
    assert entry.details["calibration_images"] == len(exported.calibration)
    import onnx

    ops = {n.op_type for n in onnx.load(str(exported.bundle.path / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    pairs = _readable(exported.validation, exported.broken)
    batch = preprocess_batch([read_image(p) for p, _ in pairs], SPEC)
    int8_probs = OnnxRunner(exported.bundle, RunnerOptions(precision="int8")).run(batch)
    assert [CLASSES[i] for i in int8_probs.argmax(axis=1)] == [label for _, label in pairs]


def test_torchscript_loads_with_torch_jit_and_matches(exported: Exported) -> None:
    entry = next(e for e in exported.bundle.manifest.models if e.format == "torchscript")
    assert (entry.file, entry.runtime, entry.precision) == ("model.torchscript.pt", "neo", "fp32")
    assert entry.details["input_shape"] == [1, 3, 32, 32]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
        loaded = torch.jit.load(str(exported.bundle.path / entry.file))
    pairs = _readable(exported.validation, exported.broken)
    batch = preprocess_batch([read_image(p) for p, _ in pairs], SPEC)
    with torch.inference_mode():
        traced = loaded(torch.from_numpy(batch)).numpy()
    assert np.abs(traced - _softmax_torch(exported.model, batch)).max() <= 1e-5


def test_reference_histograms_count_every_readable_validation_image(exported: Exported) -> None:
    m = exported.bundle.manifest
    readable = len(_readable(exported.validation, exported.broken))
    for key, top in (("confidence", 1.0), ("brightness", 255.0)):
        hist = m.reference[key]
        assert len(hist["edges"]) == 21 and hist["edges"][0] == 0.0 and hist["edges"][-1] == top
        assert sum(hist["counts"]) == readable
    # The unreadable validation image is reported, not fatal.
    assert m.metrics["validation"]["unreadable"] == 1
    assert any(exported.broken in w for w in m.metrics["warnings"])


def test_thresholds_come_from_validation_defect_scores(exported: Exported) -> None:
    m = exported.bundle.manifest
    pairs = _readable(exported.validation, exported.broken)
    probs = OnnxRunner(exported.bundle).run(preprocess_batch([read_image(p) for p, _ in pairs], SPEC))
    scores = Decider(m).defect_scores(probs)
    is_defect = np.array([label in DEFECTS for _, label in pairs])
    threshold, frr = threshold_for_recall(is_defect, scores, 0.99)
    assert m.decision.defect_threshold == pytest.approx(threshold, abs=1e-6)
    # The uncertain band holds at most 5 % of the validation good images (ExportOptions.review_fraction).
    assert threshold / 2 <= m.decision.uncertain_threshold <= threshold
    good = scores[~is_defect]
    in_band = (good >= m.decision.uncertain_threshold) & (good < threshold)
    assert in_band.sum() <= int(0.05 * good.size)
    assert m.decision.target_defect_recall == 0.99
    assert m.metrics["threshold"]["false_reject_rate"] == pytest.approx(frr)
    assert m.metrics["validation"]["classification"]["accuracy"] == pytest.approx(1.0)


def test_a_recall_threshold_among_the_good_parts_rises_to_the_false_reject_budget(
        exported: Exported, tmp_path: Path) -> None:
    # One defect the model scores like a good part (a grey part labelled scratch): recall 0.99 needs
    # every defect caught, so its threshold sits among the good parts' scores.
    hidden = _part(tmp_path / "val" / "scratch" / "grey.png", "good", seed=4242)
    validation = [*_readable(exported.validation, exported.broken), (hidden, "scratch")]
    probs = OnnxRunner(exported.bundle).run(preprocess_batch([read_image(p) for p, _ in validation], SPEC))
    scores = Decider(exported.bundle.manifest).defect_scores(probs)
    is_defect = np.array([label in DEFECTS for _, label in validation])
    recall_threshold, recall_frr = threshold_for_recall(is_defect, scores, 0.99)
    assert recall_frr > 0.2

    def export(name: str, options: ExportOptions) -> Bundle:
        return export_bundle(exported.model, output_dir=tmp_path / name, spec=SPEC, classes=CLASSES,
                             defect_classes=DEFECTS, architecture="tiny-conv", name="parts", version=name,
                             run_id="run-5", data_fingerprint="abc", calibration_paths=[], validation=validation,
                             int8=False, torchscript=False, options=options)

    bounded = export("bounded", ExportOptions(pack=False))  # the default budget, 0.2
    record, decision = bounded.manifest.metrics["threshold"], bounded.manifest.decision
    good = scores[~is_defect]
    assert decision.defect_threshold > recall_threshold
    assert np.mean(good >= decision.defect_threshold) <= 0.2
    assert record["false_reject_rate"] == pytest.approx(np.mean(good >= decision.defect_threshold))
    assert record["max_false_reject"] == 0.2 and record["chosen"].startswith("lowest threshold rejecting at most 0.2")
    assert record["recall_target_threshold"] == {"threshold": pytest.approx(recall_threshold),
                                                 "false_reject_rate": pytest.approx(recall_frr)}
    # The grey "scratch" is given up, and the recall says so; the warning names the flag.
    caught = int(np.sum(scores[is_defect] >= decision.defect_threshold))
    assert caught == int(is_defect.sum()) - 1
    assert record["defect_recall"] == pytest.approx(caught / is_defect.sum())
    assert any("--max-false-reject" in w and f"catches {caught} of" in w for w in bounded.manifest.metrics["warnings"])

    kept = export("kept", ExportOptions(max_false_reject=1.0, pack=False))
    assert kept.manifest.decision.defect_threshold == pytest.approx(recall_threshold, abs=1e-6)
    assert kept.manifest.metrics["threshold"]["defect_recall"] == 1.0
    assert "recall_target_threshold" not in kept.manifest.metrics["threshold"]
    assert not any("--max-false-reject" in w for w in kept.manifest.metrics["warnings"])


def _bgr_preprocess(image: np.ndarray) -> torch.Tensor:
    """A training pipeline that forgot OpenCV decodes BGR."""
    bgr = prepare_pixels(image, PreprocessSpec(height=32, width=32, color="BGR"))
    return torch.from_numpy(normalize(bgr, SPEC))


def _letterbox_preprocess(image: np.ndarray) -> torch.Tensor:
    """A training pipeline that letterboxed while the bundle stretches."""
    spec = PreprocessSpec(height=32, width=32, color="RGB", resize="letterbox")
    return torch.from_numpy(normalize(prepare_pixels(image, spec), spec))


def test_a_staged_bundle_replaces_the_earlier_one_only_when_its_block_ends_without_an_error(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    with staged_bundle(out) as staging:
        (staging / "manifest.json").write_text("first", encoding="utf-8")
    assert (out / "manifest.json").read_text(encoding="utf-8") == "first"
    assert oct(out.stat().st_mode & 0o777) == "0o755"  # the device's service user can read it
    with pytest.raises(KeyboardInterrupt), staged_bundle(out) as staging:
        (staging / "manifest.json").write_text("second", encoding="utf-8")
        raise KeyboardInterrupt
    assert (out / "manifest.json").read_text(encoding="utf-8") == "first"
    with staged_bundle(out) as staging:
        (staging / "manifest.json").write_text("third", encoding="utf-8")
    assert (out / "manifest.json").read_text(encoding="utf-8") == "third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging or old copy left behind
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ExportError, match="not a qcsight bundle"), staged_bundle(tmp_path / "notes"):
        pass
    assert (tmp_path / "notes" / "a.txt").read_text(encoding="utf-8") == "mine"


@pytest.mark.parametrize("mismatch", [_bgr_preprocess, _letterbox_preprocess], ids=["bgr", "letterbox"])
def test_parity_gate_fails_on_mismatched_preprocessing_and_leaves_nothing(
        exported: Exported, tmp_path: Path, mismatch: Callable[[np.ndarray], torch.Tensor]) -> None:
    out = tmp_path / "runs" / "bundle"
    with pytest.raises(ParityError, match=r"max \|Δprob\| = ") as caught:
        export_bundle(exported.model, output_dir=out, spec=SPEC, classes=CLASSES, defect_classes=DEFECTS,
                      architecture="tiny-conv", name="parts", version="8", run_id="run-2", data_fingerprint="abc",
                      calibration_paths=exported.calibration, validation=exported.validation, int8=False,
                      torchscript=False, torch_preprocess=mismatch)
    error = caught.value
    assert error.max_abs_diff is not None and error.max_abs_diff > 1e-4
    if mismatch is _bgr_preprocess:
        # Red and blue swap: scratches look like spots and spots like scratches.
        assert error.mismatched and {(t, o) for _, t, o in error.mismatched} <= {("scratch", "spot"),
                                                                                  ("spot", "scratch")}
        assert "torch=scratch onnx=spot" in str(error) or "torch=spot onnx=scratch" in str(error)
    assert not out.exists()
    assert list((tmp_path / "runs").iterdir()) == []


def test_int8_dropped_when_the_allowed_drop_is_negative(exported: Exported, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    bundle = export_bundle(exported.model, output_dir=out, spec=SPEC, classes=CLASSES, defect_classes=DEFECTS,
                           architecture="tiny-conv", name="parts", version="9", run_id="run-3", data_fingerprint="abc",
                           calibration_paths=exported.calibration, validation=exported.validation,
                           torchscript=False, options=ExportOptions(max_int8_drop_points=-1.0, pack=False))
    record = bundle.manifest.metrics["int8"]
    assert record["kept"] is False and "> allowed -1" in record["reason"]
    assert record["accuracy_fp32"] == pytest.approx(1.0) and record["accuracy_drop_points"] == pytest.approx(0.0)
    assert bundle.manifest.model("int8") is None
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    assert any("INT8 dropped" in w for w in bundle.manifest.metrics["warnings"])
    assert not (tmp_path / "model.tar.gz").exists()


def test_no_defects_in_validation_falls_back_to_the_default_threshold(exported: Exported, tmp_path: Path) -> None:
    # An earlier bundle in output_dir is replaced once the new one is complete.
    out = make_tiny_bundle(tmp_path / "bundle").path
    # Dataset Samples are accepted as well as (path, label) pairs.
    goods = [Sample(p, label, group=p, split="val") for p, label in exported.validation if label == "good"]
    tarball = tmp_path / "elsewhere" / "model.tar.gz"
    bundle = export_bundle(exported.model, output_dir=out, spec=SPEC, classes=CLASSES, defect_classes=DEFECTS,
                           architecture="tiny-conv", name="parts", version="10", run_id="run-4",
                           data_fingerprint="abc", calibration_paths=[], validation=goods, int8=False,
                           torchscript=False, options=ExportOptions(tar_path=tarball))
    assert bundle.manifest.decision.defect_threshold == 0.5 and bundle.manifest.decision.uncertain_threshold == 0.25
    assert any("no defect image" in w for w in bundle.manifest.metrics["warnings"])
    assert bundle.manifest.metrics["threshold"]["chosen"].startswith("default")
    assert load_bundle(out).manifest.version == "10" and load_bundle(tarball).manifest.version == "10"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "elsewhere"]


def test_output_dir_that_is_not_a_bundle_is_refused_before_any_work(exported: Exported, tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a qcsight bundle"):
        export_bundle(exported.model, output_dir=out, spec=SPEC, classes=CLASSES, defect_classes=DEFECTS,
                      architecture="tiny-conv", name="parts", version="11", run_id="r", data_fingerprint="abc",
                      calibration_paths=[], validation=exported.validation)
    assert (out / "notes.txt").read_text() == "keep me" and sorted(tmp_path.iterdir()) == [out]
    with pytest.raises(ExportError, match="not among the bundle's classes"):
        export_bundle(exported.model, output_dir=tmp_path / "b", spec=SPEC, classes=CLASSES, defect_classes=DEFECTS,
                      architecture="tiny-conv", name="parts", version="11", run_id="r", data_fingerprint="abc",
                      calibration_paths=[], validation=[(exported.broken, "dent")])
