"""Approval → Greengrass in AWS: every request the deploy Lambda sends, checked by botocore's Stubber.

Greengrass v2 has no moto backend, and the Lambda's S3 traffic is two calls, so all three services
go through the Stubber: each request is validated against the service model, each response is
one the model allows. IoT (the thing groups' members) goes through the Stubber too; the rollout's state
lives in the store (SQLite here; the store contract suite holds DynamoDB to the same behaviour).
"""

from __future__ import annotations

import datetime
import io
import json
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from botocore.response import StreamingBody
from botocore.stub import ANY, Stubber

import qcsight_cloud.lambda_deploy as lambda_deploy
from qcsight_cloud import timestamps
from qcsight_cloud.lambda_deploy import (
    DETAIL_TYPE,
    Clients,
    DeployEventError,
    DeploySettings,
    handler,
    on_approved,
)
from qcsight_cloud.records import Run
from qcsight_cloud.rollout import SoakSettings
from qcsight_cloud.sqlite_store import SqliteStore
from qcsight_core.bundle import ModelFile, pack_bundle, read_manifest, write_bundle
from qcsight_gg.build import find_source
from tests.cloud.builders import T0, incoming, metrics
from tests.helpers.models import make_tiny_bundle

AGENT, MODEL = "com.qcsight.EdgeAgent", "com.qcsight.Model"
CANARY = "arn:aws:iot:us-east-1:123456789012:thinggroup/line-1-canary"
FLEET = "arn:aws:iot:us-east-1:123456789012:thinggroup/line-1"
PACKAGE = "arn:aws:sagemaker:us-east-1:123456789012:model-package/qcsight-line-1/3"
SCOPE = "rollout:line-1"  # the fleet group's name
TICK = {"version": "0", "id": "e-1", "detail-type": "Scheduled Event", "source": "aws.events",
        "account": "123456789012", "time": "2026-03-02T08:05:00Z", "region": "us-east-1",
        "resources": ["arn:aws:events:us-east-1:123456789012:rule/qcsight-CanaryCheck"], "detail": {}}


def client(service: str) -> Any:
    return boto3.client(service, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x",
                        endpoint_url=f"https://{service}.invalid")


def tarball(tmp_path: Path, torch_version: str | None, version: int = 3) -> bytes:
    folder = tmp_path / f"bundle-{version}"
    make_tiny_bundle(folder, version=str(version))
    if torch_version is not None:  # a TorchScript artefact for Neo, as `qcsight train --torchscript` adds
        (folder / "model.pth").write_bytes(b"torchscript")
        manifest = read_manifest(folder)
        models = (*manifest.models, ModelFile("model.pth", "torchscript", runtime="neo",
                                              details={"torch_version": torch_version}))
        write_bundle(folder, manifest.__class__(**{**manifest.__dict__, "models": models}))
    return pack_bundle(folder, tmp_path / f"model-{version}.tar.gz").read_bytes()


def approved_event(version: int = 3) -> dict[str, Any]:
    return {"version": "0", "source": "aws.sagemaker", "detail-type": DETAIL_TYPE, "detail": {
        "ModelPackageGroupName": "qcsight-line-1", "ModelPackageVersion": version,
        "ModelPackageArn": PACKAGE.removesuffix("/3") + f"/{version}", "ModelApprovalStatus": "Approved",
        "InferenceSpecification": {"Containers": [{"Image": "x",
                                                   "ModelDataUrl": f"s3://models/line-1/{version}/model.tar.gz"}]}}}


