"""Process-group set-up from RANK/WORLD_SIZE/LOCAL_RANK (torchrun, SageMaker's torchrun driver), or one process."""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from qcsight_core.errors import ConfigError

log = logging.getLogger(__name__)

# Collectives in training are per step; a rank that is silent this long has died or hung.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 writes every file).
        world_size: number of processes in the job.
        local_rank: rank on this host (picks the GPU).
        device: the torch device this process trains on.
        backend: "nccl", "gloo", or "" for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str = ""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def _int_env(env: Mapping[str, str], key: str, default: int) -> int:
    text = env.get(key, "")
    if not text:
        return default
    try:
        return int(text)
    except ValueError as exc:
        raise ConfigError(key, text, "an integer (set by torchrun)") from exc


def init_distributed(environ: Mapping[str, str] | None = None, *, use_cuda: bool | None = None) -> DistInfo:
    """Join the process group described by the environment, or run as one process without it.

    NCCL with one GPU per process on CUDA; gloo on CPU.

    Raises:
        ConfigError: RANK/WORLD_SIZE/LOCAL_RANK are present but inconsistent.
    """
    env = os.environ if environ is None else environ
    world_size = _int_env(env, "WORLD_SIZE", 1)
    rank = _int_env(env, "RANK", 0)
    local_rank = _int_env(env, "LOCAL_RANK", 0)
    cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError("RANK/WORLD_SIZE", (rank, world_size), "0 <= RANK < WORLD_SIZE")
    if cuda:
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ConfigError("LOCAL_RANK", local_rank, f"below the number of visible GPUs ({count})")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
    if world_size == 1:
        return DistInfo(0, 1, 0, device, "")
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": COLLECTIVE_TIMEOUT}
        if cuda:
            kwargs["device_id"] = torch.device(device)
        dist.init_process_group(**kwargs)
    log.info("rank %d/%d (local %d) joined the %s process group on %s", rank, world_size, local_rank, backend,
             device)
    return DistInfo(rank, world_size, local_rank, device, backend)


def shutdown(info: DistInfo) -> None:
    """Leave the process group (idempotent)."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(info: DistInfo, tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over every rank (a copy; the input is not modified). One process: unchanged."""
    result = tensor.detach().clone()
    if info.distributed:
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
    return result


def all_gather(info: DistInfo, value: Any) -> list[Any]:
    """Every rank's picklable value, in rank order (small values only: RNG states, counts)."""
    if not info.distributed:
        return [value]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast(info: DistInfo, value: Any) -> Any:
    """Rank 0's picklable value on every rank."""
    if not info.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()
