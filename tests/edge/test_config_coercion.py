"""Configuration values as Greengrass serves them: numbers and booleans as strings (Lite), integers as floats (merges).

Greengrass Lite's YAML decoder keeps every scalar of a recipe's DefaultConfiguration as text, so
``max_fps: 2`` reaches the agent as ``'2'``; a configuration merge on the Java nucleus can turn
``10`` into ``10.0``. Both must mean the number, and the range checks must still apply.
"""

from __future__ import annotations

from typing import Any

import pytest

from qcsight_core.errors import ConfigError
from qcsight_edge.config import AgentConfig, from_greengrass


def served(**overrides: Any) -> dict[str, Any]:
    """A component configuration as Greengrass Lite serves a YAML recipe's defaults: every scalar a string."""
    data: dict[str, Any] = {
        "thing_name": "line1-cam1",
        "model": {"bundle": "/models/bundle", "warmup_runs": "1", "intra_op_threads": "0"},
        "source": {"kind": "camera", "uri": "0", "max_fps": "2", "reconnect_initial_s": "0.5", "loop": "false"},
        "alerts": {"on_uncertain": "true", "thumbnail_max_side": "160"},
        "metrics": {"window_s": "60", "heartbeat_s": "30.0"},
        "outbox": {"max_bytes": "256MiB", "max_messages": "1000"},
        "transport": {"kind": "ipc", "iot_core_limits": "TRUE"},
        "stop_deadline_s": "10",
    }
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return data


def test_strings_from_greengrass_lite_mean_their_values() -> None:
    config = from_greengrass(served())
    assert config.source.max_fps == 2.0 and isinstance(config.source.max_fps, float)
    assert config.source.uri == 0 and isinstance(config.source.uri, int)  # a camera index, not a file named "0"
    assert config.source.reconnect_initial_s == 0.5
    assert config.source.loop is False and config.alerts.on_uncertain is True
    assert config.transport.iot_core_limits is True
    assert config.model.warmup_runs == 1 and isinstance(config.model.warmup_runs, int)
    assert config.alerts.thumbnail_max_side == 160
    assert config.metrics.window_s == 60.0 and config.metrics.heartbeat_s == 30.0
    assert config.outbox.max_bytes == 256 * 1024**2 and config.outbox.max_messages == 1000
    assert config.stop_deadline_s == 10.0
    # Coerced values are the same configuration as typed ones.
    assert AgentConfig.from_dict(config.to_dict()) == config


def test_integral_floats_from_a_merge_are_integers() -> None:
    config = from_greengrass(served(model={"warmup_runs": 3.0}, alerts={"thumbnail_max_side": 128.0},
                                    outbox={"max_messages": 500.0, "max_bytes": 2048.0},
                                    source={"uri": 2.0}))
    assert config.model.warmup_runs == 3 and isinstance(config.model.warmup_runs, int)
    assert config.alerts.thumbnail_max_side == 128 and isinstance(config.alerts.thumbnail_max_side, int)
    assert config.outbox.max_messages == 500 and config.outbox.max_bytes == 2048
    assert config.source.uri == 2


@pytest.mark.parametrize("overrides, field, shown", [
    ({"source": {"max_fps": "2000"}}, "source.max_fps", "'2000'"),          # in range only after coercion
    ({"source": {"max_fps": "-1"}}, "source.max_fps", "'-1'"),
    ({"source": {"max_fps": "fast"}}, "source.max_fps", "'fast'"),
    ({"source": {"max_fps": "nan"}}, "source.max_fps", "'nan'"),
    ({"source": {"max_fps": "1e999"}}, "source.max_fps", "'1e999'"),
    ({"model": {"warmup_runs": "101"}}, "model.warmup_runs", "'101'"),
    ({"model": {"warmup_runs": "1.5"}}, "model.warmup_runs", "'1.5'"),     # not an integer, even as a float
    ({"model": {"warmup_runs": 2.5}}, "model.warmup_runs", "2.5"),
    ({"alerts": {"thumbnail_max_side": "8.0"}}, "alerts.thumbnail_max_side", "'8.0'"),
    ({"alerts": {"on_uncertain": "yes"}}, "alerts.on_uncertain", "'yes'"),  # only true/false are booleans
    ({"metrics": {"window_s": "0"}}, "metrics.window_s", "'0'"),
    ({"outbox": {"max_messages": "0"}}, "outbox.max_messages", "'0'"),
])
def test_coerced_values_are_still_range_checked_and_named(overrides: dict[str, Any], field: str, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_greengrass(served(**overrides))
    assert info.value.field == field
    assert f"{field}={shown}" in str(info.value), "the error shows the value as it was given"
