"""The source tarball the job unpacks: the checkout's code and a generated requirements.txt, reproducible."""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcsight_aws.jobs import SOURCE_TARBALL

log = logging.getLogger(__name__)

# What the container needs from a checkout; everything else (venv, .git, data, runs) stays home.
# qcsight_aws: qcsight_train.data imports it (for s3:// data given to a local run). qcsight_cloud: the
# retraining pipeline's gate step runs `qcsight cloud gate` from the same tarball (qcsight_cloud.pipeline).
SOURCE_TOP_LEVEL = ("pyproject.toml", "README.md", "LICENSE", "edge_agent", "batch", "training", "infra/qcsight_aws",
                    "infra/qcsight_cloud")
_SOURCE_SKIP_DIRS = {"__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".ipynb_checkpoints"}
_SOURCE_SKIP_SUFFIXES = (".pyc", ".pyo")
# Installed by the PyTorch image with matching CUDA builds; reinstalling them from PyPI would not.
PROVIDED_BY_IMAGE = ("torch", "torchvision")


def default_source_dir() -> Path:
    """The checkout this module runs from when it is one, else the working directory."""
    checkout = Path(__file__).resolve().parents[3]
    return checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()


@dataclass(frozen=True)
class SourcePackage:
    """The tarball the job unpacks as its working directory."""

    tarball: Path
    sha256: str
    files: tuple[str, ...]
    requirements: tuple[str, ...]


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        toml = importlib.import_module("tomllib")
    except ModuleNotFoundError:  # Python 3.10
        toml = importlib.import_module("tomli")
    data: dict[str, Any] = toml.loads(path.read_text(encoding="utf-8"))
    return data


def image_requirements(pyproject: Path) -> tuple[str, ...]:
    """The job's pip requirements: the core dependencies plus the train extra, minus what the image has."""
    project = _load_toml(pyproject).get("project", {})
    wanted = list(project.get("dependencies", [])) + list(project.get("optional-dependencies", {}).get("train", []))
    keep = []
    for requirement in wanted:
        name = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        if name not in PROVIDED_BY_IMAGE:
            keep.append(requirement)
    return tuple(keep)


def _source_files(source_dir: Path) -> list[str]:
    files = []
    for top in SOURCE_TOP_LEVEL:
        path = source_dir / top
        if path.is_file():
            files.append(top)
        elif path.is_dir():
            for item in path.rglob("*"):
                rel = item.relative_to(source_dir)
                if not item.is_file() or item.suffix in _SOURCE_SKIP_SUFFIXES:
                    continue
                if any(part in _SOURCE_SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
                    continue
                files.append(rel.as_posix())
    return sorted(files)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


def package_source(source_dir: Path, work_dir: Path) -> SourcePackage:
    """Write sourcedir.tar.gz: the checkout's code plus a generated requirements.txt.

    Byte-for-byte reproducible (sorted names, zero mtimes and owners), so the same code gives
    the same sha256 and the same S3 key.
    """
    files = _source_files(source_dir)
    requirements = image_requirements(source_dir / "pyproject.toml")
    tar_path = work_dir / SOURCE_TARBALL
    with tar_path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in files:
            path = source_dir / name
            _add_bytes(tar, name, path.read_bytes(), 0o755 if os.access(path, os.X_OK) else 0o644)
        _add_bytes(tar, "requirements.txt", ("\n".join(requirements) + "\n").encode())
    digest = hashlib.sha256(tar_path.read_bytes()).hexdigest()
    log.info("packed %d files from %s (%.1f kB, sha256 %s)", len(files), source_dir,
             tar_path.stat().st_size / 1024, digest[:12])
    return SourcePackage(tar_path, digest, tuple(files), requirements)
