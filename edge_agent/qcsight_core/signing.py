"""Signed bundles: signature.json, a signature over manifest.json, made with Ed25519 or an AWS KMS key.

manifest.json records the sha256 of every file, so a valid signature over its exact bytes
makes every file authentic. What is signed is a short statement naming the manifest's
sha256 (below 4096 bytes, so AWS KMS signs it as a RAW message and hashes it itself,
exactly as an offline verifier does with the key's public half):

    qcsight.bundle-signature/1
    manifest-sha256:<hex>

Algorithms (AWS KMS names, all verifiable offline with the `cryptography` package):
ED25519_SHA_512 (a local Ed25519 key, or KMS ECC_NIST_EDWARDS25519), ECDSA_SHA_256/384/512
(KMS ECC_NIST_P256/P384/P521, ECC_SECG_P256K1), RSASSA_PSS_SHA_256/384/512 and
RSASSA_PKCS1_V1_5_SHA_256/384/512 (KMS RSA_2048/3072/4096).

The verifying side needs only the public key (PEM or DER SubjectPublicKeyInfo), never a
network. `cryptography` is imported inside the functions that need it: devices that do not
verify signatures do not need it installed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from qcsight_core.bundle import MANIFEST_NAME, SIGNATURE_NAME
from qcsight_core.errors import BundleFileMissingError, BundleSignatureError, ConfigError

SIGNATURE_SCHEMA = "qcsight.signature/1"
STATEMENT_PREFIX = b"qcsight.bundle-signature/1\nmanifest-sha256:"
ED25519 = "ED25519_SHA_512"
# algorithm -> (key family, hash name)
ALGORITHMS: dict[str, tuple[str, str]] = {
    ED25519: ("ed25519", "sha512"),
    "ECDSA_SHA_256": ("ec", "sha256"),
    "ECDSA_SHA_384": ("ec", "sha384"),
    "ECDSA_SHA_512": ("ec", "sha512"),
    "RSASSA_PSS_SHA_256": ("rsa-pss", "sha256"),
    "RSASSA_PSS_SHA_384": ("rsa-pss", "sha384"),
    "RSASSA_PSS_SHA_512": ("rsa-pss", "sha512"),
    "RSASSA_PKCS1_V1_5_SHA_256": ("rsa-pkcs1", "sha256"),
    "RSASSA_PKCS1_V1_5_SHA_384": ("rsa-pkcs1", "sha384"),
    "RSASSA_PKCS1_V1_5_SHA_512": ("rsa-pkcs1", "sha512"),
}
_NEEDS = "bundle signatures need the 'cryptography' package: pip install 'qcsight[edge]' (or [batch])"


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives import serialization
    except ModuleNotFoundError as exc:
        raise BundleSignatureError(_NEEDS) from exc
    return serialization


def statement(manifest_bytes: bytes) -> bytes:
    """What a bundle signature signs: the sha256 of manifest.json's exact bytes."""
    return STATEMENT_PREFIX + hashlib.sha256(manifest_bytes).hexdigest().encode("ascii") + b"\n"


def key_fingerprint(public_der: bytes) -> str:
    """sha256 of the DER SubjectPublicKeyInfo: names a key in errors and in signature.json."""
    return hashlib.sha256(public_der).hexdigest()


class Signer(Protocol):
    """Something that signs with a private key it may never reveal (a file, AWS KMS)."""

    algorithm: str
    key_id: str

    def public_key_der(self) -> bytes:
        """The public half as DER SubjectPublicKeyInfo."""
        ...

    def sign(self, message: bytes) -> bytes:
        """The signature of message (which the algorithm hashes itself)."""
        ...


