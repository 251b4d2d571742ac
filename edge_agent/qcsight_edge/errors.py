"""Errors raised by the edge agent."""

from __future__ import annotations

from qcsight_core.errors import QcsightError


class EdgeError(QcsightError):
    """Base class for edge agent errors."""


class PublishError(EdgeError):
    """A message was not acknowledged by the broker (or Greengrass nucleus)."""


class NotConnectedError(PublishError):
    """The transport has no live connection; the message stays in the outbox."""


class OutboxError(EdgeError):
    """The durable outbox cannot store or read messages."""


class SourceError(EdgeError):
    """A frame source (camera, stream, hot folder) failed."""
