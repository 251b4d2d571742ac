"""Where images come from: local folders, globs, manifests and S3 prefixes, iterated lazily; bundle fetching.

Every source yields keys one at a time (os.scandir, an S3 paginator, a manifest read line by
line), so ten million inputs cost no more memory than ten. A key is a location that
read_location() understands: a local path or an s3://bucket/key URI. Sources are frozen
dataclasses so that they pickle into decode worker processes, which read the bytes
themselves; the S3 client is made lazily in each process that needs one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from qcsight_aws.errors import AwsError, aws_errors
from qcsight_aws.s3 import S3Uri, download_file, download_objects, is_s3_uri, list_objects
from qcsight_batch.errors import InputError
from qcsight_core.errors import ConfigError
from qcsight_core.imageio import is_image_path

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".jsonl", ".manifest")
# Ground Truth / augmented manifests name the image with "source-ref"; "source" is accepted too.
MANIFEST_FIELDS = ("source-ref", "source")
_GLOB_MAGIC = re.compile(r"[*?[]")
_S3_PAGE_SIZE = 1000

_client_lock = threading.Lock()
_clients: dict[tuple[int, str | None, str | None], Any] = {}


class ImageSource(Protocol):
    """A lazily iterated set of image locations and a way to read each one's bytes."""

    def iter_keys(self) -> Iterator[str]:
        """Yield each image's location once, without listing the whole input first."""
        ...

    def read(self, key: str) -> bytes:
        """The encoded bytes at key; raises InputError when they cannot be read."""
        ...

    def describe(self) -> str:
        """A short description for logs and the summary."""
        ...


def s3_client() -> Any:
    """A boto3 S3 client for this process, made on first use.

    Keyed by process id (a client must not cross a fork) and by the endpoint variables, so a
    test that points AWS_ENDPOINT_URL at a fresh moto server gets a fresh client.
    """
    key = (os.getpid(), os.environ.get("AWS_ENDPOINT_URL"), os.environ.get("AWS_ENDPOINT_URL_S3"))
    with _client_lock:
        client = _clients.get(key)
        if client is None:
            try:
                import boto3
            except ModuleNotFoundError as exc:
                raise InputError("reading s3:// locations needs boto3: pip install 'qcsight[batch]'") from exc
            client = boto3.session.Session().client("s3")
            _clients[key] = client
        return client


def parse_s3_uri(uri: str) -> S3Uri:
    """s3://bucket/some/key as an S3Uri; older us-east-1 bucket names (capitals, underscores) are accepted."""
    try:
        return S3Uri.parse(uri, legacy_bucket=True)
    except ConfigError as exc:
        raise InputError(f"{uri!r}: not a usable S3 location; expected {exc.allowed}") from exc


@contextlib.contextmanager
def s3_errors(operation: str) -> Iterator[None]:
    """AWS's refusal inside the block as an InputError naming the operation ('GetObject s3://b/k failed: Code: ...')."""
    try:
        with aws_errors(operation):
            yield
    except AwsError as exc:
        raise InputError(str(exc)) from exc.__cause__


