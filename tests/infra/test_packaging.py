"""The Lambda package CDK deploys: this repository's packages, the platform's wheels, never torch."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from stacks import names, packaging

from qcsight_core.errors import ConfigError
from tests.infra.conftest import Assembly


def test_the_deployed_package_holds_the_repository_packages_and_no_torch(assembly: Assembly) -> None:
    package = assembly.asset_dir("compute", "files", "qcsight_core/messages.py")
    present = {path.name for path in package.iterdir()}
    expected = {package_name for root, package_name in names.LAMBDA_PACKAGES
                if (packaging.REPO_ROOT / root / package_name).is_dir()}
    assert expected <= present and "qcsight_core" in present
    assert not present & set(packaging.FORBIDDEN)
    assert not list(package.rglob("__pycache__")) and not list(package.rglob("*.pyc"))
    # What the handlers import from qcsight_core loads from the package alone, as on Lambda.
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); "
             "import qcsight_core.messages as m, qcsight_core.topics as t; "
             "assert m.__file__.startswith(sys.argv[1]), m.__file__; print(t.metrics_topic('a'))")
    result = subprocess.run([sys.executable, "-I", "-c", probe, str(package)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "qcsight/a/metrics", result.stderr


# What the Lambda Python runtime offers besides the standard library: boto3 and its dependencies.
LAMBDA_RUNTIME_MODULES = ("boto3", "botocore", "s3transfer", "jmespath", "dateutil", "urllib3", "six")
# Imports each handler with only the standard library, the runtime's boto3 and the package on the path:
# any other third-party import (PyYAML, numpy, ...) fails as it would on Lambda.
_PROBE = """
import importlib.abc, sys
package, module, function, allowed = sys.argv[1], sys.argv[2], sys.argv[3], set(sys.argv[4].split(","))
sys.path.insert(0, package)
import os
class OnlyTheLambdaRuntime(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names or top in allowed or os.path.exists(os.path.join(package, top)):
            return None
        raise ModuleNotFoundError(f"{name} is not in the Lambda runtime nor in the package", name=name)
sys.meta_path.insert(0, OnlyTheLambdaRuntime())
m = importlib.import_module(module)
assert callable(getattr(m, function)), function
assert m.__file__.startswith(package), m.__file__
"""
# The deploy function is written on another branch (w/loop, issue 13 item 5); until it merges its handler
# cannot be found, and this test says so rather than skipping.
_ELSEWHERE = {"qcsight_cloud.lambda_deploy": "written on branch w/loop (issue 13 item 5): fails until it merges"}


def test_every_handler_imports_inside_the_package_with_only_the_lambda_runtime(assembly: Assembly) -> None:
    package = assembly.asset_dir("compute", "files", "qcsight_core/messages.py")
    failures = []
    for spec in names.FUNCTIONS:
        module, _, function = spec.handler.rpartition(".")
        result = subprocess.run([sys.executable, "-I", "-c", _PROBE, str(package), module, function,
                                 ",".join(LAMBDA_RUNTIME_MODULES)], capture_output=True, text=True, timeout=60,
                                check=False)
        if result.returncode != 0:
            note = f" [{_ELSEWHERE[module]}]" if module in _ELSEWHERE else ""
            failures.append(f"{spec.handler}{note}: {result.stderr.strip().splitlines()[-1:]}")
    assert not failures, "\n".join(failures)


def _fake_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "edge_agent" / "qcsight_core" / "__pycache__").mkdir(parents=True)
    (repo / "edge_agent" / "qcsight_core" / "__init__.py").write_text("")
    (repo / "edge_agent" / "qcsight_core" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"")
    return repo


def test_requirements_are_installed_for_the_lambda_platform(tmp_path: Path) -> None:
    commands: list[Sequence[str]] = []
    out = packaging.build_lambda_package(tmp_path / "out", repo_root=_fake_repo(tmp_path),
                                         requirements=("pyyaml>=6",), run=commands.append)
    (command,) = commands
    assert command[command.index("--target") + 1] == str(out)
    assert command[command.index("--platform") + 1] == packaging.LAMBDA_PLATFORM
    assert command[command.index("--python-version") + 1] == names.LAMBDA_PYTHON
    assert "--only-binary=:all:" in command and command[-1] == "pyyaml>=6"
    assert (out / "qcsight_core" / "__init__.py").exists() and not (out / "qcsight_core" / "__pycache__").exists()
    assert packaging.missing_packages(tmp_path / "repo") == ["qcsight_cloud"]


def test_a_requirement_that_brings_torch_is_refused(tmp_path: Path) -> None:
    def pip_that_installs_torch(command: Sequence[str]) -> None:
        (Path(command[command.index("--target") + 1]) / "torch").mkdir()

    with pytest.raises(packaging.PackagingError, match="must not contain torch"):
        packaging.build_lambda_package(tmp_path / "out", repo_root=_fake_repo(tmp_path),
                                       requirements=("something-with-torch",), run=pip_that_installs_torch)


def test_docker_context_allow_list() -> None:
    excludes = packaging.docker_excludes(("pyproject.toml", "batch/qcsight_batch"))
    assert excludes[0] == "**" and "!batch/qcsight_batch/**" in excludes and "**/__pycache__" in excludes
    with pytest.raises(ConfigError, match="inside the repository"):
        packaging.docker_excludes(("../secrets",))
