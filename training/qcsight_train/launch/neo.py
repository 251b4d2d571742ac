"""SageMaker Neo compilation requests for qcsight models (the bundle's ONNX, or TorchScript) and Neo's version rules.

ONNX (the default when a bundle is given): Neo's newest ONNX support is ONNX 1.7 for cloud
instances and edge devices alike, i.e. IR version 7 and operator sets up to 12. The bundle's
`model.neo.onnx` is exported for exactly that (qcsight_train.export.export_neo_onnx) and
parity-checked against model.onnx with ONNX Runtime; it is packed alone as the model.tar.gz Neo
compiles, with `Framework: ONNX`, no `FrameworkVersion` (the API takes it only for MXNet,
PyTorch, TensorFlow and TFLite) and `DataInputConfig {"input": [1, C, H, W]}` keyed by the ONNX
input's name (Neo's MXNet/ONNX rule). Sources (checked 2026-11): the Neo developer guide's
"Supported Instance Types and Frameworks" (cloud: ONNX 1.7.0) and "Supported Frameworks" (edge:
ONNX 1.7), and botocore's SageMaker service model (InputConfig.FrameworkVersion's documentation).
Neo's compiled output can be carried in the bundle, one runtimes entry per target (attach_compiled).

TorchScript (`--model-s3` given):

Neo compiles a TorchScript model (``model.pth`` inside a ``model.tar.gz``) for one target. It
loads that file with its own, old PyTorch: the version named in ``FrameworkVersion``. A
TorchScript file written by a newer torch than that version is not guaranteed to load (the
serialisation format moves forward), so the artefact Neo receives must be traced with an
accepted version. qcsight trains with torch 2.14; Neo's newest accepted PyTorch is 2.0 for
cloud instances and 1.8 for edge devices. This module therefore refuses versions outside
AWS's documented lists and, where a bundle records the torch that traced its TorchScript
file, refuses a file traced by a newer torch than the one Neo will load it with.

Sources for the version lists (checked 2026-11):

* cloud instances: https://docs.aws.amazon.com/sagemaker/latest/dg/neo-supported-cloud.html
  (PyTorch 1.4, 1.5, 1.6, 1.7, 1.8, 1.12, 1.13, 2.0; the same list ships in the SageMaker
  Python SDK's ``image_uri_config/neo-pytorch.json``);
* edge devices: https://docs.aws.amazon.com/sagemaker/latest/dg/neo-supported-devices-edge-frameworks.html
  (PyTorch 1.7, 1.8; models from earlier versions are accepted).

This module builds plain dictionaries in the shape of the CreateCompilationJob API; it imports
neither boto3 nor sagemaker, so the policy can be tested (and read) without either.
"""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qcsight_aws.s3 import S3Uri
from qcsight_core.bundle import Manifest, ModelFile
from qcsight_core.errors import ConfigError

CLOUD_TARGETS = ("ml_c4", "ml_c5", "ml_m4", "ml_m5", "ml_p2", "ml_p3", "ml_g4dn")
EDGE_TARGETS = (
    "jetson_tx1", "jetson_tx2", "jetson_nano", "jetson_xavier", "rasp3b", "rasp4b", "imx8qm", "imx8mplus",
    "rk3399", "rk3288", "qcs605", "qcs603", "sitara_am57x", "amba_cv2", "amba_cv22", "amba_cv25",
    "x86_win32", "x86_win64", "jacinto_tda4vm", "deeplens", "aisage", "sbe_c",
)
# Targets the API names but qcsight's policy does not cover: their PyTorch support follows
# other version lists (Neuron SDK for Inferentia/Trainium) or is not PyTorch image models.
UNCOVERED_TARGETS: Mapping[str, str] = {
    "ml_inf1": "Inferentia uses the Neuron compiler's own PyTorch versions",
    "ml_inf2": "Inferentia2 uses the Neuron compiler's own PyTorch versions",
    "ml_trn1": "Trainium uses the Neuron compiler's own PyTorch versions",
    "ml_eia2": "Elastic Inference is retired",
    "ml_m6g": "Graviton instance targets are not in Neo's documented PyTorch table",
    "ml_c6g": "Graviton instance targets are not in Neo's documented PyTorch table",
    "lambda": "Lambda targets are not in Neo's documented PyTorch table",
    "coreml": "Core ML targets do not take TorchScript image classifiers through qcsight",
}
CLOUD_PYTORCH_VERSIONS = ("1.4", "1.5", "1.6", "1.7", "1.8", "1.12", "1.13", "2.0")
EDGE_PYTORCH_VERSIONS = ("1.7", "1.8")

