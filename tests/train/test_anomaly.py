"""`qcsight train --task anomaly` and its parts on tiny synthetic parts: features, coreset, split, export gates, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qcsight_core.bundle import load_bundle
from qcsight_core.imageio import read_image
from qcsight_core.preprocess import PreprocessSpec, preprocess_batch
from qcsight_core.runner import OnnxRunner
from qcsight_core.verdict import Decider
from qcsight_data.dataset import Sample
from qcsight_train.errors import ExportError, ParityError
from tests.train.synth_data import make_anomaly_dataset

torch = pytest.importorskip("torch")

from qcsight_train.anomaly import coreset, features  # noqa: E402
from qcsight_train.anomaly import export as anomaly_export  # noqa: E402
from qcsight_train.anomaly.data import load_anomaly_data  # noqa: E402
from qcsight_train.anomaly.model import extract_patches, fit_bank  # noqa: E402
from qcsight_train.config import build_config  # noqa: E402

pytestmark = pytest.mark.torch

# model.neo.onnx and INT8 have their own tests on the tiny trunk; a real Lite0 export of either adds seconds here.
SMALL = ["--img-size", "64", "--bank-size", "256", "--threads", "2", "--int8", "false", "--neo-onnx", "false"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_anomaly_dataset(tmp_path_factory.mktemp("anomaly") / "data")


class TinyTrunk(torch.nn.Module):
    """Two random conv stages (stride 4 and 8): exports in a second, unlike a real backbone."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fine = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 4, 4), torch.nn.ReLU())
        self.coarse = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 2, 2), torch.nn.ReLU())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fine = self.fine(x)
        return fine, self.coarse(fine)


_FITS: dict[tuple[Path, int], tuple[features.PatchEmbedding, object, PreprocessSpec]] = {}


def _tiny_fit(parts: Path, bank: int = 512) -> tuple[features.PatchEmbedding, object, PreprocessSpec]:
    """The tiny trunk's bank on 24 good parts, fitted once per bank size for the module (exports never change it)."""
    if (parts, bank) not in _FITS:
        spec = PreprocessSpec(height=64, width=64)
        embedding = features.PatchEmbedding(TinyTrunk().eval(), None)
        paths = sorted(str(p) for p in (parts / "good").glob("*.png"))[:24]
        _FITS[(parts, bank)] = (embedding, fit_bank(embedding, paths, spec, bank), spec)
    return _FITS[(parts, bank)]


def _validation(parts: Path) -> list[tuple[str, bool]]:
    good = sorted(str(p) for p in (parts / "good").glob("*.png"))[24:]
    bad = sorted(str(p) for p in (parts / "spot").glob("*.png"))
    return [(p, False) for p in good] + [(p, True) for p in bad]


def test_patch_features_two_levels_pooled_and_projected() -> None:
    lite = features.create_embedding("efficientnet_lite0", "package", 256, seed=0)
    with torch.inference_mode():
        cells = lite(torch.zeros(2, 3, 64, 64))
    assert tuple(cells.shape) == (2, 8, 8, 40 + 112)  # stride 8, no projection: 152 <= 256
    wide = features.create_embedding("resnet18", "none", 256, seed=0)
    assert wide.projection is not None and tuple(wide.projection.shape) == (384, 256)
    assert torch.equal(wide.projection, features.projection_matrix(384, 256, seed=0))  # seeded
    with torch.inference_mode():
        assert tuple(wide(torch.zeros(1, 3, 64, 64)).shape) == (1, 8, 8, 256)
    with pytest.raises(Exception, match="anomaly"):
        features.backbone("convnext_tiny")


