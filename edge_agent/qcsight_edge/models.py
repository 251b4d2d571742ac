"""Model loading and hot swap: verify and warm a new bundle in the background, swap it in between frames."""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcsight_core.bundle import Bundle, load_bundle
from qcsight_core.errors import QcsightError
from qcsight_core.runner import OnnxRunner, RunnerOptions
from qcsight_core.signing import VerifyKey
from qcsight_core.verdict import Decider
from qcsight_edge.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A verified bundle with its warmed-up runner and decision policy, ready for frames."""

    source: Path
    bundle: Bundle
    runner: OnnxRunner
    decider: Decider

    @property
    def name(self) -> str:
        return self.bundle.manifest.name

    @property
    def version(self) -> str:
        return self.bundle.manifest.version

    @property
    def ident(self) -> dict[str, str]:
        """The `model` object of every message."""
        return {"name": self.name, "version": self.version}

    @property
    def reference(self) -> dict[str, Any]:
        return dict(self.bundle.manifest.reference)


def load_model(config: ModelConfig) -> LoadedModel:
    """Load, verify (hashes) and warm up a bundle directory or model.tar.gz.

    A tarball is unpacked to a temporary directory that is removed once ONNX Runtime holds the
    model in memory, so swaps do not accumulate copies on the device's disk.

    Raises:
        QcsightError: BundleError for a missing/partial/tampered bundle, RunnerError if it does not run.
    """
    options = RunnerOptions(precision=config.precision, intra_op_threads=config.intra_op_threads,
                            warmup_runs=config.warmup_runs)
    key = VerifyKey.from_file(config.verify_key) if config.verify_key is not None else None
    if config.bundle.is_file():
        with tempfile.TemporaryDirectory(prefix="qcsight-bundle-") as tmp:
            bundle = load_bundle(config.bundle, extract_to=tmp, verify_key=key)
            runner = OnnxRunner(bundle, options)
    else:
        bundle = load_bundle(config.bundle, verify_key=key)
        runner = OnnxRunner(bundle, options)
    return LoadedModel(config.bundle, bundle, runner, Decider(bundle.manifest))


@dataclass(frozen=True)
class Rejected:
    """A bundle that could not be swapped in."""

    source: Path
    error: str


class ModelManager:
    """Owns the running model; loads replacements on a background thread.

    request() starts loading; the inference thread calls take_pending() between frames, so a
    frame is never judged half by one model and half by another. A bundle that fails to load,
    verify or warm up is reported through on_rejected and the running model stays.
    """

    def __init__(self, current: LoadedModel, config: ModelConfig,
                 on_rejected: Callable[[Rejected], None],
                 loader: Callable[[ModelConfig], LoadedModel] = load_model) -> None:
        self.current = current
        self.config = config
        self._on_rejected = on_rejected
        self._loader = loader
        self._lock = threading.Lock()
        self._pending: LoadedModel | None = None
        self._loading: threading.Thread | None = None
        self._wanted: ModelConfig | None = None

    def request(self, config: ModelConfig) -> None:
        """Load config's bundle in the background; a newer request replaces a queued one."""
        with self._lock:
            self._wanted = config
            if self._loading is None or not self._loading.is_alive():
                self._loading = threading.Thread(target=self._load_loop, name="qcsight-model-loader", daemon=True)
                self._loading.start()

    def _load_loop(self) -> None:
        while True:
            with self._lock:
                wanted, self._wanted = self._wanted, None
            if wanted is None:
                return
            log.info("loading model bundle %s in the background", wanted.bundle)
            try:
                model = self._loader(wanted)
            except QcsightError as exc:
                self._reject(Rejected(wanted.bundle, str(exc)))
                continue
            except Exception as exc:  # anything else from ONNX Runtime/OpenCV: refuse, keep running
                log.exception("unexpected failure loading %s", wanted.bundle)
                self._reject(Rejected(wanted.bundle, f"{type(exc).__name__}: {exc}"))
                continue
            with self._lock:
                self._pending = model
                self.config = wanted

    def _reject(self, rejected: Rejected) -> None:
        log.error("model bundle %s refused, keeping %s %s: %s", rejected.source, self.current.name,
                  self.current.version, rejected.error)
        try:
            self._on_rejected(rejected)
        except Exception:  # never let reporting kill the loader thread
            log.exception("reporting the rejected model failed")

    def take_pending(self) -> LoadedModel | None:
        """The newly loaded model, once; the caller makes it current between frames."""
        with self._lock:
            model, self._pending = self._pending, None
            if model is not None:
                self.current = model
            return model

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._pending is not None or self._wanted is not None or (
                self._loading is not None and self._loading.is_alive())

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait for the background loader to finish (tests, shutdown); False on timeout."""
        with self._lock:
            thread = self._loading
        if thread is not None:
            thread.join(timeout_s)
            return not thread.is_alive()
        return True
