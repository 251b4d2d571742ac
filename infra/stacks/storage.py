"""Stateful resources, kept across every other stack's replacement: the KMS key, the buckets and the tables.

Everything here is retained when the stack is deleted; the other stacks can be torn down and
redeployed freely.
"""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy, Stack
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from constructs import Construct

from stacks.config import AppConfig
from stacks.tables import Attribute, TableSpec, table_specs

# Services that write encrypted messages with the key on their own (alarm notifications to SNS,
# EventBridge events to SQS dead-letter queues): they need the key policy to say so.
_KEY_SERVICES = ("cloudwatch.amazonaws.com", "events.amazonaws.com")


class StorageStack(Stack):
    """The customer-managed key, the buckets (data, models, images, pipeline, access logs), tables and topics."""

    def __init__(self, scope: Construct, construct_id: str, *, config: AppConfig, **kwargs: object) -> None:
        super().__init__(scope, construct_id, **kwargs)  # type: ignore[arg-type]
        self.config = config
        self.key = kms.Key(
            self, "Key", alias=f"alias/{config.fleet}", enable_key_rotation=True,
            description=f"{config.fleet}: buckets, tables, queues and topics of the qcsight cloud side",
            removal_policy=RemovalPolicy.RETAIN,
        )
        for service in _KEY_SERVICES:
            self.key.add_to_resource_policy(iam.PolicyStatement(
                sid=f"Allow{service.split('.')[0].title()}ToUseTheKey",
                principals=[iam.ServicePrincipal(service)],
                actions=["kms:Decrypt", "kms:GenerateDataKey*"],
                resources=["*"],  # in a key policy "*" means this key
                conditions={"StringEquals": {"aws:SourceAccount": self.account}},
            ))
        self.access_logs = self._access_log_bucket()
        # Names, not exports: the other stacks build these ARNs from AppConfig (stacks/arns.py).
        self.data = self._bucket("Data", "data")
        self.models = self._bucket("Models", "models")
        self.images = self._bucket("Images", "images", expire_days=config.image_retention_days)
        self.pipeline = self._bucket("Pipeline", "pipeline")
        self.tables: dict[str, dynamodb.Table] = {spec.key: self._table(spec) for spec in table_specs()}
        # Topics live here because their e-mail subscriptions are confirmed by people: replacing a
        # topic would silently drop every confirmed subscriber.
        self.alert_topic = self._topic("AlertTopic", "qcsight defect alerts")
        self.ops_topic = self._topic("OpsTopic", "qcsight operations: alarms, silent devices, failed runs")

    def _topic(self, construct_id: str, display_name: str) -> sns.Topic:
        topic = sns.Topic(self, construct_id, display_name=display_name, master_key=self.key, enforce_ssl=True)
        if self.config.alert_email:
            topic.add_subscription(subscriptions.EmailSubscription(self.config.alert_email))
        return topic

    def _lifecycle(self, expire_days: int | None) -> list[s3.LifecycleRule]:
        c = self.config
        rules = [
            s3.LifecycleRule(
                id="old-versions-to-cheaper-tiers",
                noncurrent_version_transitions=[
                    s3.NoncurrentVersionTransition(storage_class=s3.StorageClass.INFREQUENT_ACCESS,
                                                   transition_after=Duration.days(c.noncurrent_ia_days)),
                    s3.NoncurrentVersionTransition(storage_class=s3.StorageClass.GLACIER_INSTANT_RETRIEVAL,
                                                   transition_after=Duration.days(c.noncurrent_glacier_days)),
                ],
                noncurrent_version_expiration=Duration.days(c.noncurrent_expire_days),
                abort_incomplete_multipart_upload_after=Duration.days(7),
            ),
        ]
        if expire_days is not None:
            rules.append(s3.LifecycleRule(id="expire-images", expiration=Duration.days(expire_days),
                                          expired_object_delete_marker=False))
        return rules

    def _bucket(self, construct_id: str, purpose: str, expire_days: int | None = None) -> s3.Bucket:
        return s3.Bucket(
            self, construct_id, bucket_name=self.config.bucket_name(purpose),
            encryption=s3.BucketEncryption.KMS, encryption_key=self.key, bucket_key_enabled=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL, enforce_ssl=True, minimum_tls_version=1.2,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED, versioned=True,
            server_access_logs_bucket=self.access_logs, server_access_logs_prefix=f"{purpose}/",
            lifecycle_rules=self._lifecycle(expire_days), removal_policy=RemovalPolicy.RETAIN,
        )

    def _access_log_bucket(self) -> s3.Bucket:
        bucket = s3.Bucket(
            self, "AccessLogs", bucket_name=self.config.bucket_name("logs"),
            # S3 server access logging and ALB access logs deliver only to SSE-S3 buckets, not SSE-KMS.
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL, enforce_ssl=True, minimum_tls_version=1.2,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_PREFERRED, versioned=True,
            lifecycle_rules=[s3.LifecycleRule(id="expire-logs", expiration=Duration.days(365),
                                              noncurrent_version_expiration=Duration.days(30),
                                              abort_incomplete_multipart_upload_after=Duration.days(7))],
            removal_policy=RemovalPolicy.RETAIN,
        )
        # No access logging of its own: cdk-nag (S1) exempts a bucket that receives server access logs,
        # and logging it to itself would log every log delivery.
        return bucket

    def _table(self, spec: TableSpec) -> dynamodb.Table:
        table = dynamodb.Table(
            self, f"{spec.key.title()}Table", table_name=self.config.table_name(spec.key),
            partition_key=_attribute(spec.partition_key),
            sort_key=_attribute(spec.sort_key) if spec.sort_key else None,
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            encryption=dynamodb.TableEncryption.CUSTOMER_MANAGED, encryption_key=self.key,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True),
            deletion_protection=True, time_to_live_attribute=spec.ttl_attribute,
            removal_policy=RemovalPolicy.RETAIN,
        )
        for index in spec.indexes:
            table.add_global_secondary_index(
                index_name=index.name, partition_key=_attribute(index.partition_key),
                sort_key=_attribute(index.sort_key) if index.sort_key else None,
                projection_type=dynamodb.ProjectionType[index.projection],
                non_key_attributes=list(index.non_key) or None,
            )
        return table


def _attribute(attribute: Attribute) -> dynamodb.Attribute:
    kind = {"S": dynamodb.AttributeType.STRING, "N": dynamodb.AttributeType.NUMBER}[attribute.kind]
    return dynamodb.Attribute(name=attribute.name, type=kind)
