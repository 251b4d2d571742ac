"""`qcsight train` end to end on CPU: a real bundle, resumption, torchrun with two processes, the SageMaker contract."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from qcsight_core.bundle import load_bundle, pack_bundle
from qcsight_core.imageio import read_image
from qcsight_core.preprocess import preprocess_batch
from qcsight_core.runner import OnnxRunner
from tests.helpers.scripts import load_script
from tests.train.synth_data import (  # noqa: F401  (dataset is a fixture)
    CLASSES,
    DEFECTS,
    EPOCH_LINE,
    FAST_EXPORT,
    MOBILENET,
    SMALL,
    dataset,
    make_dataset,
)

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from qcsight_train import checkpoint, cli, trainer  # noqa: E402  (after the torch skip)
from qcsight_train.config import build_config  # noqa: E402
from qcsight_train.data import load_data  # noqa: E402
from qcsight_train.distributed import DistInfo  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "training" / "sagemaker_entry.py"


def _epoch_lines(text: str) -> list[tuple[int, int]]:
    return [(int(m.group(1)), int(m.group(2))) for m in re.finditer(EPOCH_LINE, text)]


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO / "edge_agent"), str(REPO / "training"), str(REPO / "infra"),
                                           str(REPO)]),
               OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1", **extra)
    return env


def test_two_epochs_on_cpu_write_a_bundle_that_onnx_runtime_runs(dataset: Path, tmp_path: Path,  # noqa: F811
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The default recipe (efficientnet_lite0, packaged ImageNet weights) end to end.

    INT8 and TorchScript are left to tests/train/test_export.py: here they would only add time.
    """
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        code = cli.main(["--data", str(dataset), "--output", str(out), *SMALL, *FAST_EXPORT, "--run-id", "t1"],
                        "qcsight train")
    assert code == 0
    assert _epoch_lines(caplog.text) == [(1, 2), (2, 2)]

    bundle = load_bundle(out / "bundle")
    manifest = bundle.manifest
    assert manifest.classes == CLASSES and manifest.defect_classes == DEFECTS
    assert manifest.architecture == "efficientnet_lite0" and manifest.run_id == "t1"
    assert (manifest.input.height, manifest.input.width, manifest.input.color) == (64, 64, "RGB")
    assert manifest.input.mean == (0.5, 0.5, 0.5)  # what the TF-ported lite0 weights expect
    assert [m.file for m in manifest.models] == ["model.onnx"]
    assert load_bundle(out / "model.tar.gz", extract_to=tmp_path / "unpacked").manifest.files == manifest.files

    images = [read_image(p) for p in sorted((dataset / "spot").glob("*.png"))[:4]]
    probs = OnnxRunner(bundle).run(preprocess_batch(images, manifest.input))
    assert probs.shape == (4, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["world_size"] == 1 and summary["resumed_from"] == 0
    assert summary["evaluation"]["split"] == "test"
    assert (out / "evaluation" / "metrics.json").is_file()
    assert len(json.loads((out / "history.json").read_text())) == 2
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["img_size"] == "64" and saved["epochs"] == 2 and saved["augment"]["hflip"] is False
    # The refit is on by default: the shipped model trained again on train+validation (the test never).
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "last.pt", "refit", "run_id.txt"]
    training = manifest.extra["training"]
    assert training["refit"] is True and training["trained_on"] == "train+validation" and training["train_images"] == 21


@pytest.mark.parametrize("ema_epochs", [0.0, 1.0])
def test_resumed_run_continues_exactly_where_the_interrupted_one_stopped(dataset: Path, tmp_path: Path,  # noqa: F811
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         ema_epochs: float) -> None:
    """Interrupted in epoch 2 and resumed, training ends with the same numbers as an uninterrupted run.

    Epoch 1 trains the head only and epoch 2 the whole network, so the resumed run must also
    restore the phase, the optimizer's state for the backbone, the schedule and the RNG (and,
    with --ema-epochs, the weight average, which is what best.pt keeps).
    """
    base = {"data": str(dataset), "output": str(tmp_path), "epochs": 2, "freeze_epochs": 1, "img_size": 64,
            "batch_size": 8, "arch": "mobilenet_v3_small", "weights": "none", "workers": 0,
            "ema_epochs": ema_epochs}
    cfg = build_config(base)
    splits = load_data(cfg, tmp_path / "cache")
    uninterrupted = trainer.fit(cfg, splits, DistInfo(), tmp_path / "a")

    real = trainer.train_one_epoch
    calls: list[int] = []

    def interrupted_in_epoch_two(*args: object, **kwargs: object) -> trainer.EpochStats:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("spot instance reclaimed")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trainer, "train_one_epoch", interrupted_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(cfg, splits, DistInfo(), tmp_path / "b")
    assert checkpoint.load(tmp_path / "b" / checkpoint.LAST)["epoch"] == 1  # type: ignore[index]
    monkeypatch.setattr(trainer, "train_one_epoch", real)

    resumed = trainer.fit(cfg, splits, DistInfo(), tmp_path / "b")
    assert resumed.resumed_from == 1 and len(resumed.history) == 2
    for before, after in zip(uninterrupted.history, resumed.history, strict=True):
        for key in ("epoch", "phase", "train_loss", "val_loss", "val_macro_f1", "lr"):
            assert before[key] == after[key], key
    last_a = checkpoint.load(tmp_path / "a" / checkpoint.LAST)["model"]  # type: ignore[index]
    last_b = checkpoint.load(tmp_path / "b" / checkpoint.LAST)["model"]  # type: ignore[index]
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)
    best_a = checkpoint.load(tmp_path / "a" / checkpoint.BEST)["model"]  # type: ignore[index]
    best_b = checkpoint.load(tmp_path / "b" / checkpoint.BEST)["model"]  # type: ignore[index]
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    # The average is what best.pt keeps (select last: the last epoch's), not the trained weights themselves.
    assert any(not torch.equal(best_a[k], last_a[k]) for k in best_a) == (ema_epochs > 0)

    with pytest.raises(checkpoint.CheckpointError, match="img_size: checkpoint '64', now '96'"):
        trainer.fit(build_config({**base, "img_size": 96}), splits, DistInfo(), tmp_path / "b")
    # Another tuning trial (same data, model and schedule, another learning rate) never carries on from it.
    with pytest.raises(checkpoint.CheckpointError, match=r"lr: checkpoint 0\.001, now 0\.002"):
        trainer.fit(build_config({**base, "lr": 0.002}), splits, DistInfo(), tmp_path / "b")