def read_location(location: str) -> bytes:
    """Bytes of a local file or an S3 object."""
    if is_s3_uri(location):
        uri = parse_s3_uri(location)
        with s3_errors(f"GetObject {uri}"):
            body = s3_client().get_object(Bucket=uri.bucket, Key=uri.key)["Body"]
            with body:
                data: bytes = body.read()
        return data
    try:
        return Path(location).read_bytes()
    except OSError as exc:
        raise InputError(f"{location}: cannot read file: {exc.strerror or exc}") from exc


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _folder_id(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def _walk_files(root: str, max_depth: int | None = None) -> Iterator[str]:
    """Regular files under root, depth first, skipping hidden entries; holds one directory handle at a time.

    Links to folders are followed once: a folder already walked (a symlink loop back to an
    ancestor, or a second link to the same folder) is skipped with a warning, so a loop can
    neither make the walk endless nor score the same files twice. One stat per folder, none per file.
    """
    try:
        walked = {_folder_id(os.stat(root))}
    except OSError as exc:
        raise InputError(f"{root}: cannot list folder: {exc.strerror or exc}") from exc
    pending: list[tuple[str, int]] = [(root, 1)]
    while pending:
        directory, depth = pending.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if not _visible(entry.name):
                        continue
                    if entry.is_dir(follow_symlinks=True):
                        if max_depth is not None and depth >= max_depth:
                            continue
                        folder = _folder_id(entry.stat(follow_symlinks=True))
                        if folder in walked:
                            log.warning("%s: not followed: it leads to a folder already walked (a symlink loop "
                                        "or a second link to the same folder)", entry.path)
                            continue
                        walked.add(folder)
                        pending.append((entry.path, depth + 1))
                    elif entry.is_file(follow_symlinks=True):
                        yield entry.path
        except OSError as exc:
            raise InputError(f"{directory}: cannot list folder: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class DirSource:
    """Every visible file under a local folder (recursively); non-images give error rows unless images_only."""

    root: str
    images_only: bool = False

    def iter_keys(self) -> Iterator[str]:
        for path in _walk_files(self.root):
            if not self.images_only or is_image_path(path):
                yield path

    def read(self, key: str) -> bytes:
        return read_location(key)

    def describe(self) -> str:
        return f"folder {self.root}"


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A regex for a shell glob over '/'-separated paths: * and ? stay within a name, ** spans folders."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class GlobSource:
    """Files matching a shell glob (with ** for any depth).

    glob.iglob reads each directory into a list before yielding; walking with os.scandir and
    matching a regex keeps a folder of millions of files streaming.
    """

    pattern: str

    def _base_and_rest(self) -> tuple[str, list[str]]:
        parts = self.pattern.split("/")
        fixed: list[str] = []
        for part in parts:
            if _GLOB_MAGIC.search(part):
                break
            fixed.append(part)
        rest = parts[len(fixed) :]
        base = "/".join(fixed) or ("/" if self.pattern.startswith("/") else ".")
        return base, rest

    def iter_keys(self) -> Iterator[str]:
        base, rest = self._base_and_rest()
        if not rest:  # no magic at all: the pattern names one file
            if os.path.isfile(self.pattern):
                yield self.pattern
            return
        if not os.path.isdir(base):
            return
        depth = None if any("**" in part for part in rest) else len(rest)
        regex = glob_regex("/".join(rest))
        strip = len(base.rstrip("/")) + 1
        for path in _walk_files(base, max_depth=depth):
            relative = path[strip:]
            if regex.match(relative):
                yield relative if base == "." else path

    def read(self, key: str) -> bytes:
        return read_location(key)

    def describe(self) -> str:
        return f"glob {self.pattern}"


def _manifest_lines(location: str) -> Iterator[bytes]:
    if is_s3_uri(location):
        uri = parse_s3_uri(location)
        with s3_errors(f"GetObject of the manifest {uri}"):
            body = s3_client().get_object(Bucket=uri.bucket, Key=uri.key)["Body"]
        with body:
            yield from body.iter_lines()
        return
    try:
        with open(location, "rb") as handle:
            yield from handle
    except OSError as exc:
        raise InputError(f"{location}: cannot read manifest: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class ManifestSource:
    """A JSON-lines manifest, one object per line naming its image in "source-ref" (as Ground Truth writes).

    Local relative paths are taken relative to the manifest's folder; s3:// references are read from S3.
    """

    location: str

    def _resolve(self, ref: str) -> str:
        if is_s3_uri(ref) or os.path.isabs(ref) or is_s3_uri(self.location):
            return ref
        return os.path.join(os.path.dirname(self.location), ref)

    def iter_keys(self) -> Iterator[str]:
        for number, raw in enumerate(_manifest_lines(self.location), start=1):
            line = raw.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InputError(f"{self.location} line {number}: not a JSON object: {exc}") from exc
            ref = next((record[f] for f in MANIFEST_FIELDS if isinstance(record, dict) and f in record), None)
            if not isinstance(ref, str) or not ref:
                raise InputError(
                    f"{self.location} line {number}: no {' or '.join(repr(f) for f in MANIFEST_FIELDS)} string"
                )
            yield self._resolve(ref)

    def read(self, key: str) -> bytes:
        return read_location(key)

    def describe(self) -> str:
        return f"manifest {self.location}"


@dataclass(frozen=True)
class S3PrefixSource:
    """Every object under s3://bucket/prefix, listed page by page with the ListObjectsV2 paginator."""

    bucket: str
    prefix: str
    images_only: bool = False
    page_size: int = _S3_PAGE_SIZE

    def iter_keys(self) -> Iterator[str]:
        paginator = s3_client().get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket, Prefix=self.prefix, PaginationConfig={"PageSize": self.page_size}
        )
        # The generator yields inside the block: only the listing's own failures are caught here.
        with s3_errors(f"ListObjectsV2 {S3Uri(self.bucket, self.prefix)}"):
            for page in pages:
                for obj in page.get("Contents", ()):
                    key = str(obj["Key"])
                    name = key.rsplit("/", 1)[-1]
                    if key.endswith("/") or not _visible(name) or (self.images_only and not is_image_path(name)):
                        continue
                    yield str(S3Uri(self.bucket, key))

    def read(self, key: str) -> bytes:
        return read_location(key)

    def describe(self) -> str:
        return f"S3 prefix s3://{self.bucket}/{self.prefix}"


def open_source(spec: str, images_only: bool = False) -> ImageSource:
    """Pick the source for an --input value: s3:// prefix or manifest, local folder, glob or manifest."""
    if is_s3_uri(spec):
        uri = parse_s3_uri(spec)
        if uri.key.endswith(MANIFEST_SUFFIXES):
            return ManifestSource(spec)
        return S3PrefixSource(uri.bucket, uri.key, images_only)
    if os.path.isdir(spec):
        return DirSource(spec, images_only)
    if os.path.isfile(spec) and spec.endswith(MANIFEST_SUFFIXES):
        return ManifestSource(spec)
    if _GLOB_MAGIC.search(spec):
        return GlobSource(spec)
    if os.path.exists(spec):
        raise InputError(f"{spec}: a file input must be a JSON-lines manifest ({', '.join(MANIFEST_SUFFIXES)})")
    raise InputError(f"{spec}: no such folder or manifest (and not a glob or s3:// URI)")


def fetch_bundle(location: str, cache_dir: Path) -> Path:
    """A local path for a bundle given as a folder, a .tar.gz, or an s3:// object or prefix.

    S3 bundles are downloaded once into cache_dir under a name derived from the bucket, key
    and ETag, so a changed object is fetched again and an unchanged one is reused.
    load_bundle() verifies every file's sha256 whichever way the files arrived.
    """
    if not is_s3_uri(location):
        return Path(location)
    uri = parse_s3_uri(location)
    client = s3_client()
    etag = ""
    if uri.key and not uri.key.endswith("/"):
        try:
            with aws_errors(f"HeadObject {uri}"):
                etag = str(client.head_object(Bucket=uri.bucket, Key=uri.key)["ETag"]).strip('"')
        except AwsError:  # not an object: treat the key as a folder prefix below
            etag = ""
    if etag:
        slot = cache_dir / "bundles" / hashlib.sha256(f"{uri.bucket}/{uri.key}@{etag}".encode()).hexdigest()[:16]
        target = slot / Path(uri.key).name
        if not target.is_file():
            log.info("downloading bundle %s to %s", location, target)
            with s3_errors(f"download of {uri}"):
                download_file(client, uri, target)
        return target
    folder = S3Uri(uri.bucket, uri.prefix)
    with s3_errors(f"ListObjectsV2 {folder} (the bundle prefix)"):
        objects = list_objects(client, folder)
    if not objects:
        raise InputError(f"{location}: no such S3 object or prefix")
    # manifest.json last: an interrupted download then leaves no manifest and is fetched again.
    objects.sort(key=lambda item: (item.key.endswith("/manifest.json"), item.key))
    # The ETag in the quotes S3 returns it with, so cache slots made before this listing moved keep their names.
    fingerprint = hashlib.sha256(repr(sorted((o.key, f'"{o.etag}"') for o in objects)).encode()).hexdigest()[:16]
    slot = cache_dir / "bundles" / fingerprint / "bundle"
    if not (slot / "manifest.json").is_file():
        log.info("downloading bundle %s (%d files) to %s", location, len(objects), slot)
        with s3_errors(f"download of the bundle {folder}"):
            download_objects(client, folder.bucket, objects, folder.prefix, slot, skip_unchanged=False)
    return slot


def default_cache_dir() -> Path:
    """$QCSIGHT_CACHE_DIR, else $XDG_CACHE_HOME/qcsight, else ~/.cache/qcsight."""
    explicit = os.environ.get("QCSIGHT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qcsight"
