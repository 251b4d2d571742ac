"""The loop's moving parts: the functions and their IoT rules, the SageMaker pipeline and registry, events, batch.

One role per function with only the actions and resources that function uses; every function has a
dead-letter queue, a reserved concurrency and a log group with a set retention.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from aws_cdk import Annotations, CfnOutput, CfnTag, Duration, IgnoreMode, RemovalPolicy, Stack, Stage
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_iam as iam
from aws_cdk import aws_iot as iot
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sagemaker as sagemaker
from aws_cdk import aws_scheduler as scheduler
from aws_cdk import aws_sqs as sqs
from constructs import Construct

from qcsight_aws.jobs import SOURCE_TARBALL
from qcsight_aws.s3 import S3Uri
from qcsight_batch.submit import ScheduleSpec, TransformJobSpec, model_request, schedule_request
from qcsight_cloud.lambda_ingest import RULE_SQL, RULE_SQL_VERSION
from qcsight_core import topics
from qcsight_train.launch.cli import default_image_uri
from qcsight_train.launch.job_requests import training_request
from qcsight_train.launch.plan import AwsSpec, ComputeSpec, TrainingJobSpec, TrainingPlan
from stacks import names, packaging
from stacks.arns import Arns
from stacks.config import AppConfig
from stacks.iot import IotStack
from stacks.nag import acknowledge, allow, kms_via
from stacks.storage import StorageStack
from stacks.tables import store_url
from stacks.training_source import TrainingSource

# CloudWatch Logs retention periods by day count, as CDK names them.
_RETENTION = {1: "ONE_DAY", 3: "THREE_DAYS", 5: "FIVE_DAYS", 7: "ONE_WEEK", 14: "TWO_WEEKS", 30: "ONE_MONTH",
              60: "TWO_MONTHS", 90: "THREE_MONTHS", 120: "FOUR_MONTHS", 150: "FIVE_MONTHS", 180: "SIX_MONTHS",
              365: "ONE_YEAR", 400: "THIRTEEN_MONTHS", 545: "EIGHTEEN_MONTHS", 731: "TWO_YEARS", 1096: "THREE_YEARS",
              1827: "FIVE_YEARS", 2192: "SIX_YEARS", 2557: "SEVEN_YEARS", 2922: "EIGHT_YEARS", 3288: "NINE_YEARS",
              3653: "TEN_YEARS"}
PipelineDefinition = Callable[[Mapping[str, str]], Mapping[str, Any]]
# Training and evaluation images come from AWS's deep learning containers (this account hosts them
# in every commercial region); the pipeline pulls them, nothing else from outside this account.
DLC_ACCOUNT = "763104351884"
DLC_REPOSITORIES = ("pytorch-training", "pytorch-inference")
BATCH_INPUT_PREFIX = "batch/incoming/"
BATCH_OUTPUT_PREFIX = "batch/scores/"
TRAINING_SOURCE_PREFIX = "source/"  # the pipeline's training code: <pipeline bucket>/source/sourcedir.tar.gz
MANIFEST_PREFIX = "manifests/"  # the policy's reviewed-alert manifests, in the pipeline bucket


def retention_days(days: int) -> logs.RetentionDays:
    """CDK's RetentionDays for a day count AppConfig has already validated."""
    return logs.RetentionDays[_RETENTION[days]]


def load_pipeline_definition(hook: str = names.PIPELINE_DEFINITION_HOOK) -> PipelineDefinition | None:
    """The pipeline definition builder named 'module:function', or None while its module is not in the tree."""
    module_name, _, attribute = hook.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None  # the module itself (qcsight_cloud) is absent; an import error inside it is raised
        raise
    builder: PipelineDefinition = getattr(module, attribute)
    return builder


