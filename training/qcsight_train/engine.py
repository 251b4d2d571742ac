"""The per-epoch loops: train_one_epoch and evaluate, with metrics reduced over every rank."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from qcsight_train.distributed import DistInfo, all_reduce_sum

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Precision:
    """Mixed-precision settings for one device.

    Attributes:
        dtype: autocast dtype (torch.bfloat16 / torch.float16), or None for full precision.
        channels_last: NHWC memory format for inputs and the model.
    """

    dtype: torch.dtype | None = None
    channels_last: bool = False

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager[object]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16


def choose_precision(amp: str, device: torch.device, channels_last: bool) -> Precision:
    """bf16 where the GPU supports it, else fp16; full precision on CPU (bf16 there is slower on most CPUs)."""
    if device.type != "cuda" or amp == "off":
        return Precision(None, channels_last)
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        return Precision(torch.float16, channels_last)
    return Precision(torch.bfloat16, channels_last)


@dataclass(frozen=True)
class EpochStats:
    """One training epoch, summed over ranks.

    Attributes:
        loss: mean training loss per image.
        images: images processed by all ranks.
        seconds: wall time of the epoch's training loop.
        per_rank_images: images each rank processed, in rank order.
    """

    loss: float
    images: int
    seconds: float
    per_rank_images: tuple[int, ...]

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class EvalResult:
    """Validation over the whole split, every image counted once across ranks.

    Attributes:
        loss: mean loss per image.
        confusion: KxK counts, rows = true class, columns = predicted class.
    """

    loss: float
    confusion: np.ndarray

    @property
    def images(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        total = self.confusion.sum()
        return float(np.trace(self.confusion) / total) if total else 0.0

    @property
    def macro_f1(self) -> float:
        """Mean F1 over every class, 0 where undefined (as qcsight_train.metrics computes it)."""
        tp = np.diag(self.confusion).astype(np.float64)
        denominator = (self.confusion.sum(axis=1) + self.confusion.sum(axis=0)).astype(np.float64)
        f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
        return float(f1.mean()) if f1.size else 0.0


def _to_device(batch: Batch, device: torch.device, precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels, _ = batch
    memory = torch.channels_last if precision.channels_last else torch.contiguous_format
    return (images.to(device, non_blocking=True, memory_format=memory),
            labels.to(device, non_blocking=True))


def train_one_epoch(model: nn.Module, loader: Iterable[Batch], criterion: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, *,
                    info: DistInfo, precision: Precision, scaler: torch.amp.GradScaler | None,
                    log_every: int = 50, after_step: Callable[[], None] | None = None) -> EpochStats:
    """One pass over the rank's shard; the scheduler steps per batch, then after_step runs (the weight average).

    Raises:
        FloatingPointError: the loss became NaN or infinite (diverged; lower --lr).
    """
    device = info.torch_device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        images, labels = _to_device(batch, device, precision)
        with precision.autocast(device):
            loss = criterion(model(images), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step()
        loss_sum += loss.detach().double() * images.shape[0]
        seen += images.shape[0]
        if log_every and step % log_every == 0 and info.is_main:
            log.debug("step %d loss %.4f", step, loss.item())
    totals = all_reduce_sum(info, torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64,
                                                                         device=device)]))
    per_rank = all_reduce_sum(info, _one_hot(info, seen, device))
    seconds = time.perf_counter() - start
    images_all = int(totals[1].item())
    mean_loss = float(totals[0].item() / images_all) if images_all else math.nan
    return EpochStats(mean_loss, images_all, seconds, tuple(int(v) for v in per_rank.tolist()))


def _one_hot(info: DistInfo, value: int, device: torch.device) -> torch.Tensor:
    row = torch.zeros(info.world_size, dtype=torch.float64, device=device)
    row[info.rank] = value
    return row


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable[Batch], criterion: nn.Module, num_classes: int, *,
             info: DistInfo, precision: Precision) -> EvalResult:
    """Loss and confusion matrix over every rank's (disjoint) shard of the split."""
    device = info.torch_device
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=device)
    for batch in loader:
        images, labels = _to_device(batch, device, precision)
        with precision.autocast(device):
            logits = model(images)
        loss_sum += criterion(logits.float(), labels).double() * images.shape[0]
        predicted = logits.argmax(dim=1)
        confusion += torch.bincount(labels * num_classes + predicted, minlength=num_classes**2).double()
    totals = all_reduce_sum(info, torch.cat([loss_sum[None], confusion]))
    matrix = totals[1:].cpu().numpy().reshape(num_classes, num_classes).astype(np.int64)
    images = matrix.sum()
    return EvalResult(float(totals[0].item() / images) if images else math.nan, matrix)


def epoch_line(epoch: int, epochs: int, train: EpochStats, val: EvalResult, lr: float) -> str:
    """The per-epoch line the SageMaker launcher's metric_definitions parse; keep its form stable."""
    return (f"epoch={epoch}/{epochs} train_loss={train.loss:.4f} val_loss={val.loss:.4f} "
            f"val_acc={val.accuracy:.4f} val_macro_f1={val.macro_f1:.4f} lr={lr:.6f} "
            f"images_per_s={train.images_per_s:.1f}")
