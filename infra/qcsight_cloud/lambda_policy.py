"""The policy Lambda function: on a schedule, decide for every line and start the retraining pipeline when one fires.

An EventBridge schedule invokes it (the event's content is not read). Each invocation:

1. brings the store's active runs up to date with their pipeline executions
   (``DescribePipelineExecution``: Executing -> running, Succeeded -> succeeded, Failed -> failed,
   Stopped -> cancelled);
2. writes one embedded-metric-format line with the fleet's silent devices (``SilentDevices``,
   what the monitoring stack alarms on);
3. for each line, gathers the evidence (:func:`qcsight_cloud.trigger.gather`), adds every execution
   SageMaker reports as running that is not the line's own run (another line's, or one started by
   hand with ``qcsight cloud pipeline start``) to the line's runs, decides
   (:func:`qcsight_cloud.policy.decide`) and records the decision, fire or hold. The pipeline is
   one resource, so "one run at a time" is across lines: a run started for one line holds the next
   line's decision back in the same invocation;
4. when a decision fires: writes the line's reviewed-image manifest (qcsight_core.review_manifest, the
   training job's ``reviewed`` channel), starts the pipeline with
   ``PIPELINE_PARAMETERS`` (idempotent on the run id), and records the run as ``running`` with its
   execution ARN. A refused start is recorded as a ``failed`` run with the error (and logged); it
   does not fail the invocation, so Lambda does not retry and record the decision twice.

Environment: ``QCSIGHT_STORE`` (``dynamodb:<table prefix>``), ``QCSIGHT_FLEET`` (inline JSON or a
file; lines name thing groups), ``QCSIGHT_PIPELINE_NAME``, ``QCSIGHT_POLICY`` (PolicySettings as
JSON, ``{}`` for the defaults) and ``QCSIGHT_MANIFEST_PREFIX`` (``s3://bucket/prefix/``).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

from qcsight_cloud import timestamps
from qcsight_cloud.emf import NAMESPACE, document
from qcsight_cloud.fleet import CachedFleet, Fleet, FleetSettings, resolve
from qcsight_cloud.lambda_ingest import Emit, emit_stdout
from qcsight_cloud.policy import FIRE, PolicySettings, decide, explain
from qcsight_cloud.records import RUN_ACTIVE, Decision, DeviceStatus, Run
from qcsight_cloud.reviewed import reviewed_alerts
from qcsight_cloud.store import Store, StoreSettings, open_store
from qcsight_cloud.trigger import gather, line_things, model_since
from qcsight_core.errors import ConfigError
from qcsight_core.review_manifest import manifest_bytes

log = logging.getLogger(__name__)

# The parameters every execution is started with; qcsight_cloud.pipeline declares the same names.
PARAM_LINE, PARAM_RUN_ID, PARAM_DECISION_ID, PARAM_MANIFEST = "Line", "RunId", "DecisionId", "ReviewedManifest"
PIPELINE_PARAMETERS = (PARAM_LINE, PARAM_RUN_ID, PARAM_DECISION_ID, PARAM_MANIFEST)
# SageMaker's PipelineExecutionStatus -> the store's run status.
RUN_STATUS = {"Executing": "running", "Stopping": "running", "Succeeded": "succeeded", "Failed": "failed",
              "Stopped": "cancelled"}
_LISTED_EXECUTIONS = 20  # newest executions looked at for running ones: a pipeline runs one at a time


class Retrainer(Protocol):
    """What the function needs of SageMaker and S3 (a narrow interface; tests run it against moto)."""

    def running(self) -> list[tuple[str, str]]:
        """(execution ARN, start time ISO) of every execution SageMaker reports as executing or stopping."""
        ...

    def state(self, execution_arn: str) -> tuple[str, str | None]:
        """(run status, finished time or None) of one execution."""
        ...

    def start(self, run_id: str, parameters: Mapping[str, str], description: str) -> str:
        """Start an execution; returns its ARN."""
        ...

    def put_manifest(self, key: str, body: bytes) -> str:
        """Store a manifest under the manifest prefix; returns its s3:// URI."""
        ...