class ComputeStack(Stack):
    """Functions (ingest, policy, deploy), IoT rules, the SageMaker pipeline with its code, registry, events, batch."""

    def __init__(self, scope: Construct, construct_id: str, *, config: AppConfig, storage: StorageStack,
                 iot_stack: IotStack, pipeline_definition: PipelineDefinition | None, **kwargs: object) -> None:
        super().__init__(scope, construct_id, **kwargs)  # type: ignore[arg-type]
        self.config = config
        self.arns = Arns(config)
        self.storage = storage
        self.key_arn = storage.key.key_arn
        self.iot_stack = iot_stack
        self.pipeline_name = config.name("retrain")
        self.model_package_group_name = config.name("models")
        self.execution_role_name = config.name("sagemaker-execution")
        self.dead_letter_queues: dict[str, sqs.Queue] = {}
        self.functions: dict[str, lambda_.Function] = {}
        self.add_stack_dependency(storage)  # by name: buckets and tables are referred to by ARN, not export
        self.add_stack_dependency(iot_stack)

        self.execution_role = self._sagemaker_role()
        code = self._lambda_code()
        self.ingest = self._function(names.INGEST, code)
        self._ingest_permissions(self.ingest.role)  # type: ignore[arg-type]
        self.policy = self._function(names.POLICY, code)
        self._policy_permissions(self.policy.role)  # type: ignore[arg-type]
        self.deploy = self._function(names.DEPLOY, code)
        self._deploy_permissions(self.deploy.role)  # type: ignore[arg-type]

        self.rule_errors = self._queue("IotRuleErrors")
        self.rules = self._topic_rules()
        self.model_package_group = sagemaker.CfnModelPackageGroup(
            self, "ModelPackageGroup", model_package_group_name=self.model_package_group_name,
            model_package_group_description=f"qcsight models of {config.fleet}: candidates wait for manual approval",
        )
        self.scoring_image = ecr_assets.DockerImageAsset(
            self, "ScoringImage", directory=str(packaging.REPO_ROOT), file="infra/docker/scoring.Dockerfile",
            exclude=packaging.docker_excludes(packaging.SCORING_CONTEXT), ignore_mode=IgnoreMode.DOCKER,
            platform=ecr_assets.Platform.LINUX_AMD64,
        )
        allow(self.execution_role, "PullScoringImage",
              ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"],
              [self.scoring_image.repository.repository_arn])
        self.training_source = TrainingSource(
            self, "TrainingSource", bucket_name=config.bucket_name("pipeline"), prefix=TRAINING_SOURCE_PREFIX,
            key_arn=self.key_arn, log_retention=retention_days(config.log_retention_days))
        self.pipeline = self._pipeline(pipeline_definition)
        self._events()
        self._batch_transform()
        CfnOutput(self, "ScoringImageUri", value=self.scoring_image.image_uri,
                  description="the Batch Transform / endpoint image (`qcsight batch submit --image-uri`)")
        CfnOutput(self, "SageMakerRoleArn", value=self.execution_role.role_arn)
        CfnOutput(self, "TrainingSourceUri",
                  value=f"s3://{config.bucket_name('pipeline')}/{TRAINING_SOURCE_PREFIX}{SOURCE_TARBALL}",
                  description="the pipeline's training code: deploy copies this checkout's here when it changes")

    # ------------------------------------------------------------ functions

    def _lambda_code(self) -> lambda_.Code:
        missing = packaging.missing_packages()
        out = Path(Stage.of(self).outdir) / ".qcsight-build" / "lambda"  # type: ignore[union-attr]
        packaging.build_lambda_package(out)
        if missing:
            Annotations.of(self).add_warning_v2(
                "qcsight:missing-lambda-packages",
                f"{', '.join(missing)} is not in this tree: the functions' handlers cannot be imported until it "
                "lands (stacks/names.py lists the entry points)")
        return lambda_.Code.from_asset(str(out))

    def _queue(self, construct_id: str, *, of_a_function: bool = False) -> sqs.Queue:
        queue = sqs.Queue(
            self, construct_id, encryption=sqs.QueueEncryption.KMS, encryption_master_key=self.storage.key,
            data_key_reuse=Duration.hours(1), enforce_ssl=True, retention_period=Duration.days(14),
        )
        if not of_a_function:  # cdk-nag recognises a function's dead-letter queue by itself
            acknowledge(queue, "AwsSolutions-SQS3",
                        "This queue is itself a dead-letter queue (of failed events, schedules or IoT rule actions); "
                        "its depth is alarmed on in the monitoring stack.")
        self.dead_letter_queues[construct_id] = queue
        return queue

    def _function(self, spec: names.FunctionSpec, code: lambda_.Code) -> lambda_.Function:
        title = spec.key.title()
        log_group = logs.LogGroup(
            self, f"{title}Logs", log_group_name=f"/aws/lambda/{self.config.name(spec.key)}",
            retention=retention_days(self.config.log_retention_days), removal_policy=RemovalPolicy.DESTROY,
        )
        role = iam.Role(self, f"{title}Role", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
                        description=f"{self.config.name(spec.key)}: only what this function uses")
        # The log group's ARN (its Arn attribute) already ends in :*, which covers its streams only.
        allow(role, "WriteOwnLogs", ["logs:CreateLogStream", "logs:PutLogEvents"], [log_group.log_group_arn])
        dlq = self._queue(f"{title}DeadLetters", of_a_function=True)
        function = lambda_.Function(
            self, title, function_name=self.config.name(spec.key), description=spec.description,
            runtime=_runtime(), architecture=lambda_.Architecture.ARM_64, handler=spec.handler, code=code,
            role=role, memory_size=spec.memory_mb, timeout=Duration.seconds(spec.timeout_s),
            reserved_concurrent_executions=spec.reserved_concurrency, dead_letter_queue=dlq,
            log_group=log_group, environment=self.function_environment(spec.key), retry_attempts=2,
        )
        self.functions[spec.key] = function
        return function

    def fleet_json(self) -> str:
        """QCSIGHT_FLEET: each line's devices are the members of its thing group (qcsight_cloud.fleet)."""
        lines = {line: {"thing_group": self.config.name(f"line-{line}")} for line in self.config.lines}
        return json.dumps({"lines": lines}, sort_keys=True, separators=(",", ":"))

    def function_environment(self, key: str) -> dict[str, str]:
        """Exactly the variables function `key` reads (names.FUNCTION_ENV), with this fleet's values."""
        c, e = self.config, names.Env
        values = {
            e.STORE: store_url(c.fleet), e.FLEET: self.fleet_json(), e.RETENTION_DAYS: str(c.metrics_retention_days),
            e.PIPELINE_NAME: self.pipeline_name, e.POLICY: "{}",
            e.MANIFEST_PREFIX: f"s3://{c.bucket_name('pipeline')}/{MANIFEST_PREFIX}",
            e.CANARY_GROUP_ARN: self.arns.iot(f"thinggroup/{c.name('canary')}"),
            e.FLEET_GROUP_ARN: self.arns.iot(f"thinggroup/{c.name('fleet')}"),
            e.COMPONENT_BUCKET: c.bucket_name("models"), e.COMPONENT_PREFIX: names.COMPONENT_ARTIFACT_PREFIX,
            e.SOAK: "{}", e.NEO_TARGET: c.neo_target, e.NEO_ROLE_ARN: self.arns.role(self.execution_role_name),
            e.NEO_OUTPUT: f"s3://{c.bucket_name('pipeline')}/{names.NEO_OUTPUT_PREFIX}",
        }
        return {name: values[name] for name in names.FUNCTION_ENV[key]}

    def _tables(self, role: iam.IRole, sid: str, actions: list[str], keys: tuple[str, ...],
                indexes: tuple[tuple[str, str], ...] = ()) -> None:
        """Table actions on the named tables and (table, index) pairs: no wildcard, only what is queried."""
        resources = [self.arns.table(key) for key in keys] + [self.arns.index(key, name) for key, name in indexes]
        allow(role, sid, actions, resources)

    def _read_line_groups(self, role: iam.IRole) -> None:
        # The fleet's lines are thing groups; qcsight_cloud.fleet lists their members.
        allow(role, "ListLineMembers", ["iot:ListThingsInThingGroup"],
              [self.arns.iot(f"thinggroup/{self.config.name(f'line-{line}')}") for line in self.config.lines])

    def _ingest_permissions(self, role: iam.IRole) -> None:
        # qcsight_cloud.dynamodb_store: one transaction puts the message (on condition it is new) and the
        # device's row; a duplicate is counted per identity.
        self._tables(role, "StoreMessages", ["dynamodb:PutItem"], ("alerts", "metrics", "status", "devices"))
        self._tables(role, "ReadDevice", ["dynamodb:GetItem"], ("devices",))
        self._tables(role, "CountOutcomes", ["dynamodb:UpdateItem"], ("counters",))
        kms_via(role, "TablesKey", self.key_arn, ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"],
                ["dynamodb"], self.region)
        self._read_line_groups(role)

    def _policy_permissions(self, role: iam.IRole) -> None:
        """What qcsight_cloud.lambda_policy does: read the evidence, record decisions and runs, start the pipeline."""
        pipeline_arn = self.arns.sagemaker(f"pipeline/{self.pipeline_name}")
        # reviews itself: each reviewed alert's reviews decide its label (qcsight_cloud.reviewed: undos, disputes).
        self._tables(role, "ReadEvidence", ["dynamodb:Query"], ("metrics", "runs", "reviews"),
                     indexes=(("reviews", "by_month"),))
        self._tables(role, "ListDevices", ["dynamodb:Scan"], ("devices",))
        self._tables(role, "ReadReviewedAlerts", ["dynamodb:BatchGetItem"], ("alerts",))
        self._tables(role, "RecordDecisions", ["dynamodb:PutItem"], ("decisions", "runs"))
        kms_via(role, "TablesKey", self.key_arn, ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"],
                ["dynamodb", "s3"], self.region)
        self._read_line_groups(role)
        allow(role, "StartRetraining", ["sagemaker:StartPipelineExecution", "sagemaker:ListPipelineExecutions"],
              [pipeline_arn])
        allow(role, "WatchRetraining", ["sagemaker:DescribePipelineExecution"], [f"{pipeline_arn}/execution/*"],
              wildcard_reason="execution ids are made by SageMaker per run, under this one pipeline")
        allow(role, "WriteReviewedManifest", ["s3:PutObject"], [self.arns.objects("pipeline", f"{MANIFEST_PREFIX}*")],
              wildcard_reason="one manifest of reviewed images per run, under the fixed manifests/ prefix")

    def _deploy_permissions(self, role: iam.IRole) -> None:
        """What qcsight_cloud.lambda_deploy does: publish and deploy an approved model, soak, promote or roll back."""
        a, c = self.arns, self.config
        group = self.model_package_group_name
        canary, fleet = a.iot(f"thinggroup/{c.name('canary')}"), a.iot(f"thinggroup/{c.name('fleet')}")
        groups = [canary, fleet, *(a.iot(f"thinggroup/{c.name(f'line-{line}')}") for line in c.lines)]
        components = a.greengrass("components:com.qcsight.*")
        allow(role, "ReadApprovedModels", ["sagemaker:DescribeModelPackage"],
              [a.sagemaker(f"model-package/{group}/*")],
              wildcard_reason="model package versions of this fleet's one group, numbered by SageMaker")
        allow(role, "ReadModelArtifacts", ["s3:GetObject"], [a.objects("pipeline", "*")],
              wildcard_reason="the approved model.tar.gz is wherever its pipeline run wrote it in the pipeline "
                              "bucket; the model package names it")
        allow(role, "PublishComponentArtifacts", ["s3:PutObject", "s3:GetObject"],
              [a.objects("models", f"{names.COMPONENT_ARTIFACT_PREFIX}/*")],
              wildcard_reason="component artifacts are written as components/<component>/<version>/ for each "
                              "new model version")
        kms_via(role, "ArtifactsKey", self.key_arn, ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"],
                ["s3", "dynamodb"], self.region)
        allow(role, "PublishComponents",
              ["greengrass:CreateComponentVersion", "greengrass:DescribeComponent", "greengrass:GetComponent",
               "greengrass:ListComponentVersions"], [components, f"{components}:versions:*"],
              wildcard_reason="qcsight's own components (com.qcsight.*) and their versions, made per model")
        allow(role, "DeployToGroups", ["greengrass:CreateDeployment"], groups)
        allow(role, "FollowDeployments",
              ["greengrass:GetDeployment", "greengrass:ListDeployments", "greengrass:CancelDeployment"],
              [a.greengrass("deployments:*")],
              wildcard_reason="deployment ids are made by Greengrass per deployment")
        # A Greengrass deployment to a thing group is an IoT job Greengrass creates with the caller's rights.
        allow(role, "GreengrassDeploymentJobs",
              ["iot:CreateJob", "iot:DescribeJob", "iot:CancelJob", "iot:UpdateJob", "iot:DescribeThingGroup"],
              [a.iot("job/*"), *groups],
              wildcard_reason="the IoT job behind each Greengrass deployment is named by Greengrass")
        # Each canary check lists the canary group's things and the fleet group's (recursive: its line groups').
        allow(role, "ListCanaryAndFleet", ["iot:ListThingsInThingGroup"], [canary, fleet])
        allow(role, "CompileForTheEdge", ["sagemaker:CreateCompilationJob", "sagemaker:DescribeCompilationJob"],
              [a.sagemaker(f"compilation-job/{c.fleet}-*")],
              wildcard_reason="one Neo compilation job per model version, named <fleet>-<version>")
        allow(role, "PassSageMakerRole", ["iam:PassRole"], [a.role(self.execution_role_name)],
              conditions={"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}})
        # The rollout in the store: the canary's run (runs), the devices' windows since it started (metrics, by
        # thing: the base table), the promote/rollback decision (decisions).
        self._tables(role, "ReadRollout", ["dynamodb:Query"], ("runs", "metrics"))
        self._tables(role, "RecordRollout", ["dynamodb:PutItem"], ("runs", "decisions"))

    # ------------------------------------------------------------ IoT rules

    def _topic_rules(self) -> dict[str, iot.CfnTopicRule]:
        role = iam.Role(self, "IotRuleErrorRole", assumed_by=iam.ServicePrincipal("iot.amazonaws.com"),
                        description="lets the IoT rules put a message whose action failed on the error queue")
        allow(role, "KeepFailedMessages", ["sqs:SendMessage"], [self.rule_errors.queue_arn])
        kms_via(role, "ErrorQueueKey", self.key_arn, ["kms:GenerateDataKey", "kms:Decrypt"], ["sqs"], self.region)
        rules = {}
        for kind in topics.KINDS:
            rule = iot.CfnTopicRule(
                self, f"{kind.title()}Rule", rule_name=f"{self.config.fleet.replace('-', '_')}_{kind}",
                topic_rule_payload=iot.CfnTopicRule.TopicRulePayloadProperty(
                    sql=RULE_SQL[kind], aws_iot_sql_version=RULE_SQL_VERSION, rule_disabled=False,
                    description=f"qcsight {kind} from every device to the ingest function",
                    actions=[iot.CfnTopicRule.ActionProperty(
                        lambda_=iot.CfnTopicRule.LambdaActionProperty(function_arn=self.ingest.function_arn))],
                    error_action=iot.CfnTopicRule.ActionProperty(sqs=iot.CfnTopicRule.SqsActionProperty(
                        queue_url=self.rule_errors.queue_url, role_arn=role.role_arn, use_base64=False)),
                ),
            )
            self.ingest.add_permission(f"Invoke{kind.title()}Rule", principal=iam.ServicePrincipal("iot.amazonaws.com"),
                                       source_arn=rule.attr_arn, source_account=self.account)
            rules[kind] = rule
        return rules

    # ------------------------------------------------------------ SageMaker

    def _sagemaker_role(self) -> iam.Role:
        a = self.arns
        group = self.model_package_group_name
        role = iam.Role(self, "SageMakerExecutionRole", role_name=self.execution_role_name,
                        assumed_by=iam.ServicePrincipal("sagemaker.amazonaws.com"),
                        description="the retraining pipeline, its jobs and the Batch Transform model")
        allow(role, "ReadTrainingData", ["s3:GetObject"],
              [a.objects("data", "*"), a.objects("images", "*"), a.objects("models", "*")],
              wildcard_reason="training reads the base data, reviewed alert images and the production model; "
                              "the run's manifest names the objects")
        allow(role, "ListTrainingData", ["s3:ListBucket"],
              [a.bucket("data"), a.bucket("images"), a.bucket("models"), a.bucket("pipeline")])
        allow(role, "WritePipelineOutput", ["s3:GetObject", "s3:PutObject"], [a.objects("pipeline", "*")],
              wildcard_reason="each run writes its checkpoints, reports and model under a prefix SageMaker names")
        kms_via(role, "BucketsKey", self.key_arn, ["kms:Decrypt", "kms:GenerateDataKey"], ["s3"], self.region)
        allow(role, "RunPipelineJobs",
              ["sagemaker:CreateTrainingJob", "sagemaker:DescribeTrainingJob", "sagemaker:StopTrainingJob",
               "sagemaker:CreateProcessingJob", "sagemaker:DescribeProcessingJob", "sagemaker:StopProcessingJob",
               "sagemaker:AddTags"],
              [a.sagemaker("training-job/*"), a.sagemaker("processing-job/*")],
              wildcard_reason="the pipeline names each step's job pipelines-<execution id>-<step>-<hash> itself")
        allow(role, "RegisterCandidates", ["sagemaker:CreateModelPackage", "sagemaker:AddTags"],
              [a.sagemaker(f"model-package/{group}/*"), a.sagemaker(f"model-package-group/{group}")],
              wildcard_reason="model package versions of this fleet's one group, numbered by SageMaker")
        allow(role, "PullDeepLearningContainers",
              ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"],
              [f"arn:{self.partition}:ecr:{self.region}:{DLC_ACCOUNT}:repository/{name}" for name in DLC_REPOSITORIES])
        allow(role, "EcrLogin", ["ecr:GetAuthorizationToken"], ["*"],
              wildcard_reason="ecr:GetAuthorizationToken has no resource: AWS requires '*'")
        allow(role, "JobLogs",
              ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
              [a.logs("log-group:/aws/sagemaker/*")],
              wildcard_reason="SageMaker writes each job's logs to /aws/sagemaker/<kind>Jobs log groups and streams "
                              "named per job")
        allow(role, "JobMetrics", ["cloudwatch:PutMetricData"], ["*"],
              wildcard_reason="cloudwatch:PutMetricData has no resource: AWS requires '*' (the condition pins "
                              "SageMaker's namespaces)",
              conditions={"StringLike": {"cloudwatch:namespace": ["/aws/sagemaker/*", "aws/sagemaker/*"]}})
        allow(role, "PassItselfToJobs", ["iam:PassRole"], [a.role(self.execution_role_name)],
              conditions={"StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}})
        return role

    def _pipeline(self, definition: PipelineDefinition | None) -> sagemaker.CfnPipeline | None:
        if definition is None:
            Annotations.of(self).add_warning_v2(
                "qcsight:no-pipeline-definition",
                f"no pipeline definition ({self.config.pipeline_definition} is not in this tree): the retraining "
                "pipeline is not created; the policy function's StartPipelineExecution will fail until it is")
            return None
        c = self.config
        inputs = {
            "role_arn": self.arns.role(self.execution_role_name), "data_bucket": c.bucket_name("data"),
            "images_bucket": c.bucket_name("images"), "models_bucket": c.bucket_name("models"),
            "pipeline_bucket": c.bucket_name("pipeline"), "model_package_group": self.model_package_group_name,
            "kms_key_arn": self.key_arn, "region": self.region,
            "training_request": json.dumps(self.training_request()), "scoring_image": self.scoring_image.image_uri,
        }
        body = definition(inputs)
        pipeline = sagemaker.CfnPipeline(
            self, "RetrainPipeline", pipeline_name=self.pipeline_name, role_arn=self.execution_role.role_arn,
            pipeline_description="train -> evaluate against production -> gate -> register (PendingManualApproval)",
            pipeline_definition={"PipelineDefinitionBody": json.dumps(body, sort_keys=True)},
        )
        pipeline.node.add_dependency(self.model_package_group)
        pipeline.node.add_dependency(self.training_source.deployment)  # no run before its code is in place
        return pipeline

    # ------------------------------------------------------------ events and batch

    def _events(self) -> None:
        events_dlq = self._queue("EventDeadLetters")
        options: dict[str, Any] = {"dead_letter_queue": events_dlq, "retry_attempts": 2,
                                   "max_event_age": Duration.hours(2)}
        approval = events.Rule(
            self, "ModelApproved", description="a model package of this fleet's group was approved: deploy it",
            event_pattern=events.EventPattern(
                source=["aws.sagemaker"], detail_type=["SageMaker Model Package State Change"],
                detail={"ModelPackageGroupName": [self.model_package_group_name], "ModelApprovalStatus": ["Approved"]}),
        )
        approval.add_target(targets.LambdaFunction(self.deploy, **options))
        events.Rule(self, "CanaryCheck", description="advance a canary deployment's soak: promote or roll back",
                    schedule=events.Schedule.rate(Duration.minutes(self.config.canary_check_minutes)),
                    targets=[targets.LambdaFunction(self.deploy, **options)])
        events.Rule(self, "PolicySchedule", description="evaluate the retraining policy over the fleet",
                    schedule=events.Schedule.rate(Duration.minutes(self.config.policy_rate_minutes)),
                    targets=[targets.LambdaFunction(self.policy, **options)])

    def training_request(self) -> dict[str, Any]:
        """The pipeline's training job, as `qcsight train launch` builds it (multi-GPU through its node script).

        Its code channel is the pipeline bucket's source/ prefix, where TrainingSource deploys the checkout's
        sourcedir.tar.gz (the TrainingSourceUri output).
        """
        c = self.config
        job = TrainingJobSpec(
            base_job_name=c.name("retrain"), source_dir=packaging.REPO_ROOT,
            output=S3Uri(c.bucket_name("pipeline"), "runs"), train_s3=f"s3://{c.bucket_name('data')}/train/",
            validation_s3=None, checkpoint_s3=None,
            image_uri=default_image_uri(c.region, c.training_instance_type), hyperparameters={},
            compute=ComputeSpec(instance_type=c.training_instance_type, instance_count=1),
        )
        plan = TrainingPlan(AwsSpec(c.region, self.arns.role(self.execution_role_name)), job)
        return training_request(plan, c.name("retrain"), S3Uri(c.bucket_name("pipeline"), TRAINING_SOURCE_PREFIX))

    def batch_spec(self) -> TransformJobSpec:
        """The scheduled Batch Transform job, as the spec `qcsight batch submit` builds from its options."""
        c = self.config
        return TransformJobSpec(
            job_name=c.name("batch"),
            # Named after the image so that a new image is a new model (SageMaker models are immutable).
            model_name=c.name(f"batch-{self.scoring_image.asset_hash[:12]}"),
            image_uri=self.scoring_image.image_uri,
            model_data=f"s3://{c.bucket_name('models')}/{names.BATCH_MODEL_KEY}",
            role_arn=self.arns.role(self.execution_role_name),
            input_uri=f"s3://{c.bucket_name('data')}/{BATCH_INPUT_PREFIX}",
            output_uri=f"s3://{c.bucket_name('pipeline')}/{BATCH_OUTPUT_PREFIX}",
            instance_type=c.batch_instance_type,
        )

    def _batch_transform(self) -> None:
        spec = self.batch_spec()
        model = model_request(spec)
        container = model["PrimaryContainer"]
        self.batch_model = sagemaker.CfnModel(
            self, "BatchModel", model_name=model["ModelName"], execution_role_arn=model["ExecutionRoleArn"],
            primary_container=sagemaker.CfnModel.ContainerDefinitionProperty(
                image=container["Image"], model_data_url=container["ModelDataUrl"],
                environment=container["Environment"]),
            tags=[CfnTag(key=tag["Key"], value=tag["Value"]) for tag in model["Tags"]],
        )
        self.batch_model.node.add_dependency(self.execution_role)
        role_name = self.config.name("batch-scheduler")
        role = iam.Role(self, "BatchSchedulerRole", role_name=role_name,
                        assumed_by=iam.ServicePrincipal("scheduler.amazonaws.com"),
                        description="lets EventBridge Scheduler start this fleet's Batch Transform jobs")
        schedule_dlq = self._queue("ScheduleDeadLetters")
        allow(role, "KeepFailedRuns", ["sqs:SendMessage"], [schedule_dlq.queue_arn])
        kms_via(role, "DeadLetterKey", self.key_arn, ["kms:GenerateDataKey", "kms:Decrypt"], ["sqs"], self.region)
        allow(role, "StartTransformJobs", ["sagemaker:CreateTransformJob", "sagemaker:AddTags"],
              [self.arns.sagemaker(f"transform-job/{spec.job_name}-*")],
              wildcard_reason="each scheduled run is named JOB-<execution id> by qcsight_batch.submit.schedule_request")
        request = schedule_request(spec, ScheduleSpec(
            name=self.config.name("batch"), expression=self.config.batch_schedule,
            role_arn=self.arns.role(role_name), timezone=self.config.batch_timezone))
        target = request["Target"]
        self.batch_schedule = scheduler.CfnSchedule(
            self, "BatchSchedule", name=request["Name"], group_name=request["GroupName"],
            schedule_expression=request["ScheduleExpression"],
            schedule_expression_timezone=request["ScheduleExpressionTimezone"],
            flexible_time_window=scheduler.CfnSchedule.FlexibleTimeWindowProperty(
                mode=request["FlexibleTimeWindow"]["Mode"]),
            state=request["State"], description=request["Description"],
            target=scheduler.CfnSchedule.TargetProperty(
                arn=target["Arn"], role_arn=target["RoleArn"], input=target["Input"],
                retry_policy=scheduler.CfnSchedule.RetryPolicyProperty(
                    maximum_retry_attempts=target["RetryPolicy"]["MaximumRetryAttempts"],
                    maximum_event_age_in_seconds=target["RetryPolicy"]["MaximumEventAgeInSeconds"]),
                dead_letter_config=scheduler.CfnSchedule.DeadLetterConfigProperty(arn=schedule_dlq.queue_arn)),
        )
        self.batch_schedule.node.add_dependency(self.batch_model, role)
        # The transform job reads the incoming images and writes its scores.
        allow(self.execution_role, "BatchInputOutput", ["s3:GetObject", "s3:PutObject"],
              [self.arns.objects("data", f"{BATCH_INPUT_PREFIX}*"),
               self.arns.objects("pipeline", f"{BATCH_OUTPUT_PREFIX}*")],
              wildcard_reason="Batch Transform reads every image under the incoming prefix and writes one result "
                              "file per input under the scores prefix")


def _runtime() -> lambda_.Runtime:
    runtime: lambda_.Runtime = getattr(lambda_.Runtime, "PYTHON_" + names.LAMBDA_PYTHON.replace(".", "_"))
    return runtime
