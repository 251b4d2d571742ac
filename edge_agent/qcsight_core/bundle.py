"""The model bundle: manifest.json plus model files, hashed, written by training and read everywhere.

The manifest records the sha256 of every file, so loading proves that the files are the
ones the manifest lists (self-consistency), not who wrote them: anyone who can replace a
file can rewrite the manifest too. With a verification key configured, loading also checks
signature.json, a signature over manifest.json (qcsight_core.signing), which makes the
hashes, and so every file, authentic.

A model.tar.gz is untrusted input until verified: only the manifest and the files it lists
are extracted, member sizes are capped from the tar headers before anything is written,
and links, devices and paths that leave the bundle are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import weakref
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qcsight_core.errors import (
    BundleError,
    BundleFileMissingError,
    BundleIntegrityError,
    BundleSchemaError,
    ConfigError,
)
from qcsight_core.input_spec import PreprocessSpec

if TYPE_CHECKING:
    from qcsight_core.signing import VerifyKey

log = logging.getLogger(__name__)

SCHEMA = "qcsight.bundle/1"
SCHEMA_MAJOR = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "signature.json"
MAX_MANIFEST_BYTES = 4 << 20  # manifests with reference histograms and metrics are tens of KB
MAX_SIGNATURE_BYTES = 64 << 10
TASKS = ("classification", "anomaly")
ANOMALY_OUTPUT = "anomaly_score"  # the one output of an anomaly model (qcsight_core.anomaly scores it)
PRECISIONS = ("fp32", "int8")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class DecisionPolicy:
    """How class probabilities become good / defect / uncertain.

    Attributes:
        defect_threshold: a defect score (sum of the defect classes' probabilities) at or above
            this is a defect. Chosen at export as the operating point for target_defect_recall.
        uncertain_threshold: a defect score in [uncertain_threshold, defect_threshold) is
            uncertain and goes to an operator. Equal to defect_threshold: no uncertain band.
        class_thresholds: per defect class, the least probability the top defect class must
            reach to be named; below it the verdict is uncertain.
        target_defect_recall: the recall the operating point was chosen for, when it was.
    """

    defect_threshold: float = 0.5
    uncertain_threshold: float = 0.5
    class_thresholds: Mapping[str, float] = field(default_factory=dict)
    target_defect_recall: float | None = None

    def __post_init__(self) -> None:
        for name in ("defect_threshold", "uncertain_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"decision.{name}", value, "a probability from 0 to 1")
        if self.uncertain_threshold > self.defect_threshold:
            raise ConfigError(
                "decision.uncertain_threshold",
                self.uncertain_threshold,
                f"at most defect_threshold ({self.defect_threshold})",
            )
        for name, value in self.class_thresholds.items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"decision.class_thresholds.{name}", value, "a probability from 0 to 1")

    def to_dict(self) -> dict[str, Any]:
        return {
            "defect_threshold": self.defect_threshold,
            "uncertain_threshold": self.uncertain_threshold,
            "class_thresholds": dict(self.class_thresholds),
            "target_defect_recall": self.target_defect_recall,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DecisionPolicy:
        recall = data.get("target_defect_recall")
        return cls(
            defect_threshold=float(data.get("defect_threshold", 0.5)),
            uncertain_threshold=float(data.get("uncertain_threshold", data.get("defect_threshold", 0.5))),
            class_thresholds={str(k): float(v) for k, v in dict(data.get("class_thresholds", {})).items()},
            target_defect_recall=None if recall is None else float(recall),
        )


@dataclass(frozen=True)
class ModelFile:
    """One runnable artefact in the bundle (ONNX FP32/INT8, TorchScript for Neo, ...)."""

    file: str
    format: str = "onnx"
    precision: str = "fp32"
    runtime: str = "onnxruntime"
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "format": self.format, "precision": self.precision,
                "runtime": self.runtime, **dict(self.details)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelFile:
        known = {"file", "format", "precision", "runtime"}
        return cls(
            file=str(data["file"]),
            format=str(data.get("format", "onnx")),
            precision=str(data.get("precision", "fp32")),
            runtime=str(data.get("runtime", "onnxruntime")),
            details={k: v for k, v in data.items() if k not in known},
        )


@dataclass(frozen=True)
class Manifest:
    """Everything a consumer needs to run the model the way it was measured."""

    name: str
    version: str
    architecture: str
    classes: tuple[str, ...]
    defect_classes: tuple[str, ...]
    input: PreprocessSpec
    decision: DecisionPolicy = field(default_factory=DecisionPolicy)
    task: str = "classification"
    output: str = "probabilities"
    models: tuple[ModelFile, ...] = (ModelFile("model.onnx"),)
    data_fingerprint: str = ""
    run_id: str = ""
    created_at: str = ""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    reference: Mapping[str, Any] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_manifest(self)

    @property
    def good_classes(self) -> tuple[str, ...]:
        return tuple(c for c in self.classes if c not in self.defect_classes)

    @property
    def defect_types_only(self) -> bool:
        """Every class is a defect type (a model that sorts defects already found): every verdict is a defect."""
        return not self.good_classes

    def model(self, precision: str = "fp32") -> ModelFile | None:
        for entry in self.models:
            if entry.format == "onnx" and entry.precision == precision:
                return entry
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "model": {"name": self.name, "version": self.version, "architecture": self.architecture,
                      "task": self.task, "output": self.output},
            "classes": list(self.classes),
            "defect_classes": list(self.defect_classes),
            "input": self.input.to_dict(),
            "decision": self.decision.to_dict(),
            "runtimes": [m.to_dict() for m in self.models],
            "training": {"data_fingerprint": self.data_fingerprint, "run_id": self.run_id,
                         "created_at": self.created_at},
            "metrics": dict(self.metrics),
            "reference": dict(self.reference),
            "extra": dict(self.extra),
            "files": dict(sorted(self.files.items())),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = MANIFEST_NAME) -> Manifest:
        check_schema(str(data.get("schema", "")), source)
        try:
            model = data["model"]
            training = data.get("training", {})
            return cls(
                name=str(model["name"]),
                version=str(model["version"]),
                architecture=str(model.get("architecture", "")),
                task=str(model.get("task", "classification")),
                output=str(model.get("output", "probabilities")),
                classes=tuple(str(c) for c in data["classes"]),
                defect_classes=tuple(str(c) for c in data["defect_classes"]),
                input=PreprocessSpec.from_dict(data["input"]),
                decision=DecisionPolicy.from_dict(data.get("decision", {})),
                models=tuple(ModelFile.from_dict(m) for m in data.get("runtimes", [])),
                data_fingerprint=str(training.get("data_fingerprint", "")),
                run_id=str(training.get("run_id", "")),
                created_at=str(training.get("created_at", "")),
                metrics=dict(data.get("metrics", {})),
                reference=dict(data.get("reference", {})),
                files={str(k): str(v) for k, v in dict(data.get("files", {})).items()},
                extra=dict(data.get("extra", {})),
            )
        except BundleSchemaError as exc:
            raise BundleSchemaError(f"{source}: {exc}") from exc
        except KeyError as exc:
            raise BundleSchemaError(f"{source}: required field {exc.args[0]!r} is missing") from exc
        except ConfigError as exc:
            raise BundleSchemaError(f"{source}: {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise BundleSchemaError(f"{source}: malformed manifest: {exc}") from exc


def check_schema(schema: str, source: str) -> None:
    """Accept qcsight.bundle/1 and its minor versions (1.x); refuse anything else by name."""
    prefix, _, version = schema.partition("/")
    if prefix != "qcsight.bundle" or not version:
        raise BundleSchemaError(f"{source}: schema {schema!r} is not a qcsight bundle manifest (expected {SCHEMA!r})")
    major = version.split(".")[0]
    if major != str(SCHEMA_MAJOR):
        raise BundleSchemaError(
            f"{source}: unsupported bundle schema major version {major!r} ({schema!r}); this qcsight reads {SCHEMA!r}"
        )


def _check_manifest(m: Manifest) -> None:
    if not m.name or not m.version:
        raise BundleSchemaError("manifest: model name and version are required")
    if m.task not in TASKS:
        raise BundleSchemaError(f"manifest: task {m.task!r} is not one of {', '.join(TASKS)}")
    # An anomaly graph returns a normalised anomaly score (qcsight_core.anomaly), not class probabilities.
    outputs = (ANOMALY_OUTPUT,) if m.task == "anomaly" else ("probabilities", "logits")
    if m.output not in outputs:
        raise BundleSchemaError(
            f"manifest: model.output {m.output!r} is not {' or '.join(map(repr, outputs))} for task {m.task!r}")
    if len(m.classes) < 2:
        raise BundleSchemaError(f"manifest: at least two classes are needed, got {list(m.classes)}")
    if len(set(m.classes)) != len(m.classes):
        raise BundleSchemaError(f"manifest: duplicate class names in {list(m.classes)}")
    unknown = [c for c in m.defect_classes if c not in m.classes]
    if unknown:
        raise BundleSchemaError(f"manifest: defect_classes {unknown} are not among classes {list(m.classes)}")
    if not m.defect_classes:
        raise BundleSchemaError("manifest: needs at least one defect class")
    stray = [c for c in m.decision.class_thresholds if c not in m.defect_classes]
    if stray:
        raise BundleSchemaError(
            f"manifest: decision.class_thresholds names {stray}, which are not defect classes {list(m.defect_classes)}"
        )
    for entry in m.models:
        if entry.precision not in PRECISIONS and entry.format == "onnx":
            raise BundleSchemaError(f"manifest: runtime {entry.file} has unknown precision {entry.precision!r}")
        check_relative_path(entry.file, "manifest: runtime file")
    for name in m.files:
        check_relative_path(name, "manifest: files entry")
        if name in (MANIFEST_NAME, SIGNATURE_NAME):
            raise BundleSchemaError(f"manifest: files lists {name!r}, which cannot hash itself")


def check_relative_path(name: str, what: str) -> str:
    """name, if it is a plain relative path inside the bundle ('a/b.onnx'); BundleSchemaError otherwise.

    Refused: empty names, absolute paths, '..' or '.' segments, backslashes and NUL: a manifest
    or a tar member must not point outside the bundle (at any .onnx on the disk).
    """
    parts = name.split("/")
    if (not name or name.startswith("/") or "\\" in name or "\x00" in name
            or any(part in ("", ".", "..") for part in parts)):
        raise BundleSchemaError(f"{what} {name!r} is not a relative path inside the bundle "
                                "(no absolute paths, '..', '.', empty segments or backslashes)")
    return name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _bundle_files(directory: Path) -> Iterable[Path]:
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.relative_to(directory).as_posix() not in (MANIFEST_NAME, SIGNATURE_NAME):
            yield path


class _TemporaryCopy:
    """An unpacked copy of a tarball, removed by close() or once nothing refers to it (or at exit)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(path), ignore_errors=True)

    def close(self) -> None:
        self._finalizer()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle directory.

    A bundle loaded from a tarball without extract_to lives in a temporary copy that is removed
    by close() (or leaving a with block), or when the Bundle is garbage collected.
    """

    path: Path
    manifest: Manifest
    signature: str | None = None  # who signed it, when a verification key checked it
    _copy: _TemporaryCopy | None = field(default=None, repr=False, compare=False)

    def model_path(self, precision: str = "fp32") -> Path:
        entry = self.manifest.model(precision)
        if entry is None:
            raise BundleFileMissingError(f"{self.path}: bundle has no {precision} ONNX model")
        return inside(self.path, entry.file)

    def close(self) -> None:
        """Remove the temporary copy of a tarball (nothing for a bundle directory)."""
        if self._copy is not None:
            self._copy.close()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def inside(directory: Path, name: str) -> Path:
    """directory/name, refusing a name or a symlink that resolves outside directory."""
    path = directory / check_relative_path(name, f"{directory}: file")
    base = directory.resolve()
    if base not in path.resolve().parents:
        raise BundleIntegrityError(f"{path}: resolves to {path.resolve()}, outside the bundle {base} (a symlink?)")
    return path


def write_bundle(directory: str | Path, manifest: Manifest) -> Bundle:
    """Hash every file in directory into the manifest and write manifest.json atomically.

    A signature.json left from before is removed: it signed the old manifest.
    """
    root = Path(directory)
    (root / SIGNATURE_NAME).unlink(missing_ok=True)
    files = {p.relative_to(root).as_posix(): sha256_file(p) for p in _bundle_files(root)}
    for entry in manifest.models:
        if entry.file not in files:
            raise BundleFileMissingError(f"{root / entry.file}: listed in runtimes but not in the bundle directory")
    final = replace(manifest, files=files)
    tmp = root / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(final.to_dict(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, root / MANIFEST_NAME)
    return Bundle(root, final)


def read_manifest(directory: str | Path) -> Manifest:
    """Parse and check manifest.json without verifying file hashes."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise BundleFileMissingError(f"{path}: manifest.json is missing; is this a qcsight bundle?")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleSchemaError(f"{path}: {path.stat().st_size} bytes, more than a manifest's {MAX_MANIFEST_BYTES}")
    return parse_manifest(path.read_bytes(), str(path))


