"""A boto3 session for one region, refusing early (before any upload) when there are no credentials."""

from __future__ import annotations

from typing import Any

from qcsight_aws.errors import AwsError


def boto_session(region: str | None = None, need_credentials: bool = True, hint: str = "configure them") -> Any:
    """A boto3.Session; with need_credentials, AwsError when none are configured.

    Args:
        hint: what the user can do instead, ending the message (e.g. "or use --dry-run").

    Raises:
        AwsError: need_credentials and no credentials in the environment, profile, ~/.aws or instance role.
    """
    import boto3

    session = boto3.Session(region_name=region)
    if need_credentials and session.get_credentials() is None:
        raise AwsError(f"no AWS credentials found (environment, AWS_PROFILE, ~/.aws or instance role); {hint}")
    return session


def default_region() -> str | None:
    """The region boto3 would use (AWS_REGION / AWS_DEFAULT_REGION / the profile), or None."""
    import boto3

    region = boto3.Session().region_name
    return str(region) if region else None
