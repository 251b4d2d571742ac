"""Errors raised by the cloud side; rooted in qcsight_core.errors.QcsightError."""

from __future__ import annotations

from qcsight_core.errors import QcsightError


class CloudError(QcsightError):
    """Base class for qcsight_cloud errors."""


class StoreError(CloudError):
    """The alert/metrics store cannot be opened, read or written."""


class NotFoundError(StoreError):
    """A record the caller named (an alert, a run) is not in the store."""


class ReviewConflictError(StoreError):
    """Someone else reviewed the alert since the caller read it; reload and decide again."""


class FleetError(CloudError):
    """The fleet membership (fleet file, IoT thing groups) cannot be read."""


class SubscriberError(CloudError):
    """The local MQTT subscriber cannot connect or subscribe."""
