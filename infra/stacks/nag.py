"""cdk-nag acknowledgments, and IAM statements that carry the reason for each wildcard they hold.

cdk-nag 3 reports through CDK's own validation: an acknowledged finding is recorded with its
reason, an unacknowledged one fails `cdk synth`. IAM5 (wildcards) reports one finding per wildcard
action or resource, so each wildcard is acknowledged by name, next to the statement that needs it: a
new wildcard fails synth until someone writes down why.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from aws_cdk import Acknowledgment, Validations
from aws_cdk import aws_iam as iam
from constructs import IConstruct

from stacks.arns import nag_resource

IAM5 = "AwsSolutions-IAM5"
# Set to 1 to synthesize with no acknowledgment, so the validation report lists every finding (the
# "before" count of CDK.md); synth then fails, as it should.
NO_ACKNOWLEDGMENTS_ENV = "QCSIGHT_NAG_NO_ACKNOWLEDGMENTS"


def acknowledge(scope: IConstruct, rule: str, reason: str, findings: Sequence[str] = ()) -> None:
    """Acknowledge rule (or each of its findings, e.g. 'Resource::arn:...:x/*') on scope and its children."""
    if os.environ.get(NO_ACKNOWLEDGMENTS_ENV) == "1":
        return
    validations = Validations.of(scope)
    if not findings:
        validations.acknowledge(Acknowledgment(id=rule, reason=reason))
    for finding in findings:
        validations.acknowledge(Acknowledgment(id=f"{rule}[{finding}]", reason=reason))


def allow(role: iam.IRole, sid: str, actions: Sequence[str], resources: Sequence[str], *,
          wildcard_reason: str = "", conditions: Mapping[str, Any] | None = None) -> iam.PolicyStatement:
    """Add an Allow statement to role; every wildcard resource in it needs wildcard_reason, acknowledged on role."""
    wild = [resource for resource in resources if "*" in resource]
    if wild and not wildcard_reason:
        raise ValueError(f"statement {sid} has wildcard resources {wild}: say why (wildcard_reason)")
    statement = iam.PolicyStatement(sid=sid, actions=list(actions), resources=list(resources),
                                    conditions=dict(conditions) if conditions else None)
    role.add_to_principal_policy(statement)
    if wild:
        acknowledge(role, IAM5, f"{sid}: {wildcard_reason}", [nag_resource(resource) for resource in wild])
    return statement


def kms_via(role: iam.IRole, sid: str, key_arn: str, actions: Sequence[str], services: Sequence[str],
            region: str) -> iam.PolicyStatement:
    """KMS use on one key, only when one of the named services calls KMS on the role's behalf."""
    via = [f"{service}.{region}.amazonaws.com" for service in services]
    return allow(role, sid, actions, [key_arn],
                 conditions={"StringEquals": {"kms:ViaService": via[0] if len(via) == 1 else via}})
