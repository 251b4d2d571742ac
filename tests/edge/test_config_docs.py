"""The configuration's one definition: the example file and the JSON Schema are derived from it and current.

The committed ``edge_agent/agent.example.yaml`` and ``agent.schema.json`` must equal what
``python -m qcsight_edge.config_docs`` writes; the example must read back as the defaults; the
schema must accept the example and the Greengrass recipe's defaults and refuse what the reader refuses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from qcsight_core.errors import ConfigError
from qcsight_edge import config_docs
from qcsight_edge.config import AgentConfig, MqttSettings, from_greengrass, load_config

ROOT = Path(__file__).resolve().parents[2]
EDGE = ROOT / "edge_agent"


def test_the_committed_example_and_schema_are_current(capsys: pytest.CaptureFixture[str]) -> None:
    assert config_docs.main(["--check", "--dir", str(EDGE)]) == 0, capsys.readouterr().err


def test_check_names_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert config_docs.main(["--dir", str(tmp_path)]) == 0
    (tmp_path / config_docs.EXAMPLE).write_text("thing_name: x\n")
    assert config_docs.main(["--check", "--dir", str(tmp_path)]) == 1
    assert config_docs.EXAMPLE in capsys.readouterr().err


def test_the_example_reads_back_as_the_defaults(tmp_path: Path) -> None:
    example = tmp_path / "agent.yaml"
    example.write_text(config_docs.example_yaml())
    shown = load_config(example)
    minimal = AgentConfig.from_dict({"thing_name": shown.thing_name, "model": {"bundle": "bundle"}},
                                    base_dir=tmp_path)
    assert shown == minimal


def _schema() -> jsonschema.Draft202012Validator:
    schema = config_docs.json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_schema_accepts_the_example_and_the_greengrass_defaults() -> None:
    validator = _schema()
    validator.validate(yaml.safe_load(config_docs.example_yaml()))
    validator.validate({"thing_name": "t", "model": {"bundle": "b"}})  # what the reader requires, no more
    recipe = yaml.safe_load((ROOT / "greengrass" / "recipes" / "com.qcsight.EdgeAgent.yaml").read_text())
    defaults = dict(recipe["ComponentConfiguration"]["DefaultConfiguration"])
    defaults.pop("accessControl")
    # What the lifecycle script adds (the thing name, the state folder, the model) completes them.
    completed = {**defaults, "thing_name": "line1-cam1", "state_dir": "/greengrass/v2/work/state",
                 "model": {**defaults.get("model", {}), "bundle": "/greengrass/v2/work/com.qcsight.Model/bundle"}}
    validator.validate(completed)
    assert from_greengrass(completed).image_upload is not None


@pytest.mark.parametrize("change", [
    {"source": {"max_fps": -1}},
    {"transport": {"kind": "http"}},
    {"line_signal": {"port": 0}},
    {"outbox": {"max_bytes": "lots"}},
    {"image_upload": {"credentials": {"timeout_s": 0}}},
    {"metrics": {"window": 60}},
    {"queue_size": True},
    {"model": {}},
])
def test_the_schema_refuses_what_the_reader_refuses(change: dict[str, Any]) -> None:
    data = {"thing_name": "t", "model": {"bundle": "b"}, **change}
    with pytest.raises(ConfigError):
        AgentConfig.from_dict(data)
    assert list(_schema().iter_errors(data)), f"the schema accepts {change}"


def test_transport_and_line_signal_are_mqtt_settings_read_like_every_section() -> None:
    config = AgentConfig.from_dict({"thing_name": "t", "model": {"bundle": "b"},
                                    "transport": {"port": "1883", "keep_alive_s": 30.0, "max_in_flight": "8"},
                                    "line_signal": {"port": 1884.0, "iot_core_limits": "true"}})
    assert isinstance(config.transport, MqttSettings) and isinstance(config.line_signal, MqttSettings)
    assert (config.transport.port, config.transport.keep_alive_s, config.transport.max_in_flight) == (1883, 30, 8)
    assert config.line_signal.port == 1884 and config.line_signal.iot_core_limits is True
    assert not config.line_signal.thing_name, "the agent sets the thing name; the configuration cannot"
    with pytest.raises(ConfigError) as info:
        AgentConfig.from_dict({"thing_name": "t", "model": {"bundle": "b"}, "line_signal": {"keep_alive_s": "1.5"}})
    assert info.value.field == "line_signal.keep_alive_s"
    with pytest.raises(ConfigError) as info:
        AgentConfig.from_dict({"thing_name": "t", "model": {"bundle": "b"}, "transport": {"protocol": "mqtt5"}})
    assert info.value.field == "transport.protocol"