@dataclass(frozen=True)
class BundleSignature:
    """signature.json: who signed which manifest, how."""

    algorithm: str
    key_id: str
    key_sha256: str
    manifest_sha256: str
    signature: bytes

    def describe(self) -> str:
        return f"{self.key_id} ({self.algorithm}, key sha256 {self.key_sha256[:16]})"

    def to_json(self) -> str:
        return json.dumps({
            "schema": SIGNATURE_SCHEMA,
            "algorithm": self.algorithm,
            "key_id": self.key_id,
            "key_sha256": self.key_sha256,
            "manifest_sha256": self.manifest_sha256,
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: bytes, source: str) -> BundleSignature:
        try:
            data = json.loads(text.decode("utf-8"))
            if not isinstance(data, dict) or data.get("schema") != SIGNATURE_SCHEMA:
                raise ValueError(f"schema is not {SIGNATURE_SCHEMA!r}")
            return cls(str(data["algorithm"]), str(data["key_id"]), str(data["key_sha256"]),
                       str(data["manifest_sha256"]), base64.b64decode(str(data["signature"]), validate=True))
        except (UnicodeDecodeError, ValueError, KeyError, binascii.Error) as exc:
            raise BundleSignatureError(f"{source}: not a readable bundle signature: {exc}") from exc


@dataclass(frozen=True)
class VerifyKey:
    """A public key that bundles must be signed with (PEM or DER SubjectPublicKeyInfo).

    Attributes:
        der: the key as DER SubjectPublicKeyInfo.
        source: where it came from, for messages.
    """

    der: bytes
    source: str

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.der)

    @classmethod
    def from_file(cls, path: str | Path) -> VerifyKey:
        """Read and check a public key file; ConfigError names the file when it is not one."""
        location = Path(path)
        try:
            data = location.read_bytes()
        except OSError as exc:
            raise ConfigError("verify_key", str(location), f"a readable public key file ({exc.strerror})") from exc
        return cls.from_bytes(data, str(location))

    @classmethod
    def from_bytes(cls, data: bytes, source: str) -> VerifyKey:
        serialization = _crypto()
        try:
            key = (serialization.load_pem_public_key(data) if data.lstrip().startswith(b"-----")
                   else serialization.load_der_public_key(data))
        except (ValueError, TypeError) as exc:
            raise ConfigError("verify_key", source, "a PEM or DER public key (Ed25519, ECDSA or RSA)") from exc
        _family(key)  # refuse key types no supported algorithm uses
        der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return cls(der, source)

    def verify(self, algorithm: str, message: bytes, signature: bytes) -> bool:
        """True when signature is the algorithm's signature of message under this key."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec, padding

        key = _crypto().load_der_public_key(self.der)
        family, hash_name = ALGORITHMS[algorithm]
        digests: dict[str, Any] = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
        digest = digests[hash_name]()
        try:
            if family == "ed25519":
                key.verify(signature, message)
            elif family == "ec":
                key.verify(signature, message, ec.ECDSA(digest))
            elif family == "rsa-pss":
                # AUTO: AWS KMS uses a salt as long as the digest; other signers use the maximum.
                key.verify(signature, message, padding.PSS(padding.MGF1(digest), padding.PSS.AUTO), digest)
            else:
                key.verify(signature, message, padding.PKCS1v15(), digest)
        except InvalidSignature:
            return False
        return True

    def allows(self, algorithm: str) -> bool:
        """Whether algorithm is one this key's type signs with."""
        family = ALGORITHMS.get(algorithm, ("", ""))[0]
        key_family = _family(_crypto().load_der_public_key(self.der))
        return family == key_family or (key_family == "rsa" and family.startswith("rsa-"))


def _family(key: Any) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ec"
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa"
    raise ConfigError("verify_key", type(key).__name__, "an Ed25519, ECDSA or RSA public key")


class Ed25519FileSigner:
    """Signs with an Ed25519 private key kept in a PEM file (qcsight bundle keygen writes one)."""

    algorithm = ED25519

    def __init__(self, path: str | Path, password: bytes | None = None) -> None:
        from cryptography.hazmat.primitives.asymmetric import ed25519

        serialization = _crypto()
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=password)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError("key", str(path), f"a readable Ed25519 private key in PEM ({exc})") from exc
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ConfigError("key", str(path), "an Ed25519 private key (use --kms-key-id for ECDSA/RSA keys in KMS)")
        self._key = key
        self.key_id = f"file:{Path(path).name}"

    def public_key_der(self) -> bytes:
        serialization = _crypto()
        der: bytes = self._key.public_key().public_bytes(serialization.Encoding.DER,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo)
        return der

    def sign(self, message: bytes) -> bytes:
        signature: bytes = self._key.sign(message)
        return signature


