"""Fleet membership (fleet file, IoT thing groups), the fleet view, and `qcsight cloud fleet`."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from qcsight_cloud import cli, timestamps
from qcsight_cloud.errors import FleetError
from qcsight_cloud.fleet import CachedFleet, Fleet, FleetSettings, fleet_view, list_thing_group, resolve
from qcsight_cloud.ingest import Ingestor
from qcsight_cloud.sqlite_store import SqliteStore
from qcsight_core.errors import ConfigError
from tests.cloud import builders
from tests.cloud.builders import T0


@pytest.mark.parametrize(("data", "field"), [
    ({"lines": {"l1": {"things": ["a"]}}, "heartbeat": 30}, "fleet.heartbeat"),
    ({"lines": {"l1": {"things": ["a"], "thing_group": "g"}}}, "fleet.lines.l1"),
    ({"lines": {"l1": {}}}, "fleet.lines.l1"),
    ({"lines": {"l1": {"things": ["bad name"]}}}, "fleet.lines.l1.things"),
    ({"lines": {"l1": {"things": "a"}}}, "fleet.lines.l1.things"),
    ({"lines": {"l1": {"thing_group": "no/slash"}}}, "fleet.lines.l1.thing_group"),
    ({"lines": ["l1"]}, "fleet.lines"),
    ({"heartbeat_s": 0}, "fleet.heartbeat_s"),
    ({"silent_heartbeats": 0}, "fleet.silent_heartbeats"),
])
def test_a_bad_fleet_file_names_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        FleetSettings.from_mapping(data)
    assert info.value.field == field


def test_a_thing_belongs_to_one_line() -> None:
    settings = FleetSettings.from_mapping({"lines": {"l1": {"things": ["a", "b"]}, "l2": {"things": ["b"]}}})
    with pytest.raises(FleetError, match="thing b is in two lines"):
        resolve(settings)


def test_thing_groups_are_listed_page_by_page_with_requests_the_iot_model_accepts() -> None:
    import boto3
    from botocore.stub import Stubber

    client = boto3.client("iot", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    settings = FleetSettings.from_mapping({"lines": {"line-1": {"thing_group": "qcsight-line-1"},
                                                     "bench": {"things": ["cam-9"]}}})
    with Stubber(client) as stub:
        stub.add_response("list_things_in_thing_group", {"things": ["cam-1", "cam-2"], "nextToken": "page-2"},
                          {"thingGroupName": "qcsight-line-1", "recursive": True, "maxResults": 250})
        stub.add_response("list_things_in_thing_group", {"things": ["cam-3"]},
                          {"thingGroupName": "qcsight-line-1", "recursive": True, "maxResults": 250,
                           "nextToken": "page-2"})
        fleet = resolve(settings, client)
        stub.assert_no_pending_responses()
    assert fleet.lines == {"line-1": ("cam-1", "cam-2", "cam-3"), "bench": ("cam-9",)}
    assert (fleet.line_of("cam-3"), fleet.line_of("cam-9"), fleet.line_of("stranger")) == ("line-1", "bench",
                                                                                           "unassigned")
    with Stubber(client) as stub:
        stub.add_client_error("list_things_in_thing_group", "ResourceNotFoundException", "no such group")
        with pytest.raises(FleetError, match="qcsight-line-1"):
            list_thing_group(client, "qcsight-line-1")


def test_cached_membership_reloads_on_expiry_and_at_most_once_a_minute_for_a_stranger() -> None:
    now = [0.0]
    loads: list[float] = []
    members = {"l1": ("a",)}

    def load() -> Fleet:
        loads.append(now[0])
        return Fleet(dict(members))

    cached = CachedFleet(load, ttl_s=300, miss_refresh_s=60, clock=lambda: now[0])
    assert cached.line_of("a") == "l1" and loads == [0.0]
    members["l1"] = ("a", "new")
    assert cached.line_of("new") == "unassigned", "just loaded: a stranger waits for the next refresh"
    now[0] = 61
    assert cached.line_of("new") == "l1" and loads == [0.0, 61]
    now[0] = 90
    assert cached.line_of("ghost") == "unassigned" and loads == [0.0, 61], "no reload storm from unknown things"
    now[0] = 400
    cached.line_of("a")
    assert loads == [0.0, 61, 400]


def _ingest_fleet(store: SqliteStore, now: Any) -> None:
    """Two lines: cam-1 drifting and fresh, cam-2 silent for 5 minutes, cam-3 healthy; a spoofer's drops."""
    def at(minutes: float) -> Any:
        return now - timedelta(minutes=minutes)

    lines = {"cam-1": "line-1", "cam-2": "line-1", "cam-3": "line-2"}
    ingestor = Ingestor(store, lines.__getitem__)
    cam3 = builders.metrics("cam-3", 2, at(1), frames=300, defects=3)
    batch = [
        builders.incoming(builders.metrics("cam-1", 1, at(3), frames=100, defects=10, confidence_psi=0.1,
                                           latency_p95=9.0, dropped=2), received=at(3)),
        builders.incoming(builders.metrics("cam-1", 2, at(2), frames=100, defects=20, confidence_psi=0.4,
                                           brightness_psi=0.3, latency_p95=12.0, dropped=1), received=at(2)),
        builders.incoming(builders.status("cam-1", 4, at(0.2), model="4"), received=at(0.2)),
        builders.incoming(builders.metrics("cam-2", 1, at(6), frames=50, defects=0), received=at(5)),
        builders.incoming(builders.metrics("cam-3", 1, at(90), frames=999, defects=999), received=at(90)),
        builders.incoming(cam3, received=at(1)),
        builders.incoming(cam3, received=at(0.5)),  # delivered twice
    ]
    ingestor.ingest_batch(batch)
    store.count("cam-9", {"drop.bad_identity": 1})