PLATFORM_OS = ("LINUX", "ANDROID")
PLATFORM_ARCH = ("X86_64", "X86", "ARM64", "ARM_EABI", "ARM_EABIHF")
PLATFORM_ACCELERATORS = ("INTEL_GRAPHICS", "MALI", "NVIDIA", "NNA")

# CreateCompilationJob's own constraint on the job name.
_JOB_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
_TRACE_HINT = (
    "Neo loads TorchScript with its own PyTorch, so trace the model with an accepted version "
    "(for example in a separate venv: pip install 'torch==2.0.1' 'torchvision==0.15.2', then torch.jit.trace "
    "and save as model.pth inside model.tar.gz); qcsight's own training uses torch 2.14, which Neo does not accept"
)


@dataclass(frozen=True)
class NeoTarget:
    """Where the compiled model will run: a named device, or an OS/architecture/accelerator triple."""

    device: str | None = None
    os: str | None = None
    arch: str | None = None
    accelerator: str | None = None

    @property
    def kind(self) -> str:
        """'cloud' for SageMaker instance families, 'edge' for devices and platforms."""
        return "cloud" if self.device in CLOUD_TARGETS else "edge"

    @property
    def label(self) -> str:
        if self.device:
            return self.device
        return ":".join(p for p in (self.os, self.arch, self.accelerator) if p)

    def to_output_config(self) -> dict[str, Any]:
        if self.device:
            return {"TargetDevice": self.device}
        platform: dict[str, Any] = {"Os": self.os, "Arch": self.arch}
        if self.accelerator:
            platform["Accelerator"] = self.accelerator
        return {"TargetPlatform": platform}


def parse_device(value: str) -> NeoTarget:
    """A --neo-target value: one of Neo's named devices that qcsight's version policy covers."""
    if value in UNCOVERED_TARGETS:
        raise ConfigError("--neo-target", value, f"not supported by qcsight ({UNCOVERED_TARGETS[value]}); "
                          f"choose a cloud target ({', '.join(CLOUD_TARGETS)}) or an edge device")
    if value not in CLOUD_TARGETS and value not in EDGE_TARGETS:
        raise ConfigError("--neo-target", value,
                          f"one of {', '.join(CLOUD_TARGETS + EDGE_TARGETS)} (or use --neo-platform OS:ARCH[:ACCEL])")
    return NeoTarget(device=value)


def parse_platform(value: str) -> NeoTarget:
    """A --neo-platform value OS:ARCH[:ACCELERATOR], e.g. LINUX:ARM64:NVIDIA."""
    parts = value.upper().split(":")
    allowed = (f"OS:ARCH[:ACCELERATOR] with OS in {', '.join(PLATFORM_OS)}, ARCH in {', '.join(PLATFORM_ARCH)}, "
               f"ACCELERATOR in {', '.join(PLATFORM_ACCELERATORS)}")
    if len(parts) not in (2, 3):
        raise ConfigError("--neo-platform", value, allowed)
    os_name, arch = parts[0], parts[1]
    accelerator = parts[2] if len(parts) == 3 else None
    if os_name not in PLATFORM_OS or arch not in PLATFORM_ARCH or (
            accelerator is not None and accelerator not in PLATFORM_ACCELERATORS):
        raise ConfigError("--neo-platform", value, allowed)
    return NeoTarget(os=os_name, arch=arch, accelerator=accelerator)


def accepted_pytorch_versions(target: NeoTarget) -> tuple[str, ...]:
    """The FrameworkVersion values Neo documents for PyTorch on this kind of target."""
    return CLOUD_PYTORCH_VERSIONS if target.kind == "cloud" else EDGE_PYTORCH_VERSIONS


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


def resolve_framework_version(target: NeoTarget, requested: str | None) -> str:
    """The FrameworkVersion to request: the one asked for if Neo accepts it, else the highest accepted.

    Raises:
        ConfigError: the requested version is not in Neo's documented list for this target.
    """
    accepted = accepted_pytorch_versions(target)
    if requested is None:
        return max(accepted, key=_version_key)
    normalised = ".".join(str(p) for p in _version_key(requested)) if re.match(r"^\d+\.\d+", requested) else requested
    if normalised not in accepted:
        raise ConfigError("--neo-framework-version", requested,
                          f"Neo accepts PyTorch {', '.join(accepted)} for {target.kind} target {target.label}. "
                          + _TRACE_HINT)
    return normalised


