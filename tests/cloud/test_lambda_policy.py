"""The policy Lambda function: decisions recorded, the pipeline started once, runs followed; moto and Stubber."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from qcsight_cloud import lambda_policy, timestamps
from qcsight_cloud.fleet import Fleet
from qcsight_cloud.ingest import Ingestor
from qcsight_cloud.lambda_policy import PolicyJob, SageMakerRetrainer, run_policy
from qcsight_cloud.policy import FIRE, HOLD, PolicySettings
from qcsight_cloud.records import CONFIRM, FALSE_ALARM, Run
from qcsight_cloud.sqlite_store import SqliteStore
from qcsight_cloud.store import Store
from qcsight_core.errors import ConfigError
from qcsight_core.review_manifest import parse_line
from tests.cloud import builders
from tests.cloud.conftest import moto_client
from tests.helpers.aws import assert_valid

POLICY = {"drift_windows": 3, "drift_min_frames": 100, "rate_min_frames": 10**6, "new_reviews_to_fire": 10**6,
          "cooldown_hours": 0.0, "weekly_cap": 5}
SETTINGS = PolicySettings.from_mapping(POLICY)


def drifting(store: Store, line: str, thing: str, now: datetime, *, psi: float = 0.5) -> None:
    """Six windows of 400 frames; the last three with confidence PSI `psi`."""
    Ingestor(store, lambda t: line).ingest_batch([
        builders.incoming(builders.metrics(thing, i + 1, now - timedelta(minutes=10 - i), frames=400, defects=4,
                                           confidence_psi=psi if i >= 3 else 0.02)) for i in range(6)])


def reviewed_alerts(store: Store, line: str, thing: str, now: datetime) -> list[str]:
    """Three alerts: one confirmed and one false alarm with images in S3, one confirmed with a device-local image."""
    ids = []
    for seq, (image, action) in enumerate([(f"s3://images/devices/{thing}/a.jpg", CONFIRM),
                                           (f"s3://images/devices/{thing}/b.jpg", FALSE_ALARM),
                                           (None, CONFIRM)], start=100):
        message = builders.alert(thing, seq, now - timedelta(minutes=5))
        message["image_ref"] = image or "file:///var/qcsight/local.jpg"
        Ingestor(store, lambda t: line).ingest_batch([builders.incoming(message)])
        store.add_review(message["message_id"], "ana", action, "good" if action == FALSE_ALARM else None,
                         time=now - timedelta(minutes=1))
        ids.append(message["message_id"])
    return ids


@pytest.fixture
def sagemaker_pipeline(moto_endpoint: str, ns: str) -> tuple[Any, Any, PolicyJob]:
    """A pipeline and a manifest bucket on the moto server (names unique to the test)."""
    sagemaker, s3 = moto_client("sagemaker", moto_endpoint), moto_client("s3", moto_endpoint)
    s3.create_bucket(Bucket=f"{ns}-pipeline")
    sagemaker.create_pipeline(PipelineName=f"{ns}-retrain", RoleArn="arn:aws:iam::123456789012:role/sm",
                              PipelineDefinition=json.dumps({"Version": "2020-12-01", "Steps": []}))
    return sagemaker, s3, PolicyJob(f"{ns}-retrain", f"s3://{ns}-pipeline/manifests/", SETTINGS)


@pytest.mark.cloud
def test_a_firing_line_starts_one_execution_and_the_next_decisions_are_held(
        dynamo_store: Store, sagemaker_pipeline: tuple[Any, Any, PolicyJob], ns: str) -> None:
    sagemaker, s3, job = sagemaker_pipeline
    now = timestamps.now()
    line_a, line_b = f"{ns}-a", f"{ns}-b"
    drifting(dynamo_store, line_a, f"{ns}-cam-1", now)
    drifting(dynamo_store, line_b, f"{ns}-cam-2", now)
    alert_ids = reviewed_alerts(dynamo_store, line_a, f"{ns}-cam-1", now)
    fleet = Fleet({line_a: (f"{ns}-cam-1",), line_b: (f"{ns}-cam-2",)})
    retrainer = SageMakerRetrainer(sagemaker, s3, job)

    first = run_policy(dynamo_store, fleet, retrainer, job, now=now)
    # Both lines drift; the pipeline runs one execution at a time, so the second line is held by it.
    assert [(r["scope"], r["action"], r["blocked_by"]) for r in first] == [
        (line_a, FIRE, []), (line_b, HOLD, ["one_run"])]
    [execution] = sagemaker.list_pipeline_executions(PipelineName=job.pipeline_name)["PipelineExecutionSummaries"]
    assert execution["PipelineExecutionArn"] == first[0]["execution_arn"]
    parameters = {p["Name"]: p["Value"] for p in sagemaker.list_pipeline_parameters_for_execution(
        PipelineExecutionArn=execution["PipelineExecutionArn"])["PipelineParameters"]}
    [run] = dynamo_store.runs(line_a)
    assert (run.status, run.decision_id, run.detail["execution_arn"]) == (
        "running", first[0]["decision_id"], execution["PipelineExecutionArn"])
    assert parameters == {"Line": line_a, "RunId": run.run_id, "DecisionId": first[0]["decision_id"],
                          "ReviewedManifest": f"s3://{ns}-pipeline/manifests/{line_a}/{run.run_id}.manifest"}
    manifest = s3.get_object(Bucket=f"{ns}-pipeline", Key=f"manifests/{line_a}/{run.run_id}.manifest")["Body"].read()
    rows = [(image.alert_id, image.label, image.verdict) for image in
            (parse_line(text, f"manifest:{n}") for n, text in enumerate(manifest.decode().splitlines(), 1))]
    assert sorted(rows) == sorted([(alert_ids[0], "crack", "defect"), (alert_ids[1], "good", "false_alarm")]), \
        "the local image is left out"
    assert run.detail["manifest_counts"] == {"reviewed": 3, "listed": 2, "without_s3_image": 1, "disputed": 0}

    # Fifteen minutes later moto reports the execution Succeeded (it never runs one): the run is finished, line A's
    # current model dates from then (no windows since, so it holds), and line B gets its turn.
    second = run_policy(dynamo_store, fleet, retrainer, job, now=now + timedelta(minutes=15))
    [finished] = dynamo_store.runs(line_a)
    assert finished.status == "succeeded" and finished.finished is not None
    assert [(r["scope"], r["action"], r["triggers"]) for r in second] == [(line_a, HOLD, []), (line_b, FIRE, ["drift"])]
    assert len(sagemaker.list_pipeline_executions(PipelineName=job.pipeline_name)["PipelineExecutionSummaries"]) == 2
    assert [d.action for d in dynamo_store.decisions(line_b)] == [FIRE, HOLD]


def test_an_execution_started_by_hand_holds_the_policy(tmp_path: Path) -> None:
    """SageMaker reports an execution the store does not know: it counts as this line's active run."""
    store = SqliteStore(tmp_path / "s.sqlite")
    now = timestamps.now()
    drifting(store, "line-1", "cam-1", now)
    by_hand = "arn:aws:sagemaker:us-east-1:1:pipeline/p/execution/byhand"
    retrainer = FakeRetrainer(running=[(by_hand, "2026-03-02T08:00:00Z")])
    [result] = run_policy(store, Fleet({"line-1": ("cam-1",)}), retrainer,
                          PolicyJob("p", "s3://b/manifests/", SETTINGS), now=now)
    assert (result["action"], result["blocked_by"]) == (HOLD, ["one_run"]) and not retrainer.started
    [decision] = store.decisions("line-1")
    guard = next(c for c in decision.checks if c.name == "one_run")
    assert "byhand" in guard.summary


