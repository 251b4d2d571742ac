"""Settings: precedence (defaults < YAML < SageMaker < flags), validation that names the field, the epoch line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from qcsight_core.errors import ConfigError
from qcsight_train import cli
from qcsight_train.config import TrainConfig, build_config, flatten, read_yaml
from qcsight_train.sm_env import SageMakerEnv
from tests.train.synth_data import EPOCH_LINE

pytestmark = pytest.mark.torch  # the train extra (qcsight_train imports it lazily, the area needs it)


def _resolve(argv: list[str], environ: dict[str, str] | None = None) -> TrainConfig:
    args = cli.get_args_parser().parse_args(cli._without_sagemaker_internal(argv))
    return cli.resolve_config(args, environ or {})[0]


def test_flags_override_yaml_which_overrides_defaults(tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"data": "d", "output": "o", "epochs": 7, "lr": 0.01,
                                      "augment": {"hflip": True, "dropout_p": 0.0}}))
    cfg = _resolve(["--config", str(config), "--lr", "0.002", "--vflip"])
    assert (cfg.epochs, cfg.lr, cfg.batch_size) == (7, 0.002, 32)
    assert (cfg.augment.hflip, cfg.augment.vflip, cfg.augment.dropout_p) == (True, True, 0.0)


def test_sagemaker_channels_and_hyperparameters_sit_between_yaml_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("epochs: 3\nbatch_size: 4\nimg_size: 96\n")
    environ = {"SM_CHANNEL_TRAIN": "/opt/ml/input/data/train", "SM_CHANNEL_VALIDATION": "/opt/ml/input/data/val",
               "SM_MODEL_DIR": "/opt/ml/model", "SM_OUTPUT_DATA_DIR": "/opt/ml/output/data",
               "SM_HPS": json.dumps({"epochs": 9, "batch-size": "16", "hflip": "true", "sagemaker_program": "x"}),
               "TRAINING_JOB_NAME": "job-1"}
    cfg = _resolve(["--config", str(config), "--epochs", "12", "--sagemaker_torch_distributed_enabled", "true"],
                   environ)
    assert (cfg.data, cfg.validation, cfg.output) == ("/opt/ml/input/data/train", "/opt/ml/input/data/val",
                                                      "/opt/ml/model")
    assert (cfg.epochs, cfg.batch_size, cfg.img_size, cfg.augment.hflip) == (12, 16, "96", True)
    assert (cfg.checkpoint_dir, cfg.run_id) == ("/opt/ml/checkpoints", "job-1")


def test_the_launcher_checkpoint_directory_wins_over_the_default() -> None:
    env = SageMakerEnv.from_environ({"SM_MODEL_DIR": "/m", "QCSIGHT_CHECKPOINT_DIR": "/ckpt"})
    assert env.settings()["checkpoint_dir"] == "/ckpt"
    assert SageMakerEnv.from_environ({}).settings() == {}


def test_bad_sm_hps_is_named() -> None:
    with pytest.raises(ConfigError, match="SM_HPS"):
        SageMakerEnv.from_environ({"SM_HPS": "{not json"})


@pytest.mark.parametrize(("argv", "field"), [
    (["--epochs", "0"], "epochs"),
    (["--lr", "fast"], "lr"),
    (["--arch", "vgg11"], "arch"),
    (["--balance", "oversample"], "balance"),
    (["--hflip", "maybe"], "hflip"),
    (["--freeze-epochs", "5", "--epochs", "5"], "freeze_epochs"),
    (["--val-fraction", "0.5", "--test-fraction", "0.45"], "val_fraction+test_fraction"),
])
def test_bad_values_name_the_field(argv: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _resolve(["--data", "d", "--output", "o", *argv])
    assert caught.value.field == field


@pytest.mark.parametrize(("settings", "field"), [
    ({"lr": 10**400}, "lr"),  # too large for a float: a ConfigError, not an OverflowError
    ({"lr": "1e400"}, "lr"),
    ({"epochs": "9" * 400}, "epochs"),
    ({"seed": 10**400}, "seed"),
    ({"hflip": "maybe"}, "hflip"),
    ({"batch_size": 32.5}, "batch_size"),
])
def test_overflow_and_wrong_types_name_the_field(settings: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({"data": "d", "output": "o", **settings})
    assert caught.value.field == field


def test_values_arriving_as_text_or_integral_floats_are_coerced() -> None:
    cfg = build_config({"data": "d", "output": "o", "epochs": 5.0, "lr": "0.01", "hflip": "yes"})
    assert (cfg.epochs, cfg.lr, cfg.augment.hflip) == (5, 0.01, True) and type(cfg.epochs) is int
    assert TrainConfig(data="d", output="o", epochs="3").epochs == 3  # type: ignore[arg-type]


def test_missing_data_and_unknown_yaml_keys_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--data"):
        _resolve(["--output", "o"])
    config = tmp_path / "c.yaml"
    config.write_text("data: d\noutput: o\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: learning_rate.*a known setting: data, validation"):
        read_yaml(config)


def test_main_reports_usage_errors_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--data", "d", "--output", "o", "--epochs", "-1"], "qcsight train") == 2
    assert "invalid configuration epochs=-1" in capsys.readouterr().err


def test_saved_config_reads_back_to_the_same_config(tmp_path: Path) -> None:
    cfg = build_config({"data": "d", "output": "o", "defect_classes": "crack,fray", "hflip": True, "lr": 3e-4})
    cfg.save(tmp_path / "config.yaml")
    assert build_config(read_yaml(tmp_path / "config.yaml")) == cfg
    assert cfg.defect_classes == ("crack", "fray")


def test_list_values_arrive_as_json_from_sagemaker() -> None:
    assert flatten({"good-classes": '["free", "ok"]'}, "SM_HPS") == {"good_classes": ("free", "ok")}


def test_sagemaker_flag_anywhere_goes_to_the_launcher(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = cli.main(["--epochs", "3", "--sagemaker", "--help"], "qcsight train")
    except SystemExit as exited:  # argparse's --help, unless the launcher turns it into a return code
        code = int(exited.code or 0)
    assert code == 0
    assert "Submit a SageMaker training job" in capsys.readouterr().out


def test_help_documents_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"], "qcsight train")
    text = capsys.readouterr().out
    for flag in ("--data", "--weights", "--freeze-epochs", "--groups", "--target-recall", "--checkpoint-dir",
                 "--hflip", "--rot90", "--balance"):
        assert flag in text
    assert "efficientnet_lite0, mobilenet_v3_small" in text


def test_epoch_line_is_what_the_launchers_metric_regexes_read() -> None:
    torch = pytest.importorskip("torch")
    import numpy as np

    from qcsight_train.engine import EpochStats, EvalResult, epoch_line
    from qcsight_train.launch.plan import METRIC_DEFINITIONS

    del torch
    confusion = np.array([[8, 1], [2, 9]])
    line = epoch_line(3, 10, EpochStats(0.41234, 852, 10.0, (426, 426)), EvalResult(0.38121, confusion), 0.00031)
    assert line == ("epoch=3/10 train_loss=0.4123 val_loss=0.3812 val_acc=0.8500 val_macro_f1=0.8496 "
                    "lr=0.000310 images_per_s=85.2")
    assert re.fullmatch(EPOCH_LINE, line)
    found = {m["Name"]: float(re.search(m["Regex"], f"2026-01-01 INFO qcsight_train.epoch: {line}").group(1))
             for m in METRIC_DEFINITIONS}
    assert found == {"train:loss": 0.4123, "validation:loss": 0.3812, "validation:accuracy": 0.85,
                     "validation:macro_f1": 0.8496, "throughput": 85.2}


def test_a_resumed_run_keeps_the_interrupted_runs_id(tmp_path: Path) -> None:
    from qcsight_train.run import RUN_ID_FILE, run_id_for

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / RUN_ID_FILE).write_text("train-20260101-000000\n")
    cfg = build_config({"data": "d", "output": "o"})
    # No last.pt: nothing to resume, a new id.
    assert run_id_for(cfg, checkpoints) != "train-20260101-000000"
    (checkpoints / "last.pt").write_bytes(b"checkpoint")
    assert run_id_for(cfg, checkpoints) == "train-20260101-000000"
    assert run_id_for(build_config({"data": "d", "output": "o", "resume": False}), checkpoints) != \
        "train-20260101-000000"
    # A configured id (on SageMaker: the job name) always wins.
    assert run_id_for(build_config({"data": "d", "output": "o", "run_id": "job-7"}), checkpoints) == "job-7"

