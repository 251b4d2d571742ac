"""Per-epoch checkpoints, written atomically, so a killed run (a reclaimed spot instance) resumes where it was.

Two files in the checkpoint directory: `last.pt` (everything needed to continue: model,
optimizer, scheduler, grad scaler, epochs done, every rank's RNG state, history, best so far)
and `best.pt` (the weights with the best validation macro-F1). SageMaker syncs the directory
(/opt/ml/checkpoints) to S3 and restores it into a restarted job.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qcsight_train.errors import TrainError

log = logging.getLogger(__name__)

FORMAT = "qcsight.checkpoint/1"
LAST = "last.pt"
BEST = "best.pt"


class CheckpointError(TrainError):
    """A checkpoint cannot be read or belongs to a different run."""


def save_atomic(payload: Mapping[str, Any], path: Path) -> Path:
    """torch.save to a temporary file in the same directory, fsync, then rename over path.

    A kill at any moment leaves either the previous complete file or the new complete one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as handle:
            torch.save(dict(payload), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms; the rename is still atomic
        return path
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def load(path: Path) -> dict[str, Any] | None:
    """A checkpoint written by save_atomic, or None when there is none.

    Raises:
        CheckpointError: the file exists but is unreadable or of another format.
    """
    if not path.is_file():
        return None
    try:
        payload: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle errors: a damaged file
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc}); delete it to start over") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint; use another --checkpoint-dir")
    return payload


def check_identity(payload: Mapping[str, Any], identity: Mapping[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint of a different run (architecture, classes, schedule, data)."""
    stored = payload.get("identity", {})
    differ = [f"{key}: checkpoint {stored.get(key)!r}, now {value!r}" for key, value in identity.items()
              if stored.get(key) != value]
    if differ:
        raise CheckpointError(
            f"{path}: belongs to a different training run ({'; '.join(differ)}). Use a new --checkpoint-dir, "
            "or --resume false to start over (the old checkpoint is then overwritten)"
        )


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, CUDA, numpy, random) in a form torch.load(weights_only) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": _python_state(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _python_state(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [int(version), [int(v) for v in internal], gauss]


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