def generate_ed25519(private_path: str | Path, public_path: str | Path) -> str:
    """Write a new Ed25519 key pair (private key 0600, public key PEM); returns the key's fingerprint."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    serialization = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(private)
    public = key.public_key()
    Path(public_path).write_bytes(public.public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_fingerprint(public.public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo))


def public_key_pem(der: bytes) -> bytes:
    """DER SubjectPublicKeyInfo (what KMS GetPublicKey returns) as PEM, for a device's configuration."""
    serialization = _crypto()
    key = serialization.load_der_public_key(der)
    pem: bytes = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem


def sign_bundle(directory: str | Path, signer: Signer) -> BundleSignature:
    """Sign the bundle directory's manifest.json and write signature.json beside it (atomically)."""
    root = Path(directory)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleFileMissingError(f"{manifest_path}: manifest.json is missing; is this a qcsight bundle?")
    if signer.algorithm not in ALGORITHMS:
        raise ConfigError("algorithm", signer.algorithm, f"one of {', '.join(ALGORITHMS)}")
    manifest = manifest_path.read_bytes()
    message = statement(manifest)
    signature = BundleSignature(
        algorithm=signer.algorithm,
        key_id=signer.key_id,
        key_sha256=key_fingerprint(signer.public_key_der()),
        manifest_sha256=hashlib.sha256(manifest).hexdigest(),
        signature=signer.sign(message),
    )
    # Check before writing: a signer whose public key does not match its signatures would
    # otherwise produce bundles that every device refuses.
    if not VerifyKey(signer.public_key_der(), signer.key_id).verify(signature.algorithm, message, signature.signature):
        raise BundleSignatureError(f"{signer.key_id}: the signature does not verify with the signer's own public key")
    tmp = root / (SIGNATURE_NAME + ".tmp")
    tmp.write_text(signature.to_json(), encoding="utf-8")
    os.replace(tmp, root / SIGNATURE_NAME)
    return signature


def verify_bundle_signature(directory: str | Path, key: VerifyKey) -> BundleSignature:
    """Check signature.json against manifest.json and key; BundleSignatureError says why not.

    This proves the manifest (and so, through its hashes, every file) was signed with key;
    verify_files then checks the files against the manifest.
    """
    root = Path(directory)
    named = f"{key.source} (sha256 {key.fingerprint[:16]})"
    signature_path = root / SIGNATURE_NAME
    if not signature_path.is_file():
        raise BundleSignatureError(
            f"{root}: unsigned bundle (no {SIGNATURE_NAME}); a verification key is configured, {named}, "
            "so only bundles signed with it are accepted (qcsight bundle sign)"
        )
    signature = BundleSignature.from_json(signature_path.read_bytes(), str(signature_path))
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleFileMissingError(f"{manifest_path}: manifest.json is missing; is this a qcsight bundle?")
    manifest = manifest_path.read_bytes()
    actual = hashlib.sha256(manifest).hexdigest()
    if signature.key_sha256 != key.fingerprint:
        raise BundleSignatureError(
            f"{root}: signed with another key, {signature.describe()}, not with the configured key {named}"
        )
    if signature.algorithm not in ALGORITHMS or not key.allows(signature.algorithm):
        raise BundleSignatureError(f"{root}: signature algorithm {signature.algorithm!r} is not one the "
                                   f"configured key {named} signs with")
    if signature.manifest_sha256 != actual:
        raise BundleSignatureError(
            f"{root}: manifest.json changed after it was signed (sha256 {actual[:16]}..., the signature covers "
            f"{signature.manifest_sha256[:16]}...)"
        )
    if not key.verify(signature.algorithm, statement(manifest), signature.signature):
        raise BundleSignatureError(f"{root}: the signature in {SIGNATURE_NAME} does not verify with {named}: "
                                   "forged or corrupted")
    return signature
