"""`qcsight bundle`: inspect, verify, pack and unpack model bundles (directories or .tar.gz)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from qcsight_core.bundle import (
    Manifest,
    load_bundle,
    pack_bundle,
    read_manifest,
    unpack_bundle,
    verify_files,
)
from qcsight_core.cli import EXIT_OK, configure_logging, parse_args
from qcsight_core.errors import BundleFileMissingError


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Inspect, verify, pack and unpack qcsight model bundles. PATH is a bundle directory "
        "(manifest.json plus model files) or a .tar.gz of one, as SageMaker stores model.tar.gz.",
        epilog="Exit codes: 0 done (verify: every file matches its sha256), 1 failed (missing, partial, "
        "tampered or unknown-schema bundle), 2 usage error.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    inspect = sub.add_parser("inspect", help="print the manifest summary, then check file hashes",
                             description="Print name, version, classes, defect classes, input spec, thresholds, "
                             "runtimes and metrics, then check every file's sha256 (exit 1 when one differs).")
    inspect.add_argument("path", metavar="PATH", type=Path)
    inspect.add_argument("--json", action="store_true", help="print manifest.json as stored instead of a summary")
    verify = sub.add_parser("verify", help="check the manifest and every file's sha256; exit 0 ok, 1 not")
    verify.add_argument("path", metavar="PATH", type=Path)
    pack = sub.add_parser("pack", help="verify a bundle directory and write it as a .tar.gz (files at the root)")
    pack.add_argument("directory", metavar="DIR", type=Path)
    pack.add_argument("output", metavar="OUTPUT.tar.gz", type=Path)
    unpack = sub.add_parser("unpack", help="unpack a bundle .tar.gz into DIR and verify it")
    unpack.add_argument("tarball", metavar="TAR", type=Path)
    unpack.add_argument("directory", metavar="DIR", type=Path)
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
        bundle = load_bundle(args.path)
        m = bundle.manifest
        print(f"OK {args.path}: {m.name} {m.version}, {len(m.files)} files match their sha256")
        return EXIT_OK
    if args.action == "pack":
        bundle = load_bundle(args.directory)
        pack_bundle(args.directory, args.output)
        print(f"packed {bundle.manifest.name} {bundle.manifest.version} ({len(bundle.manifest.files)} files) "
              f"into {args.output}")
        return EXIT_OK
    if not args.tarball.is_file():
        raise BundleFileMissingError(f"{args.tarball}: no such bundle tarball")
    unpack_bundle(args.tarball, args.directory)
    bundle = load_bundle(args.directory)
    print(f"unpacked {bundle.manifest.name} {bundle.manifest.version} into {args.directory}, "
          f"{len(bundle.manifest.files)} files verified")
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
