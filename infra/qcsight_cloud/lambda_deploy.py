"""Approval → Greengrass in AWS: the Lambda behind EventBridge ``SageMaker Model Package State Change``.

Two kinds of event, one handler (``handler(event, context)``):

1. **Approved** (EventBridge rule: source ``aws.sagemaker``, detail-type ``SageMaker Model Package State
   Change``, detail ``ModelApprovalStatus: Approved``). The function

   * reads the model package (``DescribeModelPackage`` when the event lacks its inference
     specification) and downloads its ``ModelDataUrl`` (the bundle's model.tar.gz);
   * builds the ``com.qcsight.Model`` component with qcsight_gg (version ``1.<ModelPackageVersion>.0``),
     uploads its artifacts under ``QCSIGHT_ARTIFACT_BASE`` and calls ``CreateComponentVersion``
     (qcsight_gg.publish: the same validated requests as ``qcsight gg publish``);
   * requests a Neo compilation (``CreateCompilationJob``, the training launcher's request builder)
     when ``QCSIGHT_NEO_TARGET`` is set and Neo accepts the model: the bundle must carry a TorchScript
     artefact traced by a torch Neo loads (qcsight_train.launch.neo's policy); otherwise the reason is
     returned and nothing is requested;
   * ``CreateDeployment`` to the canary thing group: the new model, every other component kept at the
     group's current version (qcsight_gg.deploy: exponential rollout, abort criteria, ROLLBACK).

   It returns ``{"phase": "canary", "componentVersion": ..., "previousVersion": ..., "deploymentId": ...,
   "canaryStartedAt": ..., "neo": {...}}``: the input of the soak event below (an EventBridge
   Scheduler schedule or a Step Functions wait loop passes it back every few minutes).

2. **Soak** (``{"qcsight": "soak", "componentVersion": "1.3.0", "previousVersion": "1.2.0",
   "canaryStartedAt": "2026-...Z", "line": "line-1"}``): the canary's metrics windows (the store,
   ``QCSIGHT_STORE``) against the line's other devices, judged by ``rollout.soak_decision``; ``wait``
   changes nothing, ``promote`` deploys the version to the fleet group, ``rollback`` deploys the
   previous version to the canary group again. The decision is recorded in the store
   (scope ``rollout:<line>``) and returned as ``{"phase": "wait"|"promote"|"rollback", "reasons": [...]}``.

Environment:
    QCSIGHT_ARTIFACT_BASE      s3://bucket/prefix for component artifacts (required for Approved); else
                               s3://$QCSIGHT_COMPONENT_BUCKET/$QCSIGHT_COMPONENT_ARTIFACT_PREFIX (default "components")
    QCSIGHT_CANARY_THING_GROUP_ARN   the canary thing group (required)
    QCSIGHT_FLEET_THING_GROUP_ARN    the line's thing group (required for promotion)
    QCSIGHT_STORE              dynamodb:<prefix> (soak)
    QCSIGHT_FLEET              fleet file or inline JSON (soak: the line's things)
    QCSIGHT_CANARY_THINGS      comma-separated canary things (soak)
    QCSIGHT_SOAK               JSON of SoakSettings fields (optional)
    QCSIGHT_NEO_TARGET         a Neo device target, e.g. jetson_nano (optional)
    QCSIGHT_NEO_ROLE_ARN, QCSIGHT_NEO_OUTPUT   the role Neo assumes and s3:// for its output (with the target)
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from qcsight_cloud import timestamps
from qcsight_cloud.errors import CloudError
from qcsight_cloud.registry import component_version
from qcsight_cloud.rollout import PROMOTE, ROLLBACK, ROLLOUT_SCOPE, WAIT, GroupStats, SoakSettings, soak_decision

log = logging.getLogger(__name__)

DETAIL_TYPE = "SageMaker Model Package State Change"
MODEL = "com.qcsight.Model"


class DeployEventError(CloudError):
    """An event or the function's environment the deployment cannot act on."""


