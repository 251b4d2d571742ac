"""The model bundle: manifest.json plus model files, hashed, written by training and read everywhere."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qcsight_core.errors import (
    BundleError,
    BundleFileMissingError,
    BundleIntegrityError,
    BundleSchemaError,
    ConfigError,
)
from qcsight_core.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

SCHEMA = "qcsight.bundle/1"
SCHEMA_MAJOR = 1
MANIFEST_NAME = "manifest.json"
TASKS = ("classification", "anomaly")
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
    if m.output not in ("probabilities", "logits"):
        raise BundleSchemaError(f"manifest: model.output {m.output!r} is not 'probabilities' or 'logits'")
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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _bundle_files(directory: Path) -> Iterable[Path]:
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST_NAME:
            yield path


@dataclass(frozen=True)
class Bundle:
    """A verified bundle directory."""

    path: Path
    manifest: Manifest

    def model_path(self, precision: str = "fp32") -> Path:
        entry = self.manifest.model(precision)
        if entry is None:
            raise BundleFileMissingError(f"{self.path}: bundle has no {precision} ONNX model")
        return self.path / entry.file


def write_bundle(directory: str | Path, manifest: Manifest) -> Bundle:
    """Hash every file in directory into the manifest and write manifest.json atomically."""
    root = Path(directory)
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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleSchemaError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleSchemaError(f"{path}: expected a JSON object")
    return Manifest.from_dict(data, str(path))


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Check that every listed file is present with its recorded sha256."""
    if not manifest.files:
        raise BundleSchemaError(f"{directory / MANIFEST_NAME}: lists no files; the bundle was not written by qcsight")
    for entry in manifest.models:
        if entry.file not in manifest.files:
            raise BundleSchemaError(f"{directory / MANIFEST_NAME}: runtime file {entry.file} has no recorded sha256")
    for name, expected in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise BundleFileMissingError(f"{path}: listed in the manifest but missing (partial bundle?)")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleIntegrityError(
                f"{path}: sha256 {actual[:16]}... does not match the manifest's "
                f"{expected[:16]}... (tampered or corrupt)"
            )


def load_bundle(path: str | Path, extract_to: str | Path | None = None) -> Bundle:
    """Load and verify a bundle directory or model.tar.gz.

    Args:
        path: a bundle directory or a .tar.gz of one.
        extract_to: where to unpack a tarball; a fresh temporary directory when None.

    Raises:
        BundleError: the bundle is missing, partial, tampered or of an unknown schema.
    """
    source = Path(path)
    if not source.exists():
        raise BundleFileMissingError(f"{source}: no such bundle directory or file")
    if source.is_file():
        target = Path(extract_to) if extract_to else Path(tempfile.mkdtemp(prefix="qcsight-bundle-"))
        unpack_bundle(source, target)
        source = target
    manifest = read_manifest(source)
    verify_files(source, manifest)
    log.debug("bundle %s %s verified (%d files)", manifest.name, manifest.version, len(manifest.files))
    return Bundle(source, manifest)


def pack_bundle(directory: str | Path, tar_path: str | Path) -> Path:
    """Write the bundle as a gzip tarball with files at its root, as SageMaker stores model.tar.gz."""
    root = Path(directory)
    read_manifest(root)
    target = Path(tar_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for file in [root / MANIFEST_NAME, *_bundle_files(root)]:
            if file.resolve() == target.resolve() or file.name.endswith(".tmp"):
                continue
            tar.add(file, arcname=file.relative_to(root).as_posix(), recursive=False)
    os.replace(tmp, target)
    return target


def unpack_bundle(tar_path: str | Path, directory: str | Path) -> Path:
    """Unpack a bundle tarball, refusing members that would land outside directory."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    base = target.resolve()
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            for member in tar.getmembers():
                dest = (base / member.name).resolve()
                if base not in dest.parents and dest != base:
                    raise BundleError(f"{tar_path}: member {member.name!r} escapes the bundle directory")
                if not (member.isfile() or member.isdir()):
                    raise BundleError(f"{tar_path}: member {member.name!r} is not a regular file")
                if member.isdir():
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                extracted = tar.extractfile(member)
                if extracted is None:
                    raise BundleError(f"{tar_path}: cannot read member {member.name!r}")
                with extracted, dest.open("wb") as out:
                    shutil.copyfileobj(extracted, out)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleError(f"{tar_path}: not a readable bundle tarball: {exc}") from exc
    return target