class FakeRetrainer:
    """The Retrainer interface with canned answers (the SageMaker calls themselves are tested with Stubber)."""

    def __init__(self, running: list[tuple[str, str]] | None = None) -> None:
        self._running = running or []
        self.started: list[dict[str, str]] = []

    def running(self) -> list[tuple[str, str]]:
        return list(self._running)

    def state(self, execution_arn: str) -> tuple[str, str | None]:
        return "running", None

    def start(self, run_id: str, parameters: Any, description: str) -> str:
        self.started.append(dict(parameters))
        return f"arn:aws:sagemaker:us-east-1:1:pipeline/p/execution/{run_id[:12]}"

    def put_manifest(self, key: str, body: bytes) -> str:
        return f"s3://b/manifests/{key}"


# ---------------------------------------------------------------- the SageMaker calls, validated by botocore


def _stubbed(tmp_path: Path) -> tuple[Any, Any, Any, PolicyJob]:
    import boto3
    from botocore.stub import Stubber

    sagemaker = boto3.client("sagemaker", region_name="eu-west-1", aws_access_key_id="k", aws_secret_access_key="s")
    s3 = boto3.client("s3", region_name="eu-west-1", aws_access_key_id="k", aws_secret_access_key="s")
    return sagemaker, Stubber(sagemaker), s3, PolicyJob("qcsight-retrain", "s3://bucket/manifests/", SETTINGS)


