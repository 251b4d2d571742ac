"""Errors raised by the edge agent."""

from __future__ import annotations

from qcsight_core.errors import QcsightError


class EdgeError(QcsightError):
    """Base class for edge agent errors."""


class PublishError(EdgeError):
    """A message was not acknowledged by the broker (or Greengrass nucleus)."""


class NotConnectedError(PublishError):
    """The transport has no live connection; the message stays in the outbox."""


class PublishRejectedError(PublishError):
    """The peer answered and refused the message (e.g. an MQTT5 PUBACK with NOT_AUTHORIZED).

    ``permanent`` refusals (not authorized, an invalid topic or payload, too large) will be refused
    again however often they are sent: the sender moves such a message to the outbox's dead
    letters. Others (quota exceeded, unspecified) are retried with backoff.
    """

    def __init__(self, topic: str, reason: str, *, permanent: bool = False) -> None:
        self.topic = topic
        self.reason = reason
        self.permanent = permanent
        super().__init__(f"publish to {topic} refused: {reason}")


class OutboxError(EdgeError):
    """The durable outbox cannot store or read messages."""


class SourceError(EdgeError):
    """A frame source (camera, stream, hot folder) failed."""


class UploadQueueError(EdgeError):
    """The image upload queue cannot store or read (a full disk, a broken file): the caller retries."""


class ImageNotQueuedError(EdgeError):
    """One image can never be queued for upload (it is larger than the whole queue): its alert goes without it."""


class CredentialsError(EdgeError):
    """AWS credentials cannot be obtained (the IoT credentials provider or the Token Exchange Service refused
    or is unreachable, or its answer is not credentials). Never carries a secret."""


class UploadError(EdgeError):
    """An image upload failed. ``permanent`` refusals (access denied, no such bucket, too large) will fail
    again however often they are tried: the image moves to the upload queue's dead letters. Others
    (network, throttling, server errors, refused credentials) are retried with backoff.
    """

    def __init__(self, message: str, *, permanent: bool = False, code: str | None = None) -> None:
        self.permanent = permanent
        self.code = code
        super().__init__(message)


class GreengrassError(EdgeError):
    """The Greengrass nucleus cannot be reached over IPC, or refused a request."""


class ImageStoreError(EdgeError):
    """An image cannot be written to the local store."""


class DatabaseOpenError(EdgeError):
    """The file cannot be created, locked or opened; the caller wraps it in its own error."""
