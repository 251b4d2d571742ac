"""publish and deploy: every request built by our code, checked against botocore's service models.

S3 is a moto server on loopback (uploads land there and are read back); Greengrass v2 has no moto
backend, so its requests go through botocore's Stubber, which validates each one against the
service model and answers with a response the model allows. IoT (thing and thing-group ARNs) is moto.
"""

from __future__ import annotations

import base64
import copy
import datetime
import hashlib
import json
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from botocore.stub import ANY, Stubber

from qcsight_core.bundle import Bundle
from qcsight_gg import cli
from qcsight_gg.build import AGENT, MODEL, build_model, find_source
from qcsight_gg.deploy import (
    DeploymentSpec,
    Rollout,
    check_agent_merge,
    create_deployment_request,
    current_components,
    resolve_components,
    resolve_target,
)
from qcsight_gg.errors import DeployError, PublishError
from qcsight_gg.publish import plan, publish
from qcsight_gg.recipes import layout_recipes
from tests.helpers.models import make_tiny_bundle

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "qcsight-artifacts"


@pytest.fixture
def model_layout(tiny_bundle: Bundle, tmp_path: Path) -> Path:
    out = tmp_path / "layout"
    build_model(tiny_bundle.path, out, find_source(ROOT), f"s3://{BUCKET}/qcsight")
    return out


def agent_defaults() -> dict[str, Any]:
    template = yaml.safe_load((ROOT / "greengrass" / "recipes" / f"{AGENT}.yaml").read_text())
    return dict(template["ComponentConfiguration"]["DefaultConfiguration"])


def greengrass_client() -> Any:
    return boto3.client("greengrassv2", region_name="us-east-1", endpoint_url="https://greengrass.invalid")


def test_publish_uploads_each_artifact_checked_by_its_digest_then_creates_the_version(
        model_layout: Path, aws_endpoint: str) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    publish_plan = plan(layout_recipes(model_layout), model_layout)
    greengrass = greengrass_client()
    arn = f"arn:aws:greengrass:us-east-1:123456789012:components:{MODEL}:versions:1.0.0"
    with Stubber(greengrass) as stub:
        (request,) = publish_plan.create_requests
        stub.add_response("create_component_version", {
            "arn": arn, "componentName": MODEL, "componentVersion": "1.0.0",
            "creationTimestamp": datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
            "status": {"componentState": "DEPLOYABLE", "message": "NONE", "errors": {}}}, expected_params=request)
        assert publish(publish_plan, s3, greengrass) == [arn]
        stub.assert_no_pending_responses()
    recipe = yaml.safe_load(request["inlineRecipe"])
    assert recipe["ComponentName"] == MODEL and recipe["ComponentVersion"] == "1.0.0"
    for artifact in recipe["Manifests"][0]["Artifacts"]:
        key = artifact["URI"].split(f"s3://{BUCKET}/", 1)[1]
        stored = s3.get_object(Bucket=BUCKET, Key=key, ChecksumMode="ENABLED")
        body = stored["Body"].read()
        digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
        assert digest == artifact["Digest"] == stored["ChecksumSHA256"], key  # S3 checks it on upload
        assert body == (model_layout / "artifacts" / MODEL / "1.0.0" / key.rsplit("/", 1)[1]).read_bytes()


def test_an_existing_version_is_reported_never_overwritten(model_layout: Path, aws_endpoint: str) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    greengrass = greengrass_client()
    with Stubber(greengrass) as stub:
        stub.add_client_error("create_component_version", "ConflictException", "exists", 409)
        with pytest.raises(PublishError, match="already published"):
            publish(plan(layout_recipes(model_layout), model_layout), s3, greengrass)