def test_the_fleet_view_shows_rates_drift_latency_and_silence_per_device_and_line(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite")
    now = T0
    _ingest_fleet(store, now)
    fleet = Fleet({"line-1": ("cam-1", "cam-2"), "line-2": ("cam-3", "cam-4")},
                  FleetSettings(heartbeat_s=30, silent_heartbeats=3))
    view = fleet_view(store, fleet, now=now, period=timedelta(hours=1))
    rows = {row.thing: row for row in view.devices}
    assert set(rows) == {"cam-1", "cam-2", "cam-3", "cam-4"}

    cam1 = rows["cam-1"]
    assert (cam1.frames, cam1.defects, cam1.defect_rate) == (200, 30, 0.15)
    assert (cam1.confidence_psi, cam1.brightness_psi, cam1.confidence_psi_max) == (0.4, 0.3, 0.4)
    assert (cam1.latency_p95_ms, cam1.dropped, cam1.model_version) == (12.0, 3, "4")
    assert (cam1.gaps, cam1.silent) == (1, False), "seq 3 never came; heard 12 s ago"
    assert rows["cam-2"].silent and rows["cam-2"].silent_s == pytest.approx(300)
    assert rows["cam-3"].frames == 300, "the window from 90 minutes ago is outside the hour"
    assert rows["cam-3"].duplicates == 1, "cam-3's seq 2 arrived twice"
    assert rows["cam-4"].silent and rows["cam-4"].last_seen is None, "in the fleet, never heard from"

    lines = {row.line: row for row in view.lines}
    assert (lines["line-1"].devices, lines["line-1"].silent, lines["line-1"].frames) == (2, 1, 250)
    assert lines["line-1"].defect_rate == pytest.approx(30 / 250)
    assert lines["line-1"].model_versions == ("3", "4")
    assert (lines["line-2"].silent, lines["line-2"].confidence_psi) == (1, 0.02)
    assert view.unknown_identities == {"cam-9": {"drop.bad_identity": 1}}
    assert json.loads(json.dumps(view.to_dict()))["devices"][0]["thing"] == "cam-1"


def test_qcsight_cloud_fleet_prints_lines_devices_and_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "s.sqlite"
    store = SqliteStore(db)
    _ingest_fleet(store, timestamps.now())
    store.close()
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("heartbeat_s: 30\nlines:\n  line-1: {things: [cam-1, cam-2]}\n  line-2: {things: [cam-3]}\n")

    assert cli.main(["fleet", "--store", f"sqlite:{db}", "--fleet", str(fleet_file)]) == 0
    out = capsys.readouterr().out
    assert "SILENT after 90 s" in out
    device_lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("cam-")}
    assert "SILENT" in device_lines["cam-2"] and "SILENT" not in device_lines["cam-1"]
    assert "GAPS 1" in device_lines["cam-1"] and "15.00" in device_lines["cam-1"]
    assert "DUPS 1" in device_lines["cam-3"]
    assert "cam-9: drop.bad_identity 1" in out

    assert cli.main(["fleet", "--store", f"sqlite:{db}", "--json", "--period", "10m"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {d["thing"] for d in data["devices"]} == {"cam-1", "cam-2", "cam-3"}, "without a fleet file: who spoke"


def test_fleet_cli_names_a_bad_duration(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["fleet", "--period", "an hour"]) == 2
    assert "not a duration like 90s" in capsys.readouterr().err


def test_qcsight_cloud_help_answers(capsys: pytest.CaptureFixture[str]) -> None:
    from qcsight_core import cli as dispatcher

    assert dispatcher.main(["cloud", "--help"]) == 0
    out = capsys.readouterr().out
    for action in ("ingest", "fleet", "policy", "decisions"):
        assert action in out
    assert dispatcher.main(["cloud", "policy", "--help"]) == 0
    assert "--fleet" in capsys.readouterr().out


@pytest.mark.parametrize("action", ["fleet", "decisions", "policy"])
def test_reading_commands_refuse_a_store_that_is_not_there(action: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from qcsight_core import cli as dispatcher

    missing = tmp_path / "typo" / "cloud.db"
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("lines: {line-1: [cam-1]}\n")
    extra = ["--fleet", str(fleet)] if action == "policy" else []
    assert dispatcher.main(["cloud", action, "--store", f"sqlite:{missing}", *extra]) == 1
    err = capsys.readouterr().err
    assert f"{missing} does not exist" in err and "--store" in err
    assert not missing.parent.exists(), "a reading command must not create the store"
