"""The retraining pipeline's training code: this checkout's sourcedir.tar.gz, packed at synth, copied to S3 on deploy.

The pipeline's training job reads its code channel from the pipeline bucket; without this, a fresh
`cdk deploy` left that prefix empty and the first run failed. The tarball is package_source's, the one
`qcsight train launch` uploads, and byte-reproducible: the same code gives the same asset hash, so a
deploy copies it again only when the code changed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import cast

from aws_cdk import RemovalPolicy, Stack, Stage
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3_assets as s3_assets
from aws_cdk import aws_s3_deployment as s3_deployment
from constructs import Construct

from qcsight_aws.jobs import SOURCE_TARBALL
from qcsight_train.launch.source import SourcePackage, package_source
from stacks import packaging
from stacks.nag import acknowledge, allow, kms_via

# BucketDeployment's id for the SingletonFunction that runs its copy (aws-s3-deployment).
_HANDLER_ID = "CustomResourceHandler"


def stage_training_source(out_dir: Path, source_dir: Path = packaging.REPO_ROOT) -> SourcePackage:
    """Empty out_dir and pack source_dir's sourcedir.tar.gz into it, alone: the folder the asset is made of."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    return package_source(source_dir, out_dir)


class TrainingSource(Construct):
    """The checkout's sourcedir.tar.gz as an asset, copied to s3://<bucket>/<prefix>sourcedir.tar.gz on deploy.

    CDK's BucketDeployment does the copy (a custom resource: download the asset, `aws s3 sync` to the
    prefix), with prune off so nothing else under the prefix is deleted, and retain on delete so that
    removing the stack deletes nothing from the retained bucket either: the copy's role may not delete.
    """

    def __init__(self, scope: Construct, construct_id: str, *, bucket_name: str, prefix: str, key_arn: str,
                 log_retention: logs.RetentionDays, source_dir: Path = packaging.REPO_ROOT) -> None:
        super().__init__(scope, construct_id)
        staging = Path(Stage.of(self).outdir) / ".qcsight-build" / "training-source"  # type: ignore[union-attr]
        self.package = stage_training_source(staging, source_dir)
        self.asset = s3_assets.Asset(self, "Asset", path=str(staging))
        # By name, as every stack refers to the storage stack's buckets (stacks/arns.py): no export.
        bucket = s3.Bucket.from_bucket_name(self, "Bucket", bucket_name)
        self.log_group = logs.LogGroup(self, "Logs", retention=log_retention, removal_policy=RemovalPolicy.DESTROY)
        self.role = self._role(bucket, prefix, key_arn)
        self.deployment = s3_deployment.BucketDeployment(
            self, "Deployment", sources=[s3_deployment.Source.bucket(self.asset.bucket, self.asset.s3_object_key)],
            destination_bucket=bucket, destination_key_prefix=prefix, prune=False, extract=True,
            retain_on_delete=True, log_group=self.log_group,
            # CDK would grant s3:GetObject*/List*/DeleteObject*/PutObject* on both buckets, the whole pipeline
            # bucket included; the role above holds only what the copy does, and the grants are dropped.
            role=self.role.without_policy_updates(),
        )
        acknowledge(self.handler(), "AwsSolutions-L1",
                    "CDK's BucketDeployment handler pins its runtime (python3.13, what CDK tests the handler and "
                    "its AWS CLI layer on); it moves with aws-cdk-lib, and overriding it would run untested code.")

    def _role(self, bucket: s3.IBucket, prefix: str, key_arn: str) -> iam.Role:
        role = iam.Role(self, "Role", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
                        description="copies the checkout's training source to the pipeline bucket at deploy")
        allow(role, "WriteOwnLogs", ["logs:CreateLogStream", "logs:PutLogEvents"], [self.log_group.log_group_arn])
        # The asset's key is its hash: the grant follows the code, and reaches no other asset.
        allow(role, "ReadSourceAsset", ["s3:GetObject"],
              [self.asset.bucket.arn_for_objects(self.asset.s3_object_key)])
        # `aws s3 sync` lists the prefix to compare, then puts the one file (with prune off it deletes nothing).
        allow(role, "ListSourcePrefix", ["s3:ListBucket"], [bucket.bucket_arn],
              conditions={"StringLike": {"s3:prefix": f"{prefix}*"}})
        allow(role, "WriteSourceTarball", ["s3:PutObject"], [bucket.arn_for_objects(f"{prefix}{SOURCE_TARBALL}")])
        # The bucket is SSE-KMS with the storage stack's key: S3 asks it for a data key on the role's behalf.
        kms_via(role, "BucketKey", key_arn, ["kms:Decrypt", "kms:GenerateDataKey"], ["s3"], Stack.of(self).region)
        return role

    def handler(self) -> lambda_.Function:
        """The Lambda function BucketDeployment runs: a singleton at the stack's root, not under this construct."""
        singleton = cast(lambda_.SingletonFunction, self.deployment.node.find_child(_HANDLER_ID))
        return cast(lambda_.Function, Stack.of(self).node.find_child(singleton.construct_name))
