"""Decode workers: read, decode and resize chunks of images in processes that never load ONNX Runtime.

This module is what the fork server preloads, so it imports only OpenCV, numpy and the
qcsight_core image code; each worker costs a Python with those, not another copy of ONNX
Runtime.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from qcsight_batch.errors import InputError, WorkerError
from qcsight_batch.sources import ImageSource
from qcsight_core.errors import ConfigError, ImageError, PreprocessError
from qcsight_core.imageio import DEFAULT_MAX_PIXELS, decode_image
from qcsight_core.preprocess import PreprocessSpec, prepare_pixels

_ORPHAN_CHECK_S = 1.0
_INHERITED_ENV_PREFIXES = ("AWS_", "QCSIGHT_")


@dataclass(frozen=True)
class DecodeSettings:
    """What a decode worker needs: the preprocessing spec, the reduced-decode floor and the pixel budget."""

    spec: PreprocessSpec
    min_side: int | None
    grayscale: bool
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise ConfigError("max_pixels", self.max_pixels, "a positive number of pixels")

    @classmethod
    def for_spec(
        cls, spec: PreprocessSpec, reduced: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> DecodeSettings:
        """The smallest decoded shorter side that never makes preprocessing upscale.

        stretch and letterbox scale each axis by at most size/side, so a shorter side of
        max(height, width) is enough; shorter_side_crop first resizes the shorter side to
        max(height, width) / crop_fraction.
        """
        if not reduced:
            return cls(spec, None, spec.color == "GRAY", max_pixels)
        need = max(spec.height, spec.width)
        if spec.resize == "shorter_side_crop":
            need = math.ceil(need / spec.crop_fraction)
        return cls(spec, need, spec.color == "GRAY", max_pixels)

    def decode(self, data: bytes, source: str) -> np.ndarray:
        """Decode one image the way this model needs it (reduced when allowed, within the pixel budget)."""
        return decode_image(data, source, min_side=self.min_side, grayscale=self.grayscale, max_pixels=self.max_pixels)


@dataclass(frozen=True)
class DecodedChunk:
    """A chunk after decoding: the keys that made it (in order), their pixels, and the keys that failed.

    pixels is uint8 NxHxWxC at the model's size and colour order (qcsight_core's
    prepare_pixels); the scorer applies normalize() to the batch, which together is exactly
    preprocess_batch. Normalising in the main process keeps what crosses the process
    boundary uint8: a quarter of float32's bytes, and pickling plus piping float32 batches
    cost about 1 ms of CPU per 224x224 image, more than normalising itself.
    """

    keys: tuple[str, ...]
    pixels: np.ndarray | None
    errors: tuple[tuple[str, str], ...]
    shapes: tuple[tuple[int, int], ...] = ()  # each decoded image's (height, width): anomaly boxes map back to it


def decode_chunk(keys: Sequence[str], source: ImageSource, settings: DecodeSettings) -> DecodedChunk:
    """Read, decode and resize keys to the model's geometry; a key that fails becomes an error with its reason."""
    prepared: list[np.ndarray] = []
    good: list[str] = []
    shapes: list[tuple[int, int]] = []
    errors: list[tuple[str, str]] = []
    for key in keys:
        try:
            image = settings.decode(source.read(key), key)
        except (InputError, ImageError) as exc:
            errors.append((key, getattr(exc, "reason", None) or str(exc)))
            continue
        try:
            prepared.append(prepare_pixels(image, settings.spec))
            good.append(key)
            shapes.append((int(image.shape[0]), int(image.shape[1])))
        except (PreprocessError, cv2.error) as exc:
            errors.append((key, f"cannot preprocess: {exc}"))
    pixels = np.stack(prepared) if prepared else None
    return DecodedChunk(tuple(good), pixels, tuple(errors), tuple(shapes))


# Per-process state of a decode worker, set once by init_worker (ProcessPoolExecutor's idiom).
_worker_state: tuple[ImageSource, DecodeSettings] | None = None


def _exit_when_orphaned() -> None:
    """Exit when the scoring process is gone: a SIGKILLed scorer cannot shut its pool down.

    The parent's sentinel is a pipe the scoring process holds open; it reads as ready (EOF)
    once that process dies. getppid() would not do: under forkserver the parent is the fork
    server, which itself lives on as long as any worker does.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    while not multiprocessing.connection.wait([parent.sentinel], timeout=_ORPHAN_CHECK_S):
        pass
    os._exit(1)


def worker_environment() -> dict[str, str]:
    """The variables a worker's S3 client reads, as the parent has them now."""
    return {k: v for k, v in os.environ.items() if k.startswith(_INHERITED_ENV_PREFIXES)}


def init_worker(source: ImageSource, settings: DecodeSettings, environment: dict[str, str]) -> None:
    """ProcessPoolExecutor initializer: keep the source and settings, tune the process for decoding."""
    global _worker_state
    # forkserver children inherit the server's environment from when it started, not this
    # run's: apply the parent's AWS settings (endpoint, region, credentials) explicitly.
    for name in [k for k in os.environ if k.startswith(_INHERITED_ENV_PREFIXES)]:
        if name not in environment:
            del os.environ[name]
    os.environ.update(environment)
    # One OpenCV thread per worker: parallelism comes from the processes, and OpenCV's own
    # pool would oversubscribe the cores left for ONNX Runtime.
    cv2.setNumThreads(1)
    # Ctrl-C goes to the whole process group; the main process decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_state = (source, settings)
    threading.Thread(target=_exit_when_orphaned, name="qcsight-orphan-watch", daemon=True).start()


def decode_in_worker(keys: Sequence[str]) -> DecodedChunk:
    """The task a worker runs for one chunk."""
    if _worker_state is None:
        raise WorkerError("decode worker was not initialised")
    source, settings = _worker_state
    return decode_chunk(keys, source, settings)
