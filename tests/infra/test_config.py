"""Context values become one validated AppConfig; a bad value names its key."""

from __future__ import annotations

from typing import Any

import pytest
from stacks.config import AppConfig, check_unknown, from_context, known_keys

from qcsight_core.errors import ConfigError


def _read(values: dict[str, Any]) -> AppConfig:
    return from_context(values.get, None, None)


def test_defaults_and_string_values_from_the_command_line() -> None:
    config = _read({"qcsight:account": "123456789012", "qcsight:region": "eu-central-1",
                    "qcsight:lines": "line-7, line-8", "qcsight:imageRetentionDays": "30",
                    "qcsight:reviewInternetFacing": "true", "qcsight:neoTarget": "jetson_nano"})
    assert config.lines == ("line-7", "line-8") and config.image_retention_days == 30
    assert config.neo_target == "jetson_nano"
    assert config.review_internet_facing is True and config.fleet == "qcsight"
    assert config.zones == ("eu-central-1a", "eu-central-1b")
    assert config.bucket_name("images") == "qcsight-images-123456789012-eu-central-1"


def test_account_and_region_fall_back_to_the_cli_environment() -> None:
    config = from_context({}.get, "123456789012", "us-east-1")
    assert (config.account, config.region) == ("123456789012", "us-east-1")
    with pytest.raises(ConfigError, match="qcsight:account"):
        from_context({}.get, None, "us-east-1")


@pytest.mark.parametrize(("key", "value", "says"), [
    ("qcsight:account", "12345", "account"),
    ("qcsight:imageRetentionDays", "soon", "qcsight:imageRetentionDays"),
    ("qcsight:logRetentionDays", 10, "log_retention_days"),
    ("qcsight:lines", "[1, 2]", "qcsight:lines"),
    ("qcsight:reviewIngressCidrs", "0.0.0.0/0", "narrower than the whole internet"),
    ("qcsight:silentAfterS", 60, "Device Defender"),
    ("qcsight:noncurrentGlacierDays", 40, "noncurrent_glacier_days"),
    ("qcsight:reviewCertificateArn", "arn:aws:acm:eu-west-1:123456789012:certificate/x", "review_domain_name"),
    ("qcsight:availabilityZones", "eu-west-1a", "two zones"),
    ("qcsight:neoTarget", "toaster", r"neo_target='toaster': one of .*jetson_nano"),
])
def test_bad_values_name_the_key(key: str, value: Any, says: str) -> None:
    values = {"qcsight:account": "123456789012", "qcsight:region": "eu-west-1", key: value}
    with pytest.raises(ConfigError, match=says):
        _read(values)


def test_an_unknown_key_is_refused_not_ignored() -> None:
    check_unknown({"qcsight:fleet": "x", "@aws-cdk/core:x": True})
    with pytest.raises(ConfigError, match="qcsight:imageRetentionDay"):
        check_unknown({"qcsight:imageRetentionDay": 30})
    assert "qcsight:alertEmail" in known_keys()