def check_traced_version(traced_with: str, framework_version: str) -> None:
    """Refuse a TorchScript file traced by a newer torch than the one Neo will load it with."""
    if _version_key(traced_with) > _version_key(framework_version):
        raise ConfigError("--bundle", f"TorchScript traced with torch {traced_with}",
                          f"Neo will load it with PyTorch {framework_version}, which cannot be relied on to read a "
                          f"file written by a newer torch. {_TRACE_HINT}")


def traced_torch_version(manifest: Manifest) -> str | None:
    """The torch version a bundle records for its TorchScript artefact, when it records one."""
    for entry in manifest.models:
        if entry.format.lower() in ("torchscript", "pytorch") and entry.details.get("torch_version"):
            return str(entry.details["torch_version"])
    return None


# Targets whose Neo support does not include ONNX at all, whatever the file.
ONNX_REFUSED: Mapping[str, str] = {
    "ml_inf1": "Inferentia compiles with the Neuron SDK, which takes PyTorch, TensorFlow and MXNet, not ONNX",
    "ml_inf2": "Inferentia2 compiles with the Neuron SDK, which takes PyTorch, TensorFlow and MXNet, not ONNX",
    "ml_trn1": "Trainium compiles with the Neuron SDK, which takes PyTorch, TensorFlow and MXNet, not ONNX",
}
NEO_ONNX_FORMAT = "onnx-neo"
NEO_ONNX_MAX_IR = 7
NEO_ONNX_MAX_OPSET = 12
COMPILED_FORMAT = "neo-compiled"


def neo_onnx_entry(manifest: Manifest, source: str) -> ModelFile:
    """The bundle's ONNX for Neo, checked against what Neo accepts (IR <= 7, opset <= 12).

    Raises:
        ConfigError: the bundle has none (exported before qcsight made one, or with --neo-onnx false),
            or its IR/opset is newer than Neo's ONNX 1.7.
    """
    for entry in manifest.models:
        if entry.format == NEO_ONNX_FORMAT:
            ir, opset = int(entry.details.get("ir_version", 99)), int(entry.details.get("opset", 99))
            if ir > NEO_ONNX_MAX_IR or opset > NEO_ONNX_MAX_OPSET:
                raise ConfigError("--bundle", source, f"an ONNX model Neo can read: {entry.file} is IR {ir}, opset "
                                  f"{opset}, and Neo's ONNX 1.7 reads IR <= {NEO_ONNX_MAX_IR}, opset <= "
                                  f"{NEO_ONNX_MAX_OPSET}")
            return entry
    record = manifest.metrics.get("neo_onnx")
    why = ""
    if isinstance(record, Mapping) and record.get("reason"):
        why = f"; this bundle's export recorded why it has none: {record['reason']}"
    raise ConfigError("--bundle", source, "a bundle with model.neo.onnx (exported by qcsight train with --neo-onnx, "
                      "the default): model.onnx is opset 18, newer than Neo's ONNX 1.7 (opset <= 12) accepts" + why)


def check_onnx_target(target: NeoTarget) -> None:
    reason = ONNX_REFUSED.get(target.device or "")
    if reason:
        raise ConfigError("--neo-target", target.device, f"a target that compiles ONNX: {reason}")


def pack_neo_onnx(bundle_dir: Path, entry: ModelFile, tar_path: Path) -> Path:
    """model.tar.gz for Neo: the one .onnx file at its root (Neo's ONNX format is "one model file")."""
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(bundle_dir / entry.file, arcname="model.onnx", recursive=False)
    return tar_path


def build_onnx_compilation_request(spec: CompilationSpec, input_name: str) -> dict[str, Any]:
    """The CreateCompilationJob request for the bundle's Neo ONNX model (no FrameworkVersion: see the module doc)."""
    return {
        "CompilationJobName": spec.job_name,
        "RoleArn": spec.role_arn,
        "InputConfig": {
            "S3Uri": spec.model_s3,
            "DataInputConfig": json.dumps({input_name: list(spec.input_shape)}),
            "Framework": "ONNX",
        },
        "OutputConfig": {"S3OutputLocation": spec.output_s3, **spec.target.to_output_config()},
        "StoppingCondition": {"MaxRuntimeInSeconds": spec.max_runtime_s},
    }


@dataclass(frozen=True)
class OnnxSource:
    """The bundle whose model.neo.onnx is compiled (packed and uploaded to model_s3 by the launcher).

    Attributes:
        bundle: the bundle directory or .tar.gz.
        entry: its Neo ONNX runtimes entry.
    """

    bundle: Path
    entry: ModelFile

    @property
    def input_name(self) -> str:
        return str(self.entry.details.get("input_name", "input"))


