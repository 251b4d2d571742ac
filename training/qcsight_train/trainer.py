"""One training run: model, loaders, optimiser and schedule, the epoch loop with checkpoints and resumption.

Head-only epochs first (the pretrained backbone frozen, its BatchNorm statistics kept), then
the whole network. AdamW with linear warm-up and cosine decay, stepped per batch. With ema_epochs,
an exponential moving average of the weights is what validation scores and best.pt keeps.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from qcsight_train import checkpoint
from qcsight_train.augment import AlbumentationsAugment
from qcsight_train.config import TrainConfig
from qcsight_train.data import ImageDataset, ShardSampler, Splits, WeightedShardSampler, class_weights
from qcsight_train.distributed import DistInfo, all_gather, barrier
from qcsight_train.engine import (
    EpochStats,
    EvalResult,
    Precision,
    choose_precision,
    epoch_line,
    evaluate,
    train_one_epoch,
)
from qcsight_train.errors import TrainError
from qcsight_train.models import create_model, head_prefix, preprocess_spec

log = logging.getLogger(__name__)
epoch_log = logging.getLogger("qcsight_train.epoch")


@dataclass(frozen=True)
class TrainResult:
    """What the epoch loop leaves behind.

    Attributes:
        best_path: best.pt in the checkpoint directory (the weights with the best val macro-F1).
        best_epoch: 1-based epoch of those weights.
        best_macro_f1: their validation macro-F1.
        history: one dict per finished epoch (this run's and the resumed run's).
        resumed_from: epochs already done when this process started (0 for a fresh run).
        world_size: processes that trained.
    """

    best_path: Path
    best_epoch: int
    best_macro_f1: float
    history: tuple[dict[str, Any], ...]
    resumed_from: int
    world_size: int
    epochs: int = field(default=0)


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics, updated after every step.

    The decay is 1 - 1 / (ema_epochs * steps_per_epoch), so the average spans about ema_epochs epochs of
    steps whatever the dataset's size. At the start it is min(decay, (1 + t) / (10 + t)) after t updates
    (as timm's ModelEma warms up), so the first steps' freshly initialised head does not linger in it.
    Integer buffers (BatchNorm's batch count) are copied. Every rank holds the same weights under DDP,
    so every rank's average is the same too.
    """

    def __init__(self, model: nn.Module, ema_epochs: float, steps_per_epoch: int) -> None:
        self.model = copy.deepcopy(model).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.decay = 1.0 - 1.0 / max(1.0, ema_epochs * steps_per_epoch)
        self.updates = 0
        # state_dict tensors share storage with the parameters and buffers: updating them updates the models.
        self._pairs = list(zip(self.model.state_dict().values(), model.state_dict().values(), strict=True))

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for average, current in self._pairs:
            if average.is_floating_point():
                average.lerp_(current, 1.0 - decay)
            else:
                average.copy_(current)

    def state(self) -> dict[str, Any]:
        return {"model": _cpu_state(self.model), "updates": self.updates}

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms and biases; the backbone at lr * backbone_lr_scale."""
    prefix = head_prefix(cfg.arch)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {(h, d): [] for h in (True, False) for d in (True, False)}
    for name, param in model.named_parameters():
        groups[(name.startswith(prefix), param.ndim > 1)].append(param)
    param_groups = [
        {"params": params, "lr": cfg.lr * (1.0 if is_head else cfg.backbone_lr_scale),
         "weight_decay": cfg.weight_decay if decay else 0.0, "name": ("head" if is_head else "backbone")}
        for (is_head, decay), params in groups.items() if params
    ]
    return torch.optim.AdamW(param_groups, lr=cfg.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warm-up to each group's lr, then cosine decay to min_lr_ratio of it.

    The decay spans decay_fraction of the steps after warm-up; the rate then holds at min_lr_ratio.
    """
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))
    decay = max(1, round(cfg.decay_fraction * (total - warmup)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / decay
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def set_phase(model: nn.Module, cfg: TrainConfig, head_only: bool) -> None:
    """Train the head alone (backbone frozen, BatchNorm statistics kept) or the whole network."""
    prefix = head_prefix(cfg.arch)
    for name, param in model.named_parameters():
        param.requires_grad_(not head_only or name.startswith(prefix))
    model.train()
    if head_only:
        model.eval()
        model.get_submodule(prefix.rstrip(".")).train()


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP over the parameters that train in this phase (rebuilt when the backbone unfreezes)."""
    if not info.distributed:
        return model
    device_ids = [info.local_rank] if info.torch_device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def _loader(dataset: ImageDataset, sampler: DistributedSampler[int] | WeightedShardSampler | ShardSampler,
            batch_size: int, cfg: TrainConfig, info: DistInfo,
            train: bool) -> DataLoader[Any]:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=cfg.workers,
                      pin_memory=info.torch_device.type == "cuda", drop_last=train and len(sampler) > batch_size,
                      persistent_workers=False)


@dataclass
class _Loop:
    """The objects of one run, built once; the loop below only drives them."""

    cfg: TrainConfig
    info: DistInfo
    model: nn.Module
    train_set: ImageDataset
    train_sampler: DistributedSampler[int] | WeightedShardSampler
    train_loader: DataLoader[Any]
    val_loader: DataLoader[Any]
    criterion: nn.Module
    val_criterion: nn.Module
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    precision: Precision
    num_classes: int
    average: WeightAverage | None = None

    @property
    def scored(self) -> nn.Module:
        """The weights validation scores and best.pt keeps: the average when there is one."""
        return self.average.model if self.average is not None else self.model


def _build(cfg: TrainConfig, splits: Splits, info: DistInfo) -> _Loop:
    device = info.torch_device
    precision = choose_precision(cfg.amp, device, cfg.channels_last)
    num_classes = len(splits.classes)
    seed_everything(cfg.seed)  # the same new head on every rank
    if info.is_main:  # one download at a time; the other ranks then read the cache
        model = create_model(cfg.arch, num_classes, cfg.weights)
        barrier(info)
    else:
        barrier(info)
        model = create_model(cfg.arch, num_classes, cfg.weights)
    if info.distributed and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # type: ignore[no-untyped-call]  # not on CPU/gloo
    model.to(device)
    if precision.channels_last:
        model.to(memory_format=torch.channels_last)
    size = cfg.input_size
    if size is None:
        raise TrainError("img_size auto must be resolved from the data before training (qcsight_train.run does)")
    spec = preprocess_spec(cfg.arch, size, cfg.resize)
    train_set = ImageDataset(splits.train, splits.classes, spec, AlbumentationsAugment(cfg.augment), cfg.seed)
    val_set = ImageDataset(splits.val, splits.classes, spec)
    weights = class_weights(train_set.labels, num_classes, cfg.balance_power)
    sampler: DistributedSampler[int] | WeightedShardSampler
    if cfg.balance == "sampler":
        sampler = WeightedShardSampler(train_set.labels, weights, rank=info.rank, world_size=info.world_size,
                                       seed=cfg.seed)
    else:
        sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                     seed=cfg.seed)
    train_loader = _loader(train_set, sampler, cfg.batch_size, cfg, info, train=True)
    val_loader = _loader(val_set, ShardSampler(len(val_set), rank=info.rank, world_size=info.world_size),
                         cfg.batch_size * 2, cfg, info, train=False)
    loss_weights = weights.to(device) if cfg.balance == "loss" else None
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(train_loader))
    scaler = torch.amp.GradScaler("cuda") if precision.needs_scaler else None
    average = WeightAverage(model, cfg.ema_epochs, len(train_loader)) if cfg.ema_epochs > 0 else None
    torch.manual_seed(cfg.seed + 1 + info.rank)  # dropout differs per rank from here on
    return _Loop(cfg, info, model, train_set, sampler, train_loader, val_loader,
                 nn.CrossEntropyLoss(weight=loss_weights, label_smoothing=cfg.label_smoothing), nn.CrossEntropyLoss(),
                 optimizer, scheduler, scaler, precision, num_classes, average)


def identity(cfg: TrainConfig, splits: Splits, info: DistInfo) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by this run: everything that shapes the weights.

    The optimisation settings are part of it, so a hyperparameter-tuning trial can never carry on
    from another trial's checkpoint that happens to share the data, model and schedule length.
    """
    return {"arch": cfg.arch, "classes": list(splits.classes), "img_size": cfg.img_size, "epochs": cfg.epochs,
            "freeze_epochs": cfg.freeze_epochs, "batch_size": cfg.batch_size, "world_size": info.world_size,
            "balance": cfg.balance, "data_fingerprint": splits.fingerprint,
            "weights": cfg.weights, "lr": cfg.lr, "backbone_lr_scale": cfg.backbone_lr_scale,
            "weight_decay": cfg.weight_decay, "warmup_epochs": cfg.warmup_epochs, "min_lr_ratio": cfg.min_lr_ratio,
            "decay_fraction": cfg.decay_fraction,
            "ema_epochs": cfg.ema_epochs, "label_smoothing": cfg.label_smoothing, "balance_power": cfg.balance_power,
            "seed": cfg.seed, "augment": dataclasses.asdict(cfg.augment), "train_images": len(splits.train),
            "resize": cfg.resize}


def _resume(loop: _Loop, directory: Path, ident: dict[str, Any]) -> tuple[int, list[dict[str, Any]], float, int]:
    """Restore last.pt if this run has one: (epochs done, history, best macro-F1, best epoch)."""
    path = directory / checkpoint.LAST
    payload = checkpoint.load(path) if loop.cfg.resume else None
    if payload is None:
        return 0, [], -1.0, 0
    checkpoint.check_identity(payload, ident, path)
    loop.model.load_state_dict(payload["model"])
    loop.optimizer.load_state_dict(payload["optimizer"])
    loop.scheduler.load_state_dict(payload["scheduler"])
    if loop.scaler is not None and payload.get("scaler"):
        loop.scaler.load_state_dict(payload["scaler"])
    if loop.average is not None:
        loop.average.restore(payload["average"])
    states = payload.get("rng", [])
    if len(states) == loop.info.world_size:
        checkpoint.set_rng_state(states[loop.info.rank])
    done = int(payload["epoch"])
    log.info("resuming from %s: %d of %d epochs done, best val macro-F1 %.4f at epoch %d", path, done,
             loop.cfg.epochs, payload["best_macro_f1"], payload["best_epoch"])
    return done, list(payload["history"]), float(payload["best_macro_f1"]), int(payload["best_epoch"])


def fit(cfg: TrainConfig, splits: Splits, info: DistInfo, checkpoint_dir: Path, *, log_as: str = "epoch"
        ) -> TrainResult:
    """Train for cfg.epochs (continuing a checkpointed run), checkpointing after every epoch.

    Only rank 0 writes; every rank reads the checkpoint when resuming. The kept weights
    (best.pt) are the best validation macro-F1's (select best) or the last epoch's (select last).

    Args:
        log_as: "epoch" logs the epoch line the SageMaker metric definitions read; "refit" or
            "fold" log `refit=3/8 ...` lines instead, which those definitions do not match (their
            validation figures are on images the model trains on, or on a fold).
    """
    loop = _build(cfg, splits, info)
    ident = identity(cfg, splits, info)
    done, history, best_f1, best_epoch = _resume(loop, checkpoint_dir, ident)
    if done:
        epoch_log.info("resumed at epoch %d/%d", done + 1, cfg.epochs)
    phase: str | None = None
    runner: nn.Module = loop.model
    for epoch in range(done, cfg.epochs):
        head_only = epoch < cfg.freeze_epochs
        if phase != ("head" if head_only else "full"):
            phase = "head" if head_only else "full"
            set_phase(loop.model, cfg, head_only)
            del runner
            gc.collect()  # the previous DDP's reducer must release its gradient hooks before a new one attaches
            runner = wrap(loop.model, info)
            log.info("epoch %d: training %s", epoch + 1, "the head only" if head_only else "the whole network")
        else:
            set_phase(loop.model, cfg, head_only)
        loop.train_sampler.set_epoch(epoch)
        loop.train_set.set_epoch(epoch)
        stats = train_one_epoch(runner, loop.train_loader, loop.criterion, loop.optimizer, loop.scheduler,
                                info=info, precision=loop.precision, scaler=loop.scaler,
                                after_step=loop.average.update if loop.average is not None else None)
        result = evaluate(loop.scored, loop.val_loader, loop.val_criterion, loop.num_classes, info=info,
                          precision=loop.precision)
        lr = _head_lr(loop.optimizer)
        history.append(_record(epoch + 1, phase, stats, result, lr))
        if info.is_main:
            line = epoch_line(epoch + 1, cfg.epochs, stats, result, lr)
            epoch_log.info(line if log_as == "epoch" else line.replace("epoch=", f"{log_as}=", 1))
        if cfg.select == "last" or result.macro_f1 > best_f1:
            best_f1, best_epoch = result.macro_f1, epoch + 1
            if info.is_main:
                checkpoint.save_atomic({"format": checkpoint.FORMAT, "model": _cpu_state(loop.scored),
                                        "epoch": best_epoch, "macro_f1": best_f1, "identity": ident},
                                       checkpoint_dir / checkpoint.BEST)
        _save_last(loop, checkpoint_dir, ident, epoch + 1, history, best_f1, best_epoch)
    check_ranks_agree(loop.model, info)
    return TrainResult(checkpoint_dir / checkpoint.BEST, best_epoch, best_f1, tuple(history), done, info.world_size,
                       cfg.epochs)


def check_ranks_agree(model: nn.Module, info: DistInfo) -> None:
    """DDP keeps every rank's weights identical; a difference means a broken reduction, so refuse to export.

    Raises:
        TrainError: the ranks' parameters differ.
    """
    if not info.distributed:
        return
    with torch.no_grad():
        total = sum(float(p.double().sum()) + 1e-3 * float(p.double().abs().sum()) for p in model.parameters())
    sums = all_gather(info, total)
    if max(sums) - min(sums) > 1e-6 * max(1.0, abs(sums[0])):
        raise TrainError(f"the ranks' weights differ after training (checksums {sums}); DDP did not keep them in sync")
    log.info("all %d ranks hold identical weights (checksum %.6g)", info.world_size, sums[0])


def _save_last(loop: _Loop, directory: Path, ident: dict[str, Any], epochs_done: int, history: list[dict[str, Any]],
               best_f1: float, best_epoch: int) -> None:
    states = all_gather(loop.info, checkpoint.rng_state())  # every rank joins; rank 0 writes
    if not loop.info.is_main:
        return
    checkpoint.save_atomic({
        "format": checkpoint.FORMAT, "identity": ident, "epoch": epochs_done,
        "model": _cpu_state(loop.model), "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(),
        "scaler": loop.scaler.state_dict() if loop.scaler is not None else {},
        "average": loop.average.state() if loop.average is not None else {},
        "rng": states, "sampler_epoch": epochs_done, "history": history,
        "best_macro_f1": best_f1, "best_epoch": best_epoch,
    }, directory / checkpoint.LAST)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _head_lr(optimizer: torch.optim.Optimizer) -> float:
    for group in optimizer.param_groups:
        if group.get("name") == "head":
            return float(group["lr"])
    return float(optimizer.param_groups[0]["lr"])


def _record(epoch: int, phase: str, stats: EpochStats, result: EvalResult, lr: float) -> dict[str, Any]:
    return {"epoch": epoch, "phase": phase, "train_loss": stats.loss, "val_loss": result.loss,
            "val_acc": result.accuracy, "val_macro_f1": result.macro_f1, "lr": lr,
            "images_per_s": stats.images_per_s, "seconds": stats.seconds, "images": stats.images,
            "per_rank_images": list(stats.per_rank_images)}
