"""Input kinds: folder, glob, manifest and S3 prefix, all iterated lazily; bundles fetched from S3."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from qcsight_batch.errors import InputError
from qcsight_batch.sources import (
    DirSource,
    GlobSource,
    ManifestSource,
    S3PrefixSource,
    fetch_bundle,
    glob_regex,
    open_source,
    s3_client,
)
from qcsight_core.bundle import load_bundle, pack_bundle
from tests.batch.conftest import ImageSet


def test_folder_yields_every_visible_file_recursively(images: ImageSet) -> None:
    (images.root / ".hidden.jpg").write_bytes(b"x")
    keys = list(DirSource(str(images.root)).iter_keys())
    assert sorted(keys) == sorted(images.expected)
    only = list(DirSource(str(images.root), images_only=True).iter_keys())
    assert str(images.root / "notes.txt") not in only
    assert len(only) == len(images.expected) - 1


def test_symlink_loops_are_not_followed(images: ImageSet, caplog: pytest.LogCaptureFixture) -> None:
    (images.root / "part0" / "back-to-root").symlink_to(images.root, target_is_directory=True)
    (images.root / "part1" / "loop").symlink_to(images.root / "part1", target_is_directory=True)
    (images.root / "again").symlink_to(images.root / "part0", target_is_directory=True)
    # Bounded so that today's endless walk fails the assertion instead of hanging the suite.
    keys = list(itertools.islice(DirSource(str(images.root)).iter_keys(), 10 * len(images.expected)))
    assert len(keys) == len(set(keys)) == len(images.expected)
    glob_keys = list(itertools.islice(GlobSource(f"{images.root}/**/*.jpg").iter_keys(), 1000))
    assert len(glob_keys) == len({Path(k).resolve() for k in glob_keys})
    assert "not followed" in caplog.text


def test_folder_iteration_is_lazy(images: ImageSet) -> None:
    keys = DirSource(str(images.root)).iter_keys()
    first = next(keys)
    assert first in images.expected
    (images.root / "part0" / "zz-added-late.jpg").write_bytes(b"y")
    assert len([first, *keys]) >= len(images.expected)


def test_glob_matches_like_the_shell(images: ImageSet) -> None:
    jpgs = sorted(GlobSource(f"{images.root}/**/*.jpg").iter_keys())
    assert jpgs == sorted(k for k in images.expected if k.endswith(".jpg"))
    top = sorted(GlobSource(f"{images.root}/part0/img000?.png").iter_keys())
    assert top == sorted(k for k in images.expected if "/part0/img000" in k and k.endswith(".png"))
    assert list(GlobSource(f"{images.root}/*.txt").iter_keys()) == [str(images.root / "notes.txt")]
    assert glob_regex("a/[!x]?.jpg").match("a/by.jpg") and not glob_regex("a/[!x]?.jpg").match("a/xy.jpg")


def test_manifest_resolves_local_and_relative_refs(images: ImageSet, tmp_path: Path) -> None:
    good = images.of("good")
    manifest = images.root / "batch.manifest"
    lines = [json.dumps({"source-ref": str(Path(good[0]).relative_to(images.root))}),
             "",
             json.dumps({"source-ref": good[1], "class": 0})]
    manifest.write_text("\n".join(lines) + "\n")
    source = open_source(str(manifest))
    assert isinstance(source, ManifestSource)
    assert list(source.iter_keys()) == [str(images.root / Path(good[0]).relative_to(images.root)), good[1]]


def test_manifest_line_without_source_ref_is_named(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"source-ref": "a.jpg"}\n{"image": "b.jpg"}\n')
    with pytest.raises(InputError, match="line 2: no 'source-ref'"):
        list(ManifestSource(str(manifest)).iter_keys())


def test_open_source_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such folder"):
        open_source(str(tmp_path / "missing"))
    single = tmp_path / "one.jpg"
    single.write_bytes(b"x")
    with pytest.raises(InputError, match="manifest"):
        open_source(str(single))
    with pytest.raises(InputError, match="cannot read file"):
        DirSource(str(tmp_path)).read(str(tmp_path / "gone.jpg"))


def _upload(images: ImageSet, bucket: str, prefix: str) -> dict[str, str]:
    client = s3_client()
    client.create_bucket(Bucket=bucket)
    keys = {}
    for path in images.expected:
        key = prefix + Path(path).relative_to(images.root).as_posix()
        client.put_object(Bucket=bucket, Key=key, Body=Path(path).read_bytes())
        keys[f"s3://{bucket}/{key}"] = path
    client.put_object(Bucket=bucket, Key=prefix + "folder-marker/", Body=b"")
    client.put_object(Bucket=bucket, Key="other/outside.jpg", Body=b"x")
    return keys


def test_s3_prefix_pages_lazily_through_the_paginator(images: ImageSet, aws_endpoint: str) -> None:
    uploaded = _upload(images, "line-7", "2024/06/")
    calls: list[str] = []
    s3_client().meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: calls.append("list"))
    source = open_source("s3://line-7/2024/06/")
    assert isinstance(source, S3PrefixSource)
    paged = S3PrefixSource(source.bucket, source.prefix, page_size=5)
    keys = paged.iter_keys()
    first = next(keys)
    assert calls == ["list"], "the first key must come after one page, not after listing everything"
    rest = list(keys)
    assert sorted([first, *rest]) == sorted(uploaded)
    assert len(calls) == -(-(len(uploaded) + 1) // 5)  # one request per page of 5 (the folder marker counts)
    assert paged.read(first) == Path(uploaded[first]).read_bytes()
    with pytest.raises(InputError, match=re.escape("GetObject s3://line-7/2024/06/missing.jpg failed: NoSuchKey")):
        paged.read("s3://line-7/2024/06/missing.jpg")
    with pytest.raises(InputError, match="'s3:///2024/06/': not a usable S3 location; expected an s3://bucket"):
        open_source("s3:///2024/06/")


def test_s3_manifest_is_streamed(images: ImageSet, aws_endpoint: str) -> None:
    uploaded = _upload(images, "manifests", "imgs/")
    chosen = sorted(uploaded)[:3]
    body = "".join(json.dumps({"source-ref": key}) + "\n" for key in chosen)
    s3_client().put_object(Bucket="manifests", Key="jobs/today.manifest", Body=body.encode())
    source = open_source("s3://manifests/jobs/today.manifest")
    assert list(source.iter_keys()) == chosen


def test_bundle_from_s3_tarball_and_prefix_is_cached(bundle, tmp_path: Path, aws_endpoint: str) -> None:
    client = s3_client()
    client.create_bucket(Bucket="models")
    tar = pack_bundle(bundle.path, tmp_path / "model.tar.gz")
    client.upload_file(str(tar), "models", "line-7/model.tar.gz")
    for file in bundle.path.iterdir():
        client.upload_file(str(file), "models", f"line-7/unpacked/{file.name}")
    cache = tmp_path / "cache"

    local_tar = fetch_bundle("s3://models/line-7/model.tar.gz", cache)
    assert local_tar.is_file() and cache in local_tar.parents
    stamp = local_tar.stat().st_mtime_ns
    assert fetch_bundle("s3://models/line-7/model.tar.gz", cache) == local_tar
    assert local_tar.stat().st_mtime_ns == stamp, "an unchanged object must not be downloaded again"
    assert load_bundle(local_tar, tmp_path / "x").manifest.name == bundle.manifest.name

    folder = fetch_bundle("s3://models/line-7/unpacked/", cache)
    assert load_bundle(folder).manifest.files == bundle.manifest.files
    with pytest.raises(InputError, match="no such S3 object or prefix"):
        fetch_bundle("s3://models/line-8/", cache)
