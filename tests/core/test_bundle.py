"""The bundle contract: round trip, hashing, tamper and partial refusal, schema checks, tarballs."""

from __future__ import annotations

import json
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from qcsight_core.bundle import (
    MANIFEST_NAME,
    SCHEMA,
    DecisionPolicy,
    Manifest,
    load_bundle,
    pack_bundle,
    read_manifest,
    sha256_file,
    unpack_bundle,
    write_bundle,
)
from qcsight_core.errors import (
    BundleError,
    BundleFileMissingError,
    BundleIntegrityError,
    BundleSchemaError,
    ConfigError,
)
from tests.helpers.models import make_tiny_bundle


def _edit_manifest(directory: Path, **changes: object) -> None:
    path = directory / MANIFEST_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_round_trip_preserves_every_field(tmp_path: Path) -> None:
    written = make_tiny_bundle(tmp_path / "b", decision=DecisionPolicy(0.7, 0.4, {"spot": 0.3}, 0.99))
    loaded = load_bundle(tmp_path / "b")
    assert loaded.manifest == written.manifest
    assert loaded.manifest.to_dict()["schema"] == SCHEMA
    assert loaded.manifest.decision.class_thresholds == {"spot": 0.3}
    assert loaded.manifest.good_classes == ("good",)
    assert loaded.manifest.files == {"model.onnx": sha256_file(tmp_path / "b" / "model.onnx")}
    assert loaded.model_path() == tmp_path / "b" / "model.onnx"


def test_one_changed_byte_is_refused_naming_the_file(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path / "b")
    model = tmp_path / "b" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=r"model\.onnx.*does not match"):
        load_bundle(tmp_path / "b")


def test_missing_file_is_refused_as_partial(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path / "b")
    (tmp_path / "b" / "model.onnx").unlink()
    with pytest.raises(BundleFileMissingError, match=r"model\.onnx.*missing"):
        load_bundle(tmp_path / "b")


def test_missing_manifest_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleFileMissingError, match=r"manifest\.json is missing"):
        load_bundle(tmp_path / "empty")
    with pytest.raises(BundleFileMissingError, match="no such bundle"):
        load_bundle(tmp_path / "nowhere")


def test_unknown_major_version_is_refused_and_minor_accepted(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path / "b")
    _edit_manifest(tmp_path / "b", schema="qcsight.bundle/1.3")
    assert load_bundle(tmp_path / "b").manifest.name == "tiny"
    _edit_manifest(tmp_path / "b", schema="qcsight.bundle/2")
    with pytest.raises(BundleSchemaError, match="major version '2'"):
        load_bundle(tmp_path / "b")
    _edit_manifest(tmp_path / "b", schema="something.else/1")
    with pytest.raises(BundleSchemaError, match="not a qcsight bundle"):
        load_bundle(tmp_path / "b")


def test_classes_and_thresholds_that_disagree(tmp_path: Path) -> None:
    manifest = make_tiny_bundle(tmp_path / "b").manifest
    with pytest.raises(BundleSchemaError, match=r"class_thresholds names \['dent'\]"):
        replace(manifest, decision=DecisionPolicy(0.5, 0.5, {"dent": 0.2}))
    with pytest.raises(BundleSchemaError, match=r"defect_classes \['dent'\] are not among classes"):
        replace(manifest, defect_classes=("dent",))
    with pytest.raises(BundleSchemaError, match="duplicate class"):
        replace(manifest, classes=("good", "spot", "spot"))
    with pytest.raises(BundleSchemaError, match="at least one defect class"):
        replace(manifest, defect_classes=())
    # Every class a defect type is a valid bundle (a model that sorts defects already found).
    assert replace(manifest, defect_classes=manifest.classes).defect_types_only
    with pytest.raises(ConfigError, match="uncertain_threshold"):
        DecisionPolicy(defect_threshold=0.3, uncertain_threshold=0.6)


def test_disagreeing_manifest_on_disk_is_refused_with_its_path(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path / "b")
    _edit_manifest(tmp_path / "b", defect_classes=["crack"])
    with pytest.raises(BundleSchemaError, match=r"manifest\.json.*\['crack'\]"):
        read_manifest(tmp_path / "b")
    (tmp_path / "b" / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleSchemaError, match="not valid JSON"):
        read_manifest(tmp_path / "b")


def test_manifest_without_required_field(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path / "b")
    data = json.loads((tmp_path / "b" / MANIFEST_NAME).read_text())
    del data["classes"]
    with pytest.raises(BundleSchemaError, match="'classes' is missing"):
        Manifest.from_dict(data)


def test_runtime_listed_but_absent_cannot_be_written(tmp_path: Path) -> None:
    bundle = make_tiny_bundle(tmp_path / "b")
    (tmp_path / "b" / "model.onnx").unlink()
    with pytest.raises(BundleFileMissingError, match="listed in runtimes"):
        write_bundle(tmp_path / "b", bundle.manifest)


def test_tarball_round_trip_like_sagemaker_model_tar_gz(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path / "b")
    tar_path = pack_bundle(tmp_path / "b", tmp_path / "out" / "model.tar.gz")
    with tarfile.open(tar_path) as tar:
        assert sorted(tar.getnames()) == ["manifest.json", "model.onnx"]  # files at the root
    loaded = load_bundle(tar_path, extract_to=tmp_path / "x")
    assert loaded.path == tmp_path / "x"
    assert loaded.manifest == load_bundle(tmp_path / "b").manifest


def test_tampered_tarball_is_refused(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path / "b")
    (tmp_path / "b" / "model.onnx").write_bytes(b"not the model")
    tar_path = tmp_path / "evil.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(tmp_path / "b" / "manifest.json", arcname="manifest.json")
        tar.add(tmp_path / "b" / "model.onnx", arcname="model.onnx")
    with pytest.raises(BundleIntegrityError):
        load_bundle(tar_path, extract_to=tmp_path / "x")


def test_tarball_member_escaping_the_directory_is_refused(tmp_path: Path) -> None:
    payload = tmp_path / "payload"
    payload.write_text("x")
    tar_path = tmp_path / "escape.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(payload, arcname="../outside.txt")
    with pytest.raises(BundleError, match=r"'\.\./outside\.txt' is not a relative path inside the bundle"):
        unpack_bundle(tar_path, tmp_path / "x")
    assert not (tmp_path / "outside.txt").exists()


def test_corrupt_tarball_is_a_bundle_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08garbage")
    with pytest.raises(BundleError, match="not a readable bundle tarball"):
        load_bundle(bad, extract_to=tmp_path / "x")