def expect_publish(s3: Stubber, gg: Stubber, data: bytes, version: int) -> None:
    """GetObject of the package's model.tar.gz, the component's two artifacts, CreateComponentVersion."""
    component = f"1.{version}.0"
    s3.add_response("get_object", {"Body": StreamingBody(io.BytesIO(data), len(data))},
                    {"Bucket": "models", "Key": f"line-1/{version}/model.tar.gz"})
    for name in ("bundle.zip", "offer_model.sh"):
        s3.add_response("put_object", {}, {"Bucket": "artifacts", "Key": f"qcsight/{MODEL}/{component}/{name}",
                                           "Body": ANY, "ChecksumAlgorithm": "SHA256", "ChecksumSHA256": ANY,
                                           "ContentType": ANY})
    gg.add_response("create_component_version", {
        "arn": f"arn:aws:greengrass:us-east-1:123456789012:components:{MODEL}:versions:{component}",
        "componentName": MODEL, "componentVersion": component,
        "creationTimestamp": datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
        "status": {"componentState": "DEPLOYABLE", "message": "NONE", "errors": {}}},
        {"inlineRecipe": ANY, "clientToken": ANY})


def expect_deployment(stub: Stubber, target: str, previous: str, new: str) -> None:
    stub.add_response("list_deployments", {"deployments": [{"deploymentId": "d-0", "targetArn": target}]},
                      {"targetArn": target, "historyFilter": "LATEST_ONLY"})
    stub.add_response("get_deployment", {"deploymentId": "d-0", "components": {
        AGENT: {"componentVersion": "0.1.0"}, MODEL: {"componentVersion": previous}}}, {"deploymentId": "d-0"})
    stub.add_response("create_deployment", {"deploymentId": f"d-{new}"}, {
        "targetArn": target, "deploymentName": f"qcsight-model-{new}",
        "components": {AGENT: {"componentVersion": "0.1.0"}, MODEL: {"componentVersion": new}},
        "iotJobConfiguration": ANY, "deploymentPolicies": ANY, "clientToken": ANY})


@pytest.mark.parametrize("torch_version, neo", [("1.8.1", True), ("2.14.1", False), (None, False)])
def test_approval_publishes_the_component_requests_neo_where_it_can_and_deploys_to_the_canary(
        tmp_path: Path, torch_version: str | None, neo: bool) -> None:
    clients = Clients(client("s3"), client("greengrassv2"), client("sagemaker"))
    store = SqliteStore(tmp_path / "s.sqlite")
    settings = DeploySettings(artifact_base="s3://artifacts/qcsight", canary_group_arn=CANARY, fleet_group_arn=FLEET,
                              neo_target="jetson_nano",
                              neo_role_arn="arn:aws:iam::123456789012:role/neo", neo_output="s3://models/neo/")
    data = tarball(tmp_path, torch_version)
    with Stubber(clients.s3) as s3, Stubber(clients.greengrass) as gg, Stubber(clients.sagemaker) as sm:
        expect_publish(s3, gg, data, 3)
        if neo:
            sm.add_response("create_compilation_job", {"CompilationJobArn": "arn:aws:sagemaker:us-east-1:"
                                                       "123456789012:compilation-job/x"}, {
                "CompilationJobName": ANY, "RoleArn": "arn:aws:iam::123456789012:role/neo",
                "InputConfig": {"S3Uri": "s3://models/line-1/3/model.tar.gz", "DataInputConfig": '{"input0": '
                                '[1, 3, 32, 32]}', "Framework": "PYTORCH", "FrameworkVersion": "1.8"},
                "OutputConfig": {"S3OutputLocation": "s3://models/neo/", "TargetDevice": "jetson_nano"},
                "StoppingCondition": ANY})
        expect_deployment(gg, CANARY, "1.2.0", "1.3.0")
        result = on_approved(approved_event()["detail"], settings, clients, store, source=find_source())
        for stub in (s3, gg, sm):
            stub.assert_no_pending_responses()
        # EventBridge may deliver the approval again: the canary is already recorded, nothing is sent
        again = on_approved(approved_event()["detail"], settings, clients, store, source=find_source())
    assert again["duplicate"] is True and again["runId"] == "canary-1.3.0"
    (run,) = store.runs(SCOPE)  # the canary in progress, durably: what the scheduled ticks pick up
    assert (run.run_id, run.status, run.model_version) == ("canary-1.3.0", "running", "1.3.0")
    assert run.detail["previousVersion"] == "1.2.0" and run.detail["deploymentId"] == "d-1.3.0"
    assert run.requested == result["canaryStartedAt"]
    assert result["phase"] == "canary" and result["componentVersion"] == "1.3.0"
    assert result["previousVersion"] == "1.2.0" and result["deploymentId"] == "d-1.3.0"
    assert result["neo"]["requested"] is neo
    if torch_version == "2.14.1":
        assert "Neo will load it with PyTorch 1.8" in result["neo"]["reason"]
    if torch_version is None:
        assert "no TorchScript artefact" in result["neo"]["reason"]


