"""benchmarks/cv_recipe.py's paired comparison: the figures a pre-registered rule reads, with their intervals."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from qcsight_train.metrics import binary_curves
from tests.train.synth_data import MOBILENET, make_dataset


def load_cv_recipe() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "cv_recipe.py"
    spec = importlib.util.spec_from_file_location("cv_recipe", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cv_recipe() -> ModuleType:
    return load_cv_recipe()


def case(seed: int = 3) -> dict[str, np.ndarray | list[str]]:
    """60 images of 3 classes (0 = good) in 20 groups of 3; two variants' predictions and defect scores."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), 20)
    groups = [f"g{i // 3}" for i in range(60)]
    base = np.where(rng.random(60) < 0.7, labels, (labels + 1) % 3)
    other = np.where(rng.random(60) < 0.85, labels, (labels + 2) % 3)
    is_defect = labels != 0
    base_score = is_defect * 0.4 + rng.random(60)
    other_score = is_defect * 0.7 + rng.random(60)
    return {"labels": labels, "groups": groups, "base": base, "other": other, "is_defect": is_defect,
            "base_score": base_score, "other_score": other_score}


def test_accuracy_and_auroc_differences_are_the_whole_sets_figures(cv_recipe: ModuleType) -> None:
    c = case()
    diff = cv_recipe.paired_difference(c["labels"], c["base"], c["other"], c["groups"], 3, 300, 0,
                                       base_score=c["base_score"], other_score=c["other_score"],
                                       is_defect=c["is_defect"])
    labels = c["labels"]
    assert diff["accuracy_difference"] == pytest.approx(np.mean(c["other"] == labels) - np.mean(c["base"] == labels))
    by_hand = (binary_curves(c["is_defect"], c["other_score"])["roc_auc"]
               - binary_curves(c["is_defect"], c["base_score"])["roc_auc"])
    assert diff["auroc_difference"] == pytest.approx(by_hand)
    for name in ("interval_95", "accuracy_interval_95", "auroc_interval_95"):
        low, high = diff[name]
        assert low < high, name
    assert diff["accuracy_interval_95"][0] <= diff["accuracy_difference"] <= diff["accuracy_interval_95"][1]
    assert diff["auroc_interval_95"][0] <= diff["auroc_difference"] <= diff["auroc_interval_95"][1]


def test_the_macro_f1_interval_is_the_same_with_or_without_scores(cv_recipe: ModuleType) -> None:
    # The AUROC rides on the macro-F1's draws: adding it must not change a figure a rule already read.
    c = case()
    plain = cv_recipe.paired_difference(c["labels"], c["base"], c["other"], c["groups"], 3, 300, 0)
    scored = cv_recipe.paired_difference(c["labels"], c["base"], c["other"], c["groups"], 3, 300, 0,
                                         base_score=c["base_score"], other_score=c["other_score"],
                                         is_defect=c["is_defect"])
    assert scored["interval_95"] == plain["interval_95"]
    assert scored["accuracy_interval_95"] == plain["accuracy_interval_95"]
    assert "auroc_difference" not in plain and "auroc_difference" in scored


def test_a_variant_against_itself_differs_by_nothing(cv_recipe: ModuleType) -> None:
    c = case()
    diff = cv_recipe.paired_difference(c["labels"], c["base"], c["base"], c["groups"], 3, 200, 0,
                                       base_score=c["base_score"], other_score=c["base_score"],
                                       is_defect=c["is_defect"])
    assert diff["macro_f1_difference"] == diff["accuracy_difference"] == diff["auroc_difference"] == 0
    assert diff["interval_95"] == diff["accuracy_interval_95"] == diff["auroc_interval_95"] == [0.0, 0.0]
    assert diff["only_this_right"] == diff["only_first_right"] == 0


def test_the_fold_mean_curve_reaches_its_final_figure_where_the_mean_does(cv_recipe: ModuleType) -> None:
    # Fold 1 comes within 0.01 of its own last figure (0.90) at epoch 2, fold 2 of its own (0.70) only
    # at epoch 4 (0.685 is 0.015 short); the mean (0.80 at the end) does at epoch 3, which neither fold gives.
    folds = [{"val_macro_f1_per_epoch": [0.50, 0.90, 0.90, 0.90], "seconds_per_epoch": [10, 10, 10, 10]},
             {"val_macro_f1_per_epoch": [0.40, 0.60, 0.685, 0.70], "seconds_per_epoch": [20, 20, 20, 20]}]
    curve = cv_recipe.fold_mean_curve(folds)
    assert curve["val_macro_f1_per_epoch"] == [0.45, 0.75, 0.7925, 0.8]
    assert (curve["epochs_to_final"], curve["epochs"], curve["within"]) == (3, 4, 0.01)
    assert curve["seconds_to_final_per_fold"] == 45.0  # three epochs at the folds' mean 15 s
    assert cv_recipe.fold_mean_curve([folds[0], {"val_macro_f1_per_epoch": [0.5, 0.6]}]) is None


def test_folds_run_one_at_a_time_share_the_workdir_and_report_once_all_are_done(
        cv_recipe: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--fold K` trains fold K only, so folds can run in separate processes; the report waits for all."""
    data = make_dataset(tmp_path / "data", count=18)
    flags = " ".join(["--img-size", "32", "--batch-size", "4", "--epochs", "1", "--workers", "0", *MOBILENET])
    argv = ["--data", str(data), "--folds", "2", "--variant", f"tiny={flags}", "--workdir", str(tmp_path / "cv"),
            "--json", str(tmp_path / "cv.json"), "--bootstrap", "10"]
    saved = [tmp_path / "cv" / "tiny" / f"fold{k}.npz" for k in (1, 2)]

    assert cv_recipe.main([*argv, "--fold", "2"]) == 0
    assert [p.exists() for p in saved] == [False, True]
    assert "not every fold is done" in capsys.readouterr().out
    assert not (tmp_path / "cv.json").exists()
    fold2 = saved[1].read_bytes()

    assert cv_recipe.main(argv) == 0  # trains fold 1, reads fold 2 back, reports both
    assert all(p.exists() for p in saved) and saved[1].read_bytes() == fold2
    report = json.loads((tmp_path / "cv.json").read_text())
    assert [f["fold"] for f in report["variants"]["tiny"]["folds"]] == [1, 2]
    assert len(report["variants"]["tiny"]["pred"]) == 18
    assert "out-of-fold accuracy" in capsys.readouterr().out

    with pytest.raises(SystemExit) as bad:
        cv_recipe.main([*argv, "--fold", "3"])
    assert bad.value.code == 2
    assert "--fold 3: a fold from 1 to --folds 2" in capsys.readouterr().err
