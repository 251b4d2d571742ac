"""Defaults that adapt: every combination of documented flags resolves, or fails naming the flag to change."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qcsight_core.errors import ConfigError
from qcsight_train import cli
from qcsight_train.config import TrainConfig, parse_img_size

pytestmark = pytest.mark.torch  # the train extra (qcsight_train imports it lazily, the area needs it)

BASE = ["--data", "d", "--output", "o"]


def _resolve(argv: list[str]) -> TrainConfig:
    args = cli.get_args_parser().parse_args([*BASE, *argv])
    return cli.resolve_config(args, {})[0]


# (flags, expected resolved values, substrings the adapted notes must hold)
WORKS = [
    ([], {"epochs": 12, "freeze_epochs": 0, "img_size": "auto", "select": "last", "refit": True}, []),
    (["--refit", "false"], {"refit": False}, []),
    (["--task", "anomaly"], {"refit": False}, ["refit True -> False: task=anomaly"]),
    (["--epochs", "1"], {"epochs": 1, "freeze_epochs": 0, "warmup_epochs": 0.5}, ["warmup_epochs 1.0 -> 0.5"]),
    (["--epochs", "1", "--freeze-epochs", "0"], {"freeze_epochs": 0}, ["warmup_epochs"]),
    (["--freeze-epochs", "1"], {"epochs": 12, "freeze_epochs": 1}, []),
    (["--freeze-epochs", "1", "--epochs", "2"], {"freeze_epochs": 1, "warmup_epochs": 1.0}, []),
    (["--epochs", "2", "--warmup-epochs", "2"], {"warmup_epochs": 2.0}, []),
    (["--val-fraction", "0.8"], {"val_fraction": 0.8, "test_fraction": 0.05}, ["test_fraction 0.15 -> 0.05"]),
    (["--test-fraction", "0.8"], {"test_fraction": 0.8, "val_fraction": 0.05}, ["val_fraction 0.15 -> 0.05"]),
    (["--val-fraction", "0.3", "--test-fraction", "0"], {"val_fraction": 0.3, "test_fraction": 0.0}, []),
    (["--img-size", "224x560"], {"img_size": "224x560"}, []),
    (["--img-size", "96", "--resize", "letterbox"], {"img_size": "96", "resize": "letterbox"}, []),
    (["--good-classes", "none"], {"good_classes": ("none",)}, []),
    (["--refit", "--epochs", "3", "--select", "best"], {"refit": True, "select": "best"}, []),
    (["--threshold-source", "oof", "--threshold-folds", "3", "--refit"], {"threshold_folds": 3}, []),
    (["--tracking-uri", "none", "--neo-onnx", "false", "--torchscript"], {"tracking_uri": "none", "torchscript": True},
     []),
    (["--epochs", "1", "--refit", "--threshold-source", "oof"], {"freeze_epochs": 0}, ["warmup_epochs"]),
]


@pytest.mark.parametrize(("argv", "expected", "notes"), WORKS, ids=[" ".join(w[0]) or "defaults" for w in WORKS])
def test_combinations_that_resolve(argv: list[str], expected: dict[str, object], notes: list[str]) -> None:
    cfg = _resolve(argv)
    assert {k: getattr(cfg, k) for k in expected} == expected
    for note in notes:
        assert any(note in line for line in cfg.adapted), cfg.adapted
    if not notes:
        assert cfg.adapted == ()


# (flags, the field the error names, a flag the message tells the user to change)
FAILS = [
    (["--freeze-epochs", "5", "--epochs", "5"], "freeze_epochs", "--freeze-epochs"),
    (["--freeze-epochs", "12"], "freeze_epochs", "--epochs"),
    (["--warmup-epochs", "3", "--epochs", "2"], "warmup_epochs", "--warmup-epochs"),
    (["--val-fraction", "0.5", "--test-fraction", "0.45"], "val_fraction+test_fraction", "--val-fraction"),
    (["--good-classes", "ok", "--defect-classes", "scratch"], "defect_classes", "--good-classes"),
    (["--img-size", "224x"], "img_size", "HxW"),
    (["--img-size", "16"], "img_size", "from 32 to 1024"),
    (["--select", "median"], "select", "best, last"),
    (["--threshold-source", "test"], "threshold_source", "validation, oof"),
    (["--threshold-folds", "1"], "threshold_folds", "from 2"),
    (["--task", "anomaly", "--refit"], "refit", "drop --refit"),
]


@pytest.mark.parametrize(("argv", "field", "hint"), FAILS, ids=[" ".join(f[0]) for f in FAILS])
def test_combinations_that_fail_name_the_flag(argv: list[str], field: str, hint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _resolve(argv)
    assert caught.value.field == field and hint in str(caught.value)


def test_epochs_1_now_trains_and_the_config_file_shows_what_was_adapted(tmp_path: Path) -> None:
    cfg = _resolve(["--epochs", "1"])
    text = cfg.save(tmp_path / "config.yaml").read_text()
    assert text.startswith("# Defaults changed to fit the settings given")
    assert "# adapted: warmup_epochs 1.0 -> 0.5: epochs=1" in text
    # The saved file reads back to the same settings (comments are comments).
    assert yaml.safe_load(text)["warmup_epochs"] == 0.5
    again = cli.resolve_config(cli.get_args_parser().parse_args(["--config", str(tmp_path / "config.yaml")]), {})[0]
    assert again == cfg


def test_img_size_forms() -> None:
    assert parse_img_size("160") == (160, 160)
    assert parse_img_size("224X560") == (224, 560)
    assert parse_img_size("auto") is None