def test_a_canary_superseded_before_its_verdict_is_cancelled_and_the_new_one_restores_what_was_before(
        tmp_path: Path) -> None:
    clients = Clients(client("s3"), client("greengrassv2"), client("sagemaker"))
    store = SqliteStore(tmp_path / "s.sqlite")
    store.put_run(Run("canary-1.3.0", SCOPE, "2026-03-02T08:00:00.000Z", "running", model_version="1.3.0",
                      detail={"previousVersion": "1.2.0", "deploymentId": "d-1.3.0"}))
    settings = DeploySettings(artifact_base="s3://artifacts/qcsight", canary_group_arn=CANARY, fleet_group_arn=FLEET)
    data = tarball(tmp_path, None, version=4)
    with Stubber(clients.s3) as s3, Stubber(clients.greengrass) as gg, Stubber(clients.sagemaker):
        expect_publish(s3, gg, data, 4)
        expect_deployment(gg, CANARY, "1.3.0", "1.4.0")  # the canary group runs the superseded 1.3.0
        result = on_approved(approved_event(4)["detail"], settings, clients, store, source=find_source())
        gg.assert_no_pending_responses()
    assert (result["componentVersion"], result["previousVersion"]) == ("1.4.0", "1.2.0")
    old, new = store.runs(SCOPE)
    assert (old.run_id, old.status) == ("canary-1.3.0", "cancelled") and old.finished is not None
    assert old.detail["outcome"].startswith("superseded by 1.4.0")
    assert (new.run_id, new.status, new.detail["previousVersion"]) == ("canary-1.4.0", "running", "1.2.0")


