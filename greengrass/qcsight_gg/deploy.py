"""Deploy to a thing or a thing group: one CreateDeployment with rollout, abort criteria and rollback.

A deployment to a target replaces the target's previous one, so the request always lists both
components: versions not given are kept from the target's latest deployment. The policies:

* rollout: an exponential rate (a few devices a minute at first, then faster as they succeed) and
  abort criteria (cancel when a share of the devices fail, once enough have run), so a bad release
  stops on a handful of devices rather than the whole fleet;
* ``failureHandlingPolicy: ROLLBACK``: a device whose components fail to install or start returns
  to its previous versions;
* ``componentUpdatePolicy: NOTIFY_COMPONENTS`` with a timeout: the Java nucleus tells the agent
  before it restarts it and the agent defers until the part in flight is judged (Greengrass
  nucleus lite stops the agent with SIGTERM, and the agent finishes the part then);
* configuration merges (a new camera URI, say) are merged into the agent's DefaultConfiguration
  and checked by the agent's own validator before anything is sent.

Every request is checked against botocore's service model; ``--dry-run`` prints it.
"""

from __future__ import annotations

import copy
import json
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from qcsight_core.errors import ConfigError
from qcsight_gg.build import AGENT, MODEL, agent_config_check
from qcsight_gg.errors import DeployError
from qcsight_gg.publish import validate_request
from qcsight_gg.semver import Version, VersionError

log = logging.getLogger(__name__)


class GreengrassDeployClient(Protocol):
    def create_deployment(self, **kwargs: Any) -> dict[str, Any]: ...

    def list_deployments(self, **kwargs: Any) -> dict[str, Any]: ...

    def get_deployment(self, **kwargs: Any) -> dict[str, Any]: ...


class IotClient(Protocol):
    def describe_thing(self, **kwargs: Any) -> dict[str, Any]: ...

    def describe_thing_group(self, **kwargs: Any) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Rollout:
    """How fast a deployment reaches a fleet and when it stops.

    Attributes:
        base_rate_per_minute: devices notified per minute at first.
        increment_factor: the rate multiplies by this each time rate_increase_after devices succeeded.
        rate_increase_after: succeeded devices before the rate grows.
        maximum_per_minute: the rate never exceeds this.
        abort_failure_percentage: cancel the rollout when this share of devices failed ...
        abort_min_executed: ... once at least this many devices ran it.
        in_progress_timeout_minutes: a device that has not finished by then counts as timed out.
        update_timeout_s: how long the nucleus waits for components to defer or accept an update.
    """

    base_rate_per_minute: int = 5
    increment_factor: float = 2.0
    rate_increase_after: int = 5
    maximum_per_minute: int = 100
    abort_failure_percentage: float = 10.0
    abort_min_executed: int = 5
    in_progress_timeout_minutes: int = 60
    update_timeout_s: int = 60

    def iot_job_configuration(self) -> dict[str, Any]:
        return {
            "jobExecutionsRolloutConfig": {
                "exponentialRate": {"baseRatePerMinute": self.base_rate_per_minute,
                                    "incrementFactor": self.increment_factor,
                                    "rateIncreaseCriteria": {"numberOfSucceededThings": self.rate_increase_after}},
                "maximumPerMinute": self.maximum_per_minute,
            },
            "abortConfig": {"criteriaList": [
                {"failureType": failure, "action": "CANCEL", "thresholdPercentage": self.abort_failure_percentage,
                 "minNumberOfExecutedThings": self.abort_min_executed}
                for failure in ("FAILED", "TIMED_OUT")]},
            "timeoutConfig": {"inProgressTimeoutInMinutes": self.in_progress_timeout_minutes},
        }


@dataclass(frozen=True)
class DeploymentSpec:
    """What to deploy where.

    Attributes:
        target_arn: the thing or thing group ARN.
        components: component name -> version (both components; see resolve_components).
        merges: component name -> configuration to merge into it.
        resets: component name -> JSON pointers of keys to reset to the recipe's defaults.
        rollout: the rollout and the update timeout.
        name: the deployment's name.
    """

    target_arn: str
    components: Mapping[str, str]
    merges: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    resets: Mapping[str, list[str]] = field(default_factory=dict)
    rollout: Rollout = field(default_factory=Rollout)
    name: str = "qcsight"


