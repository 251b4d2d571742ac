"""Defect-type sets through every consumer; refit and out-of-fold thresholds; MLflow tracking, with and without it."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from qcsight_core import messages
from qcsight_core.bundle import load_bundle
from qcsight_core.errors import ConfigError
from qcsight_core.imageio import read_image
from qcsight_core.preprocess import preprocess_batch
from qcsight_core.runner import OnnxRunner
from qcsight_core.verdict import DEFECT, Decider
from qcsight_data.synth import generate
from tests.train.synth_data import FAST_EXPORT, MOBILENET

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from qcsight_train import cli  # noqa: E402  (after the torch skip)
from qcsight_train.metrics import wilson_interval  # noqa: E402

ONE_EPOCH = ["--img-size", "64", "--batch-size", "8", "--epochs", "1", "--workers", "0", "--threads", "2"]


@pytest.fixture(scope="module")
def defect_types(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three defect types and no good class, as a steel-surface sorting set is."""
    root = tmp_path_factory.mktemp("types") / "data"
    generate(root, 24, seed=4, size=64, classes=("scratch", "spot", "crack"))
    return root


def test_a_defect_type_set_is_detected_then_trained_with_good_classes_none(
        defect_types: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing is named like a good class: refused, with the way to confirm it.
    assert cli.main(["--data", str(defect_types), "--output", str(tmp_path / "refused"), *ONE_EPOCH, *MOBILENET,
                     *FAST_EXPORT], "qcsight train") == 2
    assert "--good-classes none" in capsys.readouterr().err

    out = tmp_path / "run"
    tracking_dir = tmp_path / "mlruns"
    code = cli.main(["--data", str(defect_types), "--output", str(out), "--good-classes", "none", *ONE_EPOCH,
                     *MOBILENET, "--int8", "false", "--tracking-uri", str(tracking_dir), "--name", "sorter"],
                    "qcsight train")
    assert code == 0
    bundle = load_bundle(out / "bundle")
    manifest = bundle.manifest
    assert manifest.defect_types_only and set(manifest.defect_classes) == {"scratch", "spot", "crack"}
    assert (manifest.decision.defect_threshold, manifest.decision.uncertain_threshold) == (0.0, 0.0)

    # The device path: every verdict a defect, named by class.
    paths = sorted(str(p) for p in (defect_types / "spot").glob("*.png"))[:3]
    probs = OnnxRunner(bundle).run(preprocess_batch([read_image(p) for p in paths], manifest.input))
    verdicts = Decider(manifest).decide_batch(probs)
    assert {v.status for v in verdicts} == {DEFECT} and all(v.label in manifest.classes for v in verdicts)

    # The agent's alert for it is a valid qcsight.alert/1 message the review app can read.
    from qcsight_edge.outputs import alert_body

    alert = {**messages.envelope(messages.ALERT, "line-1", 0),
             **alert_body("f1", paths[0], verdicts[0], manifest.classes,
                          {"name": manifest.name, "version": manifest.version}, None, None)}
    assert messages.decode(messages.encode(alert))["verdict"]["status"] == DEFECT

    # Batch scoring writes a defect row, named by class, for every image.
    from qcsight_batch import cli as batch_cli

    rows_path = tmp_path / "rows.jsonl"
    assert batch_cli.main(["score", "--bundle", str(out / "bundle"), "--input", str(defect_types / "crack"),
                           "--output", str(rows_path)]) == 0
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert rows and {r["verdict"] for r in rows} == {DEFECT} and {r["class"] for r in rows} <= set(manifest.classes)

    # The run is tracked: params, per-epoch metrics, the bundle as an artefact, a registered model version.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tracking"]["registered_model"] == "sorter" and summary["tracking"]["registered_version"] == "1"
    from qcsight_train import runs_cli

    assert runs_cli.main(["--tracking-uri", str(tracking_dir), "list"]) == 0
    listing = capsys.readouterr().out
    assert summary["run_id"] in listing and "64" in listing
    run_id = summary["tracking"]["run_id"]
    assert runs_cli.main(["--tracking-uri", str(tracking_dir), "compare", run_id[:8], summary["run_id"]]) == 0
    assert "val_macro_f1" in capsys.readouterr().out
    artefacts = tracking_dir / "artifacts"
    assert list(artefacts.rglob("bundle/manifest.json")) and list(artefacts.rglob("evaluation/report.md"))


def test_refit_with_out_of_fold_thresholds_runs_without_mlflow(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """--refit trains again on train+validation; thresholds come out of fold; no mlflow installed: still a bundle."""
    data = tmp_path / "data"
    generate(data, 36, seed=5, size=64, classes=("good", "scratch", "spot"))
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        code = cli.main(["--data", str(data), "--output", str(out), *ONE_EPOCH, *MOBILENET, *FAST_EXPORT, "--refit",
                         "--threshold-source", "oof", "--threshold-folds", "2",
                         # A one-epoch model's scores mix good and defect parts; keep the recall target
                         # (the default budget would raise the threshold past every defect here).
                         "--max-false-reject", "1"], "qcsight train")
    assert code == 0
    assert "mlflow is not installed" in caplog.text and not (tmp_path / "mlruns").exists()
    assert "refit=1/1" in caplog.text and "fold=1/1" in caplog.text  # not epoch= lines: SageMaker must not read them
    manifest = load_bundle(out / "bundle").manifest
    training = manifest.extra["training"]
    assert training["refit"] is True and training["trained_on"] == "train+validation"
    summary = json.loads((out / "summary.json").read_text())
    assert training["train_images"] == sum(summary["splits"]["train"].values()) + sum(
        summary["splits"]["val"].values())
    threshold = manifest.metrics["threshold"]
    assert threshold["source"].startswith("out-of-fold scores: 2 models")
    # Every train+validation defect counted once, with its interval and the small-count warning.
    defects = sum(n for c, n in summary["splits"]["train"].items() if c != "good") + sum(
        n for c, n in summary["splits"]["val"].items() if c != "good")
    assert threshold["defect_images"] == defects and threshold["max_false_reject"] == 1.0
    low, high = threshold["defect_recall_ci95"]
    assert low < threshold["defect_recall"] <= high and "fewer than 50" in threshold["warning"]
    assert summary["evaluation"]["defect_recall_ci95"] is not None


def test_wilson_interval_by_hand() -> None:
    # 6 of 6: centre (1 + z^2/12)/(1 + z^2/6), the lower bound 6/(6 + z^2) = 0.6097.
    low, high = wilson_interval(6, 6)  # type: ignore[misc]
    assert abs(low - 6 / (6 + 1.959963984540054**2)) < 1e-12 and high == 1.0
    low, high = wilson_interval(7, 8)  # type: ignore[misc]
    assert abs(low - 0.5291) < 1e-4 and abs(high - 0.9776) < 1e-4
    assert wilson_interval(0, 0) is None


def test_explicit_defect_classes_covering_every_class_point_to_good_classes_none(defect_types: Path,
                                                                                 tmp_path: Path) -> None:
    from qcsight_train.config import build_config
    from qcsight_train.data import defect_classes

    cfg = build_config({"data": str(defect_types), "output": str(tmp_path), "defect_classes": "crack,scratch,spot"})
    with pytest.raises(ConfigError, match="--good-classes none"):
        defect_classes(cfg, ("crack", "scratch", "spot"))
    none = build_config({"data": str(defect_types), "output": str(tmp_path), "good_classes": "none"})
    assert defect_classes(none, ("crack", "scratch", "spot")) == ("crack", "scratch", "spot")
    np.testing.assert_equal(none.no_good_class, True)


class _Sized(Exception):
    """Raised by the stand-in for sizing.measure: the test needs the images it was given, not a training run."""


def test_img_size_auto_measures_train_and_validation_whatever_the_seed_and_never_the_test(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The seed moves the validation cut; the input size must not move with it (it chose 288 or 320 px)."""
    from qcsight_data import sizing

    data = tmp_path / "data"
    generate(data, 30, seed=5, size=64, classes=("good", "scratch", "spot"))
    measured: list[list[str]] = []

    def measure(samples: list[tuple[str, str]], root: object, **_: object) -> None:
        measured.append(sorted(path for path, _ in samples))
        raise _Sized

    monkeypatch.setattr(sizing, "measure", measure)
    test = tmp_path / "test"
    generate(test, 6, seed=6, size=64, classes=("good", "scratch", "spot"))
    for seed in ("0", "1"):
        argv = ["--data", str(data), "--test", str(test), "--output", str(tmp_path / seed), "--seed", seed,
                "--img-size", "auto", "--workers", "0", *MOBILENET, *FAST_EXPORT]
        with pytest.raises(_Sized):
            cli.main(argv, "qcsight train")
    everything = sorted(str(p) for p in data.rglob("*.png") if "masks" not in p.parts)
    assert measured[0] == measured[1] == everything
    assert not any(str(test) in path for path in measured[0])
