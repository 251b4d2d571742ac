"""The agent component: a wheelhouse locked by hash, installed offline into a fresh venv, built reproducibly."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

from qcsight_gg.archive import artifact_digest
from qcsight_gg.build import AGENT, Built, DeviceTarget, build_agent, check_layout, find_source
from qcsight_gg.errors import BuildError
from tests.greengrass.conftest import NO_NETWORK

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def lock_entries(wheelhouse: Path) -> dict[str, str]:
    """name==version -> sha256 from requirements.lock."""
    text = (wheelhouse / "requirements.lock").read_text().replace("\\\n", " ")
    entries = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            pin, _, digest = line.partition("--hash=sha256:")
            entries[pin.strip()] = digest.strip()
    return entries


def test_the_wheelhouse_pins_every_wheel_by_hash_and_the_recipe_by_digest(
        agent_build: tuple[Path, Built], wheelhouse: Path) -> None:
    out, built = agent_build
    check_layout(out)  # the recipe validates against its artifact (Digest included)
    recipe = yaml.safe_load(built.recipe.read_text())
    (artifact,) = {a["URI"]: a for m in recipe["Manifests"] for a in m["Artifacts"]}.values()
    assert artifact["Digest"] == artifact_digest(built.artifacts[0])
    assert all(m["Platform"]["architecture"] == DeviceTarget.this_machine().architecture for m in recipe["Manifests"])
    # pip, the installer, runs from its own wheel, checked against installer.sha256, and is not installed.
    (installer,) = wheelhouse.glob("pip-*.whl")
    digest, name = (wheelhouse / "installer.sha256").read_text().split()
    assert name == installer.name and digest == hashlib.sha256(installer.read_bytes()).hexdigest()
    wheels = sorted(w for w in wheelhouse.glob("*.whl") if w != installer)
    entries = lock_entries(wheelhouse)
    assert len(entries) == len(wheels)
    for wheel in wheels:
        name, version = wheel.name.split("-")[:2]
        pin = f"{name.replace('_', '-').lower()}=={version}"
        assert entries[pin] == hashlib.sha256(wheel.read_bytes()).hexdigest(), wheel.name
    names = {pin.split("==")[0] for pin in entries}
    assert {"qcsight", "awsiotsdk", "awscrt", "onnxruntime", "numpy", "opencv-python-headless", "pyyaml"} <= names
    assert not names & {"torch", "torchvision", "boto3", "sagemaker"}, "the device never gets torch or boto3"
    assert (wheelhouse / "python-version").read_text().strip() == DeviceTarget.this_machine().python_version


def test_the_wheelhouse_installs_offline_into_a_fresh_venv_and_runs_the_agent(
        installed_agent: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    venv, install = installed_agent
    assert install.returncode == 0, install.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    agent = subprocess.run([str(venv / "bin" / "qcsight"), "agent", "--help"], capture_output=True, text=True,
                           env={**env, **NO_NETWORK}, timeout=120, check=False)
    assert agent.returncode == 0, agent.stderr
    assert "--greengrass" in agent.stdout and "--model-slot" in agent.stdout
    # It runs the installed package, not this source tree, and nothing heavy came along.
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import qcsight_edge, importlib.util as u; "
                            "print(qcsight_edge.__file__, u.find_spec('torch'), u.find_spec('boto3'))"],
                           capture_output=True, text=True, env=env, timeout=120, check=False)
    assert where.stdout.startswith(str(venv)) and where.stdout.split()[1:] == ["None", "None"], where


def _tiny_wheel(folder: Path, name: str = "tinypkg", version: str = "1.0") -> Path:
    """A one-module wheel, written by hand (a real wheelhouse's are too big to tamper with quickly)."""
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": b"VALUE = 1\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        archive.writestr(f"{info}/RECORD", record)
    return wheel


def _lock(artifact: Path) -> str:
    with zipfile.ZipFile(artifact) as archive:
        return archive.read("requirements.lock").decode()


def test_install_refuses_a_wheel_that_does_not_match_the_lock(wheelhouse: Path, tmp_path: Path) -> None:
    house = tmp_path / "wheelhouse"
    house.mkdir()
    for name in ("install.sh", "python-version", "installer.sha256", *(p.name for p in wheelhouse.glob("pip-*.whl"))):
        shutil.copy(wheelhouse / name, house / name)
    wheel = _tiny_wheel(house)
    (house / "requirements.lock").write_text(
        f"tinypkg==1.0 \\\n    --hash=sha256:{hashlib.sha256(wheel.read_bytes()).hexdigest()}\n")
    wheel.write_bytes(wheel.read_bytes() + b"\0")  # changed after it was locked
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(["sh", str(house / "install.sh"), str(tmp_path / "venv")], capture_output=True,
                            text=True, env={**env, **NO_NETWORK}, timeout=600, check=False)
    assert result.returncode != 0
    assert "DO NOT MATCH THE HASHES" in result.stderr.upper(), result.stderr
    assert not (tmp_path / "venv" / ".qcsight-wheelhouse.sha256").exists()


def test_the_agent_build_is_reproducible(agent_build: tuple[Path, Built], wheelhouse: Path, tmp_path: Path) -> None:
    """Same source (fresh file times), same wheels -> the same wheelhouse bytes and recipe Digest."""
    _, first = agent_build
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "runs", "demo_out")
    shutil.copytree(find_source(REPO), source, ignore=ignore, copy_function=shutil.copy)  # new mtimes
    again = build_agent(source, tmp_path / "out", "s3://qcsight-test-bucket/qcsight", wheels=wheelhouse)
    assert _lock(again.artifacts[0]) == _lock(first.artifacts[0])  # the same wheels, named if not
    assert artifact_digest(again.artifacts[0]) == artifact_digest(first.artifacts[0])
    assert again.recipe.read_text() == first.recipe.read_text()


def test_a_build_from_a_wheels_folder_takes_nothing_from_the_machines_pip_configuration(
        agent_build: tuple[Path, Built], wheelhouse: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pip adds pip.conf's and PIP_FIND_LINKS's folders to --find-links; a newer wheel there must not get in."""
    _, first = agent_build
    by_variable, by_config = tmp_path / "by-variable", tmp_path / "by-config"
    by_variable.mkdir()
    by_config.mkdir()
    _tiny_wheel(by_variable, "cryptography", "999.0")  # both satisfy the edge extra (cryptography>=42,
    _tiny_wheel(by_config, "awsiotsdk", "999.0")       # awsiotsdk>=1.22) and outrank the wheelhouse's
    config = tmp_path / "pip.conf"
    config.write_text(f"[global]\nfind-links = {by_config}\n")
    monkeypatch.setenv("PIP_FIND_LINKS", str(by_variable))
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    again = build_agent(find_source(REPO), tmp_path / "out", "s3://qcsight-test-bucket/qcsight", wheels=wheelhouse)
    lock = _lock(again.artifacts[0])
    assert "999.0" not in lock
    assert lock == _lock(first.artifacts[0])


def test_a_device_target_names_one_architecture() -> None:
    assert DeviceTarget("3.11", ("manylinux_2_28_aarch64", "manylinux2014_aarch64")).architecture == "aarch64"
    with pytest.raises(BuildError, match="must name one of"):
        _ = DeviceTarget("3.11", ("manylinux_2_28_x86_64", "manylinux2014_aarch64")).architecture
    assert AGENT == "com.qcsight.EdgeAgent"
