"""Agent configuration: the example file loads, and every malformed setting is refused by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from qcsight_core.errors import ConfigError
from qcsight_edge import cli
from qcsight_edge.config import AgentConfig, from_greengrass, load_config, validate_config

EXAMPLE = Path(__file__).resolve().parents[2] / "edge_agent" / "agent.example.yaml"


def base(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"thing_name": "line1-cam1", "model": {"bundle": "/models/bundle"}}
    data.update(overrides)
    return data


def test_example_file_loads_with_paths_relative_to_it(tmp_path: Path) -> None:
    copy = tmp_path / "agent.yaml"
    copy.write_text(EXAMPLE.read_text())
    config = load_config(copy)
    assert config.thing_name == "line1-cam1"
    assert config.model.bundle == tmp_path / "bundle"
    assert config.outbox.path == tmp_path / "qcsight-state" / "outbox.db"
    assert config.image_store.max_bytes == 1024**3
    assert config.outbox.max_bytes == 256 * 1024**2
    assert config.source.kind == "synthetic"
    assert config.transport.kind == "none"
    # Every key the example documents is a real setting: a round trip through to_dict is stable.
    assert AgentConfig.from_dict(config.to_dict()) == config


def test_defaults_follow_state_dir() -> None:
    config = AgentConfig.from_dict(base(state_dir="/var/lib/qcsight"))
    assert config.outbox.path == Path("/var/lib/qcsight/outbox.db")
    assert config.image_store.dir == Path("/var/lib/qcsight/images")
    assert config.source.mode == "free"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"model": {"bundle": "b"}}, "thing_name"),
        (base(thing_name="line 1/cam"), "thing_name"),
        (base(model={}), "model.bundle"),
        (base(model={"bundle": "b", "precision": "fp16"}), "model.precision"),
        (base(model={"bundle": "b", "intra_op_threads": -1}), "model.intra_op_threads"),
        (base(source={"kind": "webcam"}), "source.kind"),
        (base(source={"kind": "camera"}), "source.uri"),
        (base(source={"kind": "camera", "uri": 0, "mode": "trigger"}), "source.mode"),
        (base(source={"kind": "hotfolder", "uri": "/in", "mode": "free"}), "source.mode"),
        (base(source={"max_fps": -1}), "source.max_fps"),
        (base(source={"max_fps": "fast"}), "source.max_fps"),
        (base(source={"loop": "yes"}), "source.loop"),
        (base(source={"uri": [1, 2]}), "source.uri"),
        (base(source={"reconnect_initial_s": 5, "reconnect_max_s": 1}), "source.reconnect_max_s"),
        (base(roi={"x": 0, "y": 0, "width": 100}), "roi.height"),
        (base(roi={"x": -5, "y": 0, "width": 100, "height": 100}), "roi.x"),
        (base(roi=[0, 0, 10, 10]), "roi"),
        (base(queue_size=0), "queue_size"),
        (base(queue_size=True), "queue_size"),
        (base(metrics={"window_s": 0}), "metrics.window_s"),
        (base(metrics={"heartbeat_s": float("nan")}), "metrics.heartbeat_s"),
        (base(alerts={"thumbnail_max_side": 4}), "alerts.thumbnail_max_side"),
        (base(alerts={"on_uncertain": "sometimes"}), "alerts.on_uncertain"),
        (base(image_store={"max_bytes": "lots"}), "image_store.max_bytes"),
        (base(outbox={"max_messages": 0}), "outbox.max_messages"),
        (base(transport={"kind": "http"}), "transport.kind"),
        (base(transport={"kind": "mqtt5"}), "transport.endpoint"),
        (base(transport={"kind": "mqtt5", "endpoint": "mqtts://x"}), "transport.endpoint"),
        (base(transport={"kind": "mqtt5", "endpoint": "x", "cert": "/no/such.pem"}), "transport.cert"),
        (base(line_signal={"kind": "gpio"}), "line_signal.kind"),
        (base(line_signal={"kind": "mqtt"}), "line_signal.endpoint"),
        (base(stop_deadline_s=-1), "stop_deadline_s"),
        (base(sauce={"kind": "camera"}), "sauce"),
        (base(source={"kind": "synthetic", "fps": 5}), "source.fps"),
        ("just a string", "configuration"),
    ],
)
def test_malformed_configuration_is_refused_naming_the_field(data: Any, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        AgentConfig.from_dict(data)
    assert caught.value.field == field
    assert field in str(caught.value)


def test_mqtt_transport_needs_all_tls_files(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ConfigError) as caught:
        AgentConfig.from_dict(base(transport={"kind": "mqtt5", "endpoint": "h", "cert": str(pem), "key": str(pem)}))
    assert caught.value.field == "transport.ca"
    ok = AgentConfig.from_dict(base(transport={"kind": "mqtt311", "endpoint": "h", "cert": str(pem), "key": str(pem),
                                               "ca": str(pem), "port": 1883}))
    assert ok.transport.port == 1883


def test_sizes_accept_units() -> None:
    config = AgentConfig.from_dict(base(image_store={"max_bytes": "500MB"}, outbox={"max_bytes": "2 MiB"}))
    assert config.image_store.max_bytes == 500_000_000
    assert config.outbox.max_bytes == 2 * 1024 * 1024


def test_greengrass_configuration_ignores_access_control_and_validates_the_rest() -> None:
    document = base(accessControl={"aws.greengrass.ipc.mqttproxy": {}}, transport={"kind": "ipc"})
    assert from_greengrass(document).transport.kind == "ipc"
    with pytest.raises(ConfigError) as caught:
        validate_config(base(accessControl={}, queue_size=-3))
    assert caught.value.field == "queue_size"


def test_hot_fields_equal_ignores_only_the_model() -> None:
    one = AgentConfig.from_dict(base())
    assert one.hot_fields_equal(AgentConfig.from_dict(base(model={"bundle": "/other"})))
    assert not one.hot_fields_equal(AgentConfig.from_dict(base(queue_size=9)))


def test_cli_refuses_a_bad_file_with_exit_2_naming_the_field(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(base(source={"kind": "camera", "uri": 0, "max_fps": -2})))
    assert cli.main(["--config", str(path)], prog="qcsight agent") == 2
    err = capsys.readouterr().err
    assert "source.max_fps" in err and "-2" in err
    path.write_text("thing_name: [unclosed\n")
    assert cli.main(["--config", str(path)], prog="qcsight agent") == 2
    assert "valid YAML" in capsys.readouterr().err
    assert cli.main(["--config", str(tmp_path / "missing.yaml")], prog="qcsight agent") == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_cli_check_prints_the_resolved_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(base(model={"bundle": "models/b"})))
    assert cli.main(["--config", str(path), "--check"], prog="qcsight agent") == 0
    assert str(tmp_path / "models" / "b") in capsys.readouterr().out


HUGE = "1" + "0" * 400


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (f"image_store:\n  max_bytes: {HUGE}\n", "image_store.max_bytes"),
        (f"outbox:\n  max_bytes: '{HUGE}'\n", "outbox.max_bytes"),
        (f"outbox:\n  max_bytes: {HUGE} MiB\n", "outbox.max_bytes"),
        (f"outbox:\n  max_messages: {HUGE}\n", "outbox.max_messages"),
        (f"stop_deadline_s: {HUGE}\n", "stop_deadline_s"),
        ("stop_deadline_s: 1.0e+400\n", "stop_deadline_s"),
        (f"source:\n  seed: {HUGE}\n", "source.seed"),
        (f"metrics:\n  window_s: -{HUGE}\n", "metrics.window_s"),
        ("queue_size: 1" + "0" * 5000 + "\n", "--config"),  # past Python's int parsing limit: YAML cannot read it
    ],
)
def test_a_value_that_overflows_is_a_config_error_naming_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("thing_name: line1-cam1\nmodel:\n  bundle: b\n" + text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.field == field


def test_a_file_that_is_not_text_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_bytes(b"thing_name: \xff\xfe\x00 line\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.field == "--config"
