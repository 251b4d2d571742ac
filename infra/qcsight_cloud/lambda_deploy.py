"""Approval → Greengrass in AWS: the Lambda behind EventBridge ``SageMaker Model Package State Change`` and the
canary-check schedule.

Two kinds of event, one handler (``handler(event, context)``); the rollout's state lives in the store, so
neither event has to carry it:

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
     group's current version (qcsight_gg.deploy: exponential rollout, abort criteria, ROLLBACK);
   * records the canary as a ``Run`` in the store (scope ``rollout:<fleet thing group name>``, run id
     ``canary-<component version>``, status ``running``; detail: previous version, deployment id,
     model package). A canary still soaking is superseded (its run ``cancelled``) and the new one keeps
     its previous version as the one to restore. The same approval delivered again (EventBridge retries for
     up to two hours, so possibly after the canary was promoted) changes nothing; only a version rolled
     back or superseded goes to the canary again when it is approved again.

2. **The schedule** (EventBridge rule ``CanaryCheck``: source ``aws.events``, detail-type ``Scheduled Event``,
   every ``canary_check_minutes``). No canary running: ``{"phase": "idle"}``. Otherwise the canary's
   things (members of the canary thing group) and the fleet's other things (members of the fleet
   group and its line groups, ``ListThingsInThingGroup`` recursive, paginated) are read; their metrics
   windows since the canary started are judged by ``rollout.soak_decision``. ``wait`` changes nothing;
   ``promote`` deploys the version to the fleet group; ``rollback`` deploys the previous version to
   the canary group again. Either records a ``Decision`` (same scope) and closes the run (``succeeded`` or
   ``failed``), so the next tick is idle. A failed deployment raises and leaves the run open: the next
   tick judges again.

Environment (infra/stacks/names.py FUNCTION_ENV["deploy"]; the CDK app sets each one):
    QCSIGHT_STORE              dynamodb:<prefix> (or sqlite:PATH locally): where the rollout is recorded
    QCSIGHT_COMPONENT_BUCKET, QCSIGHT_COMPONENT_ARTIFACT_PREFIX   component artifacts go to
                               s3://BUCKET/PREFIX (default prefix "components"); QCSIGHT_ARTIFACT_BASE
                               (s3://bucket/prefix) overrides both
    QCSIGHT_CANARY_THING_GROUP_ARN   the canary thing group (required)
    QCSIGHT_FLEET_THING_GROUP_ARN    the fleet's thing group, parent of the line groups (required)
    QCSIGHT_SOAK               JSON of rollout.SoakSettings fields; "{}" or unset: the defaults
    QCSIGHT_NEO_TARGET         a Neo device target, e.g. jetson_nano; empty: no Neo compilation
    QCSIGHT_NEO_ROLE_ARN, QCSIGHT_NEO_OUTPUT   the role Neo assumes and s3:// for its output (with the target)
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from qcsight_cloud import timestamps
from qcsight_cloud.errors import CloudError
from qcsight_cloud.records import RUN_ACTIVE, Check, Decision, Run
from qcsight_cloud.registry import component_version
from qcsight_cloud.rollout import PROMOTE, ROLLOUT_SCOPE, WAIT, GroupStats, SoakSettings, soak_decision
from qcsight_cloud.store import Store

log = logging.getLogger(__name__)

DETAIL_TYPE = "SageMaker Model Package State Change"
SCHEDULED = "Scheduled Event"  # what an EventBridge schedule rule sends (source aws.events)
MODEL = "com.qcsight.Model"
# What each event needs of the environment (DeploySettings' field names), checked before any AWS call.
TICK_NEEDS = ("store", "fleet_group_arn", "canary_group_arn")
APPROVAL_NEEDS = ("store", "artifact_base", "fleet_group_arn", "canary_group_arn")
RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"  # records.RUN_STATES


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
    store: str = ""
    soak: SoakSettings = field(default_factory=SoakSettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DeploySettings:
        soak = SoakSettings()
        if env.get("QCSIGHT_SOAK", "").strip():
            try:
                values = json.loads(env["QCSIGHT_SOAK"])
                if not isinstance(values, dict):
                    raise DeployEventError(f"QCSIGHT_SOAK: a JSON object of SoakSettings fields, not {values!r}")
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
                   env.get("QCSIGHT_STORE", ""), soak)

    def need(self, name: str) -> str:
        value = str(getattr(self, name))
        if not value:
            variable = {"canary_group_arn": "QCSIGHT_CANARY_THING_GROUP_ARN",
                        "fleet_group_arn": "QCSIGHT_FLEET_THING_GROUP_ARN",
                        "store": "QCSIGHT_STORE"}.get(name, f"QCSIGHT_{name.upper()}")
            raise DeployEventError(f"{variable} is not set; the function needs it for this event")
        return value

    def check(self, *required: str) -> DeploySettings:
        """Fail before any AWS call when a required variable is unset or a thing group ARN is malformed."""
        for name in required:
            value = self.need(name)
            if name.endswith("_group_arn"):
                group_name(value)
        return self

    @property
    def scope(self) -> str:
        """The store scope of this fleet's rollouts: ``rollout:<fleet thing group name>``."""
        return ROLLOUT_SCOPE + group_name(self.need("fleet_group_arn"))


