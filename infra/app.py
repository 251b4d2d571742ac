#!/usr/bin/env python3
"""The qcsight CDK app: `cdk deploy --all` stands up the cloud side of the loop in one account and region.

Stacks, in deployment order (each depends only on the ones before it):
  <fleet>-storage     key, buckets, tables, notification topics (retained: the state)
  <fleet>-iot         thing groups, IoT policies, Greengrass token exchange role alias, Device Defender
  <fleet>-compute     functions and IoT rules, SageMaker pipeline and registry, events, Batch Transform
  <fleet>-review      the review app behind an HTTPS load balancer with Cognito sign-in
  <fleet>-monitoring  dashboard and alarms
Configuration is CDK context (cdk.json, or -c qcsight:key=value); see stacks/config.py and CDK.md.
"""

from __future__ import annotations

import os

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks
from stacks.compute import ComputeStack, load_pipeline_definition
from stacks.config import AppConfig, check_unknown, from_context
from stacks.iot import IotStack
from stacks.monitoring import MonitoringStack
from stacks.review import ReviewStack
from stacks.storage import StorageStack


def build(app: cdk.App, config: AppConfig) -> dict[str, cdk.Stack]:
    """Every stack of the app, by short name."""
    env = cdk.Environment(account=config.account, region=config.region)
    storage = StorageStack(app, config.name("storage"), config=config, env=env,
                           description="qcsight: KMS key, buckets, tables, notification topics (retained)")
    iot_stack = IotStack(app, config.name("iot"), config=config, storage=storage, ops_topic=storage.ops_topic,
                         env=env, description="qcsight: thing groups, IoT policies, token exchange role, Defender")
    compute = ComputeStack(app, config.name("compute"), config=config, storage=storage, iot_stack=iot_stack,
                           pipeline_definition=load_pipeline_definition(config.pipeline_definition), env=env,
                           description="qcsight: functions, IoT rules, SageMaker pipeline, events, Batch Transform")
    stacks: dict[str, cdk.Stack] = {"storage": storage, "iot": iot_stack, "compute": compute}
    review = None
    if config.review_certificate_arn:
        review = ReviewStack(app, config.name("review"), config=config, storage=storage, env=env,
                             description="qcsight: review app on Fargate behind HTTPS + Cognito")
        stacks["review"] = review
    stacks["monitoring"] = MonitoringStack(app, config.name("monitoring"), config=config, storage=storage,
                                           compute=compute, review=review, env=env,
                                           description="qcsight: fleet dashboard and alarms")
    if review is None:
        cdk.Annotations.of(compute).add_warning_v2(
            "qcsight:no-review-stack",
            "qcsight:reviewCertificateArn is not set: the review stack is skipped (see CDK.md, review hosting)")
    cdk.Tags.of(app).add("qcsight:fleet", config.fleet)
    # cdk-nag runs on every synth; an unacknowledged finding fails `cdk synth` (policy-validation-report.json).
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return stacks


def main() -> None:
    app = cdk.App()
    check_unknown(app.node.get_all_context())
    config = from_context(app.node.try_get_context, os.environ.get("CDK_DEFAULT_ACCOUNT"),
                          os.environ.get("CDK_DEFAULT_REGION"))
    build(app, config)
    app.synth()


if __name__ == "__main__":
    main()
