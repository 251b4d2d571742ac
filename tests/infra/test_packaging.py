"""The Lambda package CDK deploys: what the handlers reach (our packages, their data files, the platform's wheels),
never torch; and each handler run from it with nothing else."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from stacks import names, packaging

from qcsight_core.errors import ConfigError
from tests.cloud.test_lambda_deploy import tarball
from tests.infra.conftest import Assembly


def test_the_deployed_package_holds_what_the_handlers_reach_and_no_torch(assembly: Assembly) -> None:
    package = assembly.asset_dir("compute", "files", "qcsight_core/messages.py")
    present = {path.name for path in package.iterdir()}
    expected = {path.partition("/")[0] for root, path in names.LAMBDA_PACKAGES}
    assert expected <= present and {"qcsight_core", "qcsight_gg", "qcsight_aws", "qcsight_train"} <= present
    assert not present & set(packaging.FORBIDDEN)
    assert not list(package.rglob("__pycache__")) and not list(package.rglob("*.pyc"))
    # Of qcsight_train only the launcher (torch-free) ships, and the data files sit where the repository has them.
    assert {path.name for path in (package / "qcsight_train").iterdir()} == {"__init__.py", "launch"}
    for relative in names.LAMBDA_DATA:
        assert (package / relative).read_bytes() == (packaging.REPO_ROOT / relative).read_bytes(), relative
    assert not (package / "bin").exists()
    # Third-party: exactly the requirements, pinned to what is installed here, built for the Lambda platform.
    assert {_metadata(path) for path in package.glob("*.dist-info")} == {
        (_normal(name), importlib.metadata.version(name)) for name in names.LAMBDA_REQUIREMENTS}
    compiled = [path.name for path in package.rglob("*.so")]
    assert compiled and all("aarch64" in name and ("cpython-314" in name or "abi3" in name) for name in compiled), \
        compiled
    assert _third_party_tops(package) == _installed_tops(names.LAMBDA_REQUIREMENTS)
    size = sum(path.stat().st_size for path in package.rglob("*") if path.is_file())
    assert size < 12e6, f"the function package is {size / 1e6:.1f} MB"  # measured 5.9 MB (1.6 MB zipped)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _metadata(dist_info: Path) -> tuple[str, str]:
    fields = dict(line.split(": ", 1) for line in (dist_info / "METADATA").read_text().splitlines()[:5] if ": " in line)
    return _normal(fields["Name"]), fields["Version"]


# What the Lambda Python runtime offers besides the standard library: boto3 and its dependencies.
LAMBDA_RUNTIME_MODULES = ("boto3", "botocore", "s3transfer", "jmespath", "dateutil", "urllib3", "six")
PROBE = Path(__file__).with_name("lambda_probe.py")


def _installed_tops(distributions: Sequence[str]) -> set[str]:
    """The top-level modules the installed distributions provide."""
    tops = set()
    for name in distributions:
        for file in importlib.metadata.distribution(name).files or ():
            top = file.parts[0]
            if not top.endswith((".dist-info", ".data")) and top not in ("..", "bin", "__pycache__"):
                tops.add(top.removesuffix(".py"))
    return tops


def _third_party_tops(package: Path) -> set[str]:
    ours = {path.partition("/")[0] for root, path in names.LAMBDA_PACKAGES}
    data = {relative.partition("/")[0] for relative in names.LAMBDA_DATA}
    return {path.name.removesuffix(".py") for path in package.iterdir()
            if path.name not in ours | data and not path.name.endswith(".dist-info")}


def _link(modules: Sequence[str], folder: Path) -> Path:
    """A folder of links to the installed top-level modules, as the only place they can be imported from."""
    folder.mkdir()
    for name in modules:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        locations = spec.submodule_search_locations
        source = Path(locations[0]) if locations else Path(spec.origin)
        (folder / source.name).symlink_to(source)
    return folder


def test_every_handler_runs_from_the_package_with_only_the_lambda_runtime(assembly: Assembly, tmp_path: Path) -> None:
    """Each handler's imports, lazy ones included, and the deploy function's approval and rollback, run from the
    synthesized package in an interpreter that has nothing else but the standard library and boto3.

    The package's compiled third-party modules (rpds, PyYAML's accelerator) are built for the Lambda's arm64
    CPython and cannot load here: the probe imports the same pinned distributions from this machine's
    installation instead (the test above holds the package to the same versions and modules).
    """
    package = assembly.asset_dir("compute", "files", "qcsight_core/messages.py")
    host = [*names.LAMBDA_REQUIREMENTS, *(("typing-extensions",) if sys.version_info < (3, 13) else ())]
    third_party = _link(sorted(_installed_tops(host)), tmp_path / "third_party")
    runtime = _link(LAMBDA_RUNTIME_MODULES, tmp_path / "runtime")
    work = tmp_path / "work"
    work.mkdir()
    (work / "model.tar.gz").write_bytes(tarball(tmp_path, "1.8.1"))  # with a TorchScript artefact: Neo is asked
    # -B: the probe writes no bytecode into the assembly (the test above holds it to none).
    command = [sys.executable, "-I", "-S", "-B", str(PROBE), str(package), str(third_party), str(runtime), str(work)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["outside"] == [] and report["stray"] == []
    assert {"qcsight_gg.build", "qcsight_gg.publish", "qcsight_gg.deploy", "qcsight_aws.s3",
            "qcsight_train.launch.neo", "qcsight_cloud.dynamodb_store"} <= set(report["modules"])
    approval, tick = report["approval"], report["tick"]
    assert approval["phase"] == "canary" and approval["componentVersion"] == "1.3.0"
    assert approval["neo"]["requested"] is True and len(approval["componentArns"]) == 1
    assert tick["phase"] == "rollback" and tick["deploymentId"] == "d-1.2.0"


def _fake_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "edge_agent" / "qcsight_core" / "__pycache__").mkdir(parents=True)
    (repo / "edge_agent" / "qcsight_core" / "__init__.py").write_text("")
    (repo / "edge_agent" / "qcsight_core" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"")
    (repo / "training" / "qcsight_train" / "launch").mkdir(parents=True)
    for name in ("__init__.py", "models.py", "launch/__init__.py", "launch/neo.py"):
        (repo / "training" / "qcsight_train" / name).write_text(f"# {name}\n")
    (repo / "greengrass" / "recipes").mkdir(parents=True)
    (repo / "greengrass" / "recipes" / "m.yaml").write_text("RecipeFormatVersion: '2020-01-25'\n")
    return repo


def test_requirements_are_installed_for_the_lambda_platform_with_the_packages_and_data(tmp_path: Path) -> None:
    commands: list[Sequence[str]] = []

    def pip(command: Sequence[str]) -> None:
        commands.append(command)
        (Path(command[command.index("--target") + 1]) / "bin").mkdir()  # console scripts, as pip writes them

    out = packaging.build_lambda_package(
        tmp_path / "out", repo_root=_fake_repo(tmp_path),
        packages=(("edge_agent", "qcsight_core"), ("training", "qcsight_train/launch")),
        data=("greengrass/recipes/m.yaml",), requirements=("pyyaml==6.0.4",), run=pip)
    (command,) = commands
    assert command[command.index("--target") + 1] == str(out)
    assert command[command.index("--platform") + 1] == packaging.LAMBDA_PLATFORM
    assert command[command.index("--python-version") + 1] == names.LAMBDA_PYTHON
    assert {"--only-binary=:all:", "--no-deps"} <= set(command) and command[-1] == "pyyaml==6.0.4"
    assert (out / "qcsight_core" / "__init__.py").exists() and not (out / "qcsight_core" / "__pycache__").exists()
    # A subpackage ships with its parents' __init__ only; a data file at its repository path; no bin/.
    assert sorted(str(p.relative_to(out / "qcsight_train")) for p in (out / "qcsight_train").rglob("*")) == [
        "__init__.py", "launch", "launch/__init__.py", "launch/neo.py"]
    assert (out / "greengrass" / "recipes" / "m.yaml").read_text().startswith("RecipeFormatVersion")
    assert not (out / "bin").exists()
    assert packaging.missing_packages(tmp_path / "repo") == [
        path for root, path in names.LAMBDA_PACKAGES if path not in ("qcsight_core", "qcsight_train/launch")]
    with pytest.raises(packaging.PackagingError, match=r"names\.LAMBDA_DATA"):
        packaging.build_lambda_package(tmp_path / "out", repo_root=tmp_path / "repo", packages=(),
                                       data=("greengrass/scripts/absent.sh",), requirements=())


def test_requirements_are_pinned_to_what_is_installed_here() -> None:
    assert packaging.pinned(["PyYAML"]) == [f"PyYAML=={importlib.metadata.version('PyYAML')}"]
    with pytest.raises(packaging.PackagingError, match="not installed where the app is synthesized"):
        packaging.pinned(["qcsight-no-such-distribution"])


def test_a_requirement_that_brings_torch_is_refused(tmp_path: Path) -> None:
    def pip_that_installs_torch(command: Sequence[str]) -> None:
        (Path(command[command.index("--target") + 1]) / "torch").mkdir()

    with pytest.raises(packaging.PackagingError, match="must not contain torch"):
        packaging.build_lambda_package(tmp_path / "out", repo_root=_fake_repo(tmp_path), data=(),
                                       requirements=("something-with-torch",), run=pip_that_installs_torch)


def test_docker_context_allow_list() -> None:
    excludes = packaging.docker_excludes(("pyproject.toml", "batch/qcsight_batch"))
    assert excludes[0] == "**" and "!batch/qcsight_batch/**" in excludes and "**/__pycache__" in excludes
    with pytest.raises(ConfigError, match="inside the repository"):
        packaging.docker_excludes(("../secrets",))