def test_two_stage_coreset_covers_like_one_stage_and_keeps_greedy_prefixes(parts: Path) -> None:
    embedding = features.create_embedding("efficientnet_lite0", "package", 256, seed=0)
    spec = features.preprocess_spec("efficientnet_lite0", 64, 64)
    patches, _, _ = extract_patches(embedding, sorted(str(p) for p in (parts / "good").glob("*.png"))[:24], spec)
    patches = patches - patches.reshape(-1, patches.shape[-1]).mean(0)
    flat = patches.reshape(-1, patches.shape[-1])
    one = coreset.greedy_coreset(flat, 64, seed=0)
    two, candidates = coreset.two_stage_coreset(patches, 64, seed=0)
    assert candidates < flat.shape[0] and len(set(two.tolist())) == 64
    r_one, r_two = coreset.covering_radius(flat, one), coreset.covering_radius(flat, two)
    shuffled = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(0))
    r_random = coreset.covering_radius(flat, shuffled[:64])
    assert r_two <= 1.25 * r_one and max(r_one, r_two) < r_random
    assert torch.equal(coreset.greedy_coreset(flat, 32, seed=0), one[:32])  # any prefix is the smaller selection
    assert torch.equal(coreset.two_stage_coreset(patches, 64, seed=0)[0], two)  # seeded


def test_defect_holding_groups_never_reach_train(tmp_path: Path, parts: Path) -> None:
    groups = tmp_path / "groups.csv"
    rows = ["file,class,group"]
    goods = sorted(p.name for p in (parts / "good").glob("*.png"))
    spots = sorted(p.name for p in (parts / "spot").glob("*.png"))
    for i, name in enumerate(spots):  # each spot shares a group with one good image
        rows += [f"spot/{name},spot,g{i}", f"good/{goods[i]},good,g{i}"]
    groups.write_text("\n".join(rows) + "\n")
    cfg = build_config({"data": str(parts), "output": str(tmp_path / "out"), "task": "anomaly", "groups": str(groups)})
    splits = load_anomaly_data(cfg, tmp_path / "cache")
    assert splits.good_classes == ("good",) and splits.defect_classes == ("scratch", "spot")
    train_groups = {s.group for s in splits.train}
    assert all(s.label == "good" for s in splits.train)
    assert not train_groups & {f"g{i}" for i in range(len(spots))}
    evaluated = [s for s in (*splits.val, *splits.test) if s.label != "good"]
    assert len(evaluated) == 16  # every defect is validated or tested, none is lost


def test_export_writes_one_graph_with_normalised_outputs_and_a_recorded_threshold(tmp_path: Path, parts: Path) -> None:
    embedding, fit, spec = _tiny_fit(parts)
    validation = _validation(parts)
    calibration = sorted(str(p) for p in (parts / "good").glob("*.png"))[:8]
    bundle = anomaly_export.export_anomaly_bundle(
        embedding, fit, output_dir=tmp_path / "bundle", spec=spec, architecture="tiny", name="t", version="1",
        run_id="r", data_fingerprint="f", validation=validation, calibration_paths=calibration, neo_onnx=True,
        options=anomaly_export.AnomalyExportOptions(pack=False, false_reject_rate=0.1))
    manifest = bundle.manifest
    assert (manifest.task, manifest.output, manifest.decision.defect_threshold) == ("anomaly", "anomaly_score", 1.0)
    threshold = manifest.metrics["threshold"]
    assert manifest.models[0].details["score_scale"] == threshold["raw_threshold"]
    assert manifest.metrics["parity"]["max_relative_diff"] <= 1e-3
    import onnx

    ops = {n.op_type for n in onnx.load(str(bundle.path / "model.onnx")).graph.node}
    assert {"MatMul", "ReduceMin", "ReduceMax"} <= ops and not ops & {"Loop", "Scan"}
    # Through the device path: the good validation images read below 1.0 but for the 10 % allowed.
    good = [read_image(p) for p, defect in validation if not defect]
    scores = OnnxRunner(bundle).run(preprocess_batch(good, spec))[:, 0]
    assert np.sum(scores >= 1.0) == threshold["good_over_threshold"] <= int(0.1 * len(good))
    reference = manifest.reference["confidence"]
    assert sum(reference["counts"]) == len(good) and reference["edges"][-1] == 2.0
    # INT8 of the convolutions, kept only within 0.005 of FP32's validation AUROC, with its own scale.
    int8 = manifest.metrics["int8"]
    assert "AUROC" in int8["reason"] and int8["kept"] == (manifest.model("int8") is not None)
    assert int8["kept"] == (int8["auroc_drop"] <= 0.005)
    if int8["kept"]:
        assert manifest.model("int8").details["score_scale"] == int8["threshold"]["raw_threshold"]
    # model.neo.onnx: IR 7, opset 12, batch 1, the same raw score as model.onnx, divided by the same scale.
    neo = manifest.metrics["neo_onnx"]
    assert neo["written"] and (neo["ir_version"], neo["opset"]) == (7, 12) and neo["images"] > 0
    entry = next(m for m in manifest.models if m.format == "onnx-neo")
    assert entry.details["score_scale"] == threshold["raw_threshold"]
    assert entry.details["outputs"] == ["score", "score_map"]
    import onnxruntime as ort

    session = ort.InferenceSession(str(bundle.path / entry.file), providers=["CPUExecutionProvider"])
    neo_score = session.run(None, {"input": preprocess_batch(good[:1], spec)})[0].ravel()[0]
    assert neo_score / entry.details["score_scale"] == pytest.approx(scores[0], rel=1e-3)
    from qcsight_train.launch import neo as launch_neo

    assert launch_neo.neo_onnx_entry(manifest, "bundle").file == "model.neo.onnx"


