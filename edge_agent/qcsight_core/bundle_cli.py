"""`qcsight bundle`: inspect, verify, sign, pack and unpack model bundles (directories or .tar.gz)."""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from qcsight_core.bundle import (
    SIGNATURE_NAME,
    Manifest,
    load_bundle,
    pack_bundle,
    read_manifest,
    unpack_bundle,
    verify_files,
)
from qcsight_core.cli import (
    EXIT_OK,
    EXIT_USAGE,
    Command,
    configure_logging,
    missing_extra_message,
    missing_module,
    parse_args,
)
from qcsight_core.errors import BundleFileMissingError
from qcsight_core.signing import (
    BundleSignature,
    Ed25519FileSigner,
    Signer,
    VerifyKey,
    generate_ed25519,
    public_key_pem,
    sign_bundle,
)

# AWS KMS signing needs boto3, which device code never imports: it lives with the batch extra.
KMS_SIGNER = Command("qcsight_batch.kms_signing", "batch", "sign with an AWS KMS key", ("boto3",))
SIGN_EPILOG = """\
what is signed: manifest.json, which holds the sha256 of every file, so the signature covers them all.
It is written as signature.json beside it (inside the .tar.gz for a tarball). A device or batch run
configured with the public key (model.verify_key / --verify-key) refuses unsigned bundles and
bundles signed with another key or changed after signing.

examples:
  qcsight bundle keygen signing.pem signing.pub.pem
  qcsight bundle sign runs/line7/bundle --key signing.pem
  qcsight bundle sign model.tar.gz --kms-key-id alias/qcsight-bundles --public-key-out kms.pub.pem
  qcsight bundle verify model.tar.gz --verify-key kms.pub.pem
"""


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Inspect, verify, pack and unpack qcsight model bundles. PATH is a bundle directory "
        "(manifest.json plus model files) or a .tar.gz of one, as SageMaker stores model.tar.gz.",
        epilog="Exit codes: 0 done (verify: every file matches its sha256, and the signature when --verify-key "
        "is given), 1 failed (missing or partial bundle, a file that differs from its recorded sha256, an "
        "unknown schema, an unsigned or wrongly signed bundle under --verify-key), 2 usage error. The sha256 "
        "checks prove the files match the manifest, not who wrote it: sign bundles for that.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    inspect = sub.add_parser("inspect", help="print the manifest summary, then check file hashes",
                             description="Print name, version, classes, defect classes, input spec, thresholds, "
                             "runtimes and metrics, then check every file's sha256 (exit 1 when one differs).")
    inspect.add_argument("path", metavar="PATH", type=Path)
    inspect.add_argument("--json", action="store_true", help="print manifest.json as stored instead of a summary")
    verify = sub.add_parser("verify", help="check the manifest, every file's sha256 and (with --verify-key) the "
                            "signature; exit 0 ok, 1 not")
    verify.add_argument("path", metavar="PATH", type=Path)
    verify.add_argument("--verify-key", type=Path, metavar="PUBLIC.pem",
                        help="refuse the bundle unless it is signed with this public key")
    sign = sub.add_parser("sign", help="sign the manifest with an Ed25519 key file or an AWS KMS key",
                          description="Write signature.json, a signature over manifest.json, into a bundle "
                          "directory or .tar.gz.", epilog=SIGN_EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    sign.add_argument("path", metavar="PATH", type=Path)
    key = sign.add_mutually_exclusive_group(required=True)
    key.add_argument("--key", type=Path, metavar="PRIVATE.pem", help="an Ed25519 private key (qcsight bundle keygen)")
    key.add_argument("--kms-key-id", metavar="KEY", help="an AWS KMS asymmetric SIGN_VERIFY key: id, ARN or alias/...")
    sign.add_argument("--kms-algorithm", metavar="ALG",
                      help="KMS signing algorithm (default by key spec: ECDSA_SHA_256/384/512, RSASSA_PSS_SHA_256, "
                      "ED25519_SHA_512)")
    sign.add_argument("--region", help="AWS region for KMS (default from the environment/profile)")
    sign.add_argument("--public-key-out", type=Path, metavar="PUBLIC.pem",
                      help="also write the signing key's public half as PEM, for devices' verify_key")
    keygen = sub.add_parser("keygen", help="write a new Ed25519 key pair for signing bundles")
    keygen.add_argument("private", metavar="PRIVATE.pem", type=Path, help="private key (created 0600; must not exist)")
    keygen.add_argument("public", metavar="PUBLIC.pem", type=Path, help="public key, for devices' verify_key")
    pack = sub.add_parser("pack", help="verify a bundle directory and write it as a .tar.gz (files at the root)")
    pack.add_argument("directory", metavar="DIR", type=Path)
    pack.add_argument("output", metavar="OUTPUT.tar.gz", type=Path)
    unpack = sub.add_parser("unpack", help="unpack a bundle .tar.gz into DIR and verify it")
    unpack.add_argument("tarball", metavar="TAR", type=Path)
    unpack.add_argument("directory", metavar="DIR", type=Path)
    unpack.add_argument("--verify-key", type=Path, metavar="PUBLIC.pem",
                        help="refuse the bundle unless it is signed with this public key")
    return parser


def main(argv: Sequence[str], prog: str = "qcsight bundle") -> int:
    parser = _parser(prog)
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    configure_logging(args.verbose)
    if args.action == "inspect":
        return _inspect(args.path, args.json)
    if args.action == "verify":
        key = VerifyKey.from_file(args.verify_key) if args.verify_key else None
        with load_bundle(args.path, verify_key=key) as bundle:
            m = bundle.manifest
            signed = f"; signed by {bundle.signature}" if bundle.signature else ""
            print(f"OK {args.path}: {m.name} {m.version}, {len(m.files)} files match their sha256{signed}")
        return EXIT_OK
    if args.action == "sign":
        return _sign(args)
    if args.action == "keygen":
        fingerprint = generate_ed25519(args.private, args.public)
        print(f"wrote {args.private} (private, keep it secret) and {args.public} (public key sha256 {fingerprint})")
        return EXIT_OK
    if args.action == "pack":
        with load_bundle(args.directory) as bundle:
            pack_bundle(args.directory, args.output)
            print(f"packed {bundle.manifest.name} {bundle.manifest.version} ({len(bundle.manifest.files)} files) "
                  f"into {args.output}")
        return EXIT_OK
    if not args.tarball.is_file():
        raise BundleFileMissingError(f"{args.tarball}: no such bundle tarball")
    unpack_bundle(args.tarball, args.directory)
    key = VerifyKey.from_file(args.verify_key) if args.verify_key else None
    bundle = load_bundle(args.directory, verify_key=key)
    signed = f", signed by {bundle.signature}" if bundle.signature else ""
    print(f"unpacked {bundle.manifest.name} {bundle.manifest.version} into {args.directory}, "
          f"{len(bundle.manifest.files)} files verified{signed}")
    return EXIT_OK


def _signer(args: argparse.Namespace) -> Signer | int:
    if args.key is not None:
        return Ed25519FileSigner(args.key)
    absent = missing_module(KMS_SIGNER)
    if absent is not None:
        print(missing_extra_message("bundle sign --kms-key-id", KMS_SIGNER, absent), file=sys.stderr)
        return EXIT_USAGE
    kms = importlib.import_module(KMS_SIGNER.module)
    signer: Signer = kms.signer_for(args.kms_key_id, args.kms_algorithm, args.region)
    return signer


def _sign(args: argparse.Namespace) -> int:
    signer = _signer(args)
    if isinstance(signer, int):
        return signer
    path: Path = args.path
    if not path.exists():
        raise BundleFileMissingError(f"{path}: no such bundle directory or file")
    # Only a bundle whose files match its manifest is signed: the signature vouches for them all.
    if path.is_dir():
        load_bundle(path)
        signature = sign_bundle(path, signer)
    else:
        with tempfile.TemporaryDirectory(prefix="qcsight-sign-") as tmp:
            load_bundle(path, extract_to=tmp)
            signature = sign_bundle(tmp, signer)
            pack_bundle(tmp, path)
    if args.public_key_out is not None:
        args.public_key_out.write_bytes(public_key_pem(signer.public_key_der()))
    print(f"signed {path} ({SIGNATURE_NAME}): {signature.describe()}, manifest sha256 {signature.manifest_sha256}")
    return EXIT_OK


@contextmanager
def _bundle_directory(path: Path) -> Iterator[Path]:
    """The bundle as a directory: itself, or a temporary unpacked copy of a tarball."""
    if not path.exists():
        raise BundleFileMissingError(f"{path}: no such bundle directory or file")
    if path.is_dir():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="qcsight-inspect-") as tmp:
        yield unpack_bundle(path, tmp)