@dataclass(frozen=True)
class DeploySettings:
    """The function's environment (see the module)."""

    artifact_base: str = ""
    canary_group_arn: str = ""
    fleet_group_arn: str = ""
    neo_target: str = ""
    neo_role_arn: str = ""
    neo_output: str = ""
    canary_things: tuple[str, ...] = ()
    soak: SoakSettings = field(default_factory=SoakSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DeploySettings:
        soak = SoakSettings()
        if env.get("QCSIGHT_SOAK"):
            try:
                values = json.loads(env["QCSIGHT_SOAK"])
                known = {f.name for f in fields(SoakSettings)}
                unknown = set(values) - known
                if unknown:
                    raise DeployEventError(f"QCSIGHT_SOAK: unknown fields {sorted(unknown)}; known: {sorted(known)}")
                soak = SoakSettings(**values)
            except (ValueError, TypeError) as exc:
                raise DeployEventError(f"QCSIGHT_SOAK: {exc}") from None
        artifact_base = env.get("QCSIGHT_ARTIFACT_BASE", "")
        if not artifact_base and env.get("QCSIGHT_COMPONENT_BUCKET"):  # the CDK app's names (infra/stacks/names.py)
            prefix = env.get("QCSIGHT_COMPONENT_ARTIFACT_PREFIX") or "components"
            artifact_base = f"s3://{env['QCSIGHT_COMPONENT_BUCKET']}/{prefix.strip('/')}"
        return cls(artifact_base, env.get("QCSIGHT_CANARY_THING_GROUP_ARN", ""),
                   env.get("QCSIGHT_FLEET_THING_GROUP_ARN", ""), env.get("QCSIGHT_NEO_TARGET", ""),
                   env.get("QCSIGHT_NEO_ROLE_ARN", ""), env.get("QCSIGHT_NEO_OUTPUT", ""),
                   tuple(t for t in env.get("QCSIGHT_CANARY_THINGS", "").split(",") if t), soak)

    def need(self, name: str) -> str:
        value = str(getattr(self, name))
        if not value:
            variable = {"canary_group_arn": "QCSIGHT_CANARY_THING_GROUP_ARN",
                        "fleet_group_arn": "QCSIGHT_FLEET_THING_GROUP_ARN"}.get(name, f"QCSIGHT_{name.upper()}")
            raise DeployEventError(f"{variable} is not set; the function needs it for this event")
        return value


@dataclass
class Clients:
    """The AWS clients the function uses (botocore Stubber replaces them in tests)."""

    s3: Any
    greengrass: Any
    sagemaker: Any


def _clients() -> Clients:
    import boto3

    return Clients(boto3.client("s3"), boto3.client("greengrassv2"), boto3.client("sagemaker"))


def _split_s3(uri: str) -> tuple[str, str]:
    from qcsight_aws.s3 import S3Uri

    parsed = S3Uri.parse(uri, "ModelDataUrl", allowed="an s3:// URI of the bundle's model.tar.gz")
    return parsed.bucket, parsed.key


def _deployment(clients: Clients, target_arn: str, model_version: str) -> dict[str, Any]:
    from qcsight_gg.deploy import DeploymentSpec, create_deployment_request, current_components

    current = current_components(clients.greengrass, target_arn)
    components = {**current, MODEL: model_version}
    request = create_deployment_request(DeploymentSpec(target_arn, components, name=f"qcsight-model-{model_version}"))
    response = clients.greengrass.create_deployment(**request)
    log.info("CreateDeployment %s -> %s: %s", model_version, target_arn, response.get("deploymentId"))
    return {"deploymentId": response.get("deploymentId"), "previous": current.get(MODEL)}


def _neo(clients: Clients, settings: DeploySettings, model_url: str, bundle: Path, name: str) -> dict[str, Any]:
    """Request a Neo compilation where the target accepts the model; otherwise say why not."""
    if not settings.neo_target:
        return {"requested": False, "reason": "QCSIGHT_NEO_TARGET is not set"}
    from qcsight_core.bundle import load_bundle
    from qcsight_core.errors import ConfigError
    from qcsight_train.launch.neo import (
        CompilationSpec,
        build_compilation_request,
        check_traced_version,
        compilation_job_name,
        input_shape,
        parse_device,
        resolve_framework_version,
        traced_torch_version,
    )

    try:
        target = parse_device(settings.neo_target)
        manifest = load_bundle(bundle).manifest
        framework = resolve_framework_version(target, None)
        traced = traced_torch_version(manifest)
        if traced is None:
            return {"requested": False, "reason": "the bundle carries no TorchScript artefact for Neo"}
        check_traced_version(traced, framework)
        spec = CompilationSpec(compilation_job_name(name, target, timestamps.now().strftime("%Y%m%d%H%M%S")),
                               settings.need("neo_role_arn"), model_url, settings.need("neo_output"), target,
                               framework, input_shape(manifest, None))
    except ConfigError as exc:
        return {"requested": False, "reason": str(exc)}
    request = build_compilation_request(spec)
    response = clients.sagemaker.create_compilation_job(**request)
    return {"requested": True, "job": request["CompilationJobName"], "arn": response.get("CompilationJobArn")}


def on_approved(detail: Mapping[str, Any], settings: DeploySettings, clients: Clients,
                source: Path | None = None) -> dict[str, Any]:
    """Publish the approved package's model component, request Neo, deploy it to the canary group."""
    from qcsight_gg.build import build_model, find_source
    from qcsight_gg.publish import plan, publish
    from qcsight_gg.recipes import load_recipe

    arn = str(detail.get("ModelPackageArn") or "")
    version = detail.get("ModelPackageVersion")
    if not arn or not isinstance(version, int):
        raise DeployEventError(f"event detail lacks ModelPackageArn or an integer ModelPackageVersion: "
                               f"{json.dumps(dict(detail))[:300]}")
    containers = (detail.get("InferenceSpecification") or {}).get("Containers")
    if not containers:
        containers = clients.sagemaker.describe_model_package(ModelPackageName=arn)["InferenceSpecification"][
            "Containers"]
    model_url = str(containers[0]["ModelDataUrl"])
    component = component_version(version)
    artifact_base = settings.need("artifact_base")
    canary = settings.need("canary_group_arn")
    with tempfile.TemporaryDirectory(prefix="qcsight-deploy-") as tmp:
        work = Path(tmp)
        bucket, key = _split_s3(model_url)
        tarball = work / "model.tar.gz"
        body = clients.s3.get_object(Bucket=bucket, Key=key)["Body"]
        with tarball.open("wb") as handle:
            for chunk in iter(lambda: body.read(1 << 20), b""):
                handle.write(chunk)
        bundle = work / "bundle"
        with tarfile.open(tarball) as archive:
            archive.extractall(bundle, filter="data")
        layout = work / "layout"
        built = build_model(bundle, layout, source or find_source(), artifact_base=artifact_base,
                            version=component)
        arns = publish(plan([load_recipe(built.recipe)], layout), clients.s3, clients.greengrass)
        neo = _neo(clients, settings, model_url, bundle, str(detail.get("ModelPackageGroupName") or "qcsight"))
    deployed = _deployment(clients, canary, component)
    return {"phase": "canary", "modelPackageArn": arn, "componentVersion": component,
            "componentArns": arns, "previousVersion": deployed["previous"], "deploymentId": deployed["deploymentId"],
            "canaryStartedAt": timestamps.iso(timestamps.now()), "neo": neo}


def on_soak(event: Mapping[str, Any], settings: DeploySettings, clients: Clients, store: Any,
            line_things: tuple[str, ...], now: datetime | None = None) -> dict[str, Any]:
    """Judge the canary once; promote to the fleet group or roll the canary group back."""
    from qcsight_cloud.records import Check, Decision

    now = now or timestamps.now()
    try:
        version, started, line = str(event["componentVersion"]), str(event["canaryStartedAt"]), str(event["line"])
    except KeyError as exc:
        raise DeployEventError(f"soak event lacks {exc.args[0]!r}: {json.dumps(dict(event))[:300]}") from None
    since = timestamps.parse(started)
    bundle_version = version.split(".")[1]  # component 1.N.0 ships model package version N (bundle version N)
    canary_things = settings.canary_things
    if not canary_things:
        raise DeployEventError("QCSIGHT_CANARY_THINGS is not set; the soak needs the canary's things")
    canary = [w for t in canary_things for w in store.windows(thing=t, since=since, until=now)
              if w.model_version in (bundle_version, version)]
    fleet = [w for t in line_things if t not in canary_things for w in store.windows(thing=t, since=since, until=now)
             if w.model_version not in (bundle_version, version)]
    decision = soak_decision(settings.soak, GroupStats.of(canary), GroupStats.of(fleet),
                             (now - since).total_seconds())
    result: dict[str, Any] = {"phase": decision.action, "reasons": list(decision.reasons),
                              "componentVersion": version}
    if decision.action == PROMOTE:
        result["deploymentId"] = _deployment(clients, settings.need("fleet_group_arn"), version)["deploymentId"]
    elif decision.action == ROLLBACK:
        previous = event.get("previousVersion")
        if previous:
            result["deploymentId"] = _deployment(clients, settings.need("canary_group_arn"),
                                                 str(previous))["deploymentId"]
        else:
            result["reasons"].append("no previous version to restore: the canary keeps running it; remove it by hand")
    if decision.action != WAIT:
        store.record_decision(Decision(f"{line}-{version}-{decision.action}", ROLLOUT_SCOPE + line,
                                       timestamps.iso(now), decision.action, (f"model {version}",), (),
                                       decision.checks or (Check("deployment", True, "; ".join(decision.reasons)),)))
    return result


def handler(event: Mapping[str, Any], context: Any = None) -> dict[str, Any]:
    """The Lambda entry point (see the module for the events and the environment)."""
    settings = DeploySettings.from_env(os.environ)
    if event.get("qcsight") == "soak":
        from qcsight_cloud.fleet import FleetSettings, resolve
        from qcsight_cloud.store import StoreSettings, open_store

        fleet_source = os.environ.get("QCSIGHT_FLEET", "")
        fleet_settings = (FleetSettings.from_mapping(json.loads(fleet_source)) if fleet_source.lstrip().startswith("{")
                          else FleetSettings.from_file(Path(fleet_source)) if fleet_source else FleetSettings())
        import boto3

        fleet = resolve(fleet_settings, boto3.client("iot"))
        store = open_store(StoreSettings(os.environ.get("QCSIGHT_STORE", "")))
        try:
            return on_soak(event, settings, _clients(), store, tuple(fleet.lines.get(str(event.get("line")), ())))
        finally:
            store.close()
    if event.get("detail-type") != DETAIL_TYPE:
        raise DeployEventError(f"unexpected event: detail-type {event.get('detail-type')!r}, expected {DETAIL_TYPE!r} "
                               "or a soak event")
    detail = event.get("detail") or {}
    status = detail.get("ModelApprovalStatus")
    if status != "Approved":
        log.info("model package %s is %s: nothing to deploy", detail.get("ModelPackageArn"), status)
        return {"phase": "ignored", "reason": f"ModelApprovalStatus is {status}"}
    return on_approved(detail, settings, _clients())