ARN = "arn:aws:sagemaker:eu-west-1:123456789012:pipeline/qcsight-retrain/execution/abc123"


def test_a_finished_execution_finishes_its_run_and_a_refused_start_is_recorded_not_retried(tmp_path: Path) -> None:
    from botocore.stub import ANY, Stubber

    sagemaker, stub, s3, job = _stubbed(tmp_path)
    store = SqliteStore(tmp_path / "s.sqlite")
    now = timestamps.now()
    old = Run("r1", "line-1", timestamps.iso(now - timedelta(hours=30)), "running", "d0",
              detail={"execution_arn": ARN})
    store.put_run(old)
    drifting(store, "line-1", "cam-1", now)
    finished = datetime.now(timezone.utc) - timedelta(hours=20)  # before the drifting windows
    stub.add_response("describe_pipeline_execution", {"PipelineExecutionArn": ARN,
                      "PipelineExecutionStatus": "Succeeded", "LastModifiedTime": finished},
                      {"PipelineExecutionArn": ARN})
    stub.add_response("list_pipeline_executions", {"PipelineExecutionSummaries": [
        {"PipelineExecutionArn": ARN, "PipelineExecutionStatus": "Succeeded", "StartTime": finished}]},
        {"PipelineName": "qcsight-retrain", "SortBy": "CreationTime", "SortOrder": "Descending", "MaxResults": 20})
    stub.add_client_error("start_pipeline_execution", "ResourceLimitExceeded", "too many executions",
                          expected_params={"PipelineName": "qcsight-retrain", "ClientRequestToken": ANY,
                                           "PipelineExecutionDescription": ANY, "PipelineParameters": ANY})
    s3_stub = Stubber(s3)
    s3_stub.add_response("put_object", {}, {"Bucket": "bucket", "Key": ANY, "Body": ANY,
                                            "ContentType": "application/x-ndjson"})
    with stub, s3_stub:
        [result] = run_policy(store, Fleet({"line-1": ("cam-1",)}), SageMakerRetrainer(sagemaker, s3, job), job,
                              now=now)
        stub.assert_no_pending_responses()
    assert result["action"] == FIRE and result["run_status"] == "failed"
    runs = {r.run_id: r for r in store.runs("line-1")}
    assert (runs["r1"].status, runs["r1"].finished) == ("succeeded", timestamps.iso(finished))
    [failed] = [r for r in runs.values() if r.run_id != "r1"]
    assert "ResourceLimitExceeded" in failed.detail["error"] and failed.finished == result_time(store)


def result_time(store: SqliteStore) -> str:
    return store.decisions("line-1")[0].time


def test_the_start_request_is_valid_for_the_service() -> None:
    """What SageMakerRetrainer.start sends passes botocore's full input model (patterns, lengths)."""
    sent: dict[str, Any] = {}

    class Recorder:
        def start_pipeline_execution(self, **request: Any) -> dict[str, str]:
            sent.update(request)
            return {"PipelineExecutionArn": ARN}

    job = PolicyJob("qcsight-retrain", "s3://bucket/manifests/", SETTINGS)
    run_id = "0" * 32
    SageMakerRetrainer(Recorder(), None, job).start(run_id, {"Line": "line-1", "RunId": run_id}, "x" * 5000)
    assert_valid("StartPipelineExecution", sent)


