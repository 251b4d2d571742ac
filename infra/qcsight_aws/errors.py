"""AWS failures as one qcsight error whose message names the call: ClientError -> 'Operation failed: Code: Message'."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from qcsight_core.errors import QcsightError

log = logging.getLogger(__name__)


class AwsError(QcsightError):
    """An AWS call failed or credentials are missing; the message names the call and AWS's reason."""


class JobError(AwsError):
    """A SageMaker job ended failed or stopped, or it did not finish before the wait's deadline."""


def describe(exc: BaseException) -> str:
    """What AWS said, for a message: 'Code: Message' for a ClientError, else the exception's text."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and isinstance(response.get("Error"), dict):
        error = response["Error"]
        return f"{error.get('Code', '?')}: {error.get('Message') or exc}"
    return str(exc)


@contextlib.contextmanager
def aws_errors(operation: str, error: type[AwsError] = AwsError) -> Iterator[None]:
    """Turn botocore and boto3 failures inside the block into one ``error`` that names the operation.

    Args:
        operation: the call or step, e.g. "CreateTrainingJob" or "upload of s3://b/k".
        error: the AwsError subclass to raise (a package's own, so its callers catch one type).
    """
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

    try:
        yield
    except (NoCredentialsError, PartialCredentialsError) as exc:
        log.debug("%s: credentials", operation, exc_info=True)
        raise error(f"{operation}: no usable AWS credentials ({exc}); set AWS_PROFILE or "
                    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") from exc
    except (ClientError, BotoCoreError, Boto3Error) as exc:  # Boto3Error: S3 transfers wrap their ClientError
        log.debug("%s failed", operation, exc_info=True)
        raise error(f"{operation} failed: {describe(exc)}") from exc