def test_other_states_bad_events_and_missing_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    event = approved_event()
    event["detail"]["ModelApprovalStatus"] = "Rejected"
    assert handler(event) == {"phase": "ignored", "reason": "ModelApprovalStatus is Rejected"}
    with pytest.raises(DeployEventError, match="unexpected event: detail-type 'Object Created'"):
        handler({"detail-type": "Object Created", "source": "aws.s3"})
    for name in ("QCSIGHT_STORE", "QCSIGHT_FLEET_THING_GROUP_ARN", "QCSIGHT_CANARY_THING_GROUP_ARN",
                 "QCSIGHT_ARTIFACT_BASE", "QCSIGHT_COMPONENT_BUCKET", "QCSIGHT_SOAK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DeployEventError, match="QCSIGHT_STORE is not set"):
        handler(TICK)
    with pytest.raises(DeployEventError, match="QCSIGHT_STORE is not set"):
        handler(approved_event())
    monkeypatch.setenv("QCSIGHT_STORE", f"sqlite:{tmp_path / 's.sqlite'}")
    with pytest.raises(DeployEventError, match="QCSIGHT_FLEET_THING_GROUP_ARN is not set"):
        handler(TICK)
    monkeypatch.setenv("QCSIGHT_FLEET_THING_GROUP_ARN", "line-1")  # a name where the ARN belongs
    with pytest.raises(DeployEventError, match=r"thing group ARN 'line-1': expected arn:<partition>:iot:"):
        handler(TICK)
    monkeypatch.setenv("QCSIGHT_FLEET_THING_GROUP_ARN", FLEET)
    # checked on every tick, canary or not: a deployment misconfigured shows at the first tick, not the first model
    with pytest.raises(DeployEventError, match="QCSIGHT_CANARY_THING_GROUP_ARN is not set"):
        handler(TICK)
    # the approval fails before it reads or sends anything
    with pytest.raises(DeployEventError, match="QCSIGHT_ARTIFACT_BASE is not set"):
        handler(approved_event())
    monkeypatch.setenv("QCSIGHT_COMPONENT_BUCKET", "models")
    with pytest.raises(DeployEventError, match="QCSIGHT_CANARY_THING_GROUP_ARN is not set"):
        handler(approved_event())
    monkeypatch.setenv("QCSIGHT_CANARY_THING_GROUP_ARN", "arn:aws:iot:us-east-1:123456789012:thing/cam-1")
    with pytest.raises(DeployEventError, match="thing group ARN 'arn:aws:iot:us-east-1:123456789012:thing/cam-1'"):
        handler(approved_event())
    monkeypatch.setenv("QCSIGHT_SOAK", '{"soak_seconds": 5}')
    with pytest.raises(DeployEventError, match=r"QCSIGHT_SOAK: unknown fields \['soak_seconds'\]"):
        handler(approved_event())
    monkeypatch.setenv("QCSIGHT_SOAK", '[900]')
    with pytest.raises(DeployEventError, match=r"QCSIGHT_SOAK: a JSON object of SoakSettings fields, not \[900\]"):
        handler(TICK)
    with pytest.raises(DeployEventError, match="QCSIGHT_ARTIFACT_BASE is not set"):
        DeploySettings().need("artifact_base")
    with pytest.raises(DeployEventError, match="QCSIGHT_CANARY_THING_GROUP_ARN is not set"):
        DeploySettings().need("canary_group_arn")
    with pytest.raises(DeployEventError, match="thing group ARN 'line-1'"):
        _ = DeploySettings(fleet_group_arn="line-1").scope
    # the CDK app's variables (infra/stacks/names.py; tests/infra holds the template to this reader)
    settings = DeploySettings.from_env({"QCSIGHT_COMPONENT_BUCKET": "models", "QCSIGHT_CANARY_THING_GROUP_ARN": CANARY,
                                        "QCSIGHT_FLEET_THING_GROUP_ARN": FLEET, "QCSIGHT_STORE": "dynamodb:qcsight",
                                        "QCSIGHT_SOAK": '{"soak_s": 900}', "QCSIGHT_NEO_TARGET": ""})
    assert (settings.artifact_base, settings.canary_group_arn, settings.fleet_group_arn, settings.store) == (
        "s3://models/components", CANARY, FLEET, "dynamodb:qcsight")
    assert settings.soak == SoakSettings(soak_s=900) and settings.scope == SCOPE


def expect_members(stub: Stubber, group: str, pages: list[list[str]], recursive: bool) -> None:
    for n, things in enumerate(pages):
        response: dict[str, Any] = {"things": things}
        request: dict[str, Any] = {"thingGroupName": group, "recursive": recursive, "maxResults": 250}
        if n + 1 < len(pages):
            response["nextToken"] = f"t{n + 1}"
        if n:
            request["nextToken"] = f"t{n}"
        stub.add_response("list_things_in_thing_group", response, request)


@pytest.mark.parametrize("canary_defects, phase, target, version", [(2, "promote", FLEET, "1.3.0"),
                                                                     (40, "rollback", CANARY, "1.2.0")])
def test_scheduled_ticks_soak_the_recorded_canary_then_promote_or_roll_back_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, canary_defects: int, phase: str, target: str,
        version: str) -> None:
    from qcsight_cloud.ingest import Ingestor

    store_path = tmp_path / "s.sqlite"
    clients = Clients(client("s3"), client("greengrassv2"), client("sagemaker"), client("iot"))
    monkeypatch.setattr(lambda_deploy, "_clients", lambda: clients)
    monkeypatch.setenv("QCSIGHT_STORE", f"sqlite:{store_path}")
    monkeypatch.setenv("QCSIGHT_CANARY_THING_GROUP_ARN", CANARY)
    monkeypatch.setenv("QCSIGHT_FLEET_THING_GROUP_ARN", FLEET)
    monkeypatch.setenv("QCSIGHT_SOAK", json.dumps({"soak_s": 120, "min_windows": 3, "min_frames": 300}))
    now = [T0]
    monkeypatch.setattr(lambda_deploy.timestamps, "now", lambda: now[0])

    def tick() -> dict[str, Any]:
        with Stubber(clients.iot) as iot:
            expect_members(iot, "line-1-canary", [["cam-1"]], False)
            expect_members(iot, "line-1", [["cam-1", "cam-2"], ["cam-3"]], True)  # two pages; cam-1 is the canary
            result = handler(TICK)
            iot.assert_no_pending_responses()
        return result

    with Stubber(clients.iot):  # nothing on a canary: idle, and no AWS call at all
        assert handler(TICK) == {"phase": "idle"}
    store = SqliteStore(store_path)
    store.put_run(Run("canary-1.3.0", SCOPE, "2026-03-02T08:00:00.000Z", "running", model_version="1.3.0",
                      detail={"previousVersion": "1.2.0", "deploymentId": "d-1.3.0"}))
    ingestor = Ingestor(store, lambda thing: "line-1")
    for thing, model, defects in (("cam-1", "3", canary_defects), ("cam-2", "2", 2), ("cam-3", "2", 2)):
        ingestor.ingest_batch([incoming(metrics(thing, i + 1, T0 + datetime.timedelta(minutes=i + 1), defects=defects,
                                                model=model)) for i in range(4)])
    if phase == "promote":  # one clean window so far, before the soak ends: wait (a regression would not wait)
        now[0] = T0 + datetime.timedelta(minutes=1)
        early = tick()
        assert early["phase"] == "wait" and "1 canary windows" in early["reasons"][0]
        assert (early["canaryThings"], early["fleetThings"]) == (1, 2)
        assert store.runs(SCOPE)[0].status == "running"
    now[0] = T0 + datetime.timedelta(minutes=5)
    with Stubber(clients.greengrass) as gg:
        expect_deployment(gg, target, "1.2.0" if phase == "promote" else "1.3.0", version)
        result = tick()
        gg.assert_no_pending_responses()
    assert result["phase"] == phase and result["deploymentId"] == f"d-{version}"
    (decision,) = store.decisions(SCOPE)
    assert (decision.action, decision.triggers) == (phase, ("model 1.3.0",))
    checks = {check.name: check for check in decision.checks}
    # cam-2 and cam-3 (the second page) both count for the fleet: 2 x 4 windows of 100 frames
    assert checks["defect_rate"].fired is (phase == "rollback")
    assert "16/800 on the fleet" in checks["defect_rate"].summary
    if phase == "rollback":
        assert result["reasons"] == ["canary defect rate significantly above the fleet's: "
                                     + checks["defect_rate"].summary]
    else:
        assert checks["soak"].fired and "4 canary windows" in result["reasons"][0]
    (run,) = store.runs(SCOPE)
    assert run.status == ("succeeded" if phase == "promote" else "failed") and run.decision_id == decision.decision_id
    assert run.detail["outcome"] == f"{phase}: " + "; ".join(result["reasons"])
    assert run.finished == timestamps.iso(now[0])
    with Stubber(clients.iot), Stubber(clients.greengrass):  # the next tick: idle, nothing redeployed
        assert handler(TICK) == {"phase": "idle"}
    assert len(store.decisions(SCOPE)) == 1
    assert json.loads(json.dumps(result))
    if phase == "promote":  # EventBridge retries an approval for two hours: once promoted, it changes nothing
        monkeypatch.setenv("QCSIGHT_ARTIFACT_BASE", "s3://artifacts/qcsight")
        with Stubber(clients.s3), Stubber(clients.greengrass), Stubber(clients.sagemaker):
            again = handler(approved_event())
        assert again["duplicate"] is True and store.runs(SCOPE) == [run]


