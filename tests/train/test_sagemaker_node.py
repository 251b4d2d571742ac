"""training/sagemaker_node.py: from SageMaker's /opt/ml/input/config to torchrun and the SM_* environment.

SageMaker writes resourceconfig.json, inputdataconfig.json and hyperparameters.json (values as
strings) on every node; these tests write the same files in a temporary /opt/ml and check what
the node would start, and that `qcsight train` reads back what the launcher sent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qcsight_train import cli
from qcsight_train.launch.plan import ENTRY_SCRIPT, NODE_SCRIPT
from tests.helpers.scripts import load_script

node = load_script(NODE_SCRIPT)
HYPERPARAMETERS = {"arch": "resnet18", "epochs": "10", "batch-size": "64", "lr": "0.0003", "warmup_epochs": "0.5"}


def _sagemaker_root(tmp_path: Path, current: str, hosts: list[str]) -> Path:
    config = tmp_path / "opt-ml" / "input" / "config"
    config.mkdir(parents=True)
    (config / "resourceconfig.json").write_text(json.dumps(
        {"current_host": current, "current_instance_type": "ml.g5.12xlarge", "hosts": hosts,
         "network_interface_name": "eth1"}))
    channel = {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"}
    (config / "inputdataconfig.json").write_text(json.dumps({"train": channel, "validation": channel,
                                                             "code": channel}))
    (config / "hyperparameters.json").write_text(json.dumps(HYPERPARAMETERS))
    return tmp_path / "opt-ml"


def test_each_node_joins_one_torchrun_rendezvous_on_the_first_host(tmp_path: Path) -> None:
    commands = {}
    for host in ("algo-2", "algo-1", "algo-3"):
        root = _sagemaker_root(tmp_path / host, host, ["algo-3", "algo-1", "algo-2"])
        job = node.JobConfig.read(root)
        commands[host] = node.torchrun_command(job, 4, python="python3")
    assert commands["algo-2"] == [
        "python3", "-m", "torch.distributed.run", "--nnodes=3", "--nproc_per_node=4",
        "--master_addr=algo-1", f"--master_port={node.MASTER_PORT}", "--node_rank=1", ENTRY_SCRIPT,
        "--arch", "resnet18", "--epochs", "10", "--batch-size", "64", "--lr", "0.0003", "--warmup_epochs", "0.5"]
    assert [c[7] for c in (commands["algo-1"], commands["algo-2"], commands["algo-3"])] == [
        "--node_rank=0", "--node_rank=1", "--node_rank=2"]


def test_one_node_needs_no_rendezvous_address(tmp_path: Path) -> None:
    job = node.JobConfig.read(_sagemaker_root(tmp_path, "algo-1", ["algo-1"]))
    command = node.torchrun_command(job, 1, python="python3")
    assert command[:5] == ["python3", "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=1"]
    assert not [c for c in command if c.startswith(("--master_addr", "--node_rank"))]


def test_qcsight_train_reads_back_what_the_launcher_sent(tmp_path: Path) -> None:
    """The node's SM_* environment and flags, parsed by `qcsight train` as the entry script would."""
    root = _sagemaker_root(tmp_path, "algo-1", ["algo-1", "algo-2"])
    job = node.JobConfig.read(root)
    env = node.job_environment(job, root, gpus=4)
    assert env["SM_CHANNEL_TRAIN"] == str(root / "input" / "data" / "train")
    assert (env["SM_NUM_GPUS"], env["NCCL_SOCKET_IFNAME"]) == ("4", "eth1")
    command = node.torchrun_command(job, 4)
    flags = command[command.index(ENTRY_SCRIPT) + 1:]
    args = cli.get_args_parser().parse_args(cli._without_sagemaker_internal(flags))
    cfg, sm = cli.resolve_config(args, {**env, "TRAINING_JOB_NAME": "qcsight-train-1"})
    assert (cfg.data, cfg.validation, cfg.output) == (env["SM_CHANNEL_TRAIN"], env["SM_CHANNEL_VALIDATION"],
                                                      str(root / "model"))
    assert (cfg.arch, cfg.epochs, cfg.batch_size, cfg.lr, cfg.warmup_epochs) == ("resnet18", 10, 64, 0.0003, 0.5)
    assert sm.hosts == ("algo-1", "algo-2") and cfg.run_id == "qcsight-train-1"


def test_a_broken_config_is_reported_as_the_jobs_failure_reason(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "opt-ml"
    (root / "input" / "config").mkdir(parents=True)
    (root / "input" / "config" / "resourceconfig.json").write_text('{"hosts": ["algo-1"]}')  # no current_host
    assert node.main([], root=root) == 1
    failure = (root / "output" / "failure").read_text()
    assert failure.startswith("qcsight node setup failed: KeyError") and "current_host" in failure
    assert "current_host" in capsys.readouterr().err
