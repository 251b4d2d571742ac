"""Where an alert's full image is: a local folder (file:// refs, s3:// keys mirrored into it) or S3 (presigned URLs).

The device names the image in the alert before the upload finishes (qcsight_core.messages), so an
image may not exist yet: ``locate`` answers None and the app shows the thumbnail.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

# How long a presigned image URL works: long enough to load the page, short enough that a copied
# link stops working before the end of the shift.
PRESIGN_SECONDS = 300


@dataclass(frozen=True)
class Located:
    """A found image: a local file, or a URL the browser may fetch (a presigned S3 GET)."""

    path: Path | None = None
    url: str | None = None
    uri: str = ""  # what a training manifest names it by


class ImageSource(Protocol):
    def locate(self, image_ref: str) -> Located | None:
        """The image an alert's image_ref names, if it exists (None: not uploaded yet, or not ours to serve)."""
        ...


class NoImages:
    """No image source configured: every alert shows its thumbnail."""

    def locate(self, image_ref: str) -> Located | None:
        return None


class FolderImages:
    """Images in one local folder; a ref outside it is never served (it would read any file of the host)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def locate(self, image_ref: str) -> Located | None:
        parts = urlsplit(image_ref)
        if parts.scheme == "file":
            candidate = Path(unquote(parts.path))
        elif parts.scheme == "s3":
            candidate = self.root / parts.path.lstrip("/")
        elif not parts.scheme and "/" not in image_ref and image_ref not in ("", ".", ".."):
            candidate = self.root / image_ref
        else:
            return None
        try:
            resolved = candidate.resolve()
        except OSError:
            return None
        if not resolved.is_relative_to(self.root) or not resolved.is_file():
            return None
        return Located(path=resolved, uri=str(resolved))


class S3Images:
    """Images in one S3 bucket: a HEAD says whether the upload finished, a presigned GET lets the browser load it."""

    def __init__(self, client: Any, bucket: str, expires_s: int = PRESIGN_SECONDS) -> None:
        self.client, self.bucket, self.expires_s = client, bucket, expires_s

    def locate(self, image_ref: str) -> Located | None:
        parts = urlsplit(image_ref)
        if parts.scheme != "s3" or parts.netloc != self.bucket:
            return None
        key = parts.path.lstrip("/")
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code not in ("404", "NoSuchKey", "NotFound"):
                log.warning("image %s: HEAD failed: %s", image_ref, exc)
            return None
        except BotoCoreError as exc:
            log.warning("image %s: HEAD failed: %s", image_ref, exc)
            return None
        url = self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                 ExpiresIn=self.expires_s)
        return Located(url=str(url), uri=image_ref)


def s3_client(**kwargs: Any) -> Any:
    """An S3 client that presigns with SigV4: the images bucket is KMS-encrypted, and S3 refuses a SigV2 URL
    to a KMS-encrypted object (botocore's default signer for presigned URLs on the global endpoint is SigV2)."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(signature_version="s3v4", s3={"addressing_style": "virtual"},
                                            retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5,
                                            read_timeout=10), **kwargs)


def open_images(spec: str | None) -> ImageSource:
    """``s3://BUCKET`` (boto3 default session), a folder path, or None (thumbnails only)."""
    if not spec:
        return NoImages()
    if spec.startswith("s3://"):
        return S3Images(s3_client(), urlsplit(spec).netloc)
    return FolderImages(spec)
