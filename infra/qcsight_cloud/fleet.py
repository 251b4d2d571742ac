"""The fleet: which things make up each line, and the view engineers read (per device and per line).

Membership comes from a fleet file locally (each line lists its things) or from IoT thing
groups in AWS (a line names its thing group; ``ListThingsInThingGroup`` lists it). A fleet file
may mix both::

    heartbeat_s: 30          # the agents' status heartbeat (qcsight_edge default: 30 s)
    silent_heartbeats: 3     # flag a device silent after this many heartbeats without a message
    lines:
      line-1: {things: [cam-1, cam-2]}
      line-2: {thing_group: qcsight-line-2}
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from qcsight_cloud import timestamps
from qcsight_cloud.errors import FleetError
from qcsight_cloud.records import DeviceStatus, Window
from qcsight_cloud.store import UNASSIGNED, Store
from qcsight_core import topics
from qcsight_core.errors import ConfigError

log = logging.getLogger(__name__)

# The agent's default status heartbeat (qcsight_edge.config MetricsConfig.heartbeat_s); a fleet
# that changed it says so in its fleet file.
DEFAULT_HEARTBEAT_S = 30.0
# Windows read per line for the view: 100 devices' hour of 60-s windows is 6,000.
MAX_LINE_WINDOWS = 200_000


@dataclass(frozen=True)
class LineSpec:
    """One line: its things listed, or the IoT thing group that holds them."""

    name: str
    things: tuple[str, ...] = ()
    thing_group: str | None = None

    def __post_init__(self) -> None:
        topics.check_thing_name(self.name)  # a line name travels in dimensions and keys: same alphabet
        if bool(self.things) == (self.thing_group is not None):
            raise ConfigError(f"fleet.lines.{self.name}", {"things": self.things, "thing_group": self.thing_group},
                              "either 'things' (a list of thing names) or 'thing_group' (an IoT thing group name)")
        for thing in self.things:
            try:
                topics.check_thing_name(thing)
            except ConfigError:
                raise ConfigError(f"fleet.lines.{self.name}.things", thing, "thing names: 1-128 of letters, digits, "
                                  "':', '_' and '-'") from None
        if self.thing_group is not None:
            try:
                topics.check_thing_name(self.thing_group)
            except ConfigError:
                raise ConfigError(f"fleet.lines.{self.name}.thing_group", self.thing_group,
                                  "an IoT thing group name: 1-128 of letters, digits, ':', '_' and '-'") from None


@dataclass(frozen=True)
class FleetSettings:
    """The fleet file: lines, and how long a device may stay quiet."""

    lines: tuple[LineSpec, ...] = ()
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    silent_heartbeats: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.heartbeat_s, bool) or not isinstance(self.heartbeat_s, (int, float)) or \
                not 0 < self.heartbeat_s <= 86400:
            raise ConfigError("fleet.heartbeat_s", self.heartbeat_s, "a number of seconds above 0, at most 86400")
        if isinstance(self.silent_heartbeats, bool) or not isinstance(self.silent_heartbeats, int) or \
                not 1 <= self.silent_heartbeats <= 1000:
            raise ConfigError("fleet.silent_heartbeats", self.silent_heartbeats, "an integer from 1 to 1000")
        names = [line.name for line in self.lines]
        if len(set(names)) != len(names):
            raise ConfigError("fleet.lines", names, "distinct line names")

    @property
    def silent_after_s(self) -> float:
        return self.heartbeat_s * self.silent_heartbeats

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> FleetSettings:
        if not isinstance(data, Mapping):
            raise ConfigError("fleet", data, "a mapping with 'lines' (and optionally heartbeat_s, silent_heartbeats)")
        unknown = sorted(set(data) - {"lines", "heartbeat_s", "silent_heartbeats"})
        if unknown:
            raise ConfigError(f"fleet.{unknown[0]}", data[unknown[0]], "not a setting; known: lines, heartbeat_s, "
                              "silent_heartbeats")
        raw_lines = data.get("lines") or {}
        if not isinstance(raw_lines, Mapping):
            raise ConfigError("fleet.lines", raw_lines,
                              "a mapping of line name to {things: [...]} or {thing_group: ...}")
        lines = []
        for name, spec in raw_lines.items():
            if not isinstance(spec, Mapping) or set(spec) - {"things", "thing_group"}:
                raise ConfigError(f"fleet.lines.{name}", spec, "{things: [thing, ...]} or {thing_group: NAME}")
            things = spec.get("things") or ()
            if isinstance(things, str) or not isinstance(things, Sequence):
                raise ConfigError(f"fleet.lines.{name}.things", things, "a list of thing names")
            lines.append(LineSpec(str(name), tuple(things), spec.get("thing_group")))
        return cls(tuple(lines), data.get("heartbeat_s", DEFAULT_HEARTBEAT_S), data.get("silent_heartbeats", 3))

    @classmethod
    def from_file(cls, path: str | Path) -> FleetSettings:
        """Read a YAML or JSON fleet file (JSON is YAML)."""
        import yaml  # here, not at the top: the Lambda functions read inline JSON and ship without PyYAML

        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ConfigError("fleet file", str(path), f"a readable YAML/JSON file ({exc.strerror or exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError("fleet file", str(path), f"valid YAML/JSON ({exc})") from None
        return cls.from_mapping(data or {})


@dataclass(frozen=True)
class Fleet:
    """Resolved membership: line -> things (each thing in at most one line)."""

    lines: Mapping[str, tuple[str, ...]]
    settings: FleetSettings = FleetSettings()
    _line_of: Mapping[str, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        owner: dict[str, str] = {}
        for line, things in self.lines.items():
            for thing in things:
                if thing in owner and owner[thing] != line:
                    raise FleetError(f"thing {thing} is in two lines ({owner[thing]} and {line}); a thing belongs to "
                                     "one line")
                owner[thing] = line
        object.__setattr__(self, "_line_of", owner)

    def line_of(self, thing: str) -> str:
        return self._line_of.get(thing, UNASSIGNED)

    def knows(self, thing: str) -> bool:
        return thing in self._line_of


def list_thing_group(client: Any, group: str, page_size: int = 250) -> tuple[str, ...]:
    """Every thing in an IoT thing group and its child groups (``ListThingsInThingGroup``, paginated)."""
    things: list[str] = []
    request: dict[str, Any] = {"thingGroupName": group, "recursive": True, "maxResults": page_size}
    while True:
        try:
            response = client.list_things_in_thing_group(**request)
        except Exception as exc:  # botocore's ClientError and friends; the message names the group
            raise FleetError(f"IoT thing group {group}: cannot list its things: {exc}") from exc
        things.extend(response.get("things", []))
        token = response.get("nextToken")
        if not token:
            return tuple(things)
        request["nextToken"] = token


def resolve(settings: FleetSettings, iot_client: Any | None = None) -> Fleet:
    """Membership of every line; lines naming a thing group need an IoT client (boto3 ``iot``)."""
    lines: dict[str, tuple[str, ...]] = {}
    for line in settings.lines:
        if line.thing_group is None:
            lines[line.name] = line.things
            continue
        if iot_client is None:
            raise FleetError(f"line {line.name} names thing group {line.thing_group}: an IoT client is needed")
        lines[line.name] = list_thing_group(iot_client, line.thing_group)
    return Fleet(lines, settings)


class CachedFleet:
    """Membership for a long-lived process (a Lambda container): reloaded every ``ttl_s``, and at most once
    per ``miss_refresh_s`` when an unknown thing shows up (a device just added to a group)."""

    def __init__(self, load: Callable[[], Fleet], ttl_s: float = 300.0, miss_refresh_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._load = load
        self._ttl_s = ttl_s
        self._miss_refresh_s = miss_refresh_s
        self._clock = clock
        self._fleet: Fleet | None = None
        self._loaded_at = 0.0

    def fleet(self) -> Fleet:
        if self._fleet is None or self._clock() - self._loaded_at >= self._ttl_s:
            self._refresh()
        assert self._fleet is not None
        return self._fleet

    def _refresh(self) -> None:
        self._fleet = self._load()
        self._loaded_at = self._clock()

    def line_of(self, thing: str) -> str:
        fleet = self.fleet()
        if not fleet.knows(thing) and self._clock() - self._loaded_at >= self._miss_refresh_s:
            try:
                self._refresh()
            except FleetError as exc:  # keep ingesting with what we had; the membership catches up later
                log.warning("fleet membership refresh failed: %s", exc)
            fleet = self._fleet or fleet
        return fleet.line_of(thing)


# ---------------------------------------------------------------- the view


@dataclass(frozen=True)
class DeviceRow:
    """One device over the view's period."""

    thing: str
    line: str
    windows: int
    frames: int
    defects: int
    defect_rate: float | None
    confidence_psi: float | None  # latest window
    brightness_psi: float | None
    confidence_psi_max: float | None  # over the period
    brightness_psi_max: float | None
    latency_p95_ms: float | None  # worst window of the period
    dropped: int
    model_version: str | None
    state: str | None
    last_seen: str | None
    silent_s: float | None  # seconds since last seen (None: never seen)
    silent: bool
    outbox_depth: int | None
    error_count: int
    gaps: int
    duplicates: int
    drops: int