def find_compiled(keys: list[tuple[str, float]], artefacts: str, target: NeoTarget) -> str | None:
    """The compiled model's S3 key among (key, modified time) under the job's output location.

    DescribeCompilationJob's ModelArtifacts.S3ModelArtifacts names the object; when it names only
    the prefix, the newest .tar.gz there whose name carries the target is taken.
    """
    if artefacts.endswith(".tar.gz"):
        return artefacts
    label = target.label.replace(":", "_").lower()
    found = sorted((t, k) for k, t in keys if k.endswith(".tar.gz") and label in k.lower())
    return found[-1][1] if found else None


def attach_compiled(bundle_dir: Path, target: NeoTarget, artefact: Path, job_name: str) -> Manifest:
    """Carry Neo's compiled output in the bundle: neo/<target>/<file>, one runtimes entry per target, re-hashed.

    A second compilation for the same target replaces the first.
    """
    from qcsight_core.bundle import read_manifest, write_bundle

    manifest = read_manifest(bundle_dir)
    folder = Path("neo") / target.label.replace(":", "_").lower()
    (bundle_dir / folder).mkdir(parents=True, exist_ok=True)
    for old in (bundle_dir / folder).iterdir():
        old.unlink()
    shutil.copyfile(artefact, bundle_dir / folder / artefact.name)
    entry = ModelFile((folder / artefact.name).as_posix(), format=COMPILED_FORMAT, precision="fp32", runtime="dlr",
                      details={"target": target.label, "compilation_job": job_name, "source": "model.neo.onnx"})
    kept = tuple(m for m in manifest.models
                 if not (m.format == COMPILED_FORMAT and m.details.get("target") == target.label))
    return write_bundle(bundle_dir, replace(manifest, models=(*kept, entry))).manifest


def input_shape(manifest: Manifest | None, img_size: int | None) -> tuple[int, int, int, int]:
    """NCHW shape of the model input: from the bundle's preprocessing spec, else a square RGB img_size."""
    if manifest is not None:
        return (1, manifest.input.channels, manifest.input.height, manifest.input.width)
    if img_size is None:
        raise ConfigError("--img-size", None, "the model's input size (or give --bundle to read it)")
    return (1, 3, img_size, img_size)


@dataclass(frozen=True)
class CompilationSpec:
    """Everything one CreateCompilationJob request needs."""

    job_name: str
    role_arn: str
    model_s3: str
    output_s3: str
    target: NeoTarget
    framework_version: str
    input_shape: tuple[int, int, int, int]
    max_runtime_s: int = 900
    framework: str = "PYTORCH"

    def __post_init__(self) -> None:
        if not _JOB_NAME.fullmatch(self.job_name):
            raise ConfigError("--job-name", self.job_name, "1-63 letters, digits and hyphens, starting alphanumeric")
        tarball = "an s3://bucket/key.tar.gz holding the model (model.onnx or TorchScript model.pth) Neo compiles"
        if not S3Uri.parse(self.model_s3, "--model-s3", allowed=tarball).key.endswith(".tar.gz"):
            raise ConfigError("--model-s3", self.model_s3, tarball)
        S3Uri.parse(self.output_s3, "--output-s3", allowed="an s3://bucket/prefix for the compiled model")
        if self.framework == "PYTORCH" and self.framework_version not in accepted_pytorch_versions(self.target):
            raise ConfigError("--neo-framework-version", self.framework_version,
                              f"one of {', '.join(accepted_pytorch_versions(self.target))}")
        if self.max_runtime_s < 1:
            raise ConfigError("--max-run", self.max_runtime_s, "at least 1 second")


def compilation_job_name(base: str, target: NeoTarget, stamp: str) -> str:
    """A job name Neo accepts: base-target-stamp, underscores folded to hyphens, at most 63 characters."""
    raw = f"{base}-{target.label}-{stamp}".lower()
    cleaned = re.sub(r"[^a-z0-9-]+", "-", raw).strip("-")
    return cleaned[-63:].lstrip("-")


def build_compilation_request(spec: CompilationSpec) -> dict[str, Any]:
    """The CreateCompilationJob request for a PyTorch (TorchScript) image model."""
    return {
        "CompilationJobName": spec.job_name,
        "RoleArn": spec.role_arn,
        "InputConfig": {
            "S3Uri": spec.model_s3,
            "DataInputConfig": json.dumps({"input0": list(spec.input_shape)}),
            "Framework": "PYTORCH",
            "FrameworkVersion": spec.framework_version,
        },
        "OutputConfig": {"S3OutputLocation": spec.output_s3, **spec.target.to_output_config()},
        "StoppingCondition": {"MaxRuntimeInSeconds": spec.max_runtime_s},
    }
