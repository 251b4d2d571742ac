"""The Greengrass component recipes and the model-component build, checked without AWS.

The recipes are checked for what the nucleus and the agent rely on: the recipe format, an
mqttproxy policy scoped to this device's own topics, the model as a separate component behind a
version range, and a default configuration the agent's own validator accepts. The build script
is run on a real tiny ONNX bundle and its artifact is unpacked the way the nucleus unpacks it and
verified with the same loader the agent uses.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import logging
import re
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from qcsight_core import topics
from qcsight_core.bundle import Bundle, load_bundle, pack_bundle
from qcsight_core.errors import ConfigError
from tests.helpers.models import make_tiny_bundle

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "greengrass" / "recipes"
AGENT, MODEL = "com.qcsight.EdgeAgent", "com.qcsight.Model"
THING = "line-7-camera-2"


def _load_build_script() -> ModuleType:
    path = ROOT / "greengrass" / "build_component.py"
    spec = importlib.util.spec_from_file_location("qcsight_greengrass_build", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build_component = _load_build_script()


def recipe(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((RECIPES / f"{name}.yaml").read_text(encoding="utf-8"))
    return data


def resolve(value: Any, variables: dict[str, str]) -> Any:
    """Interpolate recipe variables the way the nucleus does for component configuration."""
    if isinstance(value, dict):
        return {k: resolve(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, variables) for v in value]
    if isinstance(value, str):
        for name, replacement in variables.items():
            value = value.replace("{" + name + "}", replacement)
    return value


@pytest.mark.parametrize("name", [AGENT, MODEL])
def test_recipe_structure(name: str) -> None:
    data = recipe(name)
    assert data["RecipeFormatVersion"] == "2020-01-25"
    assert data["ComponentName"] == name
    assert re.fullmatch(r"\d+\.\d+\.\d+", data["ComponentVersion"])
    assert data["ComponentDescription"] and data["ComponentPublisher"] == "qcsight"
    assert data["Manifests"] and all("Platform" in m and "Lifecycle" in m for m in data["Manifests"])


def test_agent_may_publish_only_its_own_message_topics() -> None:
    access = recipe(AGENT)["ComponentConfiguration"]["DefaultConfiguration"]["accessControl"]
    assert set(access) == {"aws.greengrass.ipc.mqttproxy"}
    policies = access["aws.greengrass.ipc.mqttproxy"]
    assert all(p["operations"] == ["aws.greengrass#PublishToIoTCore"] for p in policies.values())
    resources = [r for p in policies.values() for r in p["resources"]]
    assert all(r.startswith("qcsight/{iot:thingName}/") and not re.search(r"[*+#]", r) for r in resources)
    resolved = {r.replace("{iot:thingName}", THING) for r in resources}
    assert resolved == {topics.topic(THING, kind) for kind in topics.KINDS}
    assert topics.line_signal_topic(THING) not in resolved


def test_agent_depends_on_the_model_component_by_version_range() -> None:
    dependency = recipe(AGENT)["ComponentDependencies"][MODEL]
    requirement = dependency["VersionRequirement"]
    assert re.fullmatch(r">=\d+\.\d+\.\d+ <\d+\.\d+\.\d+", requirement), "a range with both bounds"
    assert dependency["DependencyType"] == "HARD"
    assert build_component.satisfies(recipe(MODEL)["ComponentVersion"], requirement)
    assert build_component.satisfies("1.7.3", requirement)
    assert not build_component.satisfies("2.0.0", requirement)
    assert not build_component.satisfies("0.9.0", requirement)


def test_agent_installs_and_runs_this_release_of_qcsight() -> None:
    data = recipe(AGENT)
    match = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.MULTILINE)
    assert match is not None
    version = match.group(1)
    assert data["ComponentVersion"] == version
    (manifest,) = data["Manifests"]
    assert manifest["Platform"]["os"] == "linux"
    install, run = manifest["Lifecycle"]["Install"]["Script"], manifest["Lifecycle"]["Run"]["Script"]
    assert "python3 -m venv {work:path}/venv" in install
    assert f'"qcsight[edge]=={version}"' in install
    assert run == "{work:path}/venv/bin/qcsight agent --greengrass"


def test_agent_default_configuration_is_one_the_agent_accepts() -> None:
    config = pytest.importorskip("qcsight_edge.config")
    from qcsight_edge.greengrass_ipc import agent_settings

    defaults = recipe(AGENT)["ComponentConfiguration"]["DefaultConfiguration"]
    resolved = resolve(defaults, {"iot:thingName": THING, "work:path": "/greengrass/v2/work/com.qcsight.EdgeAgent",
                                  f"{MODEL}:artifacts:decompressedPath":
                                      "/greengrass/v2/packages/artifacts-unarchived/com.qcsight.Model/1.0.0"})
    agent = config.AgentConfig.from_dict(agent_settings(resolved))
    assert agent.thing_name == THING
    assert agent.transport.kind == "ipc"
    # The bundle path is where the nucleus unpacks the model component's ZIP: a folder named after it.
    artifact = Path(recipe(MODEL)["Manifests"][0]["Artifacts"][0]["URI"].rsplit("/", 1)[1])
    assert agent.model.bundle == Path("/greengrass/v2/packages/artifacts-unarchived/com.qcsight.Model/1.0.0") / \
        artifact.stem
    # Unresolved variables must fail closed, naming the field.
    with pytest.raises(ConfigError, match="thing_name"):
        config.AgentConfig.from_dict(agent_settings(defaults))


def test_model_component_ships_the_bundle_as_a_zip_the_nucleus_unpacks() -> None:
    (manifest,) = recipe(MODEL)["Manifests"]
    (artifact,) = manifest["Artifacts"]
    assert artifact["URI"].startswith("s3://") and artifact["URI"].endswith(f"/{MODEL}/1.0.0/bundle.zip")
    assert artifact["Unarchive"] == "ZIP"
    assert manifest["Lifecycle"] == {}


@pytest.mark.parametrize("bundle_version, expected", [("3", "3.0.0"), ("1.2", "1.2.0"), ("1.2.3", "1.2.3"),
                                                      ("2.0.0-rc.1", "2.0.0-rc.1"), ("007", "7.0.0")])
def test_component_version_from_the_bundle_version(bundle_version: str, expected: str) -> None:
    assert build_component.component_version(bundle_version) == expected


@pytest.mark.parametrize("bundle_version", ["run-20240101", "1.2.3.4", "v1", ""])
def test_a_bundle_version_that_is_not_semantic_needs_an_explicit_component_version(bundle_version: str) -> None:
    with pytest.raises(build_component.BuildError, match="pass --component-version"):
        build_component.component_version(bundle_version)


def built(out: Path, version: str) -> tuple[dict[str, Any], Path]:
    recipe_path = out / "recipes" / f"{MODEL}-{version}.yaml"
    artifact = out / "artifacts" / MODEL / version / "bundle.zip"
    assert recipe_path.is_file() and artifact.is_file()
    return yaml.safe_load(recipe_path.read_text(encoding="utf-8")), artifact


def test_build_writes_a_versioned_recipe_and_an_artifact_that_verifies(tiny_bundle: Bundle, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert build_component.main([str(tiny_bundle.path), "--out", str(out), "--artifact-base", "s3://bkt/qc/"]) == 0
    data, artifact = built(out, "1.0.0")  # the tiny bundle's manifest version is "1"
    assert data["RecipeFormatVersion"] == "2020-01-25" and data["ComponentName"] == MODEL
    assert data["ComponentVersion"] == "1.0.0"
    assert "tiny 1" in data["ComponentDescription"]
    (entry,) = data["Manifests"][0]["Artifacts"]
    assert entry["URI"] == f"s3://bkt/qc/{MODEL}/1.0.0/bundle.zip"
    assert entry["Unarchive"] == "ZIP" and entry["Algorithm"] == "SHA-256"
    assert entry["Digest"] == base64.b64encode(hashlib.sha256(artifact.read_bytes()).digest()).decode()

    # Unpack as the nucleus does (into a folder named after the archive) and load it as the agent does.
    unpacked = tmp_path / "artifacts-unarchived" / "bundle"
    with zipfile.ZipFile(artifact) as archive:
        assert sorted(archive.namelist()) == sorted(["manifest.json", *tiny_bundle.manifest.files])
        archive.extractall(unpacked)
    loaded = load_bundle(unpacked)
    assert loaded.manifest == tiny_bundle.manifest
    assert loaded.model_path().read_bytes() == tiny_bundle.model_path().read_bytes()


def test_build_is_reproducible_and_takes_a_tarball(tiny_bundle: Bundle, tmp_path: Path) -> None:
    (tiny_bundle.path / "stray.txt").write_text("not in the manifest")  # must not be shipped
    first = build_component.build(tiny_bundle.path, tmp_path / "a", "s3://bkt/qc")
    tarball = pack_bundle(make_tiny_bundle(tmp_path / "other").path, tmp_path / "model.tar.gz")
    second = build_component.build(tarball, tmp_path / "b", "s3://bkt/qc")
    digest = lambda path: yaml.safe_load(path.read_text())["Manifests"][0]["Artifacts"][0]["Digest"]  # noqa: E731
    assert digest(first) == digest(second), "the same bundle must pack to the same bytes"
    with zipfile.ZipFile(tmp_path / "a" / "artifacts" / MODEL / "1.0.0" / "bundle.zip") as archive:
        assert "stray.txt" not in archive.namelist()


def test_build_refuses_a_tampered_bundle(tiny_bundle: Bundle, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_bundle.model_path()
    model.write_bytes(model.read_bytes() + b"\0")
    with caplog.at_level(logging.ERROR):
        assert build_component.main([str(tiny_bundle.path), "--out", str(tmp_path / "out")]) == 1
    assert "model.onnx" in caplog.text and "sha256" in caplog.text
    assert not (tmp_path / "out").exists()


def test_build_version_override_and_range_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bundle = make_tiny_bundle(tmp_path / "bundle", version="run-42")
    with caplog.at_level(logging.ERROR):
        assert build_component.main([str(bundle.path), "--out", str(tmp_path / "out")]) == 1
    assert "pass --component-version" in caplog.text
    with caplog.at_level(logging.WARNING):
        assert build_component.main([str(bundle.path), "--out", str(tmp_path / "out"),
                                     "--component-version", "2.1.0"]) == 0
    data, _ = built(tmp_path / "out", "2.1.0")
    assert data["ComponentVersion"] == "2.1.0"
    assert "outside com.qcsight.EdgeAgent's dependency range" in caplog.text


def test_build_usage_errors(tiny_bundle: Bundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert build_component.main([str(tiny_bundle.path), "--out", str(tmp_path), "--artifact-base", "/local"]) == 2
    assert "s3://" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        build_component.main(["--help"])
    assert info.value.code == 0
    assert "bundle" in capsys.readouterr().out
