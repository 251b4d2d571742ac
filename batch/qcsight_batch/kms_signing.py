"""Signing bundles with an AWS KMS asymmetric key (`qcsight bundle sign --kms-key-id`).

The private key never leaves KMS: GetPublicKey gives the public half (DER), which devices
use offline as their verify_key, and each signature is one KMS Sign call over the short
statement qcsight_core.signing builds (MessageType RAW: KMS hashes it, as the offline
verifier does). Only key specs whose signatures the device can check with `cryptography`
are accepted: RSA_2048/3072/4096, ECC_NIST_P256/P384/P521, ECC_SECG_P256K1 and
ECC_NIST_EDWARDS25519 (ED25519_SHA_512, which KMS signs only as RAW). SM2 and ML-DSA keys
are refused by name.
"""

from __future__ import annotations

import logging
from typing import Any

from qcsight_batch.errors import KmsSigningError
from qcsight_core.signing import ALGORITHMS

log = logging.getLogger(__name__)

# The algorithm used when none is asked for, by KMS KeySpec.
DEFAULT_ALGORITHMS = {
    "ECC_NIST_P256": "ECDSA_SHA_256",
    "ECC_SECG_P256K1": "ECDSA_SHA_256",
    "ECC_NIST_P384": "ECDSA_SHA_384",
    "ECC_NIST_P521": "ECDSA_SHA_512",
    "ECC_NIST_EDWARDS25519": "ED25519_SHA_512",
    "RSA_2048": "RSASSA_PSS_SHA_256",
    "RSA_3072": "RSASSA_PSS_SHA_256",
    "RSA_4096": "RSASSA_PSS_SHA_256",
}


def sign_request(key_id: str, message: bytes, algorithm: str) -> dict[str, Any]:
    """Sign parameters for one statement."""
    return {"KeyId": key_id, "Message": message, "MessageType": "RAW", "SigningAlgorithm": algorithm}


class KmsSigner:
    """A qcsight_core.signing.Signer backed by an AWS KMS asymmetric SIGN_VERIFY key."""

    def __init__(self, kms: Any, key_id: str, algorithm: str | None = None) -> None:
        self._kms = kms
        response = self._call("GetPublicKey", kms.get_public_key, KeyId=key_id)
        # KeySpec; CustomerMasterKeySpec is its deprecated twin, which KMS still returns beside it.
        spec = str(response.get("KeySpec") or response.get("CustomerMasterKeySpec") or "")
        usage = str(response.get("KeyUsage", ""))
        if usage != "SIGN_VERIFY":
            raise KmsSigningError(f"KMS key {key_id} has KeyUsage {usage or '?'}; bundle signing needs SIGN_VERIFY")
        if spec not in DEFAULT_ALGORITHMS:
            raise KmsSigningError(f"KMS key {key_id} is {spec or '?'}; devices verify bundle signatures from "
                                  f"{', '.join(DEFAULT_ALGORITHMS)} keys only")
        offered = [str(a) for a in response.get("SigningAlgorithms", [])]
        chosen = algorithm or DEFAULT_ALGORITHMS[spec]
        if chosen not in ALGORITHMS or chosen not in offered:
            usable = [a for a in offered if a in ALGORITHMS]
            raise KmsSigningError(f"KMS key {key_id} ({spec}) cannot sign bundles with {chosen}; "
                                  f"use one of {', '.join(usable)}")
        self.algorithm = chosen
        self.key_id = str(response.get("KeyId") or key_id)  # KMS answers with the key's ARN for an alias
        self._public_der = bytes(response["PublicKey"])

    @staticmethod
    def _call(operation: str, function: Any, **kwargs: Any) -> dict[str, Any]:
        from qcsight_aws.errors import AwsError, aws_errors  # boto3's side: only where KMS signs

        try:
            with aws_errors(f"KMS {operation}"):
                response: dict[str, Any] = function(**kwargs)
                return response
        except AwsError as exc:
            raise KmsSigningError(str(exc)) from exc.__cause__

    def public_key_der(self) -> bytes:
        return self._public_der

    def sign(self, message: bytes) -> bytes:
        response = self._call("Sign", self._kms.sign, **sign_request(self.key_id, message, self.algorithm))
        log.info("signed with KMS key %s (%s)", self.key_id, self.algorithm)
        return bytes(response["Signature"])


def signer_for(key_id: str, algorithm: str | None = None, region: str | None = None) -> KmsSigner:
    """A KmsSigner with a KMS client from the default credential chain (the CLI's entry point)."""
    import boto3

    return KmsSigner(boto3.session.Session(region_name=region).client("kms"), key_id, algorithm)
