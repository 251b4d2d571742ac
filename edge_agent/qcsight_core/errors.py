"""The qcsight exception hierarchy; every package roots its own errors here."""

from __future__ import annotations


class QcsightError(Exception):
    """Base class for every error qcsight raises on purpose."""


class ConfigError(QcsightError):
    """A configuration value is missing or not allowed."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid configuration {field}={_shown(value)}: {allowed}")


def _shown(value: object, limit: int = 200) -> str:
    """The value's repr, cut short when it is long (a 400-digit number need not fill a screen)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit // 2]}...({len(text)} characters)"


class BundleError(QcsightError):
    """A model bundle cannot be written, read or trusted."""


class BundleFileMissingError(BundleError):
    """A file the manifest lists (or the manifest itself) is absent."""


class BundleIntegrityError(BundleError):
    """A file's sha256 differs from the one recorded in the manifest."""


class BundleSchemaError(BundleError):
    """The manifest's schema is unknown or its fields do not agree."""


class BundleSignatureError(BundleError):
    """A verification key is configured and the bundle is unsigned, or signed by another key, or altered."""


class ImageError(QcsightError):
    """An image cannot be decoded or has a shape qcsight cannot use."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


class PreprocessError(QcsightError):
    """Preprocessing was asked for something the spec cannot produce."""


class RunnerError(QcsightError):
    """The inference runtime failed to load or run a model."""


class MessageError(QcsightError):
    """A device message does not match its schema."""


class DataError(QcsightError):
    """A dataset source (folder, CSV, manifest) cannot be read."""
