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


def test_handlers_resolve_inside_the_package_once_qcsight_cloud_is_there(assembly: Assembly) -> None:
    package = assembly.asset_dir("compute", "files", "qcsight_core/messages.py")
    if not (package / "qcsight_cloud").is_dir():
        pytest.skip("qcsight_cloud is not in this tree yet; its handlers are named in stacks/names.py")
    for spec in names.FUNCTIONS:
        module, _, function = spec.handler.rpartition(".")
        probe = (f"import sys; sys.path.insert(0, sys.argv[1]); import {module} as m; "
                 f"assert callable(m.{function}); assert m.__file__.startswith(sys.argv[1])")
        result = subprocess.run([sys.executable, "-I", "-c", probe, str(package)], capture_output=True, text=True,
                                timeout=60, check=False)
        assert result.returncode == 0, f"{spec.handler}: {result.stderr[-1500:]}"


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