def _inspect(path: Path, as_json: bool) -> int:
    with _bundle_directory(path) as directory:
        manifest = read_manifest(directory)
        if as_json:
            sys.stdout.write((directory / "manifest.json").read_text(encoding="utf-8"))
        else:
            print_manifest(manifest, path)
            signature_path = directory / SIGNATURE_NAME
            if signature_path.is_file():
                signature = BundleSignature.from_json(signature_path.read_bytes(), str(signature_path))
                print(f"signature: {signature.describe()} (not checked: verify --verify-key PUBLIC.pem does)")
            else:
                print("signature: none (the sha256 checks prove the files match the manifest, not who wrote it)")
        verify_files(directory, manifest)
    if not as_json:
        print(f"integrity: ok, {len(manifest.files)} files match their sha256")
    return EXIT_OK


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    return str(value)


def print_manifest(m: Manifest, path: Path, stream: TextIO | None = None) -> None:
    """A human-readable summary of everything a consumer of the bundle relies on."""
    out = stream if stream is not None else sys.stdout
    spec, decision = m.input, m.decision
    lines = [
        f"bundle: {path}",
        f"name: {m.name}",
        f"version: {m.version}",
        f"architecture: {m.architecture or '-'} (task {m.task}, output {m.output})",
        f"classes: {', '.join(m.classes)}",
        f"defect classes: {', '.join(m.defect_classes)}",
        f"input: {spec.height}x{spec.width} {spec.color}, resize {spec.resize} (crop {spec.crop_fraction:g}), "
        f"{spec.interpolation}, mean {_format_value(list(spec.mean))}, std {_format_value(list(spec.std))}",
        f"thresholds: defect >= {decision.defect_threshold:g}, uncertain >= {decision.uncertain_threshold:g}"
        + (f", per class {_format_value(dict(decision.class_thresholds))}" if decision.class_thresholds else "")
        + (f", chosen for defect recall {decision.target_defect_recall:g}"
           if decision.target_defect_recall is not None else ""),
        "runtimes: " + "; ".join(
            f"{r.file} ({r.format} {r.precision}, {r.runtime}"
            + "".join(f", {k} {_format_value(v)}" for k, v in r.details.items()) + ")"
            for r in m.models) if m.models else "runtimes: none",
        f"training: data fingerprint {m.data_fingerprint or '-'}, run {m.run_id or '-'}, "
        f"created {m.created_at or '-'}",
    ]
    if m.metrics:
        lines.append("metrics:")
        lines.extend(f"  {key}: {_format_value(value)}" for key, value in m.metrics.items())
    else:
        lines.append("metrics: none recorded")
    if m.reference:
        lines.append(f"reference distributions: {', '.join(m.reference)}")
    lines.append(f"files: {len(m.files)} listed ({', '.join(sorted(m.files)) if len(m.files) <= 6 else '...'})")
    for line in lines:
        print(line, file=out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