@dataclass
class Clients:
    """The AWS clients the function uses (botocore Stubber replaces them in tests)."""

    s3: Any
    greengrass: Any
    sagemaker: Any
    iot: Any = None


def _clients() -> Clients:
    import boto3

    return Clients(boto3.client("s3"), boto3.client("greengrassv2"), boto3.client("sagemaker"), boto3.client("iot"))


def group_name(arn: str) -> str:
    """A thing group's name from its ARN (arn:aws:iot:REGION:ACCOUNT:thinggroup/NAME)."""
    head, _, name = arn.rpartition(":thinggroup/")
    if not head.startswith("arn:") or not name or "/" in name:
        raise DeployEventError(f"thing group ARN {arn!r}: expected arn:<partition>:iot:<region>:<account>:"
                               "thinggroup/<name>")
    return name


def group_things(iot: Any, group_arn: str, *, recursive: bool = False) -> list[str]:
    """The things of a thing group (and of its child groups with ``recursive``), every page of them."""
    things: list[str] = []
    request: dict[str, Any] = {"thingGroupName": group_name(group_arn), "recursive": recursive, "maxResults": 250}
    while True:
        page = iot.list_things_in_thing_group(**request)
        things.extend(page.get("things") or [])
        token = page.get("nextToken")
        if not token:
            return list(dict.fromkeys(things))
        request["nextToken"] = token


def active_canary(store: Store, scope: str) -> Run | None:
    """The canary being soaked (the newest run of the scope still running), if any."""
    active = [run for run in store.runs(scope) if run.status in RUN_ACTIVE]
    return active[-1] if active else None


def close_run(store: Store, run: Run, status: str, now: datetime, outcome: str,
              decision_id: str | None = None) -> Run:
    closed = Run(run.run_id, run.scope, run.requested, status, decision_id or run.decision_id, timestamps.iso(now),
                 run.model_version, {**run.detail, "outcome": outcome})
    store.put_run(closed)
    return closed


def canary_state(run: Run) -> dict[str, Any]:
    """What a running canary's record says, as the handler returns it."""
    return {"phase": "canary", "componentVersion": run.model_version, "canaryStartedAt": run.requested,
            "previousVersion": run.detail.get("previousVersion"), "deploymentId": run.detail.get("deploymentId"),
            "modelPackageArn": run.detail.get("modelPackageArn"), "runId": run.run_id}


def component_source() -> Path:
    """Where build_model reads the model component's recipe template and offer script from.

    In AWS, the function's package: the CDK app copies greengrass/recipes and greengrass/scripts' files
    beside the packages (infra/stacks/names.py LAMBDA_DATA), so its root is the tree. Elsewhere, the checkout.
    """
    package_root = Path(__file__).resolve().parents[1]
    if (package_root / "greengrass" / "recipes").is_dir():
        return package_root
    from qcsight_gg.build import find_source

    return find_source()


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


def on_approved(detail: Mapping[str, Any], settings: DeploySettings, clients: Clients, store: Store,
                source: Path | None = None) -> dict[str, Any]:
    """Publish the approved package's model component, request Neo, deploy it to the canary group, record it."""
    from qcsight_gg.build import build_model
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
    scope = settings.scope
    running = active_canary(store, scope)
    # EventBridge delivers at least once, and retries for up to two hours: a redelivery may come after the
    # canary was promoted. Only a version rolled back (or superseded) is deployed to the canary again.
    earlier = [run for run in store.runs(scope) if run.run_id == f"canary-{component}"]
    if earlier and earlier[-1].status in (*RUN_ACTIVE, SUCCEEDED):
        log.info("model package %s: component %s already went to the canary at %s (%s)", arn, component,
                 earlier[-1].requested, earlier[-1].status)
        return {**canary_state(earlier[-1]), "duplicate": True}
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
        built = build_model(bundle, layout, source or component_source(), artifact_base=artifact_base,
                            version=component)
        arns = publish(plan([load_recipe(built.recipe)], layout), clients.s3, clients.greengrass)
        neo = _neo(clients, settings, model_url, bundle, str(detail.get("ModelPackageGroupName") or "qcsight"))
    deployed = _deployment(clients, canary, component)
    now = timestamps.now()
    # A canary superseded before its verdict: the version to restore is still the one before it.
    previous = running.detail.get("previousVersion") if running is not None else deployed["previous"]
    if running is not None:
        close_run(store, running, CANCELLED, now, f"superseded by {component} before its soak ended")
        log.warning("canary %s superseded by %s; a rollback restores %s", running.model_version, component, previous)
    run = Run(f"canary-{component}", scope, timestamps.iso(now), RUNNING, model_version=component,
              detail={"previousVersion": previous, "deploymentId": deployed["deploymentId"],
                      "modelPackageArn": arn, "canaryGroupArn": canary})
    store.put_run(run)
    return {**canary_state(run), "componentArns": arns, "neo": neo}


