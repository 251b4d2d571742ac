"""ARNs of this fleet's resources, built from their names rather than passed between stacks.

Buckets and tables have fixed names (AppConfig.bucket_name/table_name), so the other stacks refer
to them by ARN strings instead of CloudFormation exports: the stacks stay independently
replaceable, and a wildcard's finding in cdk-nag reads as the ARN itself.
"""

from __future__ import annotations

import re

from aws_cdk import Aws

from stacks.config import AppConfig

PARTITION = Aws.PARTITION


class Arns:
    """ARN builders for one fleet's account and region."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config

    def _regional(self, service: str, resource: str) -> str:
        return f"arn:{PARTITION}:{service}:{self.config.region}:{self.config.account}:{resource}"

    def bucket(self, purpose: str) -> str:
        return f"arn:{PARTITION}:s3:::{self.config.bucket_name(purpose)}"

    def objects(self, purpose: str, key_pattern: str) -> str:
        return f"{self.bucket(purpose)}/{key_pattern}"

    def table(self, key: str) -> str:
        return self._regional("dynamodb", f"table/{self.config.table_name(key)}")

    def indexes(self, key: str) -> str:
        return f"{self.table(key)}/index/*"

    def index(self, key: str, name: str) -> str:
        return f"{self.table(key)}/index/{name}"

    def sagemaker(self, resource: str) -> str:
        return self._regional("sagemaker", resource)

    def iot(self, resource: str) -> str:
        return self._regional("iot", resource)

    def greengrass(self, resource: str) -> str:
        return self._regional("greengrass", resource)

    def logs(self, resource: str) -> str:
        return self._regional("logs", resource)

    def role(self, name: str) -> str:
        return f"arn:{PARTITION}:iam::{self.config.account}:role/{name}"


def nag_resource(arn: str) -> str:
    """How cdk-nag names a resource in an IAM5 finding: tokens and IAM policy variables rendered in <>."""
    return "Resource::" + re.sub(r"\$\{([^}]+)\}", r"<\1>", arn.replace(PARTITION, "<AWS::Partition>"))
