"""The memory-bank model: patch features -> nearest good patch -> score map and image score, as one nn.Module.

MemoryBankModel is what the ONNX graph is exported from, so its forward uses only operators
that export as single ONNX nodes: squared distances by one matrix product
(|q|^2 - 2 q.b + |b|^2, MatMul), the nearest bank patch by a reduction (ReduceMin), the image
score as the largest patch score (ReduceMax). No Python loop depends on the data.

fit_bank extracts every training patch (no gradients), centres them, and keeps a greedy
k-center coreset of them as the bank (qcsight_train.anomaly.coreset).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from qcsight_core.errors import ImageError, PreprocessError
from qcsight_core.imageio import read_image
from qcsight_core.preprocess import PreprocessSpec, preprocess_batch
from qcsight_train.anomaly.coreset import two_stage_coreset
from qcsight_train.anomaly.features import PatchEmbedding
from qcsight_train.errors import TrainError

log = logging.getLogger(__name__)

class MemoryBankModel(nn.Module):
    """Input NxCxHxW -> (image score N, score map Nxhxw): raw nearest-neighbour distances.

    The bank and the patches are centred on the training patches' mean before the
    distances: the expansion |q|^2 - 2 q.b + |b|^2 loses precision in float32 when the
    norms are large against the distances, and centring keeps the norms small.
    """

    centre: torch.Tensor
    bank_t: torch.Tensor
    bank_sq: torch.Tensor

    def __init__(self, embedding: PatchEmbedding, bank: torch.Tensor, centre: torch.Tensor) -> None:
        super().__init__()
        self.embedding = embedding
        bank = bank.to(torch.float32)
        self.register_buffer("centre", centre.to(torch.float32))
        self.register_buffer("bank_t", bank.T.contiguous())
        self.register_buffer("bank_sq", (bank * bank).sum(dim=1))

    @property
    def bank_size(self) -> int:
        return int(self.bank_t.shape[1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cells = self.embedding(x) - self.centre
        queries = cells.flatten(1, 2)
        squared = (queries * queries).sum(dim=-1, keepdim=True) - 2.0 * (queries @ self.bank_t) + self.bank_sq
        patch = squared.amin(dim=-1).clamp_min(0.0).sqrt()
        score_map = patch.reshape(cells.shape[0], cells.shape[1], cells.shape[2])
        return patch.amax(dim=-1), score_map


@dataclass(frozen=True)
class FitResult:
    """What fitting the bank did.

    Attributes:
        bank: MxD centred bank patches, in greedy order.
        centre: the D-dim mean of the training patches (subtracted from bank and queries).
        images: training images used.
        unreadable: training images that could not be read, with the reason.
        patches: training patches extracted.
        candidates: patches left after the coreset's first (per-image) stage.
        grid: the score map's (height, width).
        extract_seconds: time spent extracting features.
        coreset_seconds: time spent choosing the bank.
    """

    bank: torch.Tensor
    centre: torch.Tensor
    images: int
    unreadable: tuple[tuple[str, str], ...]
    patches: int
    candidates: int
    grid: tuple[int, int]
    extract_seconds: float
    coreset_seconds: float


def extract_patches(embedding: PatchEmbedding, paths: Sequence[str], spec: PreprocessSpec, *, batch_size: int = 16,
                    progress: Callable[[int, int], None] | None = None
                    ) -> tuple[torch.Tensor, tuple[int, int], list[tuple[str, str]]]:
    """(IxPxD patches of the readable images, grid (h, w), unreadable (path, reason)), via qcsight_core."""
    chunks: list[torch.Tensor] = []
    unreadable: list[tuple[str, str]] = []
    grid = (0, 0)
    done = 0
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start:start + batch_size]:
            try:
                images.append(read_image(path))
            except ImageError as exc:
                log.warning("training image %s skipped: %s", path, exc.reason)
                unreadable.append((path, exc.reason))
        if images:
            try:
                batch = torch.from_numpy(preprocess_batch(images, spec))
            except PreprocessError as exc:
                raise TrainError(f"training images cannot be preprocessed: {exc}") from exc
            with torch.inference_mode():
                cells = embedding(batch)
            grid = (int(cells.shape[1]), int(cells.shape[2]))
            chunks.append(cells.reshape(cells.shape[0], -1, cells.shape[-1]).clone())
        done += len(paths[start:start + batch_size])
        if progress is not None:
            progress(done, len(paths))
    if not chunks:
        raise TrainError(f"none of the {len(paths)} training images could be read"
                         + (f" (first: {unreadable[0][0]}: {unreadable[0][1]})" if unreadable else ""))
    return torch.cat(chunks), grid, unreadable


def fit_bank(embedding: PatchEmbedding, paths: Sequence[str], spec: PreprocessSpec, bank_size: int, *,
             seed: int = 0, batch_size: int = 16) -> FitResult:
    """Extract the training patches and keep a greedy k-center coreset of bank_size of them (fewer if fewer exist)."""
    start = time.perf_counter()
    last = [start]

    def extracting(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] >= 10.0 or done == total:
            log.info("features: %d/%d training images (%.0f s)", done, total, now - start)
            last[0] = now

    patches, grid, unreadable = extract_patches(embedding, paths, spec, batch_size=batch_size, progress=extracting)
    extract_seconds = time.perf_counter() - start
    images, per_image, dim = patches.shape
    centre = patches.reshape(-1, dim).mean(dim=0)
    patches -= centre
    total = images * per_image
    size = min(bank_size, total)
    begun = time.perf_counter()
    order, candidates = two_stage_coreset(patches, size, seed=seed)
    coreset_seconds = time.perf_counter() - begun
    log.info("bank: %d of %d patches (%.2f %%; %d stage-one candidates) x %d dims, chosen in %.1f s "
             "(features %.1f s)", size, total, 100.0 * size / total, candidates, dim, coreset_seconds,
             extract_seconds)
    bank = patches.reshape(total, dim)[order].clone()
    return FitResult(bank, centre, images, tuple(unreadable), total, candidates, grid, extract_seconds,
                     coreset_seconds)


def build_model(embedding: PatchEmbedding, fit: FitResult, bank_size: int | None = None, *,
                float16_bank: bool = False) -> MemoryBankModel:
    """The model over the first bank_size bank patches (all by default; the greedy order makes any prefix a coreset).

    float16_bank rounds the bank to float16 values, as the graph stores it then, so PyTorch
    computes what ONNX Runtime will.
    """
    bank = fit.bank if bank_size is None else fit.bank[:bank_size]
    if float16_bank:
        bank = bank.half().float()
    # The bank is stored centred: shift the queries by the same centre.
    return MemoryBankModel(embedding, bank, fit.centre).eval()


def raw_scores(model: MemoryBankModel, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch's (image scores, score maps) for a preprocessed float32 batch: the parity gate's reference."""
    with torch.inference_mode():
        score, score_map = model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
    return score.numpy().astype(np.float64), score_map.numpy().astype(np.float64)
