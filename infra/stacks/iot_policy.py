"""The AWS IoT policy documents a device certificate gets, built as plain dicts.

Two policies, both scoped by ``${iot:Connection.Thing.ThingName}`` so one document serves every
device and no device can act as another:

* ``device_policy``: what the qcsight agent itself needs, and nothing else: connect with its own
  thing name as client id (the certificate must be attached to that thing), publish to its own
  ``qcsight/<thing>/{metrics,alerts,status}``. No subscribe, no receive: the cloud never sends
  the agent anything over MQTT (models arrive as Greengrass deployments).
* ``greengrass_core_policy``: what the Greengrass nucleus needs on a core device: its own jobs
  and deployment-shadow topics (how deployments reach it), its health topic, the token exchange
  role alias, and the Greengrass data-plane calls. A plain install (the agent without Greengrass)
  attaches only the device policy.
"""

from __future__ import annotations

from typing import Any

from qcsight_core import topics

THING = "${iot:Connection.Thing.ThingName}"
# The named shadow the nucleus syncs thing-level deployments through.
DEPLOYMENT_SHADOW = "AWSManagedGreengrassV2Deployment"
# Greengrass data-plane actions authorised by the IoT policy. AWS's minimal core-device policy
# grants them on "*": ResolveComponentCandidates, GetDeploymentConfiguration and
# ListThingGroupsForCoreDevice take no resource ARN, and the artifacts a deployment names are
# chosen by whoever may create deployments (an IAM permission), not by the device.
GREENGRASS_DATA_PLANE = (
    "greengrass:GetComponentVersionArtifact",
    "greengrass:ResolveComponentCandidates",
    "greengrass:GetDeploymentConfiguration",
    "greengrass:ListThingGroupsForCoreDevice",
)


def _arn(prefix: str, kind: str, rest: str) -> str:
    """An IoT ARN; prefix is 'arn:<partition>:iot:<region>:<account>' (a token string in the stack)."""
    return f"{prefix}:{kind}/{rest}"


def device_policy(arn_prefix: str) -> dict[str, Any]:
    """The qcsight agent's policy: connect as itself, publish its own telemetry, nothing else."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ConnectAsItsOwnThing",
                "Effect": "Allow",
                "Action": "iot:Connect",
                "Resource": _arn(arn_prefix, "client", THING),
                "Condition": {"Bool": {"iot:Connection.Thing.IsAttached": "true"}},
            },
            {
                "Sid": "PublishOwnTelemetry",
                "Effect": "Allow",
                "Action": "iot:Publish",
                "Resource": [_arn(arn_prefix, "topic", f"{topics.ROOT}/{THING}/{kind}") for kind in topics.KINDS],
            },
        ],
    }


def greengrass_core_policy(arn_prefix: str, role_alias_arn: str) -> dict[str, Any]:
    """What the Greengrass nucleus needs besides the agent's own topics, scoped to the device's own thing."""
    things = f"$aws/things/{THING}"
    system_topics = [f"{things}/jobs/*", f"{things}/shadow/name/{DEPLOYMENT_SHADOW}/*"]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ConnectAsItsOwnThing",
                "Effect": "Allow",
                "Action": "iot:Connect",
                "Resource": _arn(arn_prefix, "client", THING),
                "Condition": {"Bool": {"iot:Connection.Thing.IsAttached": "true"}},
            },
            {
                "Sid": "NucleusDeploymentTopics",
                "Effect": "Allow",
                "Action": ["iot:Publish", "iot:Receive"],
                "Resource": [_arn(arn_prefix, "topic", name) for name in system_topics]
                + [_arn(arn_prefix, "topic", f"{things}/greengrassv2/health/json")],
            },
            {
                "Sid": "NucleusDeploymentSubscriptions",
                "Effect": "Allow",
                "Action": "iot:Subscribe",
                "Resource": [_arn(arn_prefix, "topicfilter", name) for name in system_topics],
            },
            {
                "Sid": "TokenExchangeRoleAlias",
                "Effect": "Allow",
                "Action": "iot:AssumeRoleWithCertificate",
                "Resource": role_alias_arn,
            },
            {
                "Sid": "GreengrassDataPlane",
                "Effect": "Allow",
                "Action": list(GREENGRASS_DATA_PLANE),
                "Resource": "*",
            },
        ],
    }
