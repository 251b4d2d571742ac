"""The Lambda package and the container build contexts, assembled from this repository's packages.

No container daemon is needed to build the Lambda package: the qcsight source packages and the data
files the handlers read are copied, and third-party requirements are installed with pip for the Lambda
platform (manylinux wheels only, so nothing compiles on this machine). pip rather than a copy of this
machine's site-packages because a requirement may be compiled (rpds-py, under jsonschema): only a wheel
for the Lambda's CPU and Python runs there. pip reads its usual configuration, so an offline CI points it
at a mirror or a wheelhouse (PIP_INDEX_URL, PIP_FIND_LINKS with PIP_NO_INDEX). Each requirement is pinned
to the version installed here and installed without its dependencies (names.LAMBDA_REQUIREMENTS lists the
closure), so the package is the same on every synth against the same environment. torch can never enter
it: the build refuses a package that contains it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from qcsight_core.errors import ConfigError, QcsightError
from stacks import names

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "torchvision", "sagemaker")
LAMBDA_PLATFORM = "manylinux2014_aarch64"  # the functions run on arm64 (Graviton)
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")

# What a container build context needs from the repository: the allow-list the Docker assets use
# (CDK stages only these files, in Docker's ignore-file syntax, so a rebuild depends on them alone).
SCORING_CONTEXT = ("pyproject.toml", "README.md", "edge_agent/qcsight_core", "batch/qcsight_batch",
                   "infra/qcsight_aws", "infra/docker/scoring.Dockerfile", "infra/docker/serve")
REVIEW_CONTEXT = ("pyproject.toml", "README.md", "edge_agent/qcsight_core", "infra/qcsight_cloud",
                  "infra/qcsight_review", "infra/docker/review.Dockerfile")


class PackagingError(QcsightError):
    """A function package or build context cannot be assembled."""


Runner = Callable[[Sequence[str]], None]


def _run(command: Sequence[str]) -> None:
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=900, check=False)
    if result.returncode != 0:
        raise PackagingError(f"{' '.join(command[:6])} ... failed ({result.returncode}): {result.stderr[-2000:]}")


def pip_command(target: Path, requirements: Sequence[str], python_version: str = names.LAMBDA_PYTHON) -> list[str]:
    """pip installing requirements as Lambda will import them: binary wheels for its platform and Python."""
    return [
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
        "--target", str(target), "--platform", LAMBDA_PLATFORM, "--implementation", "cp",
        "--python-version", python_version, "--only-binary=:all:", "--no-deps", *requirements,
    ]


def pinned(distributions: Sequence[str]) -> list[str]:
    """Each distribution pinned to the version installed here: what the tests ran against."""
    requirements = []
    for name in distributions:
        try:
            requirements.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise PackagingError(f"{name} (names.LAMBDA_REQUIREMENTS) is not installed where the app is synthesized: "
                                 "install qcsight's cloud, gg and infra extras") from None
    return requirements


def missing_packages(repo_root: Path = REPO_ROOT) -> list[str]:
    """The Lambda packages not present in this tree (qcsight_cloud lands from another branch)."""
    return [package for root, package in names.LAMBDA_PACKAGES if not (repo_root / root / package).is_dir()]


def _copy_package(source: Path, out_dir: Path, package: str) -> None:
    """A package, or a subpackage with each parent's __init__.py only (qcsight_train/launch: not the rest)."""
    shutil.copytree(source, out_dir / package, ignore=_IGNORE)
    parts = package.split("/")
    for depth in range(1, len(parts)):
        init = Path(*parts[:depth], "__init__.py")
        shutil.copyfile(source.parents[len(parts) - depth - 1] / "__init__.py", out_dir / init)


def build_lambda_package(out_dir: Path, repo_root: Path = REPO_ROOT,
                         packages: Sequence[tuple[str, str]] = names.LAMBDA_PACKAGES,
                         data: Sequence[str] = names.LAMBDA_DATA,
                         requirements: Sequence[str] | None = None,
                         run: Runner = _run) -> Path:
    """Assemble the function package in out_dir (emptied first); returns out_dir.

    Packages absent from the tree are skipped (missing_packages() names them, and the stack warns).
    requirements: pip requirement specifiers; by default names.LAMBDA_REQUIREMENTS, pinned().
    """
    if requirements is None:
        requirements = pinned(names.LAMBDA_REQUIREMENTS)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for root, package in packages:
        source = repo_root / root / package
        if not source.is_dir():
            log.warning("%s is not in this tree; the functions cannot import it until it lands", package)
            continue
        _copy_package(source, out_dir, package)
    for relative in data:
        if not (repo_root / relative).is_file():
            raise PackagingError(f"{relative} (names.LAMBDA_DATA) is not in this tree")
        (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(repo_root / relative, out_dir / relative)
    if requirements:
        run(pip_command(out_dir, requirements))
        # Console scripts name this machine's interpreter; nothing on Lambda runs them.
        shutil.rmtree(out_dir / "bin", ignore_errors=True)
    found = [name for name in FORBIDDEN if (out_dir / name).exists()]
    if found:
        raise PackagingError(f"the Lambda package must not contain {', '.join(found)}; "
                             f"check names.LAMBDA_REQUIREMENTS ({', '.join(requirements) or 'empty'})")
    return out_dir


def docker_excludes(allowed: Sequence[str]) -> list[str]:
    """Docker-syntax exclude patterns that keep only the allowed paths of the repository."""
    for path in allowed:
        if path.startswith("/") or ".." in path.split("/"):
            raise ConfigError("build context path", path, "a path inside the repository")
    return ["**", *(f"!{path}" for path in allowed), *(f"!{path}/**" for path in allowed), "**/__pycache__"]
