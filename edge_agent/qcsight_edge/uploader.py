"""Full images of alerted parts to the cloud: stored in the upload queue before their alert, uploaded by one thread.

``submit`` runs on the alert thread before the alert is stored: it names the object
(``qcsight_core.messages.image_key``) and commits the JPEG to the durable queue, so the alert can
carry the URI and nothing is lost if the agent dies at any moment after. The upload thread then
drains the queue oldest first, one PUT at a time (throughput is not the aim: one 200 KB image per
alert, and IoT Core caps a device near 100 alerts a second), backing off while the link, the
store or the credentials fail; refusals that no retry can pass go to the queue's lost images
with the reason. Thread rule: only the upload thread talks to the target.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qcsight_core.errors import ConfigError
from qcsight_core.messages import image_key
from qcsight_edge.clock import Backoff, iso_utc
from qcsight_edge.config import AgentConfig
from qcsight_edge.credentials import (
    FULL_URI_ENV,
    CachedCredentials,
    ContainerCredentialsSource,
    CredentialsSource,
    EnvironmentCredentialsSource,
    IotCredentialsSource,
)
from qcsight_edge.errors import EdgeError, UploadError
from qcsight_edge.s3 import FolderTarget, ImageTarget, S3Target
from qcsight_edge.uploadqueue import LostImage, QueuedImage, UploadQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploaderSettings:
    """Timing of the upload loop.

    Attributes:
        backoff_min_s, backoff_max_s: bounds of the jittered exponential backoff after a failure.
        idle_poll_s: how often an idle uploader looks at the queue when nobody calls ``wake()``.
    """

    backoff_min_s: float = 1.0
    backoff_max_s: float = 300.0
    idle_poll_s: float = 1.0


class ImageUploader:
    """Owns the upload queue's consumer thread.

    Args:
        queue: the durable upload queue.
        target: S3 or a folder.
        thing: the thing name, part of every key.
        prefix: the key prefix (``""`` or ending in ``/``).
        credentials: the credentials cache behind an S3 target (for status); None for a folder.
        settings: backoff and polling.
        rng: jitter source (tests inject a seeded one).
    """

    def __init__(self, queue: UploadQueue, target: ImageTarget, thing: str, prefix: str = "",
                 credentials: CachedCredentials | None = None, settings: UploaderSettings | None = None,
                 rng: random.Random | None = None) -> None:
        self.queue = queue
        self.target = target
        self.thing = thing
        self.prefix = prefix
        self.credentials = credentials
        self.settings = settings or UploaderSettings()
        self._backoff = Backoff(self.settings.backoff_min_s, self.settings.backoff_max_s, rng or random.Random())
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._uploaded = 0
        self._failed = 0
        self._last_error: str | None = None
        self._retry_at: float | None = None

    # ------------------------------------------------------------ the alert thread's side

    def submit(self, alert_id: str, epoch_s: float, data: bytes) -> QueuedImage:
        """Name the object and store the image durably (one synced commit); the alert may then name it.

        Raises:
            ImageNotQueuedError: the image alone is larger than the queue.
            UploadQueueError: the queue cannot store now (a full disk): retry, the part stays unfinished.
        """
        key = image_key(self.prefix, self.thing, epoch_s, alert_id)
        queued = self.queue.put(alert_id, key, self.target.uri(key), data)
        self._wake.set()
        return queued

    # ------------------------------------------------------------ control

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="qcsight-uploader", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float) -> bool:
        """End the thread: an upload in progress is cut off (its image stays queued for the next start).

        Returns False if the thread did not end within ``timeout_s``.
        """
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is None:
            return True
        thread.join(min(timeout_s, 0.5))
        if thread.is_alive():
            self.target.abort()
            thread.join(max(timeout_s - 0.5, 0.0))
        if thread.is_alive():
            log.error("image uploader did not stop within %.1fs", timeout_s)
            return False
        return True

    def close(self) -> None:
        self.target.close()
        self.queue.close()

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        log.info("image uploader started: %d images pending, to %s", self.queue.backlog, self.target.kind)
        try:
            while not self._stop.is_set():
                self._wake.clear()
                try:
                    wait_s = self.step()
                except Exception as exc:  # the thread must survive anything: log, count, back off
                    if self._stop.is_set():
                        break  # stopping cut the step short (the queue may be closed already): nothing to report
                    log.exception("image uploader step failed")
                    self._note_failure(f"{type(exc).__name__}: {exc}")
                    wait_s = self._backoff.next()
                if wait_s > 0:
                    self._wake.wait(wait_s)
        finally:
            self.queue.release_all()
            log.info("image uploader stopped (%d uploaded, %d failed attempts since start)", self._uploaded,
                     self._failed)

    def step(self) -> float:
        """Upload the oldest pending image, if any; returns how long to wait before the next step."""
        now = time.monotonic()
        if self._retry_at is not None and now < self._retry_at:
            return self._retry_at - now
        job = self.queue.claim()
        if job is None:
            return self.settings.idle_poll_s
        try:
            self.target.put(job.key, job.data, job.sha256)
        except UploadError as exc:
            if exc.permanent:
                self.queue.dead_letter(job.row_id, str(exc))
                log.error("image of alert %s can never be uploaded, kept aside as lost: %s", job.alert_id, exc)
                self._note_failure(str(exc))
                return 0.0
            self.queue.retry(job.row_id, str(exc))
            delay = self._backoff.next()
            self._retry_at = time.monotonic() + delay
            self._note_failure(str(exc))
            log.warning("image of alert %s not uploaded (attempt %d): %s; next try in %.1fs (%d pending)",
                        job.alert_id, job.attempts + 1, exc, delay, self.queue.backlog)
            return delay
        except BaseException:
            self.queue.release_all()
            raise
        self.queue.done(job.row_id)
        self._backoff.reset()
        self._retry_at = None
        with self._lock:
            self._uploaded += 1
        log.debug("uploaded %s (%d bytes)", job.uri, len(job.data))
        return 0.0

    def _note_failure(self, reason: str) -> None:
        with self._lock:
            self._failed += 1
            self._last_error = reason

    # ------------------------------------------------------------ reporting

    def take_lost(self, limit: int = 50) -> list[LostImage]:
        """Lost images no status message has named yet (the caller names them, then ``mark_reported``)."""
        return self.queue.lost(unreported_only=True, limit=limit)

    def mark_reported(self, lost: list[LostImage]) -> None:
        self.queue.mark_reported([item.row_id for item in lost])

    def stats(self) -> dict[str, Any]:
        """The ``detail.uploads`` object of a status message: the backlog, lifetime counters, the last error."""
        try:
            queue = self.queue.stats()
        except EdgeError as exc:
            return {"target": self.target.kind, "error": str(exc)}
        with self._lock:
            detail: dict[str, Any] = {
                "target": self.target.kind, "backlog": queue.backlog, "bytes": queue.bytes,
                "oldest": None if queue.oldest_created is None else iso_utc(queue.oldest_created),
                "uploaded": queue.uploaded, "evicted": queue.evicted, "dead_letters": queue.dead_lettered,
                "failed_attempts": self._failed, "last_error": self._last_error,
            }
        if self.credentials is not None:
            expiration = self.credentials.expiration
            detail["credentials"] = {"source": self.credentials.source.name,
                                     "expires": None if expiration is None else iso_utc(expiration),
                                     "last_error": self.credentials.last_error}
        return detail


# -------------------------------------------------------------------- building from configuration


def make_credentials(config: AgentConfig, environ: Mapping[str, str] | None = None) -> CachedCredentials:
    """The credentials an s3 upload signs with, as ``image_upload.credentials`` says.

    Raises:
        ConfigError: iot without an endpoint, role alias or certificate (its own or the transport's).
        CredentialsError: greengrass without the Token Exchange Service's variables.
    """
    env = os.environ if environ is None else environ
    assert config.image_upload is not None
    creds = config.image_upload.credentials
    kind = creds.kind
    if kind == "auto":
        kind = "greengrass" if env.get(FULL_URI_ENV) else "iot"
    source: CredentialsSource
    if kind == "greengrass":
        source = ContainerCredentialsSource.from_environment(env)
    elif kind == "environment":
        source = EnvironmentCredentialsSource(env)
    else:
        field = "image_upload.credentials"
        if not creds.endpoint:
            raise ConfigError(f"{field}.endpoint", None, "required for iot credentials (the account's "
                              "iot:CredentialProvider endpoint; or run under Greengrass with the Token Exchange "
                              "Service)")
        if not creds.role_alias:
            raise ConfigError(f"{field}.role_alias", None, "required for iot credentials")
        cert = creds.cert or config.transport.cert
        key = creds.key or config.transport.key
        if cert is None or key is None:
            raise ConfigError(f"{field}.cert", None, "required for iot credentials: the device certificate and key "
                              "(or transport.cert and transport.key)")
        source = IotCredentialsSource(creds.endpoint, creds.role_alias, config.thing_name, cert, key,
                                      creds.ca or config.transport.ca, port=creds.port, timeout_s=creds.timeout_s)
    return CachedCredentials(source, refresh_before_s=creds.refresh_before_s)


def make_uploader(config: AgentConfig, environ: Mapping[str, str] | None = None) -> ImageUploader | None:
    """The image uploader ``image_upload`` names (None for kind none); opens its queue."""
    upload = config.image_upload
    if upload is None or upload.kind == "none":
        return None
    credentials: CachedCredentials | None = None
    target: ImageTarget
    if upload.kind == "folder":
        assert upload.path is not None  # config validation requires it
        target = FolderTarget(upload.path)
    else:
        credentials = make_credentials(config, environ)
        target = S3Target(upload.bucket, upload.region, credentials, endpoint=upload.endpoint,
                          path_style=upload.path_style, ca=upload.ca, timeout_s=upload.timeout_s)
    queue = UploadQueue(upload.queue, max_images=upload.max_images, max_bytes=upload.max_bytes)
    settings = UploaderSettings(backoff_min_s=upload.retry_initial_s, backoff_max_s=upload.retry_max_s)
    return ImageUploader(queue, target, config.thing_name, upload.prefix, credentials, settings)
