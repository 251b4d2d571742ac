"""Errors raised by batch scoring, the Batch Transform handler and the job launcher."""

from __future__ import annotations

from qcsight_core.errors import QcsightError


class BatchError(QcsightError):
    """Base class for batch scoring errors."""


class InputError(BatchError):
    """An input (folder, glob, manifest, S3 prefix) or a bundle location cannot be read."""


class OutputError(BatchError):
    """The results file cannot be written, or an existing one cannot be resumed."""


class WorkerError(BatchError):
    """A decode worker died or did not answer in time."""


class RequestError(BatchError):
    """An inference request the handler cannot serve; status is the HTTP status to answer with."""

    status = 400


class UnsupportedContentTypeError(RequestError):
    """The request's Content-Type is not one the handler decodes."""

    status = 415


class UnsupportedAcceptError(RequestError):
    """The request asks for a response type the handler does not write."""

    status = 406


class PayloadTooLargeError(RequestError):
    """The request body is larger than the container accepts."""

    status = 413


class SubmitError(BatchError):
    """A SageMaker or EventBridge Scheduler request was refused or cannot be built."""


class KmsSigningError(BatchError):
    """The KMS key cannot sign bundles, or KMS refused a request."""