def judge(run: Run, settings: DeploySettings, clients: Clients, store: Store, canary_things: Sequence[str],
          fleet_things: Sequence[str], now: datetime) -> dict[str, Any]:
    """Judge the canary once; promote to the fleet group or roll the canary group back, and record it."""
    version, since = str(run.model_version), timestamps.parse(run.requested)
    bundle_version = version.split(".")[1]  # component 1.N.0 ships model package version N (bundle version N)
    on_canary = set(canary_things)
    canary = [w for t in canary_things for w in store.windows(thing=t, since=since, until=now)
              if w.model_version in (bundle_version, version)]
    fleet = [w for t in fleet_things if t not in on_canary for w in store.windows(thing=t, since=since, until=now)
             if w.model_version not in (bundle_version, version)]
    decision = soak_decision(settings.soak, GroupStats.of(canary), GroupStats.of(fleet),
                             max(0.0, (now - since).total_seconds()))
    result: dict[str, Any] = {"phase": decision.action, "reasons": list(decision.reasons),
                              "componentVersion": version, "canaryThings": len(canary_things),
                              "fleetThings": len(fleet_things)}
    if decision.action == WAIT:
        return result
    previous = run.detail.get("previousVersion")
    checks = decision.checks or (Check("deployment", True, "; ".join(decision.reasons)),)
    if decision.action == PROMOTE:
        result["deploymentId"] = _deployment(clients, settings.need("fleet_group_arn"), version)["deploymentId"]
    elif previous:
        result["deploymentId"] = _deployment(clients, settings.need("canary_group_arn"), str(previous))["deploymentId"]
    else:
        missing = "no previous version to restore: the canary keeps running it; remove it by hand"
        result["reasons"].append(missing)
        checks = (*checks, Check("restore", True, missing))
    decision_id = f"{run.scope}-{version}-{decision.action}"
    store.record_decision(Decision(decision_id, run.scope, timestamps.iso(now), decision.action, (f"model {version}",),
                                   (), checks))
    close_run(store, run, SUCCEEDED if decision.action == PROMOTE else FAILED, now,
              f"{decision.action}: " + "; ".join(result["reasons"]), decision_id)
    log.info("canary %s: %s (%s)", version, decision.action.upper(), "; ".join(result["reasons"]))
    return result


def on_tick(settings: DeploySettings, clients: Clients, store: Store, now: datetime | None = None) -> dict[str, Any]:
    """One scheduled check: idle without a canary, else judge it against the rest of the fleet."""
    now = now or timestamps.now()
    run = active_canary(store, settings.scope)
    if run is None:
        return {"phase": "idle"}
    canary_things = group_things(clients.iot, settings.need("canary_group_arn"))
    fleet_things = [t for t in group_things(clients.iot, settings.need("fleet_group_arn"), recursive=True)
                    if t not in canary_things]
    if not canary_things:
        log.warning("canary %s: the canary thing group %s has no things; nothing can soak the model",
                    run.model_version, settings.canary_group_arn)
    return judge(run, settings, clients, store, canary_things, fleet_things, now)


def handler(event: Mapping[str, Any], context: Any = None) -> dict[str, Any]:
    """The Lambda entry point (see the module for the events and the environment)."""
    from qcsight_cloud.store import StoreSettings, open_store

    settings = DeploySettings.from_env(os.environ)
    kind = event.get("detail-type")
    if kind == SCHEDULED and event.get("source") == "aws.events":
        settings.check(*TICK_NEEDS)
        store = open_store(StoreSettings(settings.store))
        try:
            return on_tick(settings, _clients(), store)
        finally:
            store.close()
    if kind != DETAIL_TYPE:
        raise DeployEventError(f"unexpected event: detail-type {kind!r} (source {event.get('source')!r}), expected "
                               f"{DETAIL_TYPE!r} or an EventBridge {SCHEDULED!r}")
    detail = event.get("detail") or {}
    status = detail.get("ModelApprovalStatus")
    if status != "Approved":
        log.info("model package %s is %s: nothing to deploy", detail.get("ModelPackageArn"), status)
        return {"phase": "ignored", "reason": f"ModelApprovalStatus is {status}"}
    settings.check(*APPROVAL_NEEDS)
    store = open_store(StoreSettings(settings.store))
    try:
        return on_approved(detail, settings, _clients(), store)
    finally:
        store.close()
