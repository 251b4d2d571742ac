"""Device identity and reach: thing groups, the IoT policies, the Greengrass token exchange role and Device Defender.

Certificates and things are not created here: a device is provisioned (by the Greengrass installer
or fleet provisioning) into a line's thing group, and its certificate gets the policies below.
"""

from __future__ import annotations

from aws_cdk import Aws, CfnOutput, Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_iot as iot
from aws_cdk import aws_sns as sns
from constructs import Construct

from stacks import iot_policy, names
from stacks.arns import Arns
from stacks.config import AppConfig
from stacks.nag import allow, kms_via
from stacks.storage import StorageStack


class IotStack(Stack):
    """Thing groups (fleet, canary, one per line), device and Greengrass-core IoT policies, TES role alias."""

    def __init__(self, scope: Construct, construct_id: str, *, config: AppConfig, storage: StorageStack,
                 ops_topic: sns.ITopic, **kwargs: object) -> None:
        super().__init__(scope, construct_id, **kwargs)  # type: ignore[arg-type]
        self.config = config
        self.fleet_group = iot.CfnThingGroup(
            self, "FleetGroup", thing_group_name=config.name("fleet"),
            thing_group_properties=iot.CfnThingGroup.ThingGroupPropertiesProperty(
                thing_group_description=f"every qcsight device of {config.fleet}"),
        )
        self.canary_group = iot.CfnThingGroup(
            self, "CanaryGroup", thing_group_name=config.name("canary"),
            thing_group_properties=iot.CfnThingGroup.ThingGroupPropertiesProperty(
                thing_group_description="devices that receive a new model first and soak it before the fleet"),
        )
        self.line_groups = []
        for line in config.lines:
            group = iot.CfnThingGroup(
                self, f"Line{line}Group", thing_group_name=config.name(f"line-{line}"),
                parent_group_name=config.name("fleet"),
                thing_group_properties=iot.CfnThingGroup.ThingGroupPropertiesProperty(
                    thing_group_description=f"qcsight devices of line {line}"),
            )
            group.node.add_dependency(self.fleet_group)
            self.line_groups.append(group)

        self.token_exchange_role = self._token_exchange_role(storage)
        self.role_alias = iot.CfnRoleAlias(
            self, "TokenExchangeRoleAlias", role_alias=config.name("token-exchange"),
            role_arn=self.token_exchange_role.role_arn, credential_duration_seconds=3600,
        )
        arn_prefix = f"arn:{Aws.PARTITION}:iot:{self.region}:{self.account}"
        role_alias_arn = f"{arn_prefix}:rolealias/{config.name('token-exchange')}"
        self.device_policy = iot.CfnPolicy(
            self, "DevicePolicy", policy_name=config.name("device"),
            policy_document=iot_policy.device_policy(arn_prefix),
        )
        self.greengrass_policy = iot.CfnPolicy(
            self, "GreengrassCorePolicy", policy_name=config.name("greengrass-core"),
            policy_document=iot_policy.greengrass_core_policy(arn_prefix, role_alias_arn),
        )
        self.key_arn = storage.key.key_arn
        self._silent_device_profile(ops_topic)
        CfnOutput(self, "RoleAlias", value=self.role_alias.role_alias or "",
                  description="the Greengrass nucleus's iotRoleAlias")
        CfnOutput(self, "DevicePolicyName", value=config.name("device"),
                  description="attach to every device certificate")
        CfnOutput(self, "GreengrassPolicyName", value=config.name("greengrass-core"),
                  description="attach to Greengrass core device certificates as well")

    def _token_exchange_role(self, storage: StorageStack) -> iam.Role:
        """Credentials the nucleus gets through the role alias: its component artifacts and its own images prefix."""
        arns = Arns(self.config)
        role = iam.Role(
            self, "TokenExchangeRole", role_name=self.config.name("greengrass-token-exchange"),
            assumed_by=iam.ServicePrincipal("credentials.iot.amazonaws.com"),
            description="Greengrass token exchange role: read component artifacts, upload the device's own images",
        )
        allow(role, "ReadComponentArtifacts", ["s3:GetObject"],
              [arns.objects("models", f"{names.COMPONENT_ARTIFACT_PREFIX}/*")],
              wildcard_reason="every version of every qcsight component a deployment may name sits under this "
                              "fixed prefix; the nucleus downloads the ones its deployment lists")
        # The nucleus asks where the artifact bucket is before it downloads.
        allow(role, "LocateArtifactBucket", ["s3:GetBucketLocation"], [arns.bucket("models")])
        # credentials-iot:ThingName is the thing whose certificate asked for the credentials: a device writes
        # only under its own prefix and can neither read nor overwrite another device's images.
        allow(role, "UploadOwnImages", ["s3:PutObject"],
              [arns.objects("images", f"{names.DEVICE_IMAGE_PREFIX}/${{credentials-iot:ThingName}}/*")],
              wildcard_reason="one object per alert frame, named by the device, under the prefix of the "
                              "device's own thing name (a policy variable, not a wildcard over devices)")
        kms_via(role, "DecryptArtifacts", storage.key.key_arn, ["kms:Decrypt"], ["s3"], self.region)
        kms_via(role, "EncryptImages", storage.key.key_arn, ["kms:GenerateDataKey"], ["s3"], self.region)
        return role

    def _silent_device_profile(self, ops_topic: sns.ITopic) -> None:
        """Device Defender Detect: a device that sends nothing for silent_after_s is a violation, mailed to ops."""
        alert_role = iam.Role(
            self, "DefenderAlertRole", assumed_by=iam.ServicePrincipal("iot.amazonaws.com"),
            description="lets Device Defender publish violations to the operations topic",
        )
        allow(alert_role, "PublishViolations", ["sns:Publish"], [ops_topic.topic_arn])
        kms_via(alert_role, "EncryptViolations", self.key_arn, ["kms:GenerateDataKey", "kms:Decrypt"], ["sns"],
                self.region)
        targets = [self.canary_group.attr_arn, *(group.attr_arn for group in self.line_groups)]
        iot.CfnSecurityProfile(
            self, "SilentDevices", security_profile_name=self.config.name("silent-devices"),
            security_profile_description="flags a device that has stopped publishing (no messages sent)",
            behaviors=[iot.CfnSecurityProfile.BehaviorProperty(
                name="SilentDevice", metric="aws:num-messages-sent",
                criteria=iot.CfnSecurityProfile.BehaviorCriteriaProperty(
                    comparison_operator="less-than", value=iot.CfnSecurityProfile.MetricValueProperty(count="1"),
                    duration_seconds=self.config.silent_after_s,
                    consecutive_datapoints_to_alarm=1, consecutive_datapoints_to_clear=1),
            )],
            alert_targets={"SNS": iot.CfnSecurityProfile.AlertTargetProperty(
                alert_target_arn=ops_topic.topic_arn, role_arn=alert_role.role_arn)},
            target_arns=targets,
        )