@dataclass(frozen=True)
class LineRow:
    """One line: its devices' windows together."""

    line: str
    devices: int
    silent: int
    frames: int
    defects: int
    defect_rate: float | None
    confidence_psi: float | None  # the worst device's latest
    brightness_psi: float | None
    latency_p95_ms: float | None
    dropped: int
    model_versions: tuple[str, ...]


@dataclass(frozen=True)
class FleetView:
    time: str
    period_s: float
    silent_after_s: float
    lines: tuple[LineRow, ...]
    devices: tuple[DeviceRow, ...]
    unknown_identities: Mapping[str, Mapping[str, int]]  # drop counters of identities that are no device

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(json.dumps({
            "time": self.time, "period_s": self.period_s, "silent_after_s": self.silent_after_s,
            "lines": [asdict(row) for row in self.lines], "devices": [asdict(row) for row in self.devices],
            "unknown_identities": {k: dict(v) for k, v in self.unknown_identities.items()},
        }))
        return data


def _max(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _device_row(thing: str, line: str, device: DeviceStatus | None, windows: Sequence[Window],
                counters: Mapping[str, int], now: datetime, silent_after_s: float) -> DeviceRow:
    frames = sum(w.frames for w in windows)
    defects = sum(w.defect for w in windows)
    latest = windows[-1] if windows else None
    silent_s = None if device is None else (now - timestamps.parse(device.last_seen)).total_seconds()
    return DeviceRow(
        thing=thing, line=line, windows=len(windows), frames=frames, defects=defects,
        defect_rate=defects / frames if frames else None,
        confidence_psi=latest.confidence_psi if latest else None,
        brightness_psi=latest.brightness_psi if latest else None,
        confidence_psi_max=_max([w.confidence_psi for w in windows]),
        brightness_psi_max=_max([w.brightness_psi for w in windows]),
        latency_p95_ms=_max([w.latency_p95 for w in windows]), dropped=sum(w.dropped for w in windows),
        model_version=device.model_version if device else None, state=device.state if device else None,
        last_seen=device.last_seen if device else None, silent_s=silent_s,
        silent=silent_s is None or silent_s > silent_after_s,
        outbox_depth=device.outbox_depth if device else None, error_count=device.error_count if device else 0,
        gaps=device.gaps if device else 0, duplicates=counters.get("duplicate", 0),
        drops=sum(n for name, n in counters.items() if name.startswith("drop.")),
    )


def fleet_view(store: Store, fleet: Fleet, *, now: datetime | None = None,
               period: timedelta = timedelta(hours=1)) -> FleetView:
    """Per device and per line over the last ``period``: rates, drift, latency, drops, model, silence.

    Devices are those in the fleet plus any that sent messages; a fleet device that never sent
    anything is listed as silent.
    """
    now = now or timestamps.now()
    silent_after_s = fleet.settings.silent_after_s
    devices = {d.thing: d for d in store.devices()}
    counters = store.counters()
    line_of = {thing: fleet.line_of(thing) if fleet.knows(thing) else device.line
               for thing, device in devices.items()}
    for line, things in fleet.lines.items():
        for thing in things:
            line_of.setdefault(thing, line)
    windows: dict[str, list[Window]] = {}
    recorded_lines = {d.line for d in devices.values()} | set(fleet.lines)
    for line in sorted(recorded_lines):
        # Newest first, so a line with more windows than the limit loses its oldest ones, never the latest.
        for window in reversed(store.windows(since=now - period, until=now, line=line, limit=MAX_LINE_WINDOWS,
                                             newest_first=True)):
            windows.setdefault(window.origin.thing, []).append(window)
    rows = [_device_row(thing, line_of[thing], devices.get(thing), windows.get(thing, []),
                        counters.get(thing, {}), now, silent_after_s) for thing in sorted(line_of)]
    lines = []
    for line in sorted({row.line for row in rows}):
        members = [row for row in rows if row.line == line]
        frames = sum(r.frames for r in members)
        defects = sum(r.defects for r in members)
        lines.append(LineRow(
            line=line, devices=len(members), silent=sum(r.silent for r in members), frames=frames, defects=defects,
            defect_rate=defects / frames if frames else None,
            confidence_psi=_max([r.confidence_psi for r in members]),
            brightness_psi=_max([r.brightness_psi for r in members]),
            latency_p95_ms=_max([r.latency_p95_ms for r in members]), dropped=sum(r.dropped for r in members),
            model_versions=tuple(sorted({r.model_version for r in members if r.model_version})),
        ))
    unknown = {identity: counts for identity, counts in counters.items() if identity not in line_of}
    return FleetView(timestamps.iso(now), period.total_seconds(), silent_after_s, tuple(lines), tuple(rows), unknown)
