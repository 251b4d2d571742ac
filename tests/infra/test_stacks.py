"""What matters in the synthesized templates, asserted with aws_cdk.assertions and on the resolved JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import timedelta
from typing import Any

import pytest

from tests.infra.cfn import ACCOUNT, REGION, as_list, resolve, resources

Templates = Mapping[str, dict[str, Any]]


@pytest.fixture(scope="module")
def cdk_templates(templates: Templates) -> dict[str, Any]:
    from aws_cdk.assertions import Template

    return {name: Template.from_json(template) for name, template in templates.items()}


# ---------------------------------------------------------------- storage


def test_every_bucket_is_encrypted_private_versioned_and_tls_only(templates: Templates,
                                                                  cdk_templates: dict[str, Any]) -> None:
    from aws_cdk.assertions import Match

    buckets = list(resources(templates, "AWS::S3::Bucket"))
    assert len(buckets) == 5
    storage = cdk_templates["storage"]
    for _, logical_id, props in buckets:
        encryption = props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]["ServerSideEncryptionByDefault"]
        is_log_bucket = "logs-" in props["BucketName"]
        # Access logs (S3 server logs, ALB logs) can be delivered only to SSE-S3 buckets.
        assert encryption["SSEAlgorithm"] == ("AES256" if is_log_bucket else "aws:kms"), logical_id
        if not is_log_bucket:
            assert "KMSMasterKeyID" in encryption and "LoggingConfiguration" in props, logical_id
        assert props["PublicAccessBlockConfiguration"] == {
            "BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True, "RestrictPublicBuckets": True}
        assert props["VersioningConfiguration"] == {"Status": "Enabled"}
        assert props["LifecycleConfiguration"]["Rules"], logical_id
        storage.has_resource_properties("AWS::S3::BucketPolicy", {
            "Bucket": {"Ref": logical_id},
            "PolicyDocument": {"Statement": Match.array_with([Match.object_like({
                "Effect": "Deny", "Condition": {"Bool": {"aws:SecureTransport": "false"}}})])},
        })


def test_images_expire_and_old_versions_move_to_cheaper_tiers(templates: Templates) -> None:
    by_name = {props["BucketName"]: props for _, _, props in resources(templates, "AWS::S3::Bucket")}
    images = by_name[f"qcsight-images-{ACCOUNT}-{REGION}"]["LifecycleConfiguration"]["Rules"]
    expire = {"Id": "expire-images", "ExpirationInDays": 90, "Status": "Enabled", "ExpiredObjectDeleteMarker": False}
    assert expire in images
    models = by_name[f"qcsight-models-{ACCOUNT}-{REGION}"]["LifecycleConfiguration"]["Rules"]
    tiers = [t["StorageClass"] for t in models[0]["NoncurrentVersionTransitions"]]
    assert tiers == ["STANDARD_IA", "GLACIER_IR"] and not any("ExpirationInDays" in rule for rule in models)


def test_key_rotates_and_tables_have_pitr_and_the_key(cdk_templates: dict[str, Any], templates: Templates) -> None:
    cdk_templates["storage"].has_resource_properties("AWS::KMS::Key", {"EnableKeyRotation": True})
    tables = list(resources(templates, "AWS::DynamoDB::Table"))
    from qcsight_cloud.tables import TABLES, create_table_request

    # The deployed tables are the store's own: what `dynamodb:qcsight` opens, with its keys, indexes and TTL.
    by_name = {props["TableName"]: props for _, _, props in tables}
    assert set(by_name) == {f"qcsight-{key}" for key in TABLES}
    for key, spec in TABLES.items():
        request, props = create_table_request("qcsight", key), by_name[f"qcsight-{key}"]
        assert props["KeySchema"] == request["KeySchema"], key
        assert sorted(props["AttributeDefinitions"], key=str) == sorted(request["AttributeDefinitions"], key=str), key
        indexes = {i["IndexName"]: i for i in props.get("GlobalSecondaryIndexes", [])}
        assert set(indexes) == {i["IndexName"] for i in spec["GlobalSecondaryIndexes"]}, key
        for index in spec["GlobalSecondaryIndexes"]:
            deployed = indexes[index["IndexName"]]
            assert deployed["KeySchema"] == index["KeySchema"], (key, index["IndexName"])
            assert deployed["Projection"]["ProjectionType"] == index["Projection"]["ProjectionType"]
            assert sorted(deployed["Projection"].get("NonKeyAttributes", [])) == sorted(
                index["Projection"].get("NonKeyAttributes", []))
        ttl = props.get("TimeToLiveSpecification")
        assert (ttl and ttl["AttributeName"]) == (spec["TimeToLiveAttribute"] or None), key
    for _, logical_id, props in tables:
        assert props["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}, logical_id
        assert props["SSESpecification"]["SSEEnabled"] is True and props["SSESpecification"]["SSEType"] == "KMS"
        assert props["DeletionProtectionEnabled"] is True


def test_stateful_resources_are_retained(templates: Templates) -> None:
    for kind in ("AWS::S3::Bucket", "AWS::DynamoDB::Table", "AWS::KMS::Key"):
        for logical_id, resource in templates["storage"]["Resources"].items():
            if resource["Type"] == kind:
                assert resource["DeletionPolicy"] == "Retain", logical_id


def test_queues_and_topics_are_encrypted_and_tls_only(templates: Templates) -> None:
    queues = list(resources(templates, "AWS::SQS::Queue"))
    topics = list(resources(templates, "AWS::SNS::Topic"))
    assert len(queues) == 6 and len(topics) == 2  # 3 function DLQs, rule errors, events, schedule
    for _, logical_id, props in queues + topics:
        assert "KmsMasterKeyId" in props, logical_id
    for kind in ("AWS::SQS::QueuePolicy", "AWS::SNS::TopicPolicy"):
        policies = list(resources(templates, kind))
        assert len(policies) == (len(queues) if kind.startswith("AWS::SQS") else len(topics))
        for _, _, props in policies:
            document = props["PolicyDocument"]["Statement"]
            assert any(s["Effect"] == "Deny" and s.get("Condition", {}).get("Bool") == {"aws:SecureTransport": "false"}
                       for s in document)


# ---------------------------------------------------------------- IAM


def _statements(templates: Templates) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for stack, logical_id, props in resources(templates, "AWS::IAM::Policy"):
        for statement in props["PolicyDocument"]["Statement"]:
            yield stack, logical_id, resolve(statement)
    for stack, logical_id, props in resources(templates, "AWS::IAM::Role"):
        for policy in props.get("Policies", []):
            for statement in policy["PolicyDocument"]["Statement"]:
                yield stack, logical_id, resolve(statement)


# Resource "*" appears only for actions that have no resource-level permissions; AWS requires it.
STAR_ALLOWED = {
    "ecr:GetAuthorizationToken": "ECR login has no resource (SageMaker jobs, the review task's execution role)",
    "cloudwatch:PutMetricData": "no resource; the statement's condition pins SageMaker's namespaces",
}
B = f"{ACCOUNT}-{REGION}"
SM = f"arn:aws:sagemaker:{REGION}:{ACCOUNT}"
# Every wildcard inside a resource ARN, by statement, with why it cannot be narrower. A new one fails here.
PARTIAL_WILDCARDS = {
    "ReadComponentArtifacts": ({f"arn:aws:s3:::qcsight-models-{B}/components/*"}, "every component version"),
    "UploadOwnImages": ({f"arn:aws:s3:::qcsight-images-{B}/devices/${{credentials-iot:ThingName}}/*"},
                        "the device's own prefix, by policy variable"),
    "WatchRetraining": ({f"{SM}:pipeline/qcsight-retrain/execution/*"}, "execution ids made by SageMaker"),
    "WriteReviewedManifest": ({f"arn:aws:s3:::qcsight-pipeline-{B}/manifests/*"}, "one manifest per run"),
    "ReadApprovedModels": ({f"{SM}:model-package/qcsight-models/*"}, "package versions numbered by SageMaker"),
    "ReadModelArtifacts": ({f"arn:aws:s3:::qcsight-pipeline-{B}/*"}, "where the run wrote the model"),
    "PublishComponentArtifacts": ({f"arn:aws:s3:::qcsight-models-{B}/components/*"}, "a folder per version"),
    "PublishComponents": ({f"arn:aws:greengrass:{REGION}:{ACCOUNT}:components:com.qcsight.*",
                           f"arn:aws:greengrass:{REGION}:{ACCOUNT}:components:com.qcsight.*:versions:*"},
                          "qcsight's own components and versions"),
    "FollowDeployments": ({f"arn:aws:greengrass:{REGION}:{ACCOUNT}:deployments:*"}, "ids made by Greengrass"),
    "GreengrassDeploymentJobs": ({f"arn:aws:iot:{REGION}:{ACCOUNT}:job/*"}, "job ids made by Greengrass"),
    "CompileForTheEdge": ({f"{SM}:compilation-job/qcsight-*"}, "one job per model version"),
    "ReadTrainingData": ({f"arn:aws:s3:::qcsight-{b}-{B}/*" for b in ("data", "images", "models")},
                         "the run's manifest names the objects"),
    "WritePipelineOutput": ({f"arn:aws:s3:::qcsight-pipeline-{B}/*"}, "prefixes named by SageMaker per run"),
    "RunPipelineJobs": ({f"{SM}:training-job/*", f"{SM}:processing-job/*"}, "job names made by the pipeline"),
    "RegisterCandidates": ({f"{SM}:model-package/qcsight-models/*"}, "package versions numbered by SageMaker"),
    "JobLogs": ({f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/aws/sagemaker/*"}, "log groups per job kind"),
    "StartTransformJobs": ({f"{SM}:transform-job/qcsight-batch-*"}, "a name per scheduled run"),
    "BatchInputOutput": ({f"arn:aws:s3:::qcsight-data-{B}/batch/incoming/*",
                          f"arn:aws:s3:::qcsight-pipeline-{B}/batch/scores/*"},
                         "every image in, a result per image out"),
    "SignImageUrls": ({f"arn:aws:s3:::qcsight-images-{B}/devices/*"}, "any device's alert image"),
}
INDEX_SIDS = {"ReadAlertsAndFleet"}  # the review app queries most indexes; the functions name theirs


def test_iam_statements_hold_no_star_resource_except_where_aws_requires_it(templates: Templates) -> None:
    seen_partial: dict[str, set[str]] = {}
    for stack, logical_id, statement in _statements(templates):
        actions = as_list(statement["Action"])
        for resource in as_list(statement.get("Resource", [])):
            where = f"{stack}/{logical_id}/{statement.get('Sid')}: {resource}"
            if resource == "*":
                assert actions and all(action in STAR_ALLOWED for action in actions), where
            elif "*" in resource:
                sid = statement.get("Sid", "")
                if sid in INDEX_SIDS and resource.endswith("/index/*"):
                    continue
                # CDK's own grants: a log group ARN's ':*' (its streams) and nothing else.
                assert sid in PARTIAL_WILDCARDS, where
                seen_partial.setdefault(sid, set()).add(resource)
    for sid, found in seen_partial.items():
        assert found == PARTIAL_WILDCARDS[sid][0], sid
    assert set(seen_partial) == set(PARTIAL_WILDCARDS)


def test_no_wildcard_actions(templates: Templates) -> None:
    for stack, logical_id, statement in _statements(templates):
        for action in as_list(statement["Action"]):
            assert "*" not in action, f"{stack}/{logical_id}: {action}"


def test_kms_use_is_tied_to_the_calling_service(templates: Templates) -> None:
    for stack, logical_id, statement in _statements(templates):
        if statement.get("Sid") and all(a.startswith("kms:") for a in as_list(statement["Action"])):
            assert "kms:ViaService" in statement["Condition"]["StringEquals"], f"{stack}/{logical_id}"


# CDK's own custom-resource handlers, by stack and logical id: the one that strips the review VPC's default
# security group, and the one that copies the training source to the pipeline bucket (stacks/training_source.py).
CDK_HANDLERS = (("review", "CustomVpcRestrictDefaultSG"), ("compute", "CustomCDKBucketDeployment"))


def _is_cdk_handler(stack: str, logical_id: str) -> bool:
    return any(stack == owner and logical_id.startswith(prefix) for owner, prefix in CDK_HANDLERS)


def _functions(templates: Templates) -> list[tuple[str, str, dict[str, Any]]]:
    """The app's own functions, CDK's custom-resource handlers left out."""
    return [(stack, logical_id, props) for stack, logical_id, props in resources(templates, "AWS::Lambda::Function")
            if not _is_cdk_handler(stack, logical_id)]


def test_one_role_per_function_and_each_function_is_bounded(templates: Templates) -> None:
    functions = _functions(templates)
    handlers = [(stack, logical_id) for stack, logical_id, _ in resources(templates, "AWS::Lambda::Function")
                if _is_cdk_handler(stack, logical_id)]
    assert sorted(stack for stack, _ in handlers) == sorted(owner for owner, _ in CDK_HANDLERS), handlers
    assert {stack for stack, _, _ in functions} == {"compute"}
    assert {props.get("FunctionName") for _, _, props in functions} == {
        "qcsight-ingest", "qcsight-policy", "qcsight-deploy"}
    roles = [json.dumps(props["Role"]) for _, _, props in functions]
    assert len(set(roles)) == 3
    log_groups = {logical_id: props for _, logical_id, props in resources(templates, "AWS::Logs::LogGroup")}
    for _, logical_id, props in functions:
        assert props["ReservedConcurrentExecutions"] >= 1, logical_id
        assert "TargetArn" in props["DeadLetterConfig"], logical_id
        assert props["Architectures"] == ["arm64"] and props["Runtime"].startswith("python3.")
        group = props["LoggingConfig"]["LogGroup"]["Ref"]
        assert log_groups[group]["RetentionInDays"] == 90
    from stacks import names

    # Each function gets exactly the variables its handler reads, and the store the tables make up.
    by_name = {props["FunctionName"]: props for _, _, props in functions}
    for spec in names.FUNCTIONS:
        props = by_name[f"qcsight-{spec.key}"]
        assert props["Handler"] == spec.handler
        env = resolve(props["Environment"]["Variables"])
        assert set(env) == set(names.FUNCTION_ENV[spec.key]), spec.key
        assert env["QCSIGHT_STORE"] == "dynamodb:qcsight"
    fleet = json.loads(resolve(by_name["qcsight-ingest"]["Environment"]["Variables"])["QCSIGHT_FLEET"])
    assert fleet == {"lines": {"line-7": {"thing_group": "qcsight-line-line-7"},
                               "line-8": {"thing_group": "qcsight-line-line-8"}}}


def test_the_deploy_function_reads_every_variable_it_is_given_and_may_do_only_its_rollout(
        templates: Templates) -> None:
    from qcsight_cloud.lambda_deploy import APPROVAL_NEEDS, TICK_NEEDS, DeploySettings
    from qcsight_cloud.rollout import SoakSettings

    class Reading(dict[str, str]):
        """The template's variables, remembering which of them the function's reader asks for."""

        def __init__(self, values: dict[str, str]) -> None:
            super().__init__(values)
            self.asked: set[str] = set()

        def get(self, key: str, default: Any = None) -> Any:
            self.asked.add(key)
            return super().get(key, default)

        def __getitem__(self, key: str) -> str:
            self.asked.add(key)
            return super().__getitem__(key)

    (props,) = [props for _, _, props in _functions(templates) if props["FunctionName"] == "qcsight-deploy"]
    env = Reading(resolve(props["Environment"]["Variables"]))
    settings = DeploySettings.from_env(env).check(*TICK_NEEDS, *APPROVAL_NEEDS)
    assert set(env) <= env.asked, "set but never read: " + ", ".join(sorted(set(env) - env.asked))
    assert env.asked - set(env) == {"QCSIGHT_ARTIFACT_BASE"}  # a local override of the bucket and prefix
    assert settings.scope == "rollout:qcsight-fleet" and settings.soak == SoakSettings()
    assert settings.artifact_base == f"s3://qcsight-models-{B}/components"
    assert settings.canary_group_arn == f"arn:aws:iot:{REGION}:{ACCOUNT}:thinggroup/qcsight-canary"
    assert (settings.neo_target, settings.neo_role_arn, settings.neo_output) == (
        "", f"arn:aws:iam::{ACCOUNT}:role/qcsight-sagemaker-execution", f"s3://qcsight-pipeline-{B}/neo/")

    granted: dict[str, set[str]] = {}
    for stack, logical_id, statement in _statements(templates):
        if stack == "compute" and logical_id.startswith("DeployRole"):
            for action in as_list(statement["Action"]):
                granted.setdefault(action, set()).update(as_list(statement["Resource"]))
    group = f"arn:aws:iot:{REGION}:{ACCOUNT}:thinggroup/qcsight-"
    assert granted["iot:ListThingsInThingGroup"] == {group + "canary", group + "fleet"}
    table = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/qcsight-"
    dynamodb = {action: resources for action, resources in granted.items() if action.startswith("dynamodb:")}
    assert dynamodb == {"dynamodb:Query": {table + "runs", table + "metrics"},
                        "dynamodb:PutItem": {table + "runs", table + "decisions"}}
    assert not [action for action in granted if action.startswith("sns:")]


# ---------------------------------------------------------------- IoT, events, batch


def test_every_iot_rule_has_an_error_action_and_passes_the_connection_identity(templates: Templates) -> None:
    from qcsight_cloud.lambda_ingest import RULE_SQL, RULE_SQL_VERSION

    rules = list(resources(templates, "AWS::IoT::TopicRule"))
    assert sorted(props["TopicRulePayload"]["Sql"] for _, _, props in rules) == sorted(RULE_SQL.values())
    assert {props["TopicRulePayload"]["AwsIotSqlVersion"] for _, _, props in rules} == {RULE_SQL_VERSION}
    assert {props["TopicRulePayload"]["Sql"].rsplit("'qcsight/+/", 1)[1] for _, _, props in rules} == {
        "metrics'", "alerts'", "status'"}
    for _, logical_id, props in rules:
        payload = props["TopicRulePayload"]
        assert payload["ErrorAction"]["Sqs"]["QueueUrl"], logical_id
        assert "clientid() AS clientid" in payload["Sql"] and "topic() AS topic" in payload["Sql"]
        assert "Lambda" in payload["Actions"][0]


def test_model_approval_event_and_the_canary_check_go_to_the_deploy_function(templates: Templates,
                                                                            cdk_templates: dict[str, Any]) -> None:
    from aws_cdk.assertions import Match

    cdk_templates["compute"].has_resource_properties("AWS::Events::Rule", {
        "EventPattern": {"source": ["aws.sagemaker"], "detail-type": ["SageMaker Model Package State Change"],
                         "detail": {"ModelPackageGroupName": ["qcsight-models"], "ModelApprovalStatus": ["Approved"]}},
        "Targets": [Match.object_like({"DeadLetterConfig": Match.any_value(), "RetryPolicy": Match.any_value()})],
    })
    # The schedule sends EventBridge's own "Scheduled Event" (no Input), which the function dispatches on.
    functions = {logical_id: props["FunctionName"] for _, logical_id, props in _functions(templates)}
    (check,) = [props for _, logical_id, props in resources(templates, "AWS::Events::Rule")
                if logical_id.startswith("CanaryCheck")]
    assert check["ScheduleExpression"] == "rate(10 minutes)"
    (target,) = check["Targets"]
    assert functions[target["Arn"]["Fn::GetAtt"][0]] == "qcsight-deploy" and "Input" not in target


def test_batch_schedule_sends_the_request_batch_submit_builds(templates: Templates) -> None:
    from qcsight_batch.submit import EXECUTION_ID, SCHEDULED_TIME, TRANSFORM_TARGET_ARN

    (_, _, schedule), = resources(templates, "AWS::Scheduler::Schedule")
    (_, _, model), = resources(templates, "AWS::SageMaker::Model")
    target = resolve(schedule["Target"])
    assert target["Arn"] == TRANSFORM_TARGET_ARN
    job = json.loads(target["Input"])
    assert job["TransformJobName"] == f"qcsight-batch-{EXECUTION_ID}"
    assert job["ModelName"] == model["ModelName"]
    assert job["TransformOutput"]["S3OutputPath"] == f"s3://qcsight-pipeline-{ACCOUNT}-{REGION}/batch/scores/{SCHEDULED_TIME}/"
    assert job["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"] == f"s3://qcsight-data-{ACCOUNT}-{REGION}/batch/incoming/"
    assert "DeadLetterConfig" in target and schedule["ScheduleExpression"] == "cron(0 2 * * ? *)"
    assert resolve(model["PrimaryContainer"])["ModelDataUrl"] == f"s3://qcsight-models-{ACCOUNT}-{REGION}/batch/current/model.tar.gz"


def test_pipeline_is_qcsight_clouds_definition_with_this_fleets_role_buckets_and_group(templates: Templates) -> None:
    from qcsight_cloud import pipeline as qp

    (_, _, pipeline), = resources(templates, "AWS::SageMaker::Pipeline")
    body = json.loads(resolve(pipeline["PipelineDefinition"]["PipelineDefinitionBody"]))
    steps = {step["Name"]: step for step in body["Steps"]}
    assert list(steps) == [qp.TRAIN, qp.EVALUATE, qp.GATE, qp.CONDITION]
    train = steps[qp.TRAIN]["Arguments"]
    assert train["RoleArn"] == f"arn:aws:iam::{ACCOUNT}:role/qcsight-sagemaker-execution"
    assert train["AlgorithmSpecification"]["TrainingImage"].startswith(f"763104351884.dkr.ecr.{REGION}.amazonaws.com/"
                                                                       "pytorch-training:")
    code = next(c for c in train["InputDataConfig"] if c["ChannelName"] == "code")
    assert code["DataSource"]["S3DataSource"]["S3Uri"] == f"s3://qcsight-pipeline-{ACCOUNT}-{REGION}/source/"
    kms = train["OutputDataConfig"]["KmsKeyId"]
    assert kms.startswith("<Import:qcsight-storage:") and "Key" in kms, "the storage stack's key"
    [register] = steps[qp.CONDITION]["Arguments"]["IfSteps"]
    assert register["Arguments"]["ModelPackageGroupName"] == "qcsight-models"
    assert register["Arguments"]["ModelApprovalStatus"] == "PendingManualApproval"
    [(_, _, model)] = list(resources(templates, "AWS::SageMaker::Model"))
    batch_image = resolve(model["PrimaryContainer"])["Image"]["Fn::Sub"]  # the scoring image asset
    assert batch_image in str(register["Arguments"]["InferenceSpecification"]["Containers"][0]["Image"]), \
        "the candidate is served by the Batch Transform image"


def test_silent_devices_are_flagged_by_device_defender(templates: Templates) -> None:
    (_, _, profile), = resources(templates, "AWS::IoT::SecurityProfile")
    behavior, = profile["Behaviors"]
    assert behavior["Metric"] == "aws:num-messages-sent"
    assert behavior["Criteria"]["ComparisonOperator"] == "less-than" and behavior["Criteria"]["DurationSeconds"] == 900
    assert len(profile["TargetArns"]) == 3  # canary + two lines


# ---------------------------------------------------------------- review hosting and monitoring


def test_review_app_is_reached_only_through_https_and_cognito(templates: Templates) -> None:
    listeners = {props["Port"]: props for _, _, props in resources(templates, "AWS::ElasticLoadBalancingV2::Listener")}
    assert set(listeners) == {80, 443}
    https = listeners[443]
    assert https["Protocol"] == "HTTPS" and https["Certificates"]
    actions = sorted(https["DefaultActions"], key=lambda action: action["Order"])
    assert [action["Type"] for action in actions] == ["authenticate-cognito", "forward"]
    assert listeners[80]["DefaultActions"][0]["RedirectConfig"]["Protocol"] == "HTTPS"
    (_, _, pool), = resources(templates, "AWS::Cognito::UserPool")
    assert pool["MfaConfiguration"] == "ON" and pool["AdminCreateUserConfig"]["AllowAdminCreateUserOnly"] is True
    ingress = [rule for _, _, props in resources(templates, "AWS::EC2::SecurityGroup")
               for rule in props.get("SecurityGroupIngress", [])]
    assert ingress and all(rule["CidrIp"] == "10.0.0.0/8" for rule in ingress if "CidrIp" in rule)


def test_every_alarm_notifies_the_ops_topic(templates: Templates) -> None:
    alarms = list(resources(templates, "AWS::CloudWatch::Alarm"))
    assert len(alarms) >= 15
    for _, logical_id, props in alarms:
        assert props["AlarmActions"], logical_id
    (_, _, dashboard), = resources(templates, "AWS::CloudWatch::Dashboard")
    body = str(resolve(dashboard["DashboardBody"]))
    for title in ("Defect rate by line", "Drift (PSI)", "Silent devices", "Retraining pipeline runs"):
        assert title in body


def test_the_dashboard_and_alarms_read_metrics_the_functions_write(tmp_path: Any) -> None:
    from stacks import names

    from qcsight_cloud.emf import NAMESPACE, window_document
    from qcsight_cloud.fleet import Fleet
    from qcsight_cloud.ingest import Ingestor
    from qcsight_cloud.lambda_policy import silent_document
    from qcsight_cloud.sqlite_store import SqliteStore
    from tests.cloud import builders

    store = SqliteStore(tmp_path / "s.sqlite")
    Ingestor(store, lambda t: "line-1").ingest_batch([builders.incoming(builders.metrics("cam-1", 1, builders.T0))])
    [window] = store.windows(thing="cam-1", since=builders.T0 - timedelta(hours=1))
    written = {m["Name"] for m in window_document(window)["_aws"]["CloudWatchMetrics"][0]["Metrics"]}
    written |= {"SilentDevices"} & set(silent_document(Fleet({}), [], builders.T0))
    assert names.METRICS_NAMESPACE == NAMESPACE
    drawn = {names.METRIC_DEFECT_RATE, names.METRIC_CONFIDENCE_PSI, names.METRIC_BRIGHTNESS_PSI,
             names.METRIC_LATENCY_P95, names.METRIC_SILENT_DEVICES}
    assert drawn <= written, drawn - written
    assert names.METRIC_DIMENSION_LINE in window_document(window)["_aws"]["CloudWatchMetrics"][0]["Dimensions"][0]