def test_torchrun_two_processes_train_together_and_only_rank_0_writes(dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               "-m", "qcsight_train.cli", "--data", str(dataset), "--output", str(out), *SMALL, *MOBILENET,
               *FAST_EXPORT, "--threads", "1"]
    done = subprocess.run(command, env=_subprocess_env(), capture_output=True, text=True, timeout=240, check=False)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    assert "rank 0/2 (local 0) joined the gloo process group" in text
    assert "rank 1/2 (local 1) joined the gloo process group" in text
    assert _epoch_lines(text) == [(1, 2), (2, 2)]  # rank 1 does not log them a second time
    assert "all 2 ranks hold identical weights" in text  # gradients were really averaged across the two
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    per_rank = summary["per_rank_images"]
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1] > 0  # both ranks trained equal shards
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "last.pt", "refit", "run_id.txt"]
    assert len(checkpoint.load(out / "checkpoints" / checkpoint.LAST)["rng"]) == 2  # type: ignore[index]
    load_bundle(out / "bundle")


def test_sagemaker_environment_is_honoured(dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    """Channels, SM_MODEL_DIR, SM_OUTPUT_DATA_DIR and SM_HPS, with argv built by training/sagemaker_node.py."""
    node = load_script("training/sagemaker_node.py")
    validation = make_dataset(tmp_path / "validation", count=9, seed=7)
    # As SageMaker stores them (hyperparameters.json): every value a string.
    hps = {"epochs": "2", "img-size": "64", "batch-size": "8", "arch": "mobilenet_v3_small", "weights": "none",
           "int8": "false", "torchscript": "false", "neo_onnx": "false", "workers": "0", "test_fraction": "0.2",
           "name": "line7"}
    model_dir, data_dir, checkpoints = tmp_path / "model", tmp_path / "output" / "data", tmp_path / "checkpoints"
    model_dir.mkdir()
    data_dir.mkdir(parents=True)
    env = _subprocess_env(
        SM_CHANNEL_TRAIN=str(dataset), SM_CHANNEL_VALIDATION=str(validation), SM_MODEL_DIR=str(model_dir),
        SM_OUTPUT_DATA_DIR=str(data_dir), SM_HPS=json.dumps(hps), SM_HOSTS='["algo-1"]', SM_CURRENT_HOST="algo-1",
        TRAINING_JOB_NAME="qcsight-train-test-1", QCSIGHT_CHECKPOINT_DIR=str(checkpoints))
    job = node.JobConfig(current_host="algo-1", hosts=("algo-1",), network_interface="eth0", channels=(),
                         hyperparameters=hps)
    command = node.torchrun_command(job, 1)
    argv = command[command.index("training/sagemaker_entry.py") + 1:]  # what our node script passes the entry
    done = subprocess.run([sys.executable, str(ENTRY), *argv, "--sagemaker_torch_distributed_enabled", "true"],
                          env=env, capture_output=True, text=True, timeout=240, check=False, cwd=tmp_path)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    assert _epoch_lines(text) == [(1, 2), (2, 2)]

    bundle = load_bundle(model_dir)  # the bundle is SM_MODEL_DIR itself, so SageMaker's model.tar.gz is the bundle
    assert bundle.manifest.name == "line7" and bundle.manifest.run_id == "qcsight-train-test-1"
    assert bundle.manifest.input.height == 64 and bundle.manifest.models[0].file == "model.onnx"
    tarball = pack_bundle(model_dir, tmp_path / "model.tar.gz")  # as SageMaker packs SM_MODEL_DIR
    assert load_bundle(tarball, extract_to=tmp_path / "unpacked").manifest.files == bundle.manifest.files

    # A folder per training job: the jobs of a tuning job share the synced prefix, a spot restart keeps its name.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["qcsight-train-test-1"]
    job_dir = checkpoints / "qcsight-train-test-1"
    assert sorted(p.name for p in job_dir.iterdir()) == ["best.pt", "last.pt", "refit", "run_id.txt"]
    config = yaml.safe_load((data_dir / "config.yaml").read_text())
    assert (config["data"], config["validation"], config["output"]) == (str(dataset), str(validation),
                                                                        str(model_dir))
    assert (config["epochs"], config["img_size"], config["arch"], config["int8"]) == (2, "64", "mobilenet_v3_small",
                                                                                        False)
    summary = json.loads((data_dir / "summary.json").read_text())
    assert summary["splits"]["val"] == {"good": 3, "scratch": 3, "spot": 3}  # the validation channel, not a split
    assert (data_dir / "evaluation" / "metrics.json").is_file()