def test_nothing_is_sent_for_a_bad_recipe_or_the_template_bucket(model_layout: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    (recipe_path,) = (model_layout / "recipes").glob("*.yaml")
    data = yaml.safe_load(recipe_path.read_text())
    data["Manifests"][0]["Lifecycle"] = {"Startup": data["Manifests"][0]["Lifecycle"]["startup"]}
    recipe_path.write_text(yaml.safe_dump(data))
    assert cli.main(["publish", "--layout", str(model_layout), "--dry-run"]) == 1
    assert "use 'startup'" in capsys.readouterr().err
    template_layout = tmp_path / "template"  # built without --artifact-base: the template's placeholder bucket
    build_model(make_tiny_bundle(tmp_path / "b").path, template_layout, find_source(ROOT))
    with pytest.raises(PublishError, match="--artifact-base s3://your-bucket/prefix"):
        plan(layout_recipes(template_layout), template_layout)
    assert cli.main(["publish", "--layout", str(template_layout), "--artifact-base", f"s3://{BUCKET}/x",
                     "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [u["Key"] for u in printed["s3:PutObject"]] == [f"x/{MODEL}/1.0.0/bundle.zip",
                                                           f"x/{MODEL}/1.0.0/offer_model.sh"]
    assert f"s3://{BUCKET}/x/{MODEL}/1.0.0/bundle.zip" in printed["greengrassv2:CreateComponentVersion"][0][
        "inlineRecipe"]


# -------------------------------------------------------------------- deploy


def test_deploy_keeps_the_deployed_agent_and_sends_rollout_rollback_and_the_checked_merge(aws_endpoint: str) -> None:
    iot = boto3.client("iot")
    group_arn = iot.create_thing_group(thingGroupName="line-7")["thingGroupArn"]
    assert resolve_target(iot, "group:line-7") == group_arn
    with pytest.raises(DeployError, match="line-9"):
        resolve_target(iot, "group:line-9")
    greengrass = greengrass_client()
    merge = {"source": {"uri": "rtsp://cam-7.line-7.local/live", "max_fps": 5}}
    with Stubber(greengrass) as stub:
        stub.add_response("list_deployments", {"deployments": [{"deploymentId": "d-1", "targetArn": group_arn}]},
                          {"targetArn": group_arn, "historyFilter": "LATEST_ONLY"})
        stub.add_response("get_deployment", {"deploymentId": "d-1", "components": {
            AGENT: {"componentVersion": "0.1.0"}, MODEL: {"componentVersion": "1.0.0"}}}, {"deploymentId": "d-1"})
        current = current_components(greengrass, group_arn)
        components = resolve_components({AGENT: None, MODEL: "1.1.0"}, current)
        assert components == {AGENT: "0.1.0", MODEL: "1.1.0"}
        merged = check_agent_merge(agent_defaults(), merge)
        assert merged["source"]["kind"] == "camera" and merged["source"]["uri"].startswith("rtsp://")
        request = create_deployment_request(DeploymentSpec(group_arn, components, {AGENT: merge},
                                                           rollout=Rollout(base_rate_per_minute=2)))
        stub.add_response("create_deployment", {"deploymentId": "d-2", "iotJobId": "j-2"},
                          {**request, "clientToken": ANY})
        greengrass.create_deployment(**request)
        stub.assert_no_pending_responses()
    assert request["deploymentPolicies"]["failureHandlingPolicy"] == "ROLLBACK"
    assert request["deploymentPolicies"]["componentUpdatePolicy"] == {"action": "NOTIFY_COMPONENTS",
                                                                      "timeoutInSeconds": 60}
    rollout = request["iotJobConfiguration"]
    assert rollout["jobExecutionsRolloutConfig"]["exponentialRate"]["baseRatePerMinute"] == 2
    assert {c["failureType"] for c in rollout["abortConfig"]["criteriaList"]} == {"FAILED", "TIMED_OUT"}
    assert json.loads(request["components"][AGENT]["configurationUpdate"]["merge"]) == merge
    assert "configurationUpdate" not in request["components"][MODEL]


@pytest.mark.parametrize("merge, field", [
    ({"source": {"max_fps": 5000}}, "source.max_fps"),
    ({"source": {"kind": "hotfolder", "uri": "/var/inbox"}}, "source.mode"),  # a camera's mode with a folder
    ({"metrics": {"window_s": "soon"}}, "metrics.window_s"),
    ({"transport": {"kind": "carrier-pigeon"}}, "transport.kind"),
])
def test_a_merge_the_agent_would_refuse_is_refused_before_sending(merge: dict[str, Any], field: str) -> None:
    with pytest.raises(DeployError, match=rf"would be refused by the agent: invalid configuration {field}="):
        check_agent_merge(agent_defaults(), merge)


def test_deploy_needs_both_components_and_semantic_versions() -> None:
    with pytest.raises(DeployError, match="--agent-version"):
        resolve_components({AGENT: None, MODEL: "1.1.0"}, {})
    with pytest.raises(DeployError, match="not a semantic version"):
        create_deployment_request(DeploymentSpec("arn:aws:iot:us-east-1:1:thing/a", {AGENT: "1.0", MODEL: "1.0.0"}))


def test_deploy_dry_run_prints_the_validated_request(aws_endpoint: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    boto3.client("iot").create_thing(thingName="line-7-camera-2")
    layout = tmp_path / "layout"
    (layout / "recipes").mkdir(parents=True)
    template = yaml.safe_load((ROOT / "greengrass" / "recipes" / f"{AGENT}.yaml").read_text())
    (layout / "recipes" / f"{AGENT}-0.1.0.yaml").write_text(yaml.safe_dump(copy.deepcopy(template)))
    argv = ["deploy", "--target", "thing:line-7-camera-2", "--agent-version", "0.1.0", "--model-version", "1.1.0",
            "--layout", str(layout), "--dry-run"]
    assert cli.main([*argv, "--merge", '{"source": {"max_fps": 5000}}']) == 1
    assert "source.max_fps" in capsys.readouterr().err
    assert cli.main([*argv, "--merge", '{"source": {"uri": "rtsp://cam/live"}}']) == 0
    request = json.loads(capsys.readouterr().out)
    assert request["targetArn"].endswith(":thing/line-7-camera-2")
    assert request["components"][MODEL] == {"componentVersion": "1.1.0"}
