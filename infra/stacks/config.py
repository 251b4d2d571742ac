"""The app's configuration, read once from CDK context (cdk.json, `-c key=value`) and validated.

Every key is listed in FIELDS with its default; an unknown key, or a value of the wrong kind, is
refused with a message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from qcsight_core.errors import ConfigError
from stacks import names
from stacks.tables import deployed_name

_ACCOUNT = re.compile(r"^\d{12}$")
_REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d$")
_NAME = re.compile(r"^[a-z][a-z0-9-]{1,23}$")
_LINE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_CIDR = re.compile(r"^\d{1,3}(\.\d{1,3}){3}/\d{1,2}$")
_SCHEDULE = re.compile(r"^(cron|rate)\(.+\)$")
# CloudWatch Logs accepts only these retention periods (days).
LOG_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922,
                      3288, 3653)
# Device Defender accepts these durations (seconds) for a cloud-side metric's window.
DEFENDER_DURATIONS_S = (300, 600, 900, 1800, 3600, 7200, 10800, 14400, 28800, 43200, 86400)
CONTEXT_PREFIX = "qcsight:"


@dataclass(frozen=True)
class AppConfig:
    """What an adopting team sets (cdk.json's context, or `cdk deploy -c qcsight:key=value`).

    Attributes:
        account: the 12-digit AWS account to deploy to.
        region: the region, e.g. eu-west-1.
        fleet: a short lower-case name prefixed to every named resource (thing groups, roles, policies).
        lines: the production lines; each gets a thing group under the fleet's group.
        alert_email: where defect-alert and operations notifications are mailed ("" for none).
        image_retention_days: full-resolution alert images expire after this many days.
        log_retention_days: retention of every log group the app creates.
        metrics_retention_days: metrics windows and status events expire (DynamoDB TTL) after this many days.
        noncurrent_ia_days / noncurrent_glacier_days / noncurrent_expire_days: old object versions
            move to Standard-IA, then Glacier Instant Retrieval, then expire.
        policy_rate_minutes: how often the retraining policy runs.
        canary_check_minutes: how often the deploy function checks a canary's soak.
        neo_target: the Neo device target the deploy function compiles each approved model for (e.g.
            jetson_nano; qcsight_train.launch.neo's list); "" compiles nothing.
        silent_after_s: a device that sent nothing for this long is flagged by Device Defender.
        batch_schedule: when Batch Transform scores the incoming images (EventBridge Scheduler syntax).
        batch_timezone: the time zone batch_schedule is read in.
        batch_instance_type: the Batch Transform instance type.
        training_instance_type: the retraining pipeline's default training instance (a multi-GPU type such as
            ml.g5.12xlarge trains on every GPU; the pipeline's TrainingInstanceType parameter overrides it per run).
        review_certificate_arn: ACM certificate for the review app's HTTPS listener; "" skips the review stack.
        review_domain_name: the review app's host name (the certificate's), e.g. review.example.com.
        review_domain_prefix: the Cognito hosted-UI domain prefix ("" derives one from fleet and account).
        review_ingress_cidrs: the networks allowed to reach the review load balancer.
        review_internet_facing: whether the review load balancer is internet-facing (default: internal).
        availability_zones: the two zones of the review VPC; empty means <region>a and <region>b. Named here
            rather than looked up so that synth needs no AWS call (set them in a region without a 'b').
        pipeline_definition: 'module:function' building the SageMaker pipeline definition (qcsight_cloud's).
    """

    account: str
    region: str
    fleet: str = "qcsight"
    lines: tuple[str, ...] = ("line-1",)
    alert_email: str = ""
    image_retention_days: int = 90
    log_retention_days: int = 90
    metrics_retention_days: int = 90
    noncurrent_ia_days: int = 30
    noncurrent_glacier_days: int = 90
    noncurrent_expire_days: int = 365
    policy_rate_minutes: int = 15
    canary_check_minutes: int = 10
    neo_target: str = ""
    silent_after_s: int = 900
    batch_schedule: str = "cron(0 2 * * ? *)"
    batch_timezone: str = "UTC"
    batch_instance_type: str = "ml.m5.xlarge"
    training_instance_type: str = "ml.g5.xlarge"
    review_certificate_arn: str = ""
    review_domain_name: str = ""
    review_domain_prefix: str = ""
    review_ingress_cidrs: tuple[str, ...] = ("10.0.0.0/8",)
    review_internet_facing: bool = False
    availability_zones: tuple[str, ...] = ()
    pipeline_definition: str = names.PIPELINE_DEFINITION_HOOK

    def __post_init__(self) -> None:
        _match("account", self.account, _ACCOUNT, "12 digits")
        _match("region", self.region, _REGION, "an AWS region such as eu-west-1")
        _match("fleet", self.fleet, _NAME, "2-24 lower-case letters, digits and '-', starting with a letter")
        if not self.lines:
            raise ConfigError("lines", self.lines, "at least one line name")
        for line in self.lines:
            _match("lines", line, _LINE, "1-64 letters, digits, '_' or '-'")
        if self.alert_email:
            _match("alert_email", self.alert_email, _EMAIL, "an e-mail address, or empty for none")
        _between("image_retention_days", self.image_retention_days, 1, 3650)
        _between("metrics_retention_days", self.metrics_retention_days, 1, 3650)  # StoreSettings' range
        if self.log_retention_days not in LOG_RETENTION_DAYS:
            raise ConfigError("log_retention_days", self.log_retention_days,
                              f"one of CloudWatch Logs' periods: {', '.join(map(str, LOG_RETENTION_DAYS))}")
        # S3 refuses a transition to Standard-IA before 30 days, and Glacier needs 30 more days after it.
        _between("noncurrent_ia_days", self.noncurrent_ia_days, 30, 3650)
        _between("noncurrent_glacier_days", self.noncurrent_glacier_days, self.noncurrent_ia_days + 30, 3650)
        _between("noncurrent_expire_days", self.noncurrent_expire_days, self.noncurrent_glacier_days + 90, 36500)
        _between("policy_rate_minutes", self.policy_rate_minutes, 1, 1440)
        _between("canary_check_minutes", self.canary_check_minutes, 1, 1440)
        if self.neo_target:
            from qcsight_train.launch.neo import parse_device

            try:
                parse_device(self.neo_target)
            except ConfigError as exc:
                raise ConfigError("neo_target", self.neo_target, exc.allowed) from None
        if self.silent_after_s not in DEFENDER_DURATIONS_S:
            raise ConfigError("silent_after_s", self.silent_after_s,
                              f"one of Device Defender's durations: {', '.join(map(str, DEFENDER_DURATIONS_S))}")
        _match("batch_schedule", self.batch_schedule, _SCHEDULE, "cron(...) or rate(...)")
        if not self.batch_instance_type.startswith("ml."):
            raise ConfigError("batch_instance_type", self.batch_instance_type, "a SageMaker type such as ml.m5.xlarge")
        if not self.training_instance_type.startswith("ml."):
            raise ConfigError("training_instance_type", self.training_instance_type,
                              "a SageMaker type such as ml.g5.12xlarge")
        if self.review_certificate_arn and not self.review_certificate_arn.startswith("arn:aws"):
            raise ConfigError("review_certificate_arn", self.review_certificate_arn,
                              "an ACM certificate ARN, or empty to skip the review stack")
        if self.review_certificate_arn:
            _match("review_domain_name", self.review_domain_name,
                   re.compile(r"^(?=.{4,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$"),
                   "the review app's DNS name (the certificate's), required with review_certificate_arn")
        if self.review_domain_prefix:
            _match("review_domain_prefix", self.review_domain_prefix, re.compile(r"^[a-z0-9](-?[a-z0-9]){0,62}$"),
                   "lower-case letters, digits and single hyphens")
        if not self.review_ingress_cidrs:
            raise ConfigError("review_ingress_cidrs", self.review_ingress_cidrs, "at least one CIDR block")
        for cidr in self.review_ingress_cidrs:
            _match("review_ingress_cidrs", cidr, _CIDR, "IPv4 CIDR blocks such as 10.0.0.0/8")
            if cidr.endswith("/0"):
                raise ConfigError("review_ingress_cidrs", cidr, "a network narrower than the whole internet")
        for zone in self.availability_zones:
            if not zone.startswith(self.region) or len(zone) != len(self.region) + 1:
                raise ConfigError("availability_zones", zone, f"zones of {self.region}, such as {self.region}a")
        if self.availability_zones and len(self.availability_zones) < 2:
            raise ConfigError("availability_zones", self.availability_zones, "two zones or more (the ALB needs two)")
        _match("pipeline_definition", self.pipeline_definition, re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"),
               "module.path:function")

    @property
    def cognito_domain_prefix(self) -> str:
        return self.review_domain_prefix or f"{self.fleet}-review-{self.account}"

    @property
    def zones(self) -> tuple[str, ...]:
        return self.availability_zones or (f"{self.region}a", f"{self.region}b")

    def bucket_name(self, purpose: str) -> str:
        """S3 bucket names are global: the account and region keep this fleet's apart from everyone's."""
        return f"{self.fleet}-{purpose}-{self.account}-{self.region}"

    def table_name(self, key: str) -> str:
        """What the store URL dynamodb:<fleet> resolves to (qcsight_cloud.tables.table_name)."""
        return deployed_name(self.fleet, key)

    def name(self, suffix: str) -> str:
        """A resource name owned by this fleet: '<fleet>-<suffix>'."""
        return f"{self.fleet}-{suffix}"


def _match(field: str, value: Any, pattern: re.Pattern[str], allowed: str) -> None:
    if not isinstance(value, str) or not pattern.match(value):
        raise ConfigError(field, value, allowed)


def _between(field: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(field, value, f"an integer from {low} to {high}")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError as exc:
            raise ConfigError(key, value, "an integer") from exc
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, value, "an integer")
    return value


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(key, value, "true or false")


def _as_list(key: str, value: Any) -> tuple[str, ...]:
    # `-c qcsight:lines=a,b` arrives as a string; cdk.json may hold a JSON list.
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(key, value, "a JSON list of strings or comma-separated names") from exc
        else:
            value = [part.strip() for part in text.split(",") if part.strip()]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(key, value, "a list of strings")
    return tuple(value)


def _as_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, value, "a string")
    return value


_CONVERTERS: dict[str, Callable[[str, Any], Any]] = {
    "int": _as_int, "bool": _as_bool, "str": _as_str, "tuple[str, ...]": _as_list,
}


def from_context(get: Callable[[str], Any], default_account: str | None, default_region: str | None) -> AppConfig:
    """Build the config from context values read with get(key) (None when unset).

    account and region fall back to the CLI's CDK_DEFAULT_ACCOUNT/CDK_DEFAULT_REGION.
    """
    values: dict[str, Any] = {}
    for item in fields(AppConfig):
        key = CONTEXT_PREFIX + _camel(item.name)
        raw = get(key)
        if raw is None:
            continue
        values[item.name] = _CONVERTERS[str(item.type)](key, raw)  # annotations are strings (PEP 563)
    values.setdefault("account", default_account or "")
    values.setdefault("region", default_region or "")
    if not values["account"]:
        raise ConfigError(CONTEXT_PREFIX + "account", "", "12 digits: set it in cdk.json or with "
                          "-c qcsight:account=123456789012 (or configure AWS credentials for the CLI)")
    if not values["region"]:
        raise ConfigError(CONTEXT_PREFIX + "region", "", "a region: -c qcsight:region=eu-west-1")
    return AppConfig(**values)


def known_keys() -> tuple[str, ...]:
    """Every context key the app reads."""
    return tuple(CONTEXT_PREFIX + _camel(item.name) for item in fields(AppConfig))


def check_unknown(context: Mapping[str, Any]) -> None:
    """Refuse a qcsight: context key the app does not read (a typo would otherwise be ignored)."""
    allowed = set(known_keys())
    for key in context:
        if key.startswith(CONTEXT_PREFIX) and key not in allowed:
            raise ConfigError(key, context[key], "a known key: " + ", ".join(sorted(allowed)))