def test_parity_gate_refuses_a_graph_that_disagrees_with_pytorch(tmp_path: Path, parts: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    embedding, fit, spec = _tiny_fit(parts)
    real = anomaly_export.raw_scores

    def drifted(model: object, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        score, score_map = real(model, batch)  # type: ignore[arg-type]
        return score * 1.01, score_map

    monkeypatch.setattr(anomaly_export, "raw_scores", drifted)
    with pytest.raises(ParityError, match="parity gate failed"):
        anomaly_export.export_anomaly_bundle(
            embedding, fit, output_dir=tmp_path / "bundle", spec=spec, architecture="tiny", name="t", version="1",
            run_id="r", data_fingerprint="f", validation=_validation(parts), calibration_paths=[], int8=False,
            options=anomaly_export.AnomalyExportOptions(pack=False))
    assert not (tmp_path / "bundle").exists() and not list(tmp_path.glob(".bundle.partial-*"))


def test_size_bound_stores_the_bank_in_float16_then_cuts_it(tmp_path: Path, parts: Path) -> None:
    plan = anomaly_export.plan_bank(1 << 20, 1000, 100, 10 << 20, int8=False)
    assert (plan.size, plan.dtype, plan.reason) == (1000, "float32", "")
    half = anomaly_export.plan_bank(1 << 20, 10_000, 100, 4 << 20, int8=False)
    assert (half.size, half.dtype) == (10_000, "float16") and "float16" in half.reason
    cut = anomaly_export.plan_bank(1 << 20, 10_000, 100, 2 << 20, int8=True)
    assert cut.dtype == "float16" and cut.size < 10_000 and cut.estimated_bytes <= 2 << 20
    with pytest.raises(ExportError, match="backbone alone"):
        anomaly_export.plan_bank(3 << 20, 10, 100, 2 << 20, int8=False)
    # The Neo ONNX is a second float32 graph: its backbone and bank count against the bound too.
    with_neo = anomaly_export.plan_bank(1 << 20, 1000, 100, 10 << 20, int8=False, neo=True)
    assert with_neo.estimated_bytes - plan.estimated_bytes == (1 << 20) + 1000 * 100 * 4

    embedding, fit, spec = _tiny_fit(parts, bank=4096)  # 4096 x 64 float32 = 1 MiB: over a 1 MiB bound
    bundle = anomaly_export.export_anomaly_bundle(
        embedding, fit, output_dir=tmp_path / "bundle", spec=spec, architecture="tiny", name="t", version="1",
        run_id="r", data_fingerprint="f", validation=_validation(parts), calibration_paths=[], int8=False,
        options=anomaly_export.AnomalyExportOptions(pack=False, max_bundle_mb=1.0))
    bank = bundle.manifest.metrics["bank"]
    assert (bank["dtype"], bank["size"]) == ("float16", 4096) and "float16" in bank["reason"]
    import onnx

    dtypes = {t.data_type for t in onnx.load(str(bundle.path / "model.onnx")).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in dtypes
    assert bundle.manifest.metrics["parity"]["max_relative_diff"] <= 1e-3  # PyTorch used the same rounded bank
    assert sum(p.stat().st_size for p in bundle.path.iterdir()) <= 1 << 20


def test_a_neo_onnx_that_fails_leaves_the_bundle_without_it_and_says_why(tmp_path: Path, parts: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    embedding, fit, spec = _tiny_fit(parts, bank=128)

    def refused(*_: object, **__: object) -> None:
        raise ExportError("torch.onnx.export (TorchScript exporter, opset 12) failed: no symbolic for aten::x")

    monkeypatch.setattr(anomaly_export, "export_neo_onnx", refused)
    bundle = anomaly_export.export_anomaly_bundle(
        embedding, fit, output_dir=tmp_path / "bundle", spec=spec, architecture="tiny", name="t", version="1",
        run_id="r", data_fingerprint="f", validation=_validation(parts), calibration_paths=[], int8=False,
        neo_onnx=True, options=anomaly_export.AnomalyExportOptions(pack=False))
    record = bundle.manifest.metrics["neo_onnx"]
    assert record["written"] is False and "aten::x" in record["reason"]
    assert not (bundle.path / "model.neo.onnx").exists()
    assert [m.format for m in bundle.manifest.models] == ["onnx"]
    from qcsight_core.errors import ConfigError
    from qcsight_train.launch import neo as launch_neo

    with pytest.raises(ConfigError, match=r"model\.neo\.onnx.*aten::x"):
        launch_neo.neo_onnx_entry(bundle.manifest, "bundle")


@pytest.mark.slow
def test_cli_fits_on_good_parts_and_evaluates_with_masks(tmp_path: Path, parts: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from qcsight_train.cli import main

    out = tmp_path / "run"
    tracking_dir = tmp_path / "mlruns"
    assert main(["--task", "anomaly", "--data", str(parts), "--output", str(out), *SMALL,
                 "--tracking-uri", str(tracking_dir), "--name", "cast-anomaly"]) == 0
    printed = capsys.readouterr().out
    assert "image AUROC" in printed and "bank:" in printed
    bundle = load_bundle(out / "model.tar.gz", extract_to=tmp_path / "unpacked")
    manifest = bundle.manifest
    assert manifest.extra["anomaly"]["trained_on"] == ["good"]
    assert manifest.extra["anomaly"]["bank"]["size"] == 256
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"]["train"]["spot"] == summary["splits"]["train"]["scratch"] == 0
    assert summary["int8"] == {"kept": False, "reason": "not requested"} and manifest.model("int8") is None
    # Tracked as a classifier run is: figures, the bundle as an artefact, a registered model version.
    assert summary["tracking"]["registered_model"] == "cast-anomaly"
    assert summary["tracking"]["registered_version"] == "1"
    from qcsight_train import runs_cli

    assert runs_cli.main(["--tracking-uri", str(tracking_dir), "compare", summary["tracking"]["run_id"][:8]]) == 0
    assert "test_pixel_auroc" in capsys.readouterr().out
    assert list((tracking_dir / "artifacts").rglob("bundle/manifest.json"))
    evaluation = json.loads((out / "evaluation" / "metrics.json").read_text())
    # Spots and scratches on one cast surface: the bank finds them, and where they are.
    assert evaluation["image"]["auroc"] > 0.85
    assert evaluation["pixel"]["pixel_auroc"] > 0.85 and evaluation["pixel"]["pro"] > 0.3
    assert evaluation["pixel"]["defect_images_without_mask"] == 0
    for name in ("report.md", "roc.png", "score_histogram.png", "worst_overlays.png"):
        assert (out / "evaluation" / name).is_file()
    assert list((out / "evaluation" / "overlays").glob("*.png"))
    # The evaluation's boxes are the device's (Decider.decide_outputs on OnnxRunner.infer).
    worst = evaluation["worst"][0]
    image = read_image(worst["path"])
    outputs = OnnxRunner(bundle).infer(preprocess_batch([image], manifest.input))
    (verdict,) = Decider(manifest).decide_outputs(outputs, [image.shape])
    assert verdict.box is not None and verdict.box.to_dict() == worst["box"]
    # And the box finds the spot: it overlaps the spot's mask on most spot images.
    hits = 0
    spots = sorted((parts / "spot").glob("*.png"))
    for path in spots:
        image, mask = read_image(str(path)), read_image(str(parts / "masks" / "spot" / path.name)) > 127
        (verdict,) = Decider(manifest).decide_outputs(
            OnnxRunner(bundle).infer(preprocess_batch([image], manifest.input)), [image.shape])
        assert verdict.box is not None
        x0, y0, x1, y1 = verdict.box.pixels(image.shape[1], image.shape[0])
        hits += bool(mask[y0:y1, x0:x1].any())
    assert hits >= 0.75 * len(spots)
    # `qcsight evaluate` takes an anomaly bundle too (every image of the folder, masks from DATA/masks).
    from qcsight_train.evaluate_cli import main as evaluate

    assert evaluate(["--bundle", str(out / "bundle"), "--data", str(parts), "--output", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["images"] == 36 + 16 and again["pixel"]["pro"] is not None


def test_cli_refuses_data_without_a_good_folder(tmp_path: Path, parts: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from qcsight_train.cli import main

    only_defects = tmp_path / "d"
    (only_defects / "spot").mkdir(parents=True)
    for p in sorted((parts / "spot").glob("*.png"))[:2]:
        (only_defects / "spot" / p.name).write_bytes(p.read_bytes())
    assert main(["--task", "anomaly", "--data", str(only_defects), "--output", str(tmp_path / "o")]) == 2
    assert "good_classes" in capsys.readouterr().err
    assert main(["--task", "anomaly", "--arch", "convnext_tiny", "--data", str(parts),
                 "--output", str(tmp_path / "o")]) == 2
    assert "wide_resnet50_2" in capsys.readouterr().err


def test_samples_are_labelled_defect_by_class(parts: Path, tmp_path: Path) -> None:
    cfg = build_config({"data": str(parts), "output": str(tmp_path / "o"), "task": "anomaly"})
    splits = load_anomaly_data(cfg, tmp_path / "cache")
    assert not splits.is_defect(Sample("x", "good", "x")) and splits.is_defect(Sample("y", "spot", "y"))


def test_img_size_hxw_and_auto_reach_the_features_spec(parts: Path, tmp_path: Path) -> None:
    """--img-size HxW is the bank's input; auto takes the good images' shape; letterbox pads with the mean grey."""
    from qcsight_train.run import input_size, resolve_input_size

    cfg = build_config({"data": str(parts), "output": str(tmp_path / "o"), "task": "anomaly",
                        "img_size": "64x96", "resize": "letterbox"})
    assert input_size(cfg) == (64, 96)
    spec = features.preprocess_spec(cfg.arch, *input_size(cfg), cfg.resize)
    assert (spec.height, spec.width, spec.resize) == (64, 96, "letterbox")
    assert spec.pad_value == round(255 * sum(spec.mean) / 3)  # normalises to ~0, as a classifier's pad does
    auto = build_config({"data": str(parts), "output": str(tmp_path / "o"), "task": "anomaly"})
    splits = load_anomaly_data(auto, tmp_path / "cache")
    resolved, record = resolve_input_size(auto, splits.train, features.preprocess_spec(auto.arch, 224, 224))
    side = read_image(str(splits.train[0].path)).shape[0]
    assert input_size(resolved) == (record["height"], record["width"])
    from qcsight_data import sizing

    # Square parts: a square input at the sizing rule's side (the native side, never below its minimum).
    expected = max(sizing.MIN_SIDE, min(sizing.BASE_SIDE, side // sizing.STEP * sizing.STEP))
    assert input_size(resolved) == (expected, expected)
    assert any(note.startswith("img_size auto") for note in resolved.adapted)


@pytest.mark.parametrize(("setting", "value", "named"), [("refit", True, "refit"),
                                                        ("threshold_source", "oof", "threshold_source"),
                                                        ("good_classes", "none", "good_classes")])
def test_classifier_only_settings_are_refused_for_anomaly_by_name(tmp_path: Path, setting: str, value: object,
                                                                  named: str) -> None:
    from qcsight_core.errors import ConfigError

    with pytest.raises(ConfigError, match=named):
        build_config({"data": "d", "output": str(tmp_path), "task": "anomaly", setting: value})



def test_the_false_reject_budget_reaches_the_anomaly_export_and_is_checked() -> None:
    from qcsight_core.errors import ConfigError

    assert anomaly_export.AnomalyExportOptions().max_false_reject == 0.2
    with pytest.raises(ConfigError, match="max_false_reject"):
        anomaly_export.AnomalyExportOptions(max_false_reject=1.5)