def parse_manifest(data: bytes, source: str) -> Manifest:
    """The manifest in data (manifest.json's bytes); source names it in errors."""
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleSchemaError(f"{source}: not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise BundleSchemaError(f"{source}: expected a JSON object")
    return Manifest.from_dict(parsed, source)


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Check that every listed file is present with its recorded sha256."""
    if not manifest.files:
        raise BundleSchemaError(f"{directory / MANIFEST_NAME}: lists no files; the bundle was not written by qcsight")
    for entry in manifest.models:
        if entry.file not in manifest.files:
            raise BundleSchemaError(f"{directory / MANIFEST_NAME}: runtime file {entry.file} has no recorded sha256")
    for name, expected in manifest.files.items():
        path = inside(directory, name)
        if not path.is_file():
            raise BundleFileMissingError(f"{path}: listed in the manifest but missing (partial bundle?)")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleIntegrityError(
                f"{path}: sha256 {actual[:16]}... does not match the manifest's {expected[:16]}...: the file "
                "changed after the manifest was written (corrupt, or tampered with; the hashes check that the "
                "files match the manifest, only a signature checks who wrote it)"
            )


@dataclass(frozen=True)
class ExtractLimits:
    """Caps on what unpacking a model.tar.gz may write, checked from the tar headers first.

    The defaults leave ten times the room of the largest bundle qcsight trains (a ResNet-50
    FP32+INT8 pair is about 125 MB; efficientnet-lite0 is 21 MB) while a bomb whose headers
    declare gigabytes is refused before a byte is written.

    Attributes:
        max_member_bytes: the largest single file.
        max_total_bytes: all extracted files together.
        max_members: tar members read (a bundle has a handful).
    """

    max_member_bytes: int = 1 << 30
    max_total_bytes: int = 2 << 30
    max_members: int = 1000

    def __post_init__(self) -> None:
        for name in ("max_member_bytes", "max_total_bytes", "max_members"):
            if getattr(self, name) < 1:
                raise ConfigError(f"bundle.{name}", getattr(self, name), "a positive number")


def load_bundle(path: str | Path, extract_to: str | Path | None = None, *, verify_key: VerifyKey | None = None,
                limits: ExtractLimits | None = None) -> Bundle:
    """Load and verify a bundle directory or model.tar.gz.

    Args:
        path: a bundle directory or a .tar.gz of one.
        extract_to: where to unpack a tarball; when None, a temporary copy that the returned
            Bundle removes on close() or when it is garbage collected.
        verify_key: when set, the bundle must carry a signature.json made with this key over
            its manifest.json (qcsight_core.signing); unsigned or otherwise signed bundles are refused.
        limits: caps on what unpacking a tarball may write.

    Raises:
        BundleError: the bundle is missing, partial, has files that differ from their recorded
            sha256, is of an unknown schema, or (with verify_key) is unsigned or wrongly signed.
    """
    source = Path(path)
    if not source.exists():
        raise BundleFileMissingError(f"{source}: no such bundle directory or file")
    copy: _TemporaryCopy | None = None
    if source.is_file():
        if extract_to is None:
            copy = _TemporaryCopy(Path(tempfile.mkdtemp(prefix="qcsight-bundle-")))
            target = copy.path
        else:
            target = Path(extract_to)
        try:
            unpack_bundle(source, target, limits)
        except BaseException:
            if copy is not None:
                copy.close()
            raise
        source = target
    try:
        signer = None
        if verify_key is not None:
            from qcsight_core.signing import verify_bundle_signature

            signer = verify_bundle_signature(source, verify_key).describe()
        manifest = read_manifest(source)
        verify_files(source, manifest)
    except BaseException:
        if copy is not None:
            copy.close()
        raise
    log.debug("bundle %s %s verified (%d files%s)", manifest.name, manifest.version, len(manifest.files),
              f", signed by {signer}" if signer else "")
    return Bundle(source, manifest, signer, copy)


def pack_bundle(directory: str | Path, tar_path: str | Path) -> Path:
    """Write the bundle as a gzip tarball with files at its root, as SageMaker stores model.tar.gz."""
    root = Path(directory)
    read_manifest(root)
    target = Path(tar_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    signature = [root / SIGNATURE_NAME] if (root / SIGNATURE_NAME).is_file() else []
    with tarfile.open(tmp, "w:gz") as tar:
        for file in [root / MANIFEST_NAME, *signature, *_bundle_files(root)]:
            if file.resolve() == target.resolve() or file.name.endswith(".tmp"):
                continue
            tar.add(file, arcname=file.relative_to(root).as_posix(), recursive=False)
    os.replace(tmp, target)
    return target


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym() or member.islnk():
        return f"a link to {member.linkname!r}"
    if member.ischr() or member.isblk():
        return "a device"
    if member.isfifo():
        return "a FIFO"
    return f"of tar type {member.type!r}"


def _read_members(tar: tarfile.TarFile, tar_path: str | Path, limits: ExtractLimits) -> dict[str, tarfile.TarInfo]:
    """Regular-file members by name, refusing links, devices, escaping names and oversized members.

    Each header is checked as it is read, before the archive is advanced past that member's
    data, so a member declaring gigabytes is refused without decompressing it.
    """
    members: dict[str, tarfile.TarInfo] = {}
    for count, member in enumerate(tar, start=1):
        if count > limits.max_members:
            raise BundleError(f"{tar_path}: more than {limits.max_members} members; not a qcsight bundle")
        name = member.name[2:] if member.name.startswith("./") else member.name
        name = name.rstrip("/") if member.isdir() else name
        if member.isdir() and name in ("", "."):
            continue
        try:
            check_relative_path(name, "member")
        except BundleSchemaError as exc:
            raise BundleError(f"{tar_path}: {exc}") from exc
        if member.isdir():
            continue
        if not member.isreg():
            raise BundleError(f"{tar_path}: member {name!r} is {_member_kind(member)}; bundles hold regular files only")
        if name in members:
            raise BundleError(f"{tar_path}: member {name!r} appears twice")
        if member.size > limits.max_member_bytes:
            raise BundleError(f"{tar_path}: member {name!r} declares {member.size} bytes, more than the "
                              f"{limits.max_member_bytes}-byte limit per file")
        members[name] = member
    return members


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    extracted = tar.extractfile(member)
    if extracted is None:
        raise BundleError(f"cannot read member {member.name!r}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    # O_NOFOLLOW: never write through a symlink that already sits in the target directory.
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with extracted, os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(extracted, out)


def unpack_bundle(tar_path: str | Path, directory: str | Path, limits: ExtractLimits | None = None) -> Path:
    """Unpack the manifest, its signature and the files the manifest lists; nothing else is written.

    manifest.json is read from the archive first; the files it lists must be regular-file
    members whose sizes, from their headers, fit limits. Links, devices, absolute or '..'
    member names anywhere in the archive refuse it; members the manifest does not list are
    skipped with a warning.
    """
    caps = limits or ExtractLimits()
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    base = target.resolve()
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = _read_members(tar, tar_path, caps)
            manifest_member = members.get(MANIFEST_NAME)
            if manifest_member is None:
                raise BundleFileMissingError(f"{tar_path}: no manifest.json at the archive's root; "
                                             "is this a qcsight bundle?")
            if manifest_member.size > MAX_MANIFEST_BYTES:
                raise BundleSchemaError(f"{tar_path}: manifest.json declares {manifest_member.size} bytes, "
                                        f"more than a manifest's {MAX_MANIFEST_BYTES}")
            reader = tar.extractfile(manifest_member)
            if reader is None:
                raise BundleError(f"{tar_path}: cannot read manifest.json")
            with reader:
                manifest = parse_manifest(reader.read(), f"{tar_path}:{MANIFEST_NAME}")
            missing = sorted(name for name in manifest.files if name not in members)
            if missing:
                raise BundleFileMissingError(f"{tar_path}: files listed in the manifest are not in the archive: "
                                             f"{', '.join(missing[:5])}")
            wanted = [MANIFEST_NAME, *manifest.files]
            signature = members.get(SIGNATURE_NAME)
            if signature is not None:
                if signature.size > MAX_SIGNATURE_BYTES:
                    raise BundleError(f"{tar_path}: signature.json declares {signature.size} bytes")
                wanted.append(SIGNATURE_NAME)
            total = sum(members[name].size for name in wanted)
            if total > caps.max_total_bytes:
                raise BundleError(f"{tar_path}: the listed files declare {total} bytes in all, more than the "
                                  f"{caps.max_total_bytes}-byte limit")
            skipped = sorted(set(members) - set(wanted))
            if skipped:
                log.warning("%s: %d members not listed in the manifest were not extracted: %s", tar_path,
                            len(skipped), ", ".join(skipped[:5]))
            for name in wanted:
                dest = base / name
                if base not in dest.parent.resolve().parents and dest.parent.resolve() != base:
                    raise BundleError(f"{tar_path}: member {name!r} would land outside {base}")
                _extract(tar, members[name], dest)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise BundleError(f"{tar_path}: not a readable bundle tarball: {exc}") from exc
    return target