@pytest.mark.parametrize(("env", "field"), [
    ({"QCSIGHT_PIPELINE_NAME": "", "QCSIGHT_MANIFEST_PREFIX": "s3://b/m/"}, "QCSIGHT_PIPELINE_NAME"),
    ({"QCSIGHT_PIPELINE_NAME": "p", "QCSIGHT_MANIFEST_PREFIX": "/tmp/m"}, "QCSIGHT_MANIFEST_PREFIX"),
    ({"QCSIGHT_PIPELINE_NAME": "p", "QCSIGHT_MANIFEST_PREFIX": "s3:///m/"}, "QCSIGHT_MANIFEST_PREFIX"),
    ({"QCSIGHT_PIPELINE_NAME": "p", "QCSIGHT_MANIFEST_PREFIX": "s3://b/m/", "QCSIGHT_POLICY": "[1]"},
     "QCSIGHT_POLICY"),
    ({"QCSIGHT_PIPELINE_NAME": "p", "QCSIGHT_MANIFEST_PREFIX": "s3://b/m/", "QCSIGHT_POLICY": '{"drift": 1}'},
     "policy.drift"),
])
def test_bad_environment_names_the_variable(env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        PolicyJob.from_environment(env)


@pytest.mark.cloud
def test_the_lambda_entry_point_runs_from_its_environment(dynamo_store: Store, aws_env: str, ns: str,
                                                          sagemaker_pipeline: tuple[Any, Any, PolicyJob],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """handler(event, context) as EventBridge calls it, the line's members listed from its IoT thing group."""
    sagemaker, _, job = sagemaker_pipeline
    iot = moto_client("iot", aws_env)
    iot.create_thing_group(thingGroupName=f"{ns}-line")
    iot.create_thing(thingName=f"{ns}-cam")
    iot.add_thing_to_thing_group(thingGroupName=f"{ns}-line", thingName=f"{ns}-cam")
    drifting(dynamo_store, f"{ns}-elsewhere", f"{ns}-cam", timestamps.now())
    for name, value in {"QCSIGHT_STORE": "dynamodb:qcsight-test", "QCSIGHT_PIPELINE_NAME": job.pipeline_name,
                        "QCSIGHT_MANIFEST_PREFIX": job.manifest_prefix, "QCSIGHT_POLICY": json.dumps(POLICY),
                        "QCSIGHT_FLEET": json.dumps({"lines": {"L": {"thing_group": f"{ns}-line"}}})}.items():
        monkeypatch.setenv(name, value)
    lambda_policy._app.cache_clear()
    try:
        result = lambda_policy.handler({"source": "aws.events", "detail-type": "Scheduled Event"}, None)
    finally:
        lambda_policy._app.cache_clear()
    [decision] = result["decisions"]
    assert (decision["scope"], decision["action"], decision["run_status"]) == ("L", FIRE, "running")
    assert len(sagemaker.list_pipeline_executions(PipelineName=job.pipeline_name)["PipelineExecutionSummaries"]) == 1


def test_silent_devices_are_counted_per_line_for_the_alarm(tmp_path: Path) -> None:
    from tests.cloud.test_ingest import check_emf

    store = SqliteStore(tmp_path / "s.sqlite")
    now = timestamps.now()
    ingest = Ingestor(store, lambda t: "line-1")
    ingest.ingest_batch([builders.incoming(builders.status("cam-1", 1, now - timedelta(seconds=30))),
                         builders.incoming(builders.status("cam-2", 1, now - timedelta(minutes=10)))])
    fleet = Fleet({"line-1": ("cam-1", "cam-2", "cam-3"), "line-2": ("cam-4",)})  # 30 s heartbeats, 3 -> 90 s
    doc = lambda_policy.silent_document(fleet, store.devices(), now)
    check_emf(doc)
    assert doc["SilentDevices"] == 3.0 and doc["SilentByLine"] == {"line-1": 2, "line-2": 1}
    assert doc["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [[]], "one fleet-wide series: what the alarm reads"
    emitted: list[dict[str, Any]] = []
    run_policy(store, fleet, FakeRetrainer(), PolicyJob("p", "s3://b/manifests/", SETTINGS), now=now,
               emit=emitted.append)
    assert [d["SilentDevices"] for d in emitted] == [3.0]
