"""`qcsight bundle ...` on a real tiny ONNX bundle: inspect, verify, pack, unpack, and refusing tampered ones."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from qcsight_core.bundle import Bundle, DecisionPolicy
from qcsight_core.cli import main
from tests.helpers.models import make_tiny_bundle


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_inspect_prints_the_manifest_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    decision = DecisionPolicy(defect_threshold=0.7, uncertain_threshold=0.4, class_thresholds={"spot": 0.3},
                              target_defect_recall=0.95)
    bundle = make_tiny_bundle(tmp_path / "b", version="3", decision=decision, name="line7-surface")

    assert main(["bundle", "inspect", str(bundle.path)]) == 0

    out = capsys.readouterr().out
    assert "name: line7-surface" in out and "version: 3" in out
    assert "classes: good, scratch, spot" in out
    assert "defect classes: scratch, spot" in out
    assert "input: 32x32 RGB, resize stretch" in out
    assert "thresholds: defect >= 0.7, uncertain >= 0.4, per class {spot: 0.3}, chosen for defect recall 0.95" in out
    assert "runtimes: model.onnx (onnx fp32, onnxruntime, opset 17)" in out
    assert "data fingerprint test, run test-run" in out
    assert "metrics: none recorded" in out
    assert "integrity: ok, 1 files match their sha256" in out


def test_inspect_json_and_tarball(tiny_bundle: Bundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tar = tmp_path / "model.tar.gz"
    assert main(["bundle", "pack", str(tiny_bundle.path), str(tar)]) == 0
    capsys.readouterr()

    assert main(["bundle", "inspect", "--json", str(tar)]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["schema"] == "qcsight.bundle/1" and manifest["classes"] == ["good", "scratch", "spot"]
    assert main(["bundle", "inspect", str(tar)]) == 0
    assert f"bundle: {tar}" in capsys.readouterr().out


def test_verify_ok_then_tampered_then_partial(tiny_bundle: Bundle, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bundle", "verify", str(tiny_bundle.path)]) == 0
    assert "OK" in capsys.readouterr().out

    flip_byte(tiny_bundle.path / "model.onnx")
    assert main(["bundle", "verify", str(tiny_bundle.path)]) == 1
    err = capsys.readouterr().err
    assert "qcsight bundle: error:" in err and "model.onnx" in err and "changed after the manifest was written" in err
    assert main(["bundle", "inspect", str(tiny_bundle.path)]) == 1
    captured = capsys.readouterr()
    assert "name: tiny" in captured.out and "changed after the manifest was written" in captured.err

    (tiny_bundle.path / "model.onnx").unlink()
    assert main(["bundle", "verify", str(tiny_bundle.path)]) == 1
    assert "missing" in capsys.readouterr().err


def test_pack_unpack_round_trip(tiny_bundle: Bundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tar = tmp_path / "out" / "model.tar.gz"
    assert main(["bundle", "pack", str(tiny_bundle.path), str(tar)]) == 0
    with tarfile.open(tar) as handle:
        assert sorted(handle.getnames()) == ["manifest.json", "model.onnx"]

    target = tmp_path / "unpacked"
    assert main(["bundle", "unpack", str(tar), str(target)]) == 0
    assert "1 files verified" in capsys.readouterr().out
    assert (target / "model.onnx").read_bytes() == (tiny_bundle.path / "model.onnx").read_bytes()
    assert main(["bundle", "verify", str(target)]) == 0


def test_pack_refuses_a_tampered_bundle(tiny_bundle: Bundle, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    flip_byte(tiny_bundle.path / "model.onnx")
    tar = tmp_path / "model.tar.gz"
    assert main(["bundle", "pack", str(tiny_bundle.path), str(tar)]) == 1
    assert "changed after the manifest was written" in capsys.readouterr().err
    assert not tar.exists()


def test_wrong_paths_and_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for action in ("verify", "inspect"):
        assert main(["bundle", action, str(tmp_path / "nope")]) == 1
        assert f"{tmp_path / 'nope'}: no such bundle" in capsys.readouterr().err
    assert main(["bundle", "unpack", str(tmp_path / "nope.tar.gz"), str(tmp_path / "x")]) == 1
    assert "no such bundle tarball" in capsys.readouterr().err
    not_tar = tmp_path / "junk.tar.gz"
    not_tar.write_bytes(b"definitely not gzip")
    assert main(["bundle", "unpack", str(not_tar), str(tmp_path / "y")]) == 1
    assert "not a readable bundle tarball" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert main(["bundle", "verify", str(tmp_path / "plain")]) == 1
    assert "manifest.json is missing" in capsys.readouterr().err
    assert main(["bundle", "pack", str(tmp_path)]) == 2
    assert main(["bundle", "--help"]) == 0
    assert "model.tar.gz" in capsys.readouterr().out
