"""SageMaker training job, once per node: install the requirements, fill in SM_*, start torchrun on this node.

The launcher (qcsight_train.launch.job_requests.NODE_COMMAND) starts every node with
``bash -c 'cd /opt/ml/code; tar -xzf .../sourcedir.tar.gz; exec python3 training/sagemaker_node.py'``.
SageMaker describes the job in /opt/ml/input/config/*.json; this script turns that into the
SM_* variables qcsight_train reads (the ones SageMaker's training toolkit sets), pip-installs
requirements.txt (the image already has torch and torchvision), then replaces itself with
torchrun running training/sagemaker_entry.py, the hyperparameters as ``--key value`` flags.

Standard library only: it runs before the requirements are installed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ENTRY_SCRIPT = "training/sagemaker_entry.py"
SAGEMAKER_ROOT = Path("/opt/ml")
# Rendezvous port on the first host; SageMaker leaves the nodes' ports free for the job.
MASTER_PORT = 7777


@dataclass(frozen=True)
class JobConfig:
    """What SageMaker writes to /opt/ml/input/config for this node."""

    current_host: str
    hosts: tuple[str, ...]  # sorted: every node ranks them the same way
    network_interface: str
    channels: tuple[str, ...]
    hyperparameters: Mapping[str, str]

    @classmethod
    def read(cls, root: Path) -> JobConfig:
        config = root / "input" / "config"
        resource = json.loads((config / "resourceconfig.json").read_text(encoding="utf-8"))
        channels = _optional_json(config / "inputdataconfig.json")
        hyperparameters = _optional_json(config / "hyperparameters.json")
        return cls(
            current_host=str(resource["current_host"]),
            hosts=tuple(sorted(str(h) for h in resource["hosts"])),
            network_interface=str(resource.get("network_interface_name") or "eth0"),
            channels=tuple(sorted(channels)),
            hyperparameters={str(k): str(v) for k, v in hyperparameters.items()},
        )

    @property
    def node_rank(self) -> int:
        return self.hosts.index(self.current_host)


def _optional_json(path: Path) -> dict[str, object]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def job_environment(job: JobConfig, root: Path, gpus: int) -> dict[str, str]:
    """The SM_* variables qcsight_train.sm_env reads, and the NCCL interface SageMaker names."""
    env = {
        "SM_MODEL_DIR": str(root / "model"),
        "SM_OUTPUT_DATA_DIR": str(root / "output" / "data"),
        "SM_CHANNELS": json.dumps(list(job.channels)),
        "SM_HPS": json.dumps(dict(job.hyperparameters)),
        "SM_HOSTS": json.dumps(list(job.hosts)),
        "SM_CURRENT_HOST": job.current_host,
        "SM_NUM_GPUS": str(gpus),
        "NCCL_SOCKET_IFNAME": job.network_interface,
    }
    for channel in job.channels:
        env[f"SM_CHANNEL_{channel.upper()}"] = str(root / "input" / "data" / channel)
    return env


def torchrun_command(job: JobConfig, processes_per_node: int, python: str = sys.executable) -> list[str]:
    """torchrun for this node: every node runs processes_per_node processes, the first host is the rendezvous."""
    command = [python, "-m", "torch.distributed.run", f"--nnodes={len(job.hosts)}",
               f"--nproc_per_node={processes_per_node}"]
    if len(job.hosts) > 1:
        command += [f"--master_addr={job.hosts[0]}", f"--master_port={MASTER_PORT}", f"--node_rank={job.node_rank}"]
    command.append(ENTRY_SCRIPT)
    for key, value in job.hyperparameters.items():
        command += [f"--{key}", value]
    return command


def gpu_count() -> int:
    try:
        listing = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))


def _install_requirements(workdir: Path) -> None:
    requirements = workdir / "requirements.txt"
    if requirements.is_file():
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-cache-dir", "-r", str(requirements)],
                       check=True, timeout=3600)


def main(argv: Sequence[str] | None = None, root: Path = SAGEMAKER_ROOT) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes-per-node", type=int, default=0, help="default: one per GPU, else one")
    args = parser.parse_args(argv)
    try:
        job = JobConfig.read(root)
        _install_requirements(Path.cwd())
        gpus = gpu_count()
        command = torchrun_command(job, args.processes_per_node or gpus or 1)
        print(f"node {job.node_rank} of {len(job.hosts)} ({gpus} GPUs): {' '.join(command)}", flush=True)
        os.execve(command[0], command, {**os.environ, **job_environment(job, root, gpus)})
    except (OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
        # SageMaker reports the failure file's text as the job's FailureReason.
        message = f"qcsight node setup failed: {type(exc).__name__}: {exc}"
        print(message, file=sys.stderr, flush=True)
        failure = root / "output" / "failure"
        failure.parent.mkdir(parents=True, exist_ok=True)
        failure.write_text(message[:1000], encoding="utf-8")
        return 1
    return 0  # not reached: execve replaced this process


if __name__ == "__main__":
    sys.exit(main())