def running_canary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   previous: str | None) -> tuple[Clients, SqliteStore]:
    """A canary 1.3.0 started at T0 whose only device (cam-1) reported 40 defects per 100 frames: a rollback."""
    from qcsight_cloud.ingest import Ingestor

    clients = Clients(client("s3"), client("greengrassv2"), client("sagemaker"), client("iot"))
    monkeypatch.setattr(lambda_deploy, "_clients", lambda: clients)
    monkeypatch.setattr(lambda_deploy.timestamps, "now", lambda: T0 + datetime.timedelta(minutes=5))
    for name, value in (("QCSIGHT_STORE", f"sqlite:{tmp_path / 's.sqlite'}"),
                        ("QCSIGHT_CANARY_THING_GROUP_ARN", CANARY), ("QCSIGHT_FLEET_THING_GROUP_ARN", FLEET)):
        monkeypatch.setenv(name, value)
    store = SqliteStore(tmp_path / "s.sqlite")
    store.put_run(Run("canary-1.3.0", SCOPE, "2026-03-02T08:00:00.000Z", "running", model_version="1.3.0",
                      detail={"previousVersion": previous} if previous else {}))
    ingestor = Ingestor(store, lambda thing: "line-1")
    ingestor.ingest_batch([incoming(metrics("cam-1", i + 1, T0 + datetime.timedelta(minutes=i + 1), defects=40,
                                            model="3")) for i in range(4)])
    ingestor.ingest_batch([incoming(metrics("cam-2", i + 1, T0 + datetime.timedelta(minutes=i + 1), defects=2,
                                            model="2")) for i in range(4)])
    return clients, store