def create_deployment_request(spec: DeploymentSpec) -> dict[str, Any]:
    """The CreateDeployment parameters, checked against botocore's service model.

    Raises:
        DeployError: a version is not semantic, or the request breaks the service model.
    """
    components: dict[str, Any] = {}
    for name, version in sorted(spec.components.items()):
        try:
            Version.parse(version)
        except VersionError as exc:
            raise DeployError(f"{name}: {exc}") from None
        entry: dict[str, Any] = {"componentVersion": version}
        update: dict[str, Any] = {}
        if spec.merges.get(name):
            update["merge"] = json.dumps(spec.merges[name], sort_keys=True)
        if spec.resets.get(name):
            update["reset"] = list(spec.resets[name])
        if update:
            entry["configurationUpdate"] = update
        components[name] = entry
    request: dict[str, Any] = {
        "targetArn": spec.target_arn,
        "deploymentName": spec.name,
        "components": components,
        "iotJobConfiguration": spec.rollout.iot_job_configuration(),
        "deploymentPolicies": {
            "failureHandlingPolicy": "ROLLBACK",
            "componentUpdatePolicy": {"action": "NOTIFY_COMPONENTS", "timeoutInSeconds": spec.rollout.update_timeout_s},
            "configurationValidationPolicy": {"timeoutInSeconds": 30},
        },
        "clientToken": str(uuid.uuid4()),
    }
    try:
        validate_request("greengrassv2", "CreateDeployment", request)
    except Exception as exc:
        raise DeployError(str(exc)) from exc
    return request


def resolve_target(iot: IotClient, target: str) -> str:
    """An ARN for ``thing:NAME``, ``group:NAME`` or an ARN given as is (the thing or group must exist).

    Raises:
        DeployError: the target is malformed or does not exist.
    """
    from botocore.exceptions import ClientError

    if target.startswith("arn:"):
        return target
    kind, _, name = target.partition(":")
    if not name or kind not in ("thing", "group"):
        raise DeployError(f"--target {target!r}: thing:NAME, group:NAME or an ARN")
    try:
        if kind == "thing":
            return str(iot.describe_thing(thingName=name)["thingArn"])
        return str(iot.describe_thing_group(thingGroupName=name)["thingGroupArn"])
    except ClientError as exc:
        raise DeployError(f"--target {target!r}: {exc.response.get('Error', {}).get('Message', exc)}") from exc


def current_components(greengrass: GreengrassDeployClient, target_arn: str) -> dict[str, str]:
    """The component versions of the target's latest deployment (empty when it has none)."""
    listed = greengrass.list_deployments(targetArn=target_arn, historyFilter="LATEST_ONLY")
    deployments = listed.get("deployments") or []
    if not deployments:
        return {}
    latest = greengrass.get_deployment(deploymentId=deployments[0]["deploymentId"])
    return {name: str(c["componentVersion"]) for name, c in (latest.get("components") or {}).items()}


def resolve_components(wanted: Mapping[str, str | None], current: Mapping[str, str]) -> dict[str, str]:
    """Both components' versions: those given, the rest kept from the current deployment.

    Raises:
        DeployError: a component has no version given and none deployed.
    """
    resolved: dict[str, str] = {}
    for name in (AGENT, MODEL):
        version = wanted.get(name) or current.get(name)
        if not version:
            raise DeployError(f"{name}: no version given and none deployed to this target yet; pass "
                              f"--{'agent' if name == AGENT else 'model'}-version")
        resolved[name] = version
    for name, version in current.items():
        resolved.setdefault(name, version)  # other components already deployed there stay
    return resolved


def deep_merge(base: Mapping[str, Any], change: Mapping[str, Any]) -> dict[str, Any]:
    """Greengrass's merge: objects merge key by key, anything else replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in change.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def check_agent_merge(defaults: Mapping[str, Any], merge: Mapping[str, Any]) -> dict[str, Any]:
    """The agent's configuration after the merge, refused by the agent's own rules before it is sent.

    Raises:
        DeployError: naming the field, the value and what is allowed.
    """
    merged = deep_merge(defaults, merge)
    try:
        agent_config_check(merged)
    except ConfigError as exc:
        raise DeployError(f"the configuration merge for {AGENT} would be refused by the agent: {exc}") from exc
    return merged
