"""Signing bundles with AWS KMS: requests checked against botocore's model, a round trip through moto's KMS,
and the device verifying offline with the exported public key."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber

from qcsight_batch.kms_signing import KmsSigner, KmsSigningError, sign_request
from qcsight_core.bundle import Bundle, load_bundle
from qcsight_core.cli import main
from qcsight_core.errors import BundleSignatureError
from qcsight_core.signing import VerifyKey, sign_bundle, statement


def _key(kms: object, spec: str, usage: str = "SIGN_VERIFY") -> str:
    return str(kms.create_key(KeySpec=spec, KeyUsage=usage)["KeyMetadata"]["Arn"])  # type: ignore[attr-defined]


@pytest.mark.parametrize(("spec", "algorithm"), [("ECC_NIST_P384", None), ("RSA_2048", None)])
def test_kms_signed_bundle_verifies_offline(aws_endpoint: str, tiny_bundle: Bundle, spec: str,
                                            algorithm: str | None) -> None:
    kms = boto3.client("kms")
    signer = KmsSigner(kms, _key(kms, spec), algorithm)
    signature = sign_bundle(tiny_bundle.path, signer)
    assert signature.algorithm == (algorithm or {"ECC_NIST_P256": "ECDSA_SHA_256", "ECC_NIST_P384": "ECDSA_SHA_384",
                                                 "RSA_2048": "RSASSA_PSS_SHA_256"}[spec])
    device_key = VerifyKey(signer.public_key_der(), "exported")  # what GetPublicKey handed over, used offline
    assert load_bundle(tiny_bundle.path, verify_key=device_key).signature == signature.describe()
    other = KmsSigner(kms, _key(kms, spec))
    with pytest.raises(BundleSignatureError, match="signed with another key"):
        load_bundle(tiny_bundle.path, verify_key=VerifyKey(other.public_key_der(), "other"))


def test_keys_that_cannot_sign_bundles_are_refused_by_name(aws_endpoint: str) -> None:
    kms = boto3.client("kms")
    with pytest.raises(KmsSigningError, match="KeyUsage ENCRYPT_DECRYPT; bundle signing needs SIGN_VERIFY"):
        KmsSigner(kms, _key(kms, "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT"))
    with pytest.raises(KmsSigningError, match="cannot sign bundles with ECDSA_SHA_512; use one of ECDSA_SHA_256"):
        KmsSigner(kms, _key(kms, "ECC_NIST_P256"), "ECDSA_SHA_512")


def test_requests_match_the_kms_service_model(tiny_bundle: Bundle, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1())
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    arn = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    message = statement((tiny_bundle.path / "manifest.json").read_bytes())
    kms = boto3.client("kms", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(kms) as stub:  # the stubber refuses any parameter the service model does not define
        stub.add_response("get_public_key", {"KeyId": arn, "PublicKey": der, "KeySpec": "ECC_NIST_P256",
                                             "KeyUsage": "SIGN_VERIFY", "SigningAlgorithms": ["ECDSA_SHA_256"]},
                          {"KeyId": "alias/qcsight-bundles"})
        stub.add_response("sign", {"KeyId": arn, "Signature": private.sign(message, ec.ECDSA(_sha256())),
                                   "SigningAlgorithm": "ECDSA_SHA_256"},
                          sign_request(arn, message, "ECDSA_SHA_256"))
        sign_bundle(tiny_bundle.path, KmsSigner(kms, "alias/qcsight-bundles"))
        stub.assert_no_pending_responses()
    assert sign_request(arn, message, "ECDSA_SHA_256")["MessageType"] == "RAW"
    assert len(message) < 4096  # KMS signs RAW messages up to 4096 bytes


def _sha256() -> object:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def test_cli_signs_with_kms_and_exports_the_device_key(aws_endpoint: str, tiny_bundle: Bundle, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    kms = boto3.client("kms")
    arn = _key(kms, "ECC_NIST_P256")
    public = tmp_path / "kms.pub.pem"
    assert main(["bundle", "sign", str(tiny_bundle.path), "--kms-key-id", arn, "--public-key-out", str(public)]) == 0
    assert f"signed {tiny_bundle.path}" in capsys.readouterr().out
    assert main(["bundle", "verify", str(tiny_bundle.path), "--verify-key", str(public)]) == 0
    key_id = arn.rsplit("/", 1)[-1]
    assert f"{key_id} (ECDSA_SHA_256" in capsys.readouterr().out
