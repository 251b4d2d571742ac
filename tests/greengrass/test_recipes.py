"""Recipe validation before publishing: the recipe format, then one bad recipe per rule, each named by field.

The good recipes are the templates in greengrass/recipes and the model component built from a
real tiny ONNX bundle; each bad one changes exactly one thing.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from qcsight_core.bundle import Bundle, load_bundle, pack_bundle
from qcsight_core.errors import BundleError
from qcsight_gg import build, recipes
from qcsight_gg.errors import BuildError, RecipeError
from qcsight_gg.recipes import ComponentRecipe, validate
from qcsight_gg.semver import Requirement, Version, VersionError
from tests.helpers.models import make_tiny_bundle

ROOT = Path(__file__).resolve().parents[2]
AGENT, MODEL = build.AGENT, build.MODEL


def template(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "greengrass" / "recipes" / f"{name}.yaml").read_text())
    return data


def problems_of(data: dict[str, Any], *others: dict[str, Any], layout: Path | None = None) -> list[str]:
    return validate([ComponentRecipe(data), *(ComponentRecipe(o) for o in others)], layout, build.CONFIG_CHECKS)


def test_the_templates_are_valid_for_both_nuclei() -> None:
    assert problems_of(template(AGENT), template(MODEL)) == []
    for data in (template(AGENT), template(MODEL)):
        runtimes = [m["Platform"].get("runtime") for m in data["Manifests"]]
        assert runtimes == ["*", None], "a manifest Lite reads beside the classic one"
        assert all(set(m["Lifecycle"]) <= set(recipes.PHASES) for m in data["Manifests"])


def test_the_agent_depends_on_the_token_exchange_service_and_offers_image_upload() -> None:
    """The s3 image upload takes its credentials from the TES, which only a dependency puts in the environment."""
    data = template(AGENT)
    tes = data["ComponentDependencies"]["aws.greengrass.TokenExchangeService"]
    assert tes["DependencyType"] == "HARD"
    assert Requirement.parse(tes["VersionRequirement"]).allows(Version.parse("2.1.0"))
    defaults = data["ComponentConfiguration"]["DefaultConfiguration"]
    assert defaults["image_upload"]["kind"] == "none"
    # Both manifests (Lite's and the classic one) share the recipe's dependencies and defaults; the
    # defaults pass the agent's own rules as each nucleus serves them (typed, and Lite's strings), and
    # so does the merge a deployment sends to turn the upload on.
    build.agent_config_check(defaults)
    merged = {**defaults, "image_upload": {**defaults["image_upload"], "kind": "s3", "bucket": "my-qcsight-images",
                                           "region": "eu-west-1"}}
    build.agent_config_check(merged)
    assert problems_of(data, template(MODEL)) == []


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        node: Any = data
        keys = [int(k) if k.isdigit() else k for k in path.split("/")]
        for key in keys[:-1]:
            node = node[key]
        if value is _DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return change


_DELETE = object()
_ACCESS = "ComponentConfiguration.DefaultConfiguration.accessControl.aws.greengrass.ipc.mqttproxy"
_POLICY = f"{_ACCESS}.com.qcsight.EdgeAgent:mqttproxy:1"


def _rename_run(data: dict[str, Any]) -> None:
    lifecycle = data["Manifests"][0]["Lifecycle"]
    lifecycle["Run"] = lifecycle.pop("run")


def _script(text: str) -> Callable[[dict[str, Any]], None]:
    return _set("Manifests/0/Lifecycle/run/Script", text)


def _resources(*resources: str) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data["ComponentConfiguration"]["DefaultConfiguration"]["accessControl"]["aws.greengrass.ipc.mqttproxy"][
            "com.qcsight.EdgeAgent:mqttproxy:1"]["resources"] = list(resources)
    return change


# (rule, change to the agent template, the field the problem must name, words the message must hold)
BAD_AGENT = [
    ("format: required key", _set("ComponentVersion", _DELETE), "(recipe)", "'ComponentVersion' is a required"),
    ("format: recipe version", _set("RecipeFormatVersion", "2021-01-01"), "RecipeFormatVersion", "2020-01-25"),
    ("format: unknown key", _set("ComponentDependancies", {}), "(recipe)", "'ComponentDependancies'"),
    ("format: semantic version", _set("ComponentVersion", "1.0"), "ComponentVersion", "does not match"),
    ("format: lifecycle key case", _rename_run, "Manifests[0].Lifecycle", "use 'run'"),
    ("format: dependency type", _set("ComponentDependencies/com.qcsight.Model/DependencyType", "STRONG"),
     "ComponentDependencies.com.qcsight.Model.DependencyType", "'HARD', 'SOFT'"),
    ("format: platform runtime", _set("Manifests/0/Platform/runtime", "lite"), "Manifests[0].Platform.runtime",
     "aws_nucleus_lite"),
    ("format: unarchive", _set("Manifests/0/Artifacts/0/Unarchive", "TAR"), "Manifests[0].Artifacts[0].Unarchive",
     "'NONE', 'ZIP'"),
    ("format: digest", _set("Manifests/0/Artifacts/0/Digest", "sha256:abc"), "Manifests[0].Artifacts[0].Digest",
     "does not match"),
    ("format: step keys", _set("Manifests/0/Lifecycle/install/script", "true"), "Manifests[0].Lifecycle.install",
     "neither a script"),
    ("Lite needs a runtime manifest", _set("Manifests/0/Platform/runtime", _DELETE), "Manifests",
     "nucleus lite skips"),
    ("the Java nucleus needs its manifest", lambda d: [m["Platform"].update(runtime="aws_nucleus_lite")
                                                       for m in d["Manifests"]], "Manifests", "Java nucleus"),
    ("a lifecycle phase", _set("Manifests/0/Lifecycle", {}), "Manifests[0].Lifecycle", "refuses a component"),
    ("placeholders: another component's variable",
     _script("exec x --model {com.qcsight.Model:artifacts:decompressedPath}/bundle"),
     "Manifests[0].Lifecycle.run.Script", "only the Java nucleus"),
    ("placeholders: stray brace", _script('exec "${HOME}/qcsight" agent'), "Manifests[0].Lifecycle.run.Script",
     "write $VAR"),
    ("placeholders: stray closing brace", _script("exec x; echo done }"), "Manifests[0].Lifecycle.run.Script",
     "a stray '}'"),
    ("placeholders: unknown variable", _script("exec x --thing-name {iot:thing}"),
     "Manifests[0].Lifecycle.run.Script", "{iot:thing} is not a recipe variable"),
    ("placeholders: configuration pointer", _script("exec x --fps {configuration:/source/fps}"),
     "Manifests[0].Lifecycle.run.Script", "'/source/fps'"),
    ("placeholders: none in configuration", _set("ComponentConfiguration/DefaultConfiguration/thing_name",
                                                 "{iot:thingName}"),
     "ComponentConfiguration.DefaultConfiguration.thing_name", "lifecycle script"),
    ("accessControl under the thing", _resources("qcsight/{iot:thingName}/alerts", "qcsight/#"),
     f"{_POLICY}.resources", "'qcsight/#' is outside"),
    ("accessControl under this thing only", _resources("qcsight/other-thing/alerts"),
     f"{_POLICY}.resources", "outside qcsight/{iot:thingName}/"),
    ("dependency range parses", _set("ComponentDependencies/com.qcsight.Model/VersionRequirement", ">=1.0.0 <two"),
     "ComponentDependencies.com.qcsight.Model.VersionRequirement", "not a version comparator"),
    ("dependency range satisfiable", _set("ComponentDependencies/com.qcsight.Model/VersionRequirement",
                                          ">=2.0.0 <1.0.0"),
     "ComponentDependencies.com.qcsight.Model.VersionRequirement", "can never be met"),
    ("dependency range meets the version published with it",
     _set("ComponentDependencies/com.qcsight.Model/VersionRequirement", ">=2.0.0 <3.0.0"),
     "ComponentDependencies.com.qcsight.Model.VersionRequirement", "excludes com.qcsight.Model 1.0.0"),
    ("archives end in .zip", _set("Manifests/0/Artifacts/0/URI", "s3://bucket/qcsight/wheelhouse.tgz"),
     "Manifests[0].Artifacts[0].URI", "does not end in .zip"),
    ("the agent's own rules", _set("ComponentConfiguration/DefaultConfiguration/source/max_fps", 5000),
     "ComponentConfiguration.DefaultConfiguration", "source.max_fps"),
]


@pytest.mark.parametrize("rule, change, field, words", BAD_AGENT, ids=[b[0] for b in BAD_AGENT])
def test_one_bad_recipe_per_rule(rule: str, change: Callable[[dict[str, Any]], None], field: str, words: str) -> None:
    data = copy.deepcopy(template(AGENT))
    change(data)
    problems = problems_of(data, template(MODEL))
    assert problems, f"{rule}: not caught"
    assert any(p.startswith(f"{AGENT}-") and f": {field}:" in p and words in p for p in problems), problems


def test_check_raises_with_every_problem() -> None:
    data = copy.deepcopy(template(AGENT))
    _rename_run(data)
    data["ComponentConfiguration"]["DefaultConfiguration"]["source"]["max_fps"] = 5000
    with pytest.raises(RecipeError) as info:
        recipes.check([ComponentRecipe(data)])
    assert len(info.value.problems) == 1  # the format comes first: semantic rules assume it
    fixed = copy.deepcopy(template(AGENT))
    fixed["ComponentConfiguration"]["DefaultConfiguration"]["source"]["max_fps"] = 5000
    fixed["Manifests"][1]["Lifecycle"] = {}
    with pytest.raises(RecipeError, match=r"2 recipe problem\(s\)"):
        recipes.check([ComponentRecipe(fixed)], config_checks=build.CONFIG_CHECKS)


# -------------------------------------------------------------------- the model component


def built_recipe(out: Path, version: str) -> tuple[dict[str, Any], Path]:
    path = out / "recipes" / f"{MODEL}-{version}.yaml"
    return yaml.safe_load(path.read_text()), out / "artifacts" / MODEL / version / build.BUNDLE_ZIP


def test_the_model_component_builds_validates_and_unpacks_to_the_bundle(tiny_bundle: Bundle, tmp_path: Path) -> None:
    out = tmp_path / "out"
    built = build.build_model(tiny_bundle.path, out, ROOT, "s3://bkt/qc/")
    data, archive = built_recipe(out, "1.0.0")  # the tiny bundle's manifest version is "1"
    assert built.recipe == out / "recipes" / f"{MODEL}-1.0.0.yaml"
    assert "tiny 1" in data["ComponentDescription"]
    assert problems_of(data, layout=out) == []
    (entry, script) = data["Manifests"][0]["Artifacts"]
    assert entry["URI"] == f"s3://bkt/qc/{MODEL}/1.0.0/bundle.zip" and entry["Unarchive"] == "ZIP"
    assert entry["Digest"] == base64.b64encode(hashlib.sha256(archive.read_bytes()).digest()).decode()
    assert script["URI"].endswith("/offer_model.sh") and "Unarchive" not in script
    # Unpack as the nucleus does (into a folder named after the archive) and load it as the agent does.
    unpacked = tmp_path / "artifacts-unarchived" / "bundle"
    with zipfile.ZipFile(archive) as zipped:
        assert sorted(zipped.namelist()) == sorted(["manifest.json", *tiny_bundle.manifest.files])
        zipped.extractall(unpacked)
    assert load_bundle(unpacked).manifest == tiny_bundle.manifest

    # A wrong digest, a missing file: caught against the layout.
    tampered = copy.deepcopy(data)
    tampered["Manifests"][0]["Artifacts"][0]["Digest"] = base64.b64encode(b"x" * 32).decode()
    assert any("Manifests[0].Artifacts[0].Digest" in p and "is not the SHA-256" in p
               for p in problems_of(tampered, layout=out))
    (out / "artifacts" / MODEL / "1.0.0" / build.OFFER_SCRIPT).unlink()
    assert any("Manifests[0].Artifacts[1].URI: no file" in p for p in problems_of(data, layout=out))
    missing = copy.deepcopy(data)
    del missing["Manifests"][1]["Artifacts"][0]["Digest"]
    assert any("Manifests[1].Artifacts[0].Digest: missing" in p for p in problems_of(missing, layout=out))


def test_the_model_build_is_reproducible_and_takes_a_tarball(tiny_bundle: Bundle, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tiny_bundle.path / "stray.txt").write_text("not in the manifest")  # must not be shipped
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    build.build_model(tiny_bundle.path, tmp_path / "a", ROOT)
    tarball = pack_bundle(make_tiny_bundle(tmp_path / "other").path, tmp_path / "model.tar.gz")
    build.build_model(tarball, tmp_path / "b", ROOT)
    first, archive = built_recipe(tmp_path / "a", "1.0.0")
    second, _ = built_recipe(tmp_path / "b", "1.0.0")
    assert first["Manifests"] == second["Manifests"], "the same bundle packs to the same bytes and Digests"
    with zipfile.ZipFile(archive) as zipped:
        assert "stray.txt" not in zipped.namelist()
        assert {i.date_time for i in zipped.infolist()} == {(2023, 11, 14, 22, 13, 20)}  # SOURCE_DATE_EPOCH


def test_the_model_build_refuses_a_tampered_bundle(tiny_bundle: Bundle, tmp_path: Path) -> None:
    model = tiny_bundle.model_path()
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(BundleError, match=r"model\.onnx"):
        build.build_model(tiny_bundle.path, tmp_path / "out", ROOT)
    assert not (tmp_path / "out" / "recipes").exists()


@pytest.mark.parametrize("bundle_version, expected", [("3", "3.0.0"), ("1.2", "1.2.0"), ("1.2.3", "1.2.3"),
                                                      ("2.0.0-rc.1", "2.0.0-rc.1"), ("007", "7.0.0")])
def test_component_version_from_the_bundle_version(bundle_version: str, expected: str) -> None:
    assert build.component_version(bundle_version) == expected


@pytest.mark.parametrize("bundle_version", ["run-20240101", "1.2.3.4", "v1", ""])
def test_a_bundle_version_that_is_not_semantic_needs_an_explicit_one(bundle_version: str) -> None:
    with pytest.raises(BuildError, match="pass --model-version"):
        build.component_version(bundle_version)


def test_build_cli_model_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qcsight_gg import cli

    bundle = make_tiny_bundle(tmp_path / "bundle", version="run-42")
    out = tmp_path / "out"
    assert cli.main(["build", "--bundle", str(bundle.path), "--out", str(out), "--no-agent"]) == 1
    assert "pass --model-version" in capsys.readouterr().err
    assert cli.main(["build", "--bundle", str(bundle.path), "--out", str(out), "--no-agent",
                     "--model-version", "2.1.0"]) == 0
    assert f"{MODEL}-2.1.0.yaml" in capsys.readouterr().out
    assert cli.main(["validate", str(out)]) == 0
    assert cli.main(["build", "--out", str(out), "--no-agent"]) == 2
    assert cli.main(["build", "--bundle", str(bundle.path), "--out", str(out), "--artifact-base", "/local"]) == 2
    assert "s3://" in capsys.readouterr().err


# -------------------------------------------------------------------- versions


def test_version_ranges_as_greengrass_writes_them() -> None:
    requirement = Requirement.parse(template(AGENT)["ComponentDependencies"][MODEL]["VersionRequirement"])
    assert requirement.allows("1.0.0") and requirement.allows("1.7.3")
    assert not requirement.allows("2.0.0") and not requirement.allows("0.9.0")
    assert Requirement.parse("^1.2.0").allows("1.9.9") and not Requirement.parse("^1.2.0").allows("2.0.0")
    assert Requirement.parse("~1.2.0").allows("1.2.9") and not Requirement.parse("~1.2.0").allows("1.3.0")
    assert Requirement.parse("1.x").allows("1.5.0") and Requirement.parse(">=1.0.0 <1.0.0 || 3.0.0").allows("3.0.0")
    assert not Requirement.parse(">=2.0.0 <1.0.0").satisfiable
    assert Version.parse("2.0.0-rc.1") < Version.parse("2.0.0") < Version.parse("2.0.1")
    with pytest.raises(VersionError):
        Requirement.parse(">= one")