@dataclass(frozen=True)
class PolicyJob:
    """One fleet's policy function: its pipeline, where manifests go, and the policy's settings."""

    pipeline_name: str
    manifest_prefix: str
    settings: PolicySettings

    def __post_init__(self) -> None:
        if not self.pipeline_name:
            raise ConfigError("QCSIGHT_PIPELINE_NAME", self.pipeline_name, "the retraining pipeline's name")
        if not self.manifest_prefix.startswith("s3://") or not self.bucket:
            raise ConfigError("QCSIGHT_MANIFEST_PREFIX", self.manifest_prefix, "s3://bucket/prefix/")

    @property
    def bucket(self) -> str:
        return self.manifest_prefix[5:].split("/", 1)[0]

    @property
    def prefix(self) -> str:
        rest = self.manifest_prefix[5:].split("/", 1)
        return rest[1] if len(rest) > 1 else ""

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> PolicyJob:
        raw = environ.get("QCSIGHT_POLICY", "{}") or "{}"
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError("QCSIGHT_POLICY", raw, f"PolicySettings as a JSON object ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError("QCSIGHT_POLICY", raw, "PolicySettings as a JSON object")
        return cls(environ.get("QCSIGHT_PIPELINE_NAME", ""), environ.get("QCSIGHT_MANIFEST_PREFIX", ""),
                   PolicySettings.from_mapping(data))


class SageMakerRetrainer:
    """Retrainer on boto3 clients for SageMaker and S3."""

    def __init__(self, sagemaker: Any, s3: Any, job: PolicyJob) -> None:
        self.sagemaker, self.s3, self.job = sagemaker, s3, job

    def running(self) -> list[tuple[str, str]]:
        response = self.sagemaker.list_pipeline_executions(
            PipelineName=self.job.pipeline_name, SortBy="CreationTime", SortOrder="Descending",
            MaxResults=_LISTED_EXECUTIONS)
        return [(e["PipelineExecutionArn"], timestamps.iso(e["StartTime"]))
                for e in response.get("PipelineExecutionSummaries", [])
                if RUN_STATUS.get(e.get("PipelineExecutionStatus", "")) == "running"]

    def state(self, execution_arn: str) -> tuple[str, str | None]:
        response = self.sagemaker.describe_pipeline_execution(PipelineExecutionArn=execution_arn)
        status = RUN_STATUS.get(response["PipelineExecutionStatus"], "running")
        finished = response.get("LastModifiedTime") if status not in RUN_ACTIVE else None
        return status, timestamps.iso(finished) if finished else None

    def start(self, run_id: str, parameters: Mapping[str, str], description: str) -> str:
        response = self.sagemaker.start_pipeline_execution(
            PipelineName=self.job.pipeline_name, ClientRequestToken=run_id,
            PipelineExecutionDescription=description[:3072],
            PipelineParameters=[{"Name": name, "Value": value} for name, value in parameters.items()])
        arn: str = response["PipelineExecutionArn"]
        return arn

    def put_manifest(self, key: str, body: bytes) -> str:
        full_key = self.job.prefix + key
        self.s3.put_object(Bucket=self.job.bucket, Key=full_key, Body=body, ContentType="application/x-ndjson")
        return f"s3://{self.job.bucket}/{full_key}"


def reviewed_manifest(store: Store, scope: str, since: datetime) -> tuple[bytes, dict[str, int]]:
    """The line's alerts reviewed since ``since`` as a reviewed-image manifest (qcsight_core.review_manifest).

    Selected and labelled as every manifest is (qcsight_cloud.reviewed: disputed alerts left out, a
    false alarm as the good class). Training reads the images from S3 itself, so an alert whose image
    is not in S3 (``image_ref`` missing or device-local) cannot be trained on: counted, not listed.
    """
    selection = reviewed_alerts(store, since=since, line=scope)
    images, without_image = [], 0
    for labelled in selection.labelled:
        ref = labelled.alert.image_ref
        if not ref or not ref.startswith("s3://"):
            without_image += 1
            continue
        images.append(labelled.image(ref))
    return manifest_bytes(images), {"reviewed": len(selection.labelled) + len(selection.disputed),
                                    "listed": len(images), "without_s3_image": without_image,
                                    "disputed": len(selection.disputed)}


def sync_runs(store: Store, scopes: Sequence[str], retrainer: Retrainer) -> list[Run]:
    """Bring each active run that has an execution up to date with SageMaker; returns the runs changed."""
    changed = []
    for scope in scopes:
        for run in store.runs(scope):
            arn = run.detail.get("execution_arn")
            if run.status not in RUN_ACTIVE or not isinstance(arn, str):
                continue
            status, finished = retrainer.state(arn)
            if status != run.status:
                updated = replace(run, status=status, finished=finished)
                store.put_run(updated)
                changed.append(updated)
                log.info("run %s of %s: %s -> %s", run.run_id, scope, run.status, status)
    return changed


def silent_document(fleet: Fleet, devices: Sequence[DeviceStatus], now: datetime) -> dict[str, Any]:
    """EMF: devices silent longer than the fleet's silent_after_s (or never seen), per line and in all.

    The monitoring stack's SilentDevices alarm and dashboard read the dimensionless total.
    """
    last_seen = {d.thing: timestamps.parse(d.last_seen) for d in devices}
    limit = fleet.settings.silent_after_s
    per_line = {}
    for scope in sorted(fleet.lines):
        things = line_things(fleet, devices, scope)
        per_line[scope] = sum(1 for t in things if t not in last_seen or (now - last_seen[t]).total_seconds() > limit)
    total = sum(per_line.values())
    doc = document(NAMESPACE, [[]], {}, {"SilentDevices": (float(total), "Count")}, int(now.timestamp() * 1000),
                   {"SilentByLine": per_line, "SilentAfterS": limit})
    return doc


def run_policy(store: Store, fleet: Fleet, retrainer: Retrainer, job: PolicyJob, *,
               now: datetime | None = None, emit: Emit | None = None) -> list[dict[str, Any]]:
    """Decide for every line of the fleet, record each decision, and start the pipeline for the first that fires.

    ``emit`` receives one EMF document with the fleet's silent devices (the function writes it to its log).
    """
    now = now or timestamps.now()
    scopes = sorted(fleet.lines)
    sync_runs(store, scopes, retrainer)
    running = dict(retrainer.running())
    devices = store.devices()
    if emit is not None:
        emit(silent_document(fleet, devices, now))
    results = []
    for scope in scopes:
        evidence = gather(store, scope, line_things(fleet, devices, scope), job.settings, now)
        # Executions of the one pipeline that are not this line's own runs: another line's, or started by hand.
        own = {r.detail.get("execution_arn") for r in evidence.runs}
        others = tuple(Run(arn.rsplit("/", 1)[-1], scope, started, "running",
                           detail={"execution_arn": arn, "not_this_lines_run": True})
                       for arn, started in running.items() if arn not in own)
        evidence = replace(evidence, runs=evidence.runs + others)
        decision = decide(job.settings, evidence, uuid.uuid4().hex)
        store.record_decision(decision)
        log.info("%s", explain(decision))
        result: dict[str, Any] = {"scope": scope, "decision_id": decision.decision_id, "action": decision.action,
                                  "triggers": list(decision.triggers), "blocked_by": list(decision.blocked_by)}
        if decision.action == FIRE:
            run = _start(store, retrainer, decision, model_since(store.runs(scope), now, job.settings))
            result.update(run_id=run.run_id, run_status=run.status, execution_arn=run.detail.get("execution_arn"))
            if run.status == "running":
                running[str(run.detail["execution_arn"])] = run.requested
        results.append(result)
    return results


def _start(store: Store, retrainer: Retrainer, decision: Decision, since: datetime) -> Run:
    run_id = uuid.uuid4().hex
    scope = decision.scope
    detail: dict[str, Any] = {"triggers": list(decision.triggers)}
    try:
        body, counts = reviewed_manifest(store, scope, since)
        detail["manifest_counts"] = counts
        manifest = retrainer.put_manifest(f"{scope}/{run_id}.manifest", body)
        detail["manifest"] = manifest
        arn = retrainer.start(run_id, {PARAM_LINE: scope, PARAM_RUN_ID: run_id,
                                       PARAM_DECISION_ID: decision.decision_id, PARAM_MANIFEST: manifest},
                              f"qcsight policy: {scope} fired on {', '.join(decision.triggers)}")
    except Exception as exc:  # any refusal is recorded on the run, never retried into a second decision
        detail["error"] = f"{type(exc).__name__}: {exc}"
        run = Run(run_id, scope, decision.time, "failed", decision.decision_id, finished=decision.time, detail=detail)
        store.put_run(run)
        log.error("policy %s: the retraining run could not start: %s", scope, detail["error"])
        return run
    detail["execution_arn"] = arn
    run = Run(run_id, scope, decision.time, "running", decision.decision_id, detail=detail)
    store.put_run(run)
    log.info("policy %s: pipeline execution %s started (run %s)", scope, arn, run_id)
    return run


@dataclass(frozen=True)
class _App:
    store: Store
    fleet: CachedFleet
    retrainer: Retrainer
    job: PolicyJob


@functools.cache
def _app() -> _App:
    """Built on the first invocation of a container (not at import) and reused by the next ones."""
    import boto3

    url = os.environ.get("QCSIGHT_STORE")
    if not url:
        raise ConfigError("QCSIGHT_STORE", url, "the function's store, dynamodb:<table prefix>")
    job = PolicyJob.from_environment(os.environ)
    fleet_source = os.environ.get("QCSIGHT_FLEET", "{}")
    fleet_settings = (FleetSettings.from_mapping(json.loads(fleet_source)) if fleet_source.lstrip().startswith("{")
                      else FleetSettings.from_file(fleet_source))
    iot = boto3.client("iot")
    return _App(open_store(StoreSettings(url)), CachedFleet(lambda: resolve(fleet_settings, iot)),
                SageMakerRetrainer(boto3.client("sagemaker"), boto3.client("s3"), job), job)


def handler(event: Any, context: Any) -> dict[str, Any]:
    """The Lambda entry point (``qcsight_cloud.lambda_policy.handler``)."""
    app = _app()
    return {"decisions": run_policy(app.store, app.fleet.fleet(), app.retrainer, app.job, emit=emit_stdout)}
