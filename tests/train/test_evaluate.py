"""Evaluation of a real tiny ONNX bundle on real image files (no torch needed).

The tiny bundle's defect score rises with brightness: dark images are named "good", bright
ones "spot" (see tests/helpers/models.py), so the expected numbers can be worked out by hand.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from qcsight_core import cli
from qcsight_core.bundle import Bundle, DecisionPolicy, pack_bundle
from qcsight_core.runner import OnnxRunner
from qcsight_train import evaluate_cli
from qcsight_train.errors import EvaluationError
from qcsight_train.evaluate import evaluate_bundle, score_images, summarise
from tests.helpers.images import truncate, write_image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DARK, MID, BRIGHT = 30, 128, 220


def _dataset(root: Path) -> Path:
    """good: 3 dark + 1 mid (named spot); scratch: 2 bright (named spot); spot: 3 bright + 1 corrupt."""
    for i in range(3):
        write_image(root / "good" / f"dark{i}.png", DARK, seed=i)
    write_image(root / "good" / "mid.png", MID, seed=9)
    for i in range(2):
        write_image(root / "scratch" / f"bright{i}.png", BRIGHT, seed=10 + i)
    for i in range(3):
        write_image(root / "spot" / f"bright{i}.png", BRIGHT, seed=20 + i)
    truncate(write_image(root / "spot" / "broken.jpg", BRIGHT, seed=30), keep=0.4)
    return root


def test_evaluate_bundle_numbers_match_a_hand_count(tiny_bundle: Bundle, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    pairs = [(str(p), p.parent.name) for p in sorted(data.rglob("*.*"))]

    metrics = evaluate_bundle(tiny_bundle, pairs, tmp_path / "out", target_defect_recall=0.99)

    # Top-1 classes: good 3/4 right (mid -> spot), scratch 0/2 (-> spot), spot 3/3; broken.jpg unreadable.
    cls = metrics["classification"]
    assert metrics["images"] == 9
    assert cls["confusion_matrix"] == [[3, 0, 1], [0, 0, 2], [0, 0, 3]]
    assert cls["accuracy"] == pytest.approx(6 / 9)
    assert cls["balanced_accuracy"] == pytest.approx((3 / 4 + 0 + 1) / 3)
    assert cls["per_class"]["spot"]["precision"] == pytest.approx(3 / 6)
    # Every defect (bright) scores above every good part (dark, mid): perfect ranking.
    assert metrics["binary"]["roc_auc"] == pytest.approx(1.0)
    assert metrics["binary"]["pr_auc"] == pytest.approx(1.0)
    op = metrics["operating_point"]
    assert op["defect_recall"] == pytest.approx(1.0) and op["false_reject_rate"] == pytest.approx(0.0)
    # At the bundle's own 0.5 threshold the mid-grey good part is rejected: 1 of 4.
    assert metrics["at_bundle_threshold"]["false_reject_rate"] == pytest.approx(1 / 4)
    assert metrics["verdicts"] == {"good": 3, "defect": 6, "uncertain": 0}
    assert [u["path"] for u in metrics["unreadable"]] == [str(data / "spot" / "broken.jpg")]
    assert "truncated" in metrics["unreadable"][0]["reason"]


def test_classification_scores_the_top1_class_and_named_the_verdicts_class(tiny_bundle: Bundle) -> None:
    # Classes good, scratch, spot; defect threshold 0.6, uncertain band from 0.3.
    manifest = dataclasses.replace(tiny_bundle.manifest, decision=DecisionPolicy(0.6, 0.3))
    probs = np.array([[0.9, 0.05, 0.05],    # good: top-1 good, verdict good
                      [0.6, 0.3, 0.1],      # good: top-1 good, defect score 0.4 -> uncertain, names scratch
                      [0.5, 0.1, 0.4],      # spot: top-1 good, score 0.5 -> uncertain, names spot
                      [0.1, 0.2, 0.7]])     # spot: top-1 spot, verdict defect
    labels = ["good", "good", "spot", "spot"]

    metrics = summarise(manifest, labels, probs, target_defect_recall=1.0)

    assert metrics["classification"]["accuracy"] == pytest.approx(3 / 4)   # only row 2's top-1 is wrong
    assert metrics["named"]["accuracy"] == pytest.approx(3 / 4)            # row 1 is named scratch
    assert metrics["classification"]["confusion_matrix"] == [[2, 0, 0], [0, 0, 0], [1, 0, 1]]
    assert metrics["named"]["confusion_matrix"] == [[1, 1, 0], [0, 0, 0], [0, 0, 2]]
    assert metrics["verdicts"] == {"good": 1, "defect": 1, "uncertain": 2}
    at = metrics["at_bundle_threshold"]
    assert at["good_to_review_rate"] == pytest.approx(1 / 2) and at["defect_to_review_rate"] == pytest.approx(1 / 2)
    assert at["defect_recall"] == pytest.approx(1 / 2) and at["false_reject_rate"] == pytest.approx(0.0)


def test_threshold_matches_the_lowest_defect_score(tiny_bundle: Bundle, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    pairs = [(str(p), p.parent.name) for p in sorted(data.rglob("*.png"))]
    scored = score_images(pairs, tiny_bundle.manifest.input, {"fp32": OnnxRunner(tiny_bundle)})
    probs = scored.probabilities["fp32"]
    defect_scores = probs[:, 1:].sum(axis=1)
    is_defect = np.array([label != "good" for label in scored.labels])

    metrics = evaluate_bundle(tiny_bundle, pairs, tmp_path / "out", target_defect_recall=1.0)

    assert metrics["operating_point"]["threshold"] == pytest.approx(defect_scores[is_defect].min(), abs=1e-6)


def test_evaluate_cli_writes_metrics_plots_and_report(tiny_bundle: Bundle, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    data = _dataset(tmp_path / "data")
    out = tmp_path / "eval"

    code = evaluate_cli.main(["--bundle", str(tiny_bundle.path), "--data", str(data), "--output", str(out)],
                             prog="qcsight evaluate")

    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 9 and len(metrics["unreadable"]) == 1
    for name in ("confusion_matrix.png", "roc.png", "pr.png"):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE), name
        assert (out / name).stat().st_size > 5000
    report = (out / "report.md").read_text()
    assert "broken.jpg" in report and "truncated" in report
    # The worst misclassified images are listed: the two bright scratches named spot, then the mid-grey good part.
    worst = report.split("## Worst misclassified")[1].split("## Unreadable")[0]
    assert worst.count("| scratch | spot |") == 2 and "mid.png" in worst
    assert worst.index("bright") < worst.index("mid.png")
    printed = capsys.readouterr().out
    assert "accuracy 0.6667" in printed
    # The recall at the bundle's threshold comes with its Wilson interval and the defect count it rests on.
    at = metrics["at_bundle_threshold"]
    low, high = at["defect_recall_ci95"]
    assert low <= at["defect_recall"] <= high and at["defect_images"] + at["good_images"] == 9
    assert f"{at['defect_images']} defects)" in printed and "95 % CI" in report


def test_evaluate_cli_reads_a_tarball_and_a_csv_test_split(tiny_bundle: Bundle, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    tarball = pack_bundle(tiny_bundle.path, tmp_path / "model.tar.gz")
    index = tmp_path / "data" / "index.csv"
    rows = ["path,label,group,split", "good/dark0.png,good,a,test", "spot/bright0.png,spot,b,test",
            "good/dark1.png,good,c,train", "scratch/bright0.png,scratch,d,val"]
    index.write_text("\n".join(rows) + "\n")
    out = tmp_path / "eval"

    code = evaluate_cli.main(["--bundle", str(tarball), "--data", str(index), "--output", str(out)], prog="q")

    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 2 and metrics["classification"]["accuracy"] == pytest.approx(1.0)
    assert data.exists()


def test_evaluate_cli_failures_are_named(tiny_bundle: Bundle, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    data = _dataset(tmp_path / "data")
    # The tiny bundle has no INT8 model: a clear error and exit code 1 through the dispatcher.
    argv = ["evaluate", "--bundle", str(tiny_bundle.path), "--data", str(data), "--output", str(tmp_path / "o")]
    assert cli.main([*argv, "--int8"]) == 1
    assert "int8" in capsys.readouterr().err
    assert cli.main([*argv, "--split", "val"]) == 1
    assert "no samples in split 'val'" in capsys.readouterr().err
    assert cli.main([*argv, "--target-recall", "1.5"]) == 2


def test_labels_unknown_to_the_bundle_and_all_unreadable_are_refused(tiny_bundle: Bundle, tmp_path: Path) -> None:
    image = write_image(tmp_path / "a.png", DARK)
    with pytest.raises(EvaluationError, match="dent"):
        evaluate_bundle(tiny_bundle, [(str(image), "dent")], tmp_path / "out")
    broken = truncate(write_image(tmp_path / "b.jpg", DARK), keep=0.3)
    with pytest.raises(EvaluationError, match="none of the 1 images"):
        evaluate_bundle(tiny_bundle, [(str(broken), "good")], tmp_path / "out")


def test_evaluation_without_defect_images_still_writes_everything(tiny_bundle: Bundle, tmp_path: Path) -> None:
    pairs = [(str(write_image(tmp_path / f"g{i}.png", DARK, seed=i)), "good") for i in range(3)]
    out = tmp_path / "out"
    metrics = evaluate_bundle(tiny_bundle, pairs, out)
    assert metrics["binary"]["roc_auc"] is None and metrics["operating_point"]["threshold"] is None
    assert sorted(p.name for p in out.iterdir()) == ["confusion_matrix.png", "metrics.json", "pr.png", "report.md",
                                                     "roc.png"]
