"""The Lambda package and the container build contexts, assembled from this repository's packages.

No container daemon is needed to build the Lambda package: the qcsight source packages are copied
and third-party requirements are installed with pip for the Lambda platform (manylinux wheels
only, so nothing compiles on this machine). torch can never enter it: the build refuses a package
that contains it.
"""

from __future__ import annotations

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
        "--python-version", python_version, "--only-binary=:all:", *requirements,
    ]


def missing_packages(repo_root: Path = REPO_ROOT) -> list[str]:
    """The Lambda packages not present in this tree (qcsight_cloud lands from another branch)."""
    return [package for root, package in names.LAMBDA_PACKAGES if not (repo_root / root / package).is_dir()]


def build_lambda_package(out_dir: Path, repo_root: Path = REPO_ROOT,
                         packages: Sequence[tuple[str, str]] = names.LAMBDA_PACKAGES,
                         requirements: Sequence[str] = names.LAMBDA_REQUIREMENTS,
                         run: Runner = _run) -> Path:
    """Assemble the function package in out_dir (emptied first); returns out_dir.

    Packages absent from the tree are skipped (missing_packages() names them, and the stack warns).
    """
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for root, package in packages:
        source = repo_root / root / package
        if not source.is_dir():
            log.warning("%s is not in this tree; the functions cannot import it until it lands", package)
            continue
        shutil.copytree(source, out_dir / package, ignore=_IGNORE)
    if requirements:
        run(pip_command(out_dir, requirements))
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
