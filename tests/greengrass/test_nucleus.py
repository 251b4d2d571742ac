"""The local nucleus's rules, on small shell components: manifests, variables, deferral, validation, rollback.

Each flavour is held to what the nucleus it stands for does (the sources are cited in
qcsight_gg/nucleus.py): a recipe that loads on the Java nucleus can be refused by Greengrass
nucleus lite, and the other way round.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from qcsight_edge.greengrass_ipc import SOCKET_ENV, TOKEN_ENV, ComponentUpdates, GreengrassConfig, connect_ipc
from qcsight_gg.errors import NucleusError
from qcsight_gg.ipc_server import CLASSIC, LITE
from qcsight_gg.nucleus import LocalDeployment, LocalNucleus, NucleusConfig, select_manifest
from tests.helpers.wait import eventually

NAME = "com.example.Probe"


def recipe(version: str, lifecycle: dict[str, Any], runtime: str | None = "*", config: dict[str, Any] | None = None,
           dependencies: dict[str, Any] | None = None, name: str = NAME) -> dict[str, Any]:
    platform = {"os": "linux", **({"runtime": runtime} if runtime else {})}
    data: dict[str, Any] = {"RecipeFormatVersion": "2020-01-25", "ComponentName": name, "ComponentVersion": version,
                            "Manifests": [{"Platform": platform, "Lifecycle": lifecycle}]}
    if config is not None:
        data["ComponentConfiguration"] = {"DefaultConfiguration": config}
    if dependencies:
        data["ComponentDependencies"] = dependencies
    return data


def store(tmp_path: Path, *recipes: dict[str, Any]) -> Path:
    layout = tmp_path / "layout"
    (layout / "recipes").mkdir(parents=True, exist_ok=True)
    for data in recipes:
        path = layout / "recipes" / f"{data['ComponentName']}-{data['ComponentVersion']}.yaml"
        path.write_text(yaml.safe_dump(data))
    return layout


@pytest.fixture
def nucleus_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[LocalNucleus] = []

    def make(layout: Path, flavor: str = CLASSIC) -> LocalNucleus:
        nucleus = LocalNucleus(NucleusConfig(root=tmp_path / f"root-{flavor}", store=layout, thing_name="probe-thing",
                                             flavor=flavor, settle_s=0.3, restart_delay_s=0.05,
                                             stop_timeout_s=5.0)).start()
        started.append(nucleus)
        return nucleus

    yield make
    for nucleus in started:
        nucleus.stop()


def test_each_flavour_takes_the_manifest_its_nucleus_takes() -> None:
    classic_only = recipe("1.0.0", {"run": "true"}, runtime=None)
    with pytest.raises(NucleusError, match=r"no Platform\.runtime"):
        select_manifest(classic_only, LITE)
    assert select_manifest(classic_only, CLASSIC)[1] == {"run": "true"}
    capitalised = recipe("1.0.0", {"Run": "true", "Install": "true"})
    assert select_manifest(capitalised, CLASSIC)[1] == {"run": "true", "install": "true"}  # case-insensitive
    with pytest.raises(NucleusError, match=r"no lifecycle phase Greengrass nucleus lite reads.*'Run'"):
        select_manifest(capitalised, LITE)
    with pytest.raises(NucleusError, match="no lifecycle phase"):
        select_manifest(recipe("1.0.0", {}), LITE)


@pytest.mark.parametrize("flavor, work_suffix", [(CLASSIC, ""), (LITE, "/")])
def test_scripts_get_the_nucleus_environment_and_variables(tmp_path: Path, nucleus_factory: Any, flavor: str,
                                                           work_suffix: str) -> None:
    script = ("printf '%s\\n' \"{work:path}|{artifacts:decompressedPath}|{iot:thingName}|{kernel:rootPath}|"
              "{configuration:/greeting}|$SVCUID|$AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT|"
              "$AWS_IOT_THING_NAME|$PROBE\" > out.txt")
    layout = store(tmp_path, recipe("1.0.0", {"Setenv": {"PROBE": "{iot:thingName}-probe"}, "startup": script},
                                    config={"greeting": "hello"}))
    nucleus = nucleus_factory(layout, flavor)
    assert nucleus.deploy(LocalDeployment({NAME: "1.0.0"})).wait(30).succeeded
    root = nucleus.root
    fields = (root / "work" / NAME / "out.txt").read_text().strip().split("|")
    assert fields == [f"{root}/work/{NAME}{work_suffix}",
                      f"{root}/packages/artifacts-unarchived/{NAME}/1.0.0{work_suffix}", "probe-thing", str(root),
                      "hello", nucleus.svcuid(NAME), nucleus.socket_path, "probe-thing", "probe-thing-probe"]


def test_lite_fails_a_script_with_another_components_variable_the_java_nucleus_resolves(
        tmp_path: Path, nucleus_factory: Any) -> None:
    base = recipe("1.0.0", {"startup": "true"}, name="com.example.Base")
    user = recipe("1.0.0", {"startup": "echo {com.example.Base:artifacts:path} > where.txt"},
                  dependencies={"com.example.Base": {"VersionRequirement": ">=1.0.0 <2.0.0"}})
    layout = store(tmp_path, base, user)
    classic = nucleus_factory(layout, CLASSIC)
    assert classic.deploy(LocalDeployment({NAME: "1.0.0"})).wait(30).succeeded  # the dependency came along
    assert (classic.root / "work" / NAME / "where.txt").read_text().strip().endswith("/com.example.Base/1.0.0")
    lite = nucleus_factory(layout, LITE)
    result = lite.deploy(LocalDeployment({NAME: "1.0.0"})).wait(30)
    assert result.status == "FAILED" and "unhandled variable substitution" in result.failure_cause


def test_lite_serves_yaml_scalars_as_text_and_skips_validation(tmp_path: Path, nucleus_factory: Any) -> None:
    layout = store(tmp_path, recipe("1.0.0", {"run": "exec sleep 600"}, config={"fps": 2, "on": True}))
    for flavor, expected in ((CLASSIC, {"fps": 2, "on": True}), (LITE, {"fps": "2", "on": "true"})):
        nucleus = nucleus_factory(layout, flavor)
        assert nucleus.deploy(LocalDeployment({NAME: "1.0.0"})).wait(30).succeeded
        assert nucleus.configuration(NAME) == expected


def test_a_component_deferring_an_update_holds_the_deployment_until_it_is_ready(
        tmp_path: Path, nucleus_factory: Any) -> None:
    layout = store(tmp_path, recipe("1.0.0", {"run": "exec sleep 600"}), recipe("1.1.0", {"run": "exec sleep 600"}))
    nucleus = nucleus_factory(layout)
    assert nucleus.deploy(LocalDeployment({NAME: "1.0.0"})).wait(30).succeeded
    session = connect_ipc(5.0, environ={SOCKET_ENV: nucleus.socket_path, TOKEN_ENV: nucleus.svcuid(NAME)})
    asked: list[int] = []

    def busy() -> bool:  # busy for the first two notices
        asked.append(1)
        return len(asked) <= 2

    updates = ComponentUpdates(session, busy, recheck_ms=300, timeout_s=5.0)
    assert updates.subscribe()
    eventually(lambda: nucleus.server.update_subscribers() == [NAME], timeout_s=5)
    result = nucleus.deploy(LocalDeployment({NAME: "1.1.0"})).wait(30)
    assert result.succeeded
    assert [d.recheck_after_ms for d in nucleus.server.deferrals] == [300, 300, 0]
    assert nucleus.status()[NAME]["version"] == "1.1.0"
    session.close(5.0)


def test_a_configuration_the_component_rejects_changes_nothing(tmp_path: Path, nucleus_factory: Any) -> None:
    layout = store(tmp_path, recipe("1.0.0", {"run": "exec sleep 600"}, config={"limit": 5}))
    nucleus = nucleus_factory(layout)
    assert nucleus.deploy(LocalDeployment({NAME: "1.0.0"})).wait(30).succeeded
    session = connect_ipc(5.0, environ={SOCKET_ENV: nucleus.socket_path, TOKEN_ENV: nucleus.svcuid(NAME)})

    def validate(config: dict[str, Any]) -> None:
        from qcsight_core.errors import ConfigError

        if not 0 < int(config["limit"]) < 10:
            raise ConfigError("limit", config["limit"], "from 1 to 9")

    config = GreengrassConfig(session, validate, timeout_s=5.0)
    delivered: list[dict[str, Any]] = []
    config.subscribe(delivered.append)
    eventually(lambda: nucleus.server.validates(NAME), timeout_s=5)
    refused = nucleus.deploy(LocalDeployment(merges={NAME: {"limit": 50}})).wait(30)
    assert refused.detailed_status == "FAILED_NO_STATE_CHANGE" and "limit=50" in refused.failure_cause
    assert nucleus.configuration(NAME) == {"limit": 5}
    assert nucleus.deploy(LocalDeployment(merges={NAME: {"limit": 7}})).wait(30).succeeded
    assert nucleus.configuration(NAME) == {"limit": 7}
    eventually(lambda: delivered == [{"limit": 7}], timeout_s=5, message=lambda: f"delivered {delivered}")
    config.close()
    session.close(5.0)


def test_a_version_that_breaks_is_rolled_back_and_state_is_kept(tmp_path: Path, nucleus_factory: Any) -> None:
    layout = store(tmp_path, recipe("1.0.0", {"run": "exec sleep 600"}),
                   recipe("2.0.0", {"run": "echo 'cannot start: no camera' >&2; exit 3"}))
    nucleus = nucleus_factory(layout)
    assert nucleus.deploy(LocalDeployment({NAME: "1.0.0"})).wait(30).succeeded
    result = nucleus.deploy(LocalDeployment({NAME: "2.0.0"})).wait(60)
    assert result.detailed_status == "FAILED_ROLLBACK_COMPLETE"
    assert "run exited 3" in result.failure_cause and "no camera" in result.failure_cause
    assert nucleus.status()[NAME]["version"] == "1.0.0" and nucleus.status()[NAME]["state"] == "RUNNING"
    kept = nucleus.deploy(LocalDeployment({NAME: "2.0.0"}, failure_policy="DO_NOTHING")).wait(60)
    assert kept.detailed_status == "FAILED_ROLLBACK_NOT_REQUESTED"
    assert nucleus.status()[NAME] == {**nucleus.status()[NAME], "version": "2.0.0", "state": "BROKEN"}
    state = json.loads((nucleus.root / "state.json").read_text())
    assert state["components"][NAME]["state"] == "BROKEN" and len(state["deployments"]) == 3
