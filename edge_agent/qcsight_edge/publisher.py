"""The Publisher interface every transport implements (MQTT5, MQTT 3.1.1, Greengrass IPC)."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Protocol


class Publisher(Protocol):
    """Sends one payload to one topic, at least once.

    publish() returns at once with a future that completes when the peer acknowledged the
    message (PUBACK for QoS 1, the IPC response for Greengrass) and fails with PublishError
    (NotConnectedError while offline) otherwise. The outbox deletes a message only after its
    future succeeded, so a failure never loses anything.
    """

    def connect(self, timeout_s: float) -> None:
        """Start connecting; returns when connected or raises PublishError after timeout_s."""

    @property
    def connected(self) -> bool:
        """Whether a publish issued now can be acknowledged."""

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> Future[None]:
        """Queue one message; the future resolves on acknowledgement."""

    def close(self, timeout_s: float) -> None:
        """Disconnect cleanly within timeout_s."""