def test_a_failed_rollback_deployment_raises_and_leaves_the_canary_to_the_next_tick(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clients, store = running_canary(tmp_path, monkeypatch, "1.2.0")
    with Stubber(clients.iot) as iot, Stubber(clients.greengrass) as gg:
        expect_members(iot, "line-1-canary", [["cam-1"]], False)
        expect_members(iot, "line-1", [["cam-1", "cam-2"]], True)
        gg.add_response("list_deployments", {"deployments": [{"deploymentId": "d-0", "targetArn": CANARY}]},
                        {"targetArn": CANARY, "historyFilter": "LATEST_ONLY"})
        gg.add_response("get_deployment", {"deploymentId": "d-0", "components": {
            MODEL: {"componentVersion": "1.3.0"}}}, {"deploymentId": "d-0"})
        gg.add_client_error("create_deployment", "ThrottlingException", "Rate exceeded", 429)
        with pytest.raises(ClientError, match="ThrottlingException"):
            handler(TICK)  # the Lambda fails: EventBridge retries, and the next tick judges again
    (run,) = store.runs(SCOPE)
    assert run.status == "running" and store.decisions(SCOPE) == []
    with Stubber(clients.iot) as iot, Stubber(clients.greengrass) as gg:
        expect_members(iot, "line-1-canary", [["cam-1"]], False)
        expect_members(iot, "line-1", [["cam-1", "cam-2"]], True)
        expect_deployment(gg, CANARY, "1.3.0", "1.2.0")
        assert handler(TICK)["phase"] == "rollback"
    assert store.runs(SCOPE)[0].status == "failed" and len(store.decisions(SCOPE)) == 1


def test_a_rollback_with_no_previous_version_says_so_and_deploys_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clients, store = running_canary(tmp_path, monkeypatch, None)  # the group's first model
    with Stubber(clients.iot) as iot, Stubber(clients.greengrass):
        expect_members(iot, "line-1-canary", [["cam-1"]], False)
        expect_members(iot, "line-1", [["cam-1", "cam-2"]], True)
        result = handler(TICK)
    assert result["phase"] == "rollback" and "deploymentId" not in result
    assert "no previous version to restore" in result["reasons"][-1]
    (decision,) = store.decisions(SCOPE)
    assert {c.name: c.fired for c in decision.checks}["restore"] is True
    assert store.runs(SCOPE)[0].status == "failed"
