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
