"""S3 locations and transfers: one parser for s3:// URIs, listing and downloading a prefix, one object at a time.

Downloads land in a ``.part`` file renamed into place, so an interrupted transfer never leaves
a truncated file that a later run would take for complete.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcsight_aws.errors import AwsError, aws_errors
from qcsight_core.errors import ConfigError

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
# Bucket names as S3 has required them since 2018 (and SageMaker's own examples use).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
# Older us-east-1 buckets may hold capitals and underscores, up to 255 characters.
_LEGACY_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{1,253}[A-Za-z0-9]")
BUCKET_RULE = "bucket: 3-63 lowercase letters, digits, '.' or '-'"


def is_s3_uri(text: str) -> bool:
    return text.startswith(S3_SCHEME)


@dataclass(frozen=True)
class S3Uri:
    """s3://bucket/key; the key may be empty (the whole bucket) or end in '/' (a folder prefix)."""

    bucket: str
    key: str = ""

    @classmethod
    def parse(cls, text: str, field: str = "S3 URI", *, allowed: str = "", legacy_bucket: bool = False) -> S3Uri:
        """Split s3://bucket/key, checking the bucket name.

        Args:
            field: the setting or flag named in the error.
            allowed: what the error says is allowed (default: an s3://bucket/prefix URI and the bucket rule).
            legacy_bucket: also accept the older us-east-1 bucket names (capitals, underscores).

        Raises:
            ConfigError: not an s3:// URI, or no valid bucket name.
        """
        rule = _LEGACY_BUCKET if legacy_bucket else _BUCKET
        bucket, _, key = text[len(S3_SCHEME):].partition("/") if is_s3_uri(text) else ("", "", "")
        if not rule.fullmatch(bucket):
            raise ConfigError(field, text, allowed or f"an s3://bucket/prefix URI ({BUCKET_RULE})")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}" if self.key else f"{S3_SCHEME}{self.bucket}"

    @property
    def uri(self) -> str:
        return str(self)

    @property
    def prefix(self) -> str:
        """The key as a folder prefix: '' for the bucket, else ending in exactly one '/'."""
        return self.key.rstrip("/") + "/" if self.key.strip("/") else ""

    def join(self, *parts: str) -> S3Uri:
        """This location with parts appended as folders/names; with no parts, the key without stray slashes."""
        names = [p.strip("/") for p in (self.key, *parts)]
        return S3Uri(self.bucket, "/".join(n for n in names if n))


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str


def list_objects(client: Any, location: S3Uri) -> list[S3Object]:
    """Every object under location's prefix (ListObjectsV2, page by page).

    Raises:
        AwsError: the listing failed (no such bucket, access denied, no connection).
    """
    objects: list[S3Object] = []
    with aws_errors(f"listing {location}"):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=location.key):
            objects.extend(S3Object(str(o["Key"]), int(o["Size"]), str(o.get("ETag", "")).strip('"'))
                           for o in page.get("Contents", ()))
    return objects


def download_file(client: Any, location: S3Uri, target: Path) -> None:
    """One object into target, through target.part, so a partial download is never taken for the file.

    Raises:
        AwsError: the download failed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    with aws_errors(f"download of {location}"):
        client.download_file(location.bucket, location.key, str(part))
    os.replace(part, target)


def download_objects(client: Any, bucket: str, objects: Iterable[S3Object], prefix: str, target: Path, *,
                     skip_unchanged: bool = True) -> int:
    """Download objects (keys under prefix) to target/<key without prefix>, in the order given.

    Folder markers (keys ending in '/') are skipped; with skip_unchanged, so are files already
    present with the object's size, which makes a resumed download cheap.

    Returns:
        How many objects were fetched.

    Raises:
        AwsError: a key does not start with prefix or escapes target ('..'), or a download failed.
    """
    root = target.resolve()
    fetched = 0
    for item in objects:
        if not item.key.startswith(prefix):
            raise AwsError(f"s3://{bucket}/{item.key}: not under the prefix {prefix!r}")
        relative = item.key[len(prefix):]
        if not relative or relative.endswith("/"):
            continue
        local = (target / relative).resolve()
        if root not in local.parents:
            raise AwsError(f"s3://{bucket}/{item.key}: escapes the download folder {target}")
        if skip_unchanged and local.is_file() and local.stat().st_size == item.size:
            continue
        download_file(client, S3Uri(bucket, item.key), local)
        fetched += 1
    return fetched


def download_prefix(client: Any, location: S3Uri, target: Path, *, skip_unchanged: bool = True) -> int:
    """Everything under location (taken as a folder) into target; returns how many objects were fetched."""
    folder = S3Uri(location.bucket, location.prefix)
    fetched = download_objects(client, folder.bucket, list_objects(client, folder), folder.prefix, target,
                               skip_unchanged=skip_unchanged)
    log.info("%s: %d objects downloaded to %s", folder, fetched, target)
    return fetched


def upload_file(client: Any, path: Path, location: S3Uri) -> None:
    """One local file to location.

    Raises:
        AwsError: the upload failed (the message names the S3 URI and AWS's reason).
    """
    with aws_errors(f"upload of {path.name} to {location}"):
        client.upload_file(str(path), location.bucket, location.key)
