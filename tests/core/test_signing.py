"""Signed bundles: Ed25519 signatures over manifest.json, and every way a configured key refuses a bundle."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from qcsight_core.bundle import MANIFEST_NAME, SIGNATURE_NAME, Bundle, load_bundle, pack_bundle
from qcsight_core.cli import main
from qcsight_core.errors import BundleIntegrityError, BundleSignatureError, ConfigError
from qcsight_core.signing import Ed25519FileSigner, VerifyKey, generate_ed25519, sign_bundle

pytest.importorskip("cryptography", reason="the edge and batch extras install cryptography")


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    paths = {}
    for name in ("ours", "theirs"):
        paths[name], paths[name + ".pub"] = tmp_path / f"{name}.pem", tmp_path / f"{name}.pub.pem"
        generate_ed25519(paths[name], paths[name + ".pub"])
    return paths


def test_a_signed_bundle_loads_and_names_its_signer(tiny_bundle: Bundle, keys: dict[str, Path]) -> None:
    assert oct(keys["ours"].stat().st_mode & 0o777) == "0o600"
    signature = sign_bundle(tiny_bundle.path, Ed25519FileSigner(keys["ours"]))
    loaded = load_bundle(tiny_bundle.path, verify_key=VerifyKey.from_file(keys["ours.pub"]))
    assert loaded.signature == signature.describe() and "ours.pem" in str(loaded.signature)
    assert load_bundle(tiny_bundle.path).signature is None  # no key configured: hashes only, as before


def test_with_a_key_configured_every_other_bundle_is_refused_naming_why(
    tiny_bundle: Bundle, keys: dict[str, Path]
) -> None:
    key = VerifyKey.from_file(keys["ours.pub"])
    with pytest.raises(BundleSignatureError, match=r"unsigned bundle .* only bundles signed with it are accepted"):
        load_bundle(tiny_bundle.path, verify_key=key)

    sign_bundle(tiny_bundle.path, Ed25519FileSigner(keys["theirs"]))
    with pytest.raises(BundleSignatureError, match=r"signed with another key, file:theirs\.pem"):
        load_bundle(tiny_bundle.path, verify_key=key)

    sign_bundle(tiny_bundle.path, Ed25519FileSigner(keys["ours"]))
    manifest_path = tiny_bundle.path / MANIFEST_NAME
    original = manifest_path.read_text()
    edited = json.loads(original)
    edited["decision"]["defect_threshold"] = 0.99  # pass every part: the attack a signature stops
    edited["decision"]["uncertain_threshold"] = 0.99
    manifest_path.write_text(json.dumps(edited))
    with pytest.raises(BundleSignatureError, match=r"manifest\.json changed after it was signed"):
        load_bundle(tiny_bundle.path, verify_key=key)
    manifest_path.write_text(original)

    signature_path = tiny_bundle.path / SIGNATURE_NAME
    genuine = json.loads(signature_path.read_text())
    forged = dict(genuine, signature=base64.b64encode(b"\x00" * 64).decode())
    signature_path.write_text(json.dumps(forged))
    with pytest.raises(BundleSignatureError, match=r"does not verify with .*ours\.pub\.pem.*forged or corrupted"):
        load_bundle(tiny_bundle.path, verify_key=key)
    signature_path.write_text(json.dumps(genuine))

    model = tiny_bundle.path / "model.onnx"
    model.write_bytes(model.read_bytes() + b"\x00")  # signed manifest, replaced file: the hashes catch it
    with pytest.raises(BundleIntegrityError, match="sha256"):
        load_bundle(tiny_bundle.path, verify_key=key)


def test_verify_key_must_be_a_public_key(tmp_path: Path, keys: dict[str, Path]) -> None:
    (tmp_path / "junk.pem").write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError, match="verify_key"):
        VerifyKey.from_file(tmp_path / "junk.pem")
    with pytest.raises(ConfigError, match="a readable public key file"):
        VerifyKey.from_file(tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match="Ed25519 private key"):
        Ed25519FileSigner(keys["ours.pub"])


def test_cli_keygen_sign_and_verify_a_tarball(tiny_bundle: Bundle, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    private, public = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    assert main(["bundle", "keygen", str(private), str(public)]) == 0
    archive = pack_bundle(tiny_bundle.path, tmp_path / "model.tar.gz")
    assert main(["bundle", "verify", str(archive), "--verify-key", str(public)]) == 1
    assert "unsigned bundle" in capsys.readouterr().err
    assert main(["bundle", "sign", str(archive), "--key", str(private)]) == 0
    assert main(["bundle", "verify", str(archive), "--verify-key", str(public)]) == 0
    assert "signed by file:k.pem (ED25519_SHA_512" in capsys.readouterr().out
    assert main(["bundle", "inspect", str(archive)]) == 0
    assert "signature: file:k.pem" in capsys.readouterr().out


def test_the_agent_refuses_an_unsigned_bundle_when_it_has_a_key(tiny_bundle: Bundle, keys: dict[str, Path]) -> None:
    from qcsight_edge.config import ModelConfig
    from qcsight_edge.models import load_model

    config = ModelConfig(bundle=tiny_bundle.path, verify_key=keys["ours.pub"])
    with pytest.raises(BundleSignatureError, match="unsigned bundle"):
        load_model(config)
    sign_bundle(tiny_bundle.path, Ed25519FileSigner(keys["ours"]))
    assert load_model(config).bundle.signature is not None
