"""Hostile bundles: tar bombs, links, devices, escaping names and manifests pointing outside the bundle."""

from __future__ import annotations

import gc
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

import pytest

from qcsight_core.bundle import (
    MANIFEST_NAME,
    Bundle,
    ExtractLimits,
    load_bundle,
    pack_bundle,
    sha256_file,
    unpack_bundle,
)
from qcsight_core.cli import main
from qcsight_core.errors import BundleError, BundleIntegrityError, BundleSchemaError
from tests.helpers import bombs


def _members(bundle: Bundle) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in bundle.path.iterdir() if p.is_file()}


def _size_on_disk(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_only_the_files_the_manifest_lists_are_written(tiny_bundle: Bundle, tmp_path: Path) -> None:
    archive = tmp_path / "model.tar.gz"
    # 64 MB of zeros beside the bundle's files: a few dozen KB compressed.
    archive.write_bytes(bombs.tar_bomb({**_members(tiny_bundle), "padding.bin": 64 << 20}))
    assert archive.stat().st_size < 200_000
    unpack_bundle(archive, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(_members(tiny_bundle))
    assert _size_on_disk(tmp_path / "out") < 100_000


def test_member_and_total_sizes_are_capped_from_the_headers(tiny_bundle: Bundle, tmp_path: Path) -> None:
    members = _members(tiny_bundle)
    big = tmp_path / "big.tar.gz"
    big.write_bytes(bombs.tar_bomb({**members, "model.onnx": 8 << 20}))  # listed, declares 8 MB
    with pytest.raises(BundleError, match=r"member 'model\.onnx' declares 8388608 bytes, more than the 1048576"):
        unpack_bundle(big, tmp_path / "a", ExtractLimits(max_member_bytes=1 << 20))
    small = tmp_path / "small.tar.gz"
    small.write_bytes(bombs.tar_bomb(members))
    with pytest.raises(BundleError, match=r"declare .* bytes in all, more than the 100-byte limit"):
        unpack_bundle(small, tmp_path / "b", ExtractLimits(max_total_bytes=100))
    for target in (tmp_path / "a", tmp_path / "b"):
        assert not target.exists() or not any(target.iterdir()), "nothing is written before the checks"
    crowd = tmp_path / "crowd.tar.gz"
    crowd.write_bytes(bombs.tar_bomb({**members, **{f"x{i}": b"" for i in range(20)}}))
    with pytest.raises(BundleError, match="more than 10 members"):
        unpack_bundle(crowd, tmp_path / "c", ExtractLimits(max_members=10))


def _with_member(bundle: Bundle, path: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in _members(bundle).items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data) if data else None)
    path.write_bytes(buffer.getvalue())
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(("member", "message"), [
    (_member("model.onnx.link", tarfile.SYMTYPE, "/etc/passwd"), "is a link to '/etc/passwd'"),
    (_member("hard", tarfile.LNKTYPE, "model.onnx"), "is a link to 'model.onnx'"),
    (_member("dev", tarfile.CHRTYPE), "is a device"),
    (_member("fifo", tarfile.FIFOTYPE), "is a FIFO"),
    (_member("/etc/cron.d/x"), "'/etc/cron.d/x' is not a relative path"),
    (_member("sub/../../x"), "is not a relative path"),
])
def test_links_devices_and_escaping_names_refuse_the_archive(
    tiny_bundle: Bundle, tmp_path: Path, member: tarfile.TarInfo, message: str
) -> None:
    archive = _with_member(tiny_bundle, tmp_path / "bad.tar.gz", member)
    with pytest.raises(BundleError, match=message):
        load_bundle(archive, extract_to=tmp_path / "out")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["../outside.onnx", "/tmp/outside.onnx", "sub/../../outside.onnx"])
def test_manifest_paths_must_stay_inside_the_bundle(tiny_bundle: Bundle, tmp_path: Path, name: str) -> None:
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((tiny_bundle.path / "model.onnx").read_bytes())
    manifest = json.loads((tiny_bundle.path / MANIFEST_NAME).read_text())
    manifest["runtimes"][0]["file"] = name
    manifest["files"] = {name: sha256_file(outside)}
    (tiny_bundle.path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleSchemaError, match="is not a relative path inside the bundle"):
        load_bundle(tiny_bundle.path)


def test_a_symlink_resolving_out_of_the_bundle_is_refused(tiny_bundle: Bundle, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.onnx"
    model = tiny_bundle.path / "model.onnx"
    elsewhere.write_bytes(model.read_bytes())
    model.unlink()
    model.symlink_to(elsewhere)  # same bytes, same sha256: only the path check can refuse it
    with pytest.raises(BundleIntegrityError, match="outside the bundle"):
        load_bundle(tiny_bundle.path)


def test_tarball_copies_are_removed(tiny_bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    archive = pack_bundle(tiny_bundle.path, tmp_path / "model.tar.gz")
    for _ in range(3):
        assert main(["bundle", "verify", str(archive)]) == 0
    assert os.listdir(scratch) == [], "bundle verify left its extracted copy behind"
    with load_bundle(archive) as bundle:
        assert bundle.model_path().is_file()
    assert os.listdir(scratch) == []
    bundle = load_bundle(archive)
    del bundle
    gc.collect()
    assert os.listdir(scratch) == [], "a dropped Bundle keeps its copy"
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(archive.read_bytes()[:-200])
    with pytest.raises(BundleError):
        load_bundle(broken)
    assert os.listdir(scratch) == []
    capsys.readouterr()
