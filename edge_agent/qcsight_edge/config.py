"""The agent's configuration: one frozen AgentConfig, read once from YAML or Greengrass, validated by field."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qcsight_core.errors import ConfigError
from qcsight_core.runner import PRECISION_CHOICES
from qcsight_core.topics import check_thing_name
from qcsight_edge import thumbnails
from qcsight_edge.redact import redact_uri

SOURCE_KINDS = ("camera", "hotfolder", "synthetic")
SOURCE_MODES = ("free", "trigger")
TRANSPORTS = ("mqtt5", "mqtt311", "ipc", "none")
LINE_SIGNALS = ("none", "log", "mqtt")
GREENGRASS_KEYS = ("accessControl",)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
# The largest count any setting takes: SQLite's (and C's) 64-bit signed integer. A 400-digit value
# would otherwise pass validation and overflow wherever it is used.
MAX_INT = 2**63 - 1
_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}
_INTEGER_TEXT = re.compile(r"^\s*[+-]?\d+\s*$")


# Greengrass Lite serves every scalar of a YAML recipe's DefaultConfiguration as a string (its YAML
# decoder keeps scalars as text: max_fps 2 arrives as '2', true as 'true'), and a configuration merge
# on the Java nucleus can turn 10 into 10.0. The readers below take those forms for what they mean
# and then apply the same range checks; anything else is left as it is, to be refused by name.
def coerce_integer(value: Any) -> Any:
    """'10', ' 10 ' and 10.0 as 10; any other value unchanged."""
    if isinstance(value, str) and _INTEGER_TEXT.match(value):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def coerce_number(value: Any) -> Any:
    """'0.5' as 0.5 and '2' as 2.0; any other value unchanged (non-finite text is refused by the caller)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def coerce_boolean(value: Any) -> Any:
    """'true' and 'false' (any case) as booleans; any other value unchanged."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


@dataclass(frozen=True)
class ModelConfig:
    """Which bundle runs and how.

    Attributes:
        bundle: a bundle directory or model.tar.gz; changing it at run time hot-swaps the model.
        precision: fp32, int8, or auto (int8 when the bundle has it).
        intra_op_threads: ONNX Runtime threads inside one operator; 0 lets it decide.
        warmup_runs: inferences run on a new model before it replaces the old one.
        verify_key: a public key (PEM); when set, only bundles signed with it are loaded.
    """

    bundle: Path
    precision: str = "auto"
    intra_op_threads: int = 0
    warmup_runs: int = 2
    verify_key: Path | None = None


@dataclass(frozen=True)
class SourceConfig:
    """Where frames come from.

    Attributes:
        kind: camera (OpenCV VideoCapture: USB index, RTSP/HTTP URL or video file), hotfolder, synthetic.
        uri: camera: a device index (0) or a URL/path; hotfolder: the inbox directory.
        mode: free (free-running, capped at max_fps) or trigger (one frame per part; for the hot
            folder each file is a part; cameras do not support trigger).
        max_fps: frame-rate cap for free-running sources; 0 = as fast as the source gives frames.
        loop: camera reading a video file: start again at its end (demo); otherwise the end of a
            file is the end of the run.
        reconnect_initial_s: first wait after a camera is lost; doubles up to reconnect_max_s.
        reconnect_max_s: the longest wait between reconnection attempts.
        settle_s: hot folder: a file is read only after its size and mtime have not changed for this long.
        poll_s: hot folder: how often the inbox is scanned.
        retain_s: hot folder: files in done/ and failed/ older than this are deleted; 0 keeps them.
        retain_bytes: hot folder: done/ and failed/ together hold at most this, oldest deleted first; 0: no cap.
        size: synthetic: frame side in pixels (square).
        defect_rate: synthetic: fraction of frames drawn with a defect.
        seed: synthetic: random seed.
    """

    kind: str = "synthetic"
    uri: str | int | None = None
    mode: str = "free"
    max_fps: float = 10.0
    loop: bool = False
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    settle_s: float = 0.5
    poll_s: float = 0.2
    retain_s: float = 7 * 86400.0
    retain_bytes: int = 1024**3
    size: int = 256
    defect_rate: float = 0.05
    seed: int = 0


@dataclass(frozen=True)
class Roi:
    """A crop, in pixels of the source frame, applied before preprocessing."""

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class AlertConfig:
    """What raises an alert and what it carries."""

    on_uncertain: bool = True
    thumbnail_max_side: int = 160
    thumbnail_quality: int = 80


@dataclass(frozen=True)
class LineSignalConfig:
    """The reject signal to the line controller (local, never via the cloud).

    Attributes:
        kind: none, log (a log line per reject: the stand-in when nothing is wired), or mqtt (a
            publish on qcsight/<thing>/line/reject to the line's local broker, TLS with a client
            certificate like every qcsight MQTT connection).
        endpoint, port, cert, key, ca: the local broker, for kind mqtt.
        on_uncertain: also reject parts whose verdict is uncertain (they go to a person).
    """

    kind: str = "log"
    endpoint: str = ""
    port: int = 8883
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    on_uncertain: bool = True


@dataclass(frozen=True)
class ImageStoreConfig:
    """Full-resolution images of alerted frames, kept on local disk under a byte cap (oldest evicted)."""

    dir: Path
    max_bytes: int = 1024**3
    jpeg_quality: int = 90


@dataclass(frozen=True)
class MetricsConfig:
    """Windowed metrics and the status heartbeat."""

    window_s: float = 60.0
    heartbeat_s: float = 30.0
    reservoir_size: int = 2048


@dataclass(frozen=True)
class OutboxConfig:
    """The durable outbox every message goes through."""

    path: Path
    max_messages: int = 100_000
    max_bytes: int = 256 * 1024**2


@dataclass(frozen=True)
class TransportConfig:
    """How the outbox reaches the cloud.

    Attributes:
        kind: mqtt5 or mqtt311 (direct to IoT Core or a broker, mutual TLS), ipc (through the
            Greengrass nucleus; needs --greengrass), or none (messages stay in the outbox).
        endpoint, port: the broker (IoT Core's ATS endpoint, port 8883).
        cert, key, ca: PEM files: the device certificate, its key, the CA of the broker.
        client_id: MQTT client id; the thing name when empty.
        keep_alive_s: MQTT keep-alive.
        connect_timeout_s: one connection attempt; the transport keeps reconnecting by itself.
        iot_core_limits: MQTT5: throttle to IoT Core's per-connection limits (off for a local broker).
        ack_timeout_s: a publish without PUBACK after this long is retried.
        min_reconnect_delay_s, max_reconnect_delay_s: the transport's reconnect backoff bounds.
    """

    kind: str = "none"
    endpoint: str = ""
    port: int = 8883
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    client_id: str = ""
    keep_alive_s: int = 60
    connect_timeout_s: float = 10.0
    iot_core_limits: bool = True
    ack_timeout_s: int = 10
    min_reconnect_delay_s: float = 1.0
    max_reconnect_delay_s: float = 60.0


# ---------------------------------------------------------------- image upload (its own section: see _image_upload)

IMAGE_UPLOAD_KINDS = ("none", "s3", "folder")
CREDENTIAL_KINDS = ("auto", "iot", "greengrass", "environment")
# S3 bucket names: 3-63 of lowercase letters, digits, '.', '-', starting and ending with a letter or digit.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_ROLE_ALIAS = re.compile(r"^[\w=,@-]{1,128}$")


@dataclass(frozen=True)
class CredentialsConfig:
    """Where the device's temporary AWS credentials come from (for an s3 image upload).

    Attributes:
        kind: iot (the AWS IoT credentials provider with the device certificate and a role alias),
            greengrass (the Token Exchange Service: AWS_CONTAINER_CREDENTIALS_FULL_URI and
            AWS_CONTAINER_AUTHORIZATION_TOKEN), environment (AWS_ACCESS_KEY_ID, ...), or auto:
            greengrass when those variables are set, else iot.
        endpoint: iot: the credentials endpoint host (describe-endpoint iot:CredentialProvider).
        port: iot: 443 for AWS.
        role_alias: iot: the role alias.
        cert, key, ca: iot: PEM files; transport's when empty.
        refresh_before_s: fetch new credentials this long before the current ones expire.
        timeout_s: one credentials request.
    """

    kind: str = "auto"
    endpoint: str = ""
    port: int = 443
    role_alias: str = ""
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    refresh_before_s: float = 300.0
    timeout_s: float = 10.0


@dataclass(frozen=True)
class ImageUploadConfig:
    """Full images of alerted parts to the cloud, through a durable queue.

    Attributes:
        kind: none (images stay in the local image store), s3, or folder (a local or mounted folder
            standing in for the bucket).
        bucket, region: s3: the bucket and its region.
        prefix: keys are <prefix>images/<thing>/<YYYY-MM-DD>/<alert_id>.jpg; empty, or ending in '/'.
        endpoint: s3: an endpoint URL instead of AWS's (VPC endpoint, S3-compatible store, local stand-in).
        path_style: s3: <endpoint>/<bucket>/<key> addressing (default: when an endpoint is given).
        ca: s3: a CA bundle for https instead of the system's.
        path: folder: the folder.
        queue: the queue's SQLite file.
        max_images, max_bytes: the backlog's bounds; beyond them the oldest pending images are evicted.
        timeout_s: connect, and each wait for the store during one upload.
        retry_initial_s, retry_max_s: backoff after a failed upload.
        credentials: s3: where credentials come from.
    """

    queue: Path
    kind: str = "none"
    bucket: str = ""
    region: str = ""
    prefix: str = ""
    endpoint: str = ""
    path_style: bool = False
    ca: Path | None = None
    path: Path | None = None
    max_images: int = 10_000
    max_bytes: int = 1024**3
    timeout_s: float = 60.0
    retry_initial_s: float = 1.0
    retry_max_s: float = 300.0
    credentials: CredentialsConfig = field(default_factory=CredentialsConfig)


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent needs, validated once at the edge of the program."""

    thing_name: str
    model: ModelConfig
    outbox: OutboxConfig
    image_store: ImageStoreConfig
    source: SourceConfig = field(default_factory=SourceConfig)
    roi: Roi | None = None
    queue_size: int = 4
    alerts: AlertConfig = field(default_factory=AlertConfig)
    line_signal: LineSignalConfig = field(default_factory=LineSignalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    image_upload: ImageUploadConfig | None = None
    stop_deadline_s: float = 10.0
    config_reload_s: float = 5.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: Path | None = None) -> AgentConfig:
        """Build and validate a configuration.

        Args:
            data: the parsed YAML (or Greengrass component configuration).
            base_dir: relative paths are resolved against it (the config file's folder).

        Raises:
            ConfigError: naming the first field that is missing, unknown or not allowed.
        """
        return _parse(data, base_dir)

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration, JSON/YAML-serialisable (paths as strings)."""
        plain: dict[str, Any] = _plain(asdict(self))
        return plain

    def redacted_dict(self) -> dict[str, Any]:
        """to_dict() for what leaves the device (the status config echo, --check): no credentials in the camera URI."""
        plain = self.to_dict()
        if plain["source"]["uri"] is not None:
            plain["source"]["uri"] = redact_uri(plain["source"]["uri"])
        return plain

    def hot_fields_equal(self, other: AgentConfig) -> bool:
        """Whether other differs from self only in what the agent applies without a restart (the model)."""
        return self.to_dict() | {"model": None} == other.to_dict() | {"model": None}


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate a YAML configuration file.

    Raises:
        ConfigError: the file is unreadable, not YAML, or a field is invalid.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("--config", str(file), f"a readable YAML file ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("--config", str(file), f"a UTF-8 text file ({exc})") from exc
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError, ValueError) as exc:  # ValueError: an integer of over 4300 digits
        raise ConfigError("--config", str(file), f"valid YAML ({exc})") from exc
    return AgentConfig.from_dict(data if data is not None else {}, base_dir=file.resolve().parent)


def from_greengrass(data: Mapping[str, Any]) -> AgentConfig:
    """The agent configuration from a Greengrass component configuration.

    Greengrass keeps the recipe's `accessControl` in the same document; it is the nucleus's, not ours.
    Relative paths resolve against the component's working directory.
    """
    if not isinstance(data, Mapping):
        raise ConfigError("configuration", data, "a mapping of settings")
    return AgentConfig.from_dict({k: v for k, v in data.items() if k not in GREENGRASS_KEYS})


def validate_config(data: Mapping[str, Any]) -> AgentConfig:
    """The validator Greengrass calls on a proposed configuration update (raises ConfigError)."""
    return from_greengrass(data)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


class _Section:
    """Typed reads from one mapping that remember which keys were used, to refuse unknown ones."""

    def __init__(self, data: Any, prefix: str, base_dir: Path | None) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(prefix or "configuration", data, "a mapping of settings")
        self.data = data
        self.prefix = prefix
        self.base_dir = base_dir
        self.used: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def raw(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        value = self.data.get(key, default)
        return default if value is None else value

    def required(self, key: str) -> Any:
        value = self.raw(key)
        if value is None or value == "":
            raise ConfigError(self.name(key), None, "required")
        return value

    def section(self, key: str) -> _Section:
        return _Section(self.raw(key, {}), self.name(key), self.base_dir)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(key, default)
        if value not in choices:
            raise ConfigError(self.name(key), value, f"one of {', '.join(choices)}")
        return str(value)

    def boolean(self, key: str, default: bool) -> bool:
        given = self.raw(key, default)
        value = coerce_boolean(given)
        if not isinstance(value, bool):
            raise ConfigError(self.name(key), given, "true or false")
        return value

    def integer(self, key: str, default: int, low: int, high: int | None = None) -> int:
        given = self.raw(key, default)
        value = coerce_integer(given)
        top = MAX_INT if high is None else high
        if isinstance(value, bool) or not isinstance(value, int) or value < low or value > top:
            raise ConfigError(self.name(key), given, f"an integer from {low} to {top}")
        return value

    def number(self, key: str, default: float, low: float, high: float | None = None, *,
               open_low: bool = False) -> float:
        given = self.raw(key, default)
        value = coerce_number(given)
        try:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        except OverflowError:  # an integer too large for a float (400 digits)
            ok = False
        if ok:
            ok = (value > low if open_low else value >= low) and (high is None or value <= high)
        if not ok:
            bound = f"more than {low}" if open_low else f"at least {low}"
            allowed = f"a number {bound}" + (f" and at most {high}" if high is not None else "")
            raise ConfigError(self.name(key), given, allowed)
        return float(value)

    def size(self, key: str, default: int, low: int) -> int:
        """A byte count: an integer or a string such as '256MiB' or '1GB'."""
        value = self.raw(key, default)
        parsed: int | None = None
        if isinstance(value, float) and value.is_integer():
            parsed = coerce_integer(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            parsed = value
        elif isinstance(value, str) and (match := _SIZE.match(value)):
            unit = (match.group(2) or "").lower().rstrip("b")
            try:
                parsed = int(float(match.group(1)) * _UNITS[unit])
            except OverflowError:  # 400 digits: float infinity
                parsed = None
        if parsed is None or not low <= parsed <= MAX_INT:
            raise ConfigError(self.name(key), value,
                              f"a byte count from {low} to {MAX_INT} (an integer or e.g. '256MiB')")
        return parsed

    def text(self, key: str, default: str = "") -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise ConfigError(self.name(key), value, "a string")
        return value

    def path(self, key: str, default: str | None = None) -> Path:
        value = self.required(key) if default is None else self.raw(key, default)
        if not isinstance(value, str):
            raise ConfigError(self.name(key), value, "a path")
        path = Path(value).expanduser()
        if not path.is_absolute() and self.base_dir is not None:
            path = self.base_dir / path
        return path

    def optional_path(self, key: str) -> Path | None:
        return None if self.raw(key) in (None, "") else self.path(key)

    def existing_file(self, key: str) -> Path | None:
        path = self.optional_path(key)
        if path is not None and not path.is_file():
            raise ConfigError(self.name(key), str(path), "an existing file")
        return path

    def finish(self) -> None:
        unknown = sorted(str(k) for k in self.data if k not in self.used)
        if unknown:
            where = self.prefix or "the configuration"
            raise ConfigError(self.name(unknown[0]), self.data[unknown[0]],
                              f"a known setting of {where}: {', '.join(sorted(self.used))}")


def _parse(data: Mapping[str, Any], base_dir: Path | None) -> AgentConfig:
    top = _Section(data, "", base_dir)
    thing = check_thing_name(top.required("thing_name"))
    state_dir = top.path("state_dir", "qcsight-state")
    cfg = AgentConfig(
        thing_name=thing,
        model=_model(top.section("model")),
        source=_source(top.section("source")),
        roi=_roi(top.raw("roi")),
        queue_size=top.integer("queue_size", 4, 1, 10_000),
        alerts=_alerts(top.section("alerts")),
        line_signal=_line_signal(top.section("line_signal")),
        image_store=_image_store(top.section("image_store"), state_dir),
        metrics=_metrics(top.section("metrics")),
        outbox=_outbox(top.section("outbox"), state_dir),
        transport=_transport(top.section("transport")),
        image_upload=_image_upload(top.section("image_upload"), state_dir),
        stop_deadline_s=top.number("stop_deadline_s", 10.0, 0.0, 600.0),
        config_reload_s=top.number("config_reload_s", 5.0, 0.0, 3600.0),
    )
    top.finish()
    return cfg


def _model(s: _Section) -> ModelConfig:
    cfg = ModelConfig(
        bundle=s.path("bundle"),
        precision=s.choice("precision", "auto", PRECISION_CHOICES),
        intra_op_threads=s.integer("intra_op_threads", 0, 0, 256),
        warmup_runs=s.integer("warmup_runs", 2, 0, 100),
        verify_key=s.existing_file("verify_key"),
    )
    s.finish()
    return cfg


def _source(s: _Section) -> SourceConfig:
    kind = s.choice("kind", "synthetic", SOURCE_KINDS)
    uri = s.raw("uri")
    if kind == "camera":
        uri = coerce_integer(uri)  # a device index served as '0' (Greengrass Lite) or 0.0 (a merge)
    if kind in ("camera", "hotfolder") and uri in (None, ""):
        raise ConfigError(s.name("uri"), uri, f"required for a {kind} source (a device index, URL or path)")
    if uri is not None and (isinstance(uri, bool) or not isinstance(uri, (int, str))):
        raise ConfigError(s.name("uri"), uri, "a camera index (integer) or a URL/path (string)")
    if kind == "hotfolder":
        uri = str(s.path("uri"))
    elif kind == "camera" and isinstance(uri, str) and "://" not in uri:
        uri = str(s.path("uri"))  # a video file: relative to the config file like every path
    mode = s.choice("mode", "trigger" if kind == "hotfolder" else "free", SOURCE_MODES)
    if kind == "camera" and mode == "trigger":
        raise ConfigError(s.name("mode"), mode, "free for a camera (a hardware part trigger is not supported)")
    if kind == "hotfolder" and mode == "free":
        raise ConfigError(s.name("mode"), mode, "trigger for a hot folder (each file is one part)")
    initial = s.number("reconnect_initial_s", 0.5, 0.0, 3600.0, open_low=True)
    cfg = SourceConfig(
        kind=kind,
        uri=uri,
        mode=mode,
        max_fps=s.number("max_fps", 10.0, 0.0, 1000.0),
        loop=s.boolean("loop", False),
        reconnect_initial_s=initial,
        reconnect_max_s=s.number("reconnect_max_s", max(30.0, initial), initial, 3600.0),
        settle_s=s.number("settle_s", 0.5, 0.0, 600.0),
        poll_s=s.number("poll_s", 0.2, 0.0, 60.0, open_low=True),
        retain_s=s.number("retain_s", 7 * 86400.0, 0.0, 100 * 365 * 86400.0),
        retain_bytes=s.size("retain_bytes", 1024**3, 0),
        size=s.integer("size", 256, 32, 2048),
        defect_rate=s.number("defect_rate", 0.05, 0.0, 1.0),
        seed=s.integer("seed", 0, 0),
    )
    s.finish()
    return cfg


def _roi(value: Any) -> Roi | None:
    if value is None:
        return None
    s = _Section(value, "roi", None)
    for key in ("width", "height"):
        s.required(key)
    roi = Roi(x=s.integer("x", 0, 0, 65535), y=s.integer("y", 0, 0, 65535),
              width=s.integer("width", 0, 8, 65535), height=s.integer("height", 0, 8, 65535))
    s.finish()
    return roi


def _alerts(s: _Section) -> AlertConfig:
    cfg = AlertConfig(
        on_uncertain=s.boolean("on_uncertain", True),
        thumbnail_max_side=s.integer("thumbnail_max_side", 160, 16, 1024),
        thumbnail_quality=s.integer("thumbnail_quality", 80, 10, 100),
    )
    side, quality = cfg.thumbnail_max_side, cfg.thumbnail_quality
    if thumbnails.worst_case_size(side, quality) > thumbnails.THUMBNAIL_BUDGET:
        fits = thumbnails.largest_side_that_fits(side, quality)
        raise ConfigError(s.name("thumbnail_max_side"), side,
                          f"at most about {fits} at thumbnail_quality {quality} (or a lower quality): a thumbnail "
                          f"must fit with its alert in IoT Core's 128 KiB message whatever the picture holds")
    s.finish()
    return cfg


def _line_signal(s: _Section) -> LineSignalConfig:
    kind = s.choice("kind", "log", LINE_SIGNALS)
    cfg = LineSignalConfig(
        kind=kind,
        endpoint=_endpoint(s, required=kind == "mqtt"),
        port=s.integer("port", 8883, 1, 65535),
        cert=s.existing_file("cert"),
        key=s.existing_file("key"),
        ca=s.existing_file("ca"),
        on_uncertain=s.boolean("on_uncertain", True),
    )
    if kind == "mqtt":
        _require_tls(s, cfg.cert, cfg.key, cfg.ca)
    s.finish()
    return cfg


def _endpoint(s: _Section, required: bool) -> str:
    endpoint = s.text("endpoint", "")
    if required and not endpoint:
        raise ConfigError(s.name("endpoint"), None, "required: the broker host name")
    if "://" in endpoint:
        raise ConfigError(s.name("endpoint"), endpoint, "a host name without scheme (no mqtts://)")
    return endpoint


def _require_tls(s: _Section, cert: Path | None, key: Path | None, ca: Path | None) -> None:
    for name, value in (("cert", cert), ("key", key), ("ca", ca)):
        if value is None:
            raise ConfigError(s.name(name), None, "required: MQTT connections use TLS with a client certificate "
                              "(cert, key and the broker's ca, PEM files)")


def _image_store(s: _Section, state_dir: Path) -> ImageStoreConfig:
    cfg = ImageStoreConfig(
        dir=s.path("dir", str(state_dir / "images")),
        max_bytes=s.size("max_bytes", 1024**3, 1024),
        jpeg_quality=s.integer("jpeg_quality", 90, 10, 100),
    )
    s.finish()
    return cfg


def _metrics(s: _Section) -> MetricsConfig:
    cfg = MetricsConfig(
        window_s=s.number("window_s", 60.0, 0.0, 86400.0, open_low=True),
        heartbeat_s=s.number("heartbeat_s", 30.0, 0.0, 86400.0, open_low=True),
        reservoir_size=s.integer("reservoir_size", 2048, 16, 1_000_000),
    )
    s.finish()
    return cfg


def _outbox(s: _Section, state_dir: Path) -> OutboxConfig:
    cfg = OutboxConfig(
        path=s.path("path", str(state_dir / "outbox.db")),
        max_messages=s.integer("max_messages", 100_000, 1),
        max_bytes=s.size("max_bytes", 256 * 1024**2, 1024),
    )
    s.finish()
    return cfg


def _transport(s: _Section) -> TransportConfig:
    kind = s.choice("kind", "none", TRANSPORTS)
    mqtt = kind in ("mqtt5", "mqtt311")
    cfg = TransportConfig(
        kind=kind,
        endpoint=_endpoint(s, required=mqtt),
        port=s.integer("port", 8883, 1, 65535),
        cert=s.existing_file("cert"),
        key=s.existing_file("key"),
        ca=s.existing_file("ca"),
        client_id=s.text("client_id", ""),
        keep_alive_s=s.integer("keep_alive_s", 60, 5, 1200),
        connect_timeout_s=s.number("connect_timeout_s", 10.0, 0.1, 300.0),
        iot_core_limits=s.boolean("iot_core_limits", True),
        ack_timeout_s=s.integer("ack_timeout_s", 10, 1, 600),
        min_reconnect_delay_s=s.number("min_reconnect_delay_s", 1.0, 0.01, 3600.0),
        max_reconnect_delay_s=s.number("max_reconnect_delay_s", 60.0, 0.01, 3600.0),
    )
    if cfg.max_reconnect_delay_s < cfg.min_reconnect_delay_s:
        raise ConfigError(s.name("max_reconnect_delay_s"), cfg.max_reconnect_delay_s,
                          f"at least min_reconnect_delay_s ({cfg.min_reconnect_delay_s})")
    if mqtt:
        _require_tls(s, cfg.cert, cfg.key, cfg.ca)
    s.finish()
    return cfg


# ---------------------------------------------------------------- image upload


def _image_upload(s: _Section, state_dir: Path) -> ImageUploadConfig:
    kind = s.choice("kind", "none", IMAGE_UPLOAD_KINDS)
    endpoint = s.text("endpoint", "")
    if endpoint and not re.match(r"^https?://[^/\s]+(/\S*)?$", endpoint):
        raise ConfigError(s.name("endpoint"), endpoint, "an http:// or https:// URL (empty for AWS)")
    initial = s.number("retry_initial_s", 1.0, 0.001, 3600.0)
    cfg = ImageUploadConfig(
        queue=s.path("queue", str(state_dir / "uploads.db")),
        kind=kind,
        bucket=s.text("bucket", ""),
        region=s.text("region", ""),
        prefix=_key_prefix(s),
        endpoint=endpoint,
        path_style=s.boolean("path_style", bool(endpoint)),
        ca=s.existing_file("ca"),
        path=s.optional_path("path"),
        max_images=s.integer("max_images", 10_000, 1),
        max_bytes=s.size("max_bytes", 1024**3, 1024),
        timeout_s=s.number("timeout_s", 60.0, 0.1, 3600.0),
        retry_initial_s=initial,
        retry_max_s=s.number("retry_max_s", max(300.0, initial), initial, 86400.0),
        credentials=_credentials(s.section("credentials")),
    )
    if kind == "s3":
        if not _BUCKET.match(cfg.bucket):
            raise ConfigError(s.name("bucket"), cfg.bucket or None, "required for s3: an S3 bucket name (3-63 of "
                              "lowercase letters, digits, '.', '-')")
        if not _REGION.match(cfg.region):
            raise ConfigError(s.name("region"), cfg.region or None, "required for s3: the bucket's region, e.g. "
                              "eu-west-1")
    if kind == "folder" and cfg.path is None:
        raise ConfigError(s.name("path"), None, "required for a folder: the folder images are written to")
    s.finish()
    return cfg


def _key_prefix(s: _Section) -> str:
    prefix = s.text("prefix", "")
    if prefix.startswith("/") or "//" in prefix or any(part in (".", "..") for part in prefix.split("/")):
        raise ConfigError(s.name("prefix"), prefix, "a key prefix without a leading '/', '//', '.' or '..' parts")
    if len(prefix) > 512 or not prefix.isprintable():
        raise ConfigError(s.name("prefix"), prefix, "at most 512 printable characters")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def _credentials(s: _Section) -> CredentialsConfig:
    kind = s.choice("kind", "auto", CREDENTIAL_KINDS)
    cfg = CredentialsConfig(
        kind=kind,
        endpoint=_endpoint(s, required=kind == "iot"),
        port=s.integer("port", 443, 1, 65535),
        role_alias=s.text("role_alias", ""),
        cert=s.existing_file("cert"),
        key=s.existing_file("key"),
        ca=s.existing_file("ca"),
        refresh_before_s=s.number("refresh_before_s", 300.0, 0.0, 43200.0),
        timeout_s=s.number("timeout_s", 10.0, 0.1, 600.0),
    )
    if cfg.role_alias and not _ROLE_ALIAS.match(cfg.role_alias):
        raise ConfigError(s.name("role_alias"), cfg.role_alias, "1-128 of letters, digits and '=,@-_'")
    if kind == "iot" and not cfg.role_alias:
        raise ConfigError(s.name("role_alias"), None, "required for iot: the role alias the device's IoT policy "
                          "may assume")
    s.finish()
    return cfg
