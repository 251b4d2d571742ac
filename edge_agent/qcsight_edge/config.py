"""The agent's configuration: one frozen AgentConfig, read once from YAML or Greengrass, validated by field.

The dataclasses below are the only definition of a setting: its type, its default, its bounds and
its help text (``field(metadata=...)`` through `setting`). The reader (`AgentConfig.from_dict`),
the annotated example file (``agent.example.yaml``) and the JSON Schema (``agent.schema.json``,
both written by ``python -m qcsight_edge.config_docs``) are derived from them; what a field cannot
say by itself (a default that depends on another field, a rule between fields) is written once in
the section's reader below.

Greengrass Lite serves every scalar of a YAML recipe's DefaultConfiguration as a string (its YAML
decoder keeps scalars as text: max_fps 2 arrives as '2', true as 'true'), and a configuration merge
on the Java nucleus can turn 10 into 10.0. The reader takes those forms for what they mean
(`qcsight_core.checks`) and then applies the same range checks; anything else is refused by name.
"""

# RUF009: `setting` is this module's dataclass field specifier (it returns `field(...)`), not a call
# whose result every instance would share.
# ruff: noqa: RUF009

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Collection, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import yaml

from qcsight_core.checks import check_int, check_number, check_size
from qcsight_core.errors import ConfigError
from qcsight_core.runner import PRECISION_CHOICES
from qcsight_core.topics import check_thing_name
from qcsight_edge import thumbnails
from qcsight_edge.redact import redact_uri

SOURCE_KINDS = ("camera", "hotfolder", "synthetic")
SOURCE_MODES = ("free", "trigger")
TRANSPORTS = ("mqtt5", "mqtt311", "ipc", "none")
PROTOCOLS = ("mqtt5", "mqtt311")
LINE_SIGNALS = ("none", "log", "mqtt")
IMAGE_UPLOAD_KINDS = ("none", "s3", "folder")
CREDENTIAL_KINDS = ("auto", "iot", "greengrass", "environment")
GREENGRASS_KEYS = ("accessControl",)
# S3 bucket names: 3-63 of lowercase letters, digits, '.', '-', starting and ending with a letter or digit.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
_ROLE_ALIAS = re.compile(r"^[\w=,@-]{1,128}$")
_INTEGER_TEXT = re.compile(r"^\s*[+-]?\d+\s*$")


def setting(default: Any = MISSING, *, help: str, low: float | None = None, high: float | None = None,
            open_low: bool = False, choices: tuple[str, ...] = (), size: bool = False, file: bool = False,
            state_file: str | None = None, example: Any = None, internal: bool = False,
            custom: bool = False, absent: Any = MISSING, default_factory: Any = MISSING) -> Any:
    """A configuration field: its default, and in its metadata what the reader, the schema and the example need.

    Args:
        help: what the setting does (the example file's comment, the schema's description).
        low, high, open_low: bounds of a number (``open_low``: more than ``low``).
        choices: the words a text setting allows.
        size: a byte count (an integer, or text such as '256MiB').
        file: a path that must name an existing file when given.
        state_file: a path whose default is this name inside ``state_dir``.
        example: what the example file shows for a required setting.
        internal: set by the program, not read from the configuration (the MQTT thing name, protocol).
        custom: read by the section's reader itself (a value of several types, or one needing another field).
        absent: the value when the configuration leaves the setting out, for a field the dataclass requires.
    """
    meta = {"help": help, "low": low, "high": high, "open_low": open_low, "choices": choices, "size": size,
            "file": file, "state_file": state_file, "example": example, "internal": internal, "custom": custom,
            "absent": absent}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def coerce_integer(value: Any) -> Any:
    """'10', ' 10 ' and 10.0 as 10; any other value unchanged."""
    if isinstance(value, str) and _INTEGER_TEXT.match(value):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def coerce_boolean(value: Any) -> Any:
    """'true' and 'false' (any case) as booleans; any other value unchanged (only these words are booleans)."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


# ---------------------------------------------------------------- the definition


@dataclass(frozen=True)
class ModelConfig:
    """Which bundle runs and how."""

    bundle: Path = setting(help="a bundle directory or model.tar.gz. Changing it while running hot-swaps the model "
                                "(verified and warmed first).", example="bundle")
    precision: str = setting("auto", choices=PRECISION_CHOICES,
                             help="fp32, int8, or auto (int8 when the bundle has model.int8.onnx)")
    intra_op_threads: int = setting(0, low=0, high=256, help="ONNX Runtime threads per operator; 0 lets it decide")
    warmup_runs: int = setting(2, low=0, high=100, help="inferences run on a new model before it replaces the old one")
    verify_key: Path | None = setting(None, file=True, help=(
        "a public key (PEM: qcsight bundle keygen, or a KMS key's exported public key). When set, a bundle must carry "
        "a signature made with it (qcsight bundle sign) or it is refused; without it, loading checks only that the "
        "files match the manifest's sha256 (not who wrote them)."))


@dataclass(frozen=True)
class SourceConfig:
    """Where frames come from.

    camera: uri is a USB index (0), an rtsp:// or http:// URL, or a video file path; live sources
    reconnect with exponential backoff when lost; a file ends the run (exit 0) unless loop is true.
    hotfolder: uri is the inbox directory and each file is one part. Partial files are never read:
    write as name.jpg.part (or .tmp, or a leading dot) and rename when complete, or write in place:
    a file is read once its size and mtime stayed the same for settle_s. Judged files move to
    <inbox>/done/ once their alert is stored in the outbox; undecodable ones and symbolic links
    (never followed) to <inbox>/failed/. Files still in the inbox at stop (or after a crash) are
    read on the next start. synthetic: rendered surface pictures with defect_rate defects (the demo).
    """

    kind: str = setting("synthetic", choices=SOURCE_KINDS, help="camera, hotfolder or synthetic")
    uri: str | int | None = setting(None, custom=True, help=(
        "camera: a device index (0) or a URL/path; hotfolder: the inbox directory (both required)"))
    mode: str = setting("free", choices=SOURCE_MODES, help=(
        "free (cameras, synthetic; capped at max_fps) or trigger (one frame per part: the hot folder's default and "
        "only mode). A camera part-trigger input is not supported."))
    max_fps: float = setting(10.0, low=0.0, high=1000.0, help="frame-rate cap; 0 = as fast as frames come")
    loop: bool = setting(False, help="camera reading a video file: start again at its end")
    reconnect_initial_s: float = setting(0.5, low=0.0, high=3600.0, open_low=True,
                                         help="first wait after a live camera is lost; doubles up to reconnect_max_s")
    reconnect_max_s: float = setting(30.0, high=3600.0, help="the longest wait between reconnection attempts "
                                     "(at least reconnect_initial_s)")
    settle_s: float = setting(0.5, low=0.0, high=600.0, help="hotfolder: size and mtime must be stable this long")
    poll_s: float = setting(0.2, low=0.0, high=60.0, open_low=True, help="hotfolder: how often the inbox is scanned")
    retain_s: float = setting(7 * 86400.0, low=0.0, high=100 * 365 * 86400.0, help=(
        "hotfolder: files in done/ and failed/ older than this (7 days) are deleted; 0 keeps them"))
    retain_bytes: int = setting(1024**3, low=0, size=True, help=(
        "hotfolder: done/ and failed/ together hold at most this, oldest deleted first; 0 = no cap"))
    size: int = setting(256, low=32, high=2048, help="synthetic: picture side in pixels")
    defect_rate: float = setting(0.05, low=0.0, high=1.0, help="synthetic: fraction of defective parts")
    seed: int = setting(0, low=0, help="synthetic: random seed")


@dataclass(frozen=True)
class Roi:
    """A crop, in source pixels, applied before preprocessing, e.g. {x: 100, y: 40, width: 640, height: 480}."""

    x: int = setting(absent=0, low=0, high=65535, help="left edge")
    y: int = setting(absent=0, low=0, high=65535, help="top edge")
    width: int = setting(low=8, high=65535, help="width in pixels", example=640)
    height: int = setting(low=8, high=65535, help="height in pixels", example=480)


@dataclass(frozen=True)
class AlertConfig:
    """What raises an alert and what it carries."""

    on_uncertain: bool = setting(True, help="alert on uncertain verdicts too, not only defects")
    thumbnail_max_side: int = setting(160, low=16, high=1024, help="the alert's JPEG thumbnail, longer side in pixels")
    thumbnail_quality: int = setting(80, low=10, high=100, help=(
        "side and quality are refused when a worst-case (noise) thumbnail would not fit IoT Core's 128 KiB message, "
        "e.g. 512 at 90; a thumbnail too big for one alert is shrunk, or dropped (counted)"))


_PEM = "a PEM file"


@dataclass(frozen=True, kw_only=True)
class MqttSettings:
    """How the device reaches an MQTT broker (IoT Core's ATS endpoint, or a local broker), mutual TLS.

    The type of the agent's ``transport`` and ``line_signal`` sections and what the MQTT transports
    of `qcsight_edge.mqtt` are built from. ``thing_name`` and ``protocol`` are the agent's to set.
    """

    where: ClassVar[str] = "mqtt"  # how errors of a directly built instance name the fields

    endpoint: str = setting("", help="the broker host name without scheme, e.g. "
                            "xxxxxxxx-ats.iot.eu-west-1.amazonaws.com; required to connect")
    port: int = setting(8883, low=1, high=65535, help="the broker port (8883 for IoT Core mutual TLS)")
    cert: Path | None = setting(None, file=True, help=f"the device certificate, {_PEM}; required to connect")
    key: Path | None = setting(None, file=True, help=(
        f"its private key, {_PEM}; keep it chmod 600 (the agent warns when group or others can read it)"))
    ca: Path | None = setting(None, file=True, help=f"the CA that signed the broker's certificate, {_PEM}")
    client_id: str = setting("", help="the MQTT client id; the thing name when empty (IoT policies scope by it)")
    keep_alive_s: int = setting(60, low=5, high=1200, help="MQTT keep-alive (IoT Core accepts 30-1200 s)")
    connect_timeout_s: float = setting(10.0, low=0.1, high=300.0, help=(
        "one connection attempt (TCP, TLS, CONNACK); the transport keeps reconnecting by itself"))
    ack_timeout_s: int = setting(10, low=1, high=600, help="a publish without PUBACK after this long fails (and is "
                                 "retried from the outbox)")
    min_reconnect_delay_s: float = setting(1.0, low=0.01, high=3600.0, help="the reconnect backoff's first wait")
    max_reconnect_delay_s: float = setting(60.0, low=0.01, high=3600.0, help=(
        "the reconnect backoff's longest wait (at least min_reconnect_delay_s)"))
    max_in_flight: int = setting(100, low=1, high=65535, help=(
        "publishes awaiting PUBACK at once; more fail at once instead of queueing"))
    iot_core_limits: bool = setting(True, help=(
        "MQTT5: throttle to IoT Core's per-connection limits (100 publishes/s, 512 KB/s) so a backlog drains at the "
        "rate IoT Core accepts; false for a local broker"))
    thing_name: str = setting("", internal=True, help="the IoT thing; the agent's thing_name")
    protocol: str = setting("mqtt5", choices=PROTOCOLS, internal=True, help="mqtt5 or mqtt311")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("file") and isinstance(value, str) and value:
                value = Path(value)
                object.__setattr__(self, f.name, value)
            _check_typed(self, f, value)
        name = self.where
        if not isinstance(self.endpoint, str) or "://" in self.endpoint:
            raise ConfigError(f"{name}.endpoint", self.endpoint, "a host name without scheme, e.g. "
                              "xxx-ats.iot.<region>.amazonaws.com")
        if self.thing_name:
            check_thing_name(self.thing_name)
        if len(self.client_id) > 128:
            raise ConfigError(f"{name}.client_id", self.client_id, "at most 128 characters, or empty for thing_name")
        if self.max_reconnect_delay_s < self.min_reconnect_delay_s:
            raise ConfigError(f"{name}.max_reconnect_delay_s", self.max_reconnect_delay_s,
                              f"at least min_reconnect_delay_s ({self.min_reconnect_delay_s})")

    @property
    def mqtt_client_id(self) -> str:
        return self.client_id or self.thing_name

    def check_files(self) -> None:
        """Raise ConfigError naming the field and file if the endpoint, thing, certificate, key or CA cannot be used."""
        name = "mqtt"
        if not self.endpoint.strip():
            raise ConfigError(f"{name}.endpoint", self.endpoint, "required: the broker host name")
        check_thing_name(self.thing_name)
        for key in ("cert", "key", "ca"):
            path: Path | None = getattr(self, key)
            if path is None:
                raise ConfigError(f"{name}.{key}", None, "a path to a PEM file")
            try:
                head = path.read_bytes()[:4096]
            except FileNotFoundError:
                raise ConfigError(f"{name}.{key}", str(path), "a readable PEM file; it does not exist") from None
            except OSError as exc:
                raise ConfigError(f"{name}.{key}", str(path), f"a readable PEM file; cannot read it: "
                                  f"{exc.strerror or exc}") from None
            if b"-----BEGIN" not in head:
                raise ConfigError(f"{name}.{key}", str(path), "a PEM file; it has no '-----BEGIN' line")


@dataclass(frozen=True, kw_only=True)
class LineSignalConfig(MqttSettings):
    """The reject signal to the line controller (local; never through the cloud).

    kind mqtt publishes on qcsight/<thing>/line/reject to the line's local broker, with TLS and a
    client certificate like every qcsight MQTT connection (the MQTT settings below).
    """

    where: ClassVar[str] = "line_signal"

    kind: str = setting("log", choices=LINE_SIGNALS, help=(
        "none, log (a log line per reject: the stand-in when nothing is wired) or mqtt"))
    on_uncertain: bool = setting(True, help="also reject parts whose verdict is uncertain (they go to a person)")
    iot_core_limits: bool = setting(False, help="throttle to IoT Core's per-connection limits (off: a local broker)")


@dataclass(frozen=True, kw_only=True)
class TransportConfig(MqttSettings):
    """How the outbox reaches the cloud."""

    where: ClassVar[str] = "transport"

    kind: str = setting("none", choices=TRANSPORTS, help=(
        "mqtt5 or mqtt311 (direct to IoT Core or a broker, mutual TLS), ipc (through the Greengrass nucleus; needs "
        "--greengrass), or none (messages stay in the outbox)"))


@dataclass(frozen=True)
class ImageStoreConfig:
    """Full-resolution images of alerted frames, kept on local disk under a byte cap (oldest evicted)."""

    dir: Path = setting(state_file="images", help="the folder")
    max_bytes: int = setting(1024**3, low=1024, size=True, help="bytes, or with a unit: 500MB, 1GiB")
    jpeg_quality: int = setting(90, low=10, high=100, help="JPEG quality of the stored images")


@dataclass(frozen=True)
class MetricsConfig:
    """Windowed metrics and the status heartbeat."""

    window_s: float = setting(60.0, low=0.0, high=86400.0, open_low=True,
                              help="one qcsight.metrics/1 message per window")
    heartbeat_s: float = setting(30.0, low=0.0, high=86400.0, open_low=True,
                                 help="one qcsight.status/1 heartbeat per interval")
    reservoir_size: int = setting(2048, low=16, high=1_000_000,
                                  help="samples kept per window for quantiles (bounded memory)")


@dataclass(frozen=True)
class OutboxConfig:
    """The durable outbox every message goes through: stored here first (SQLite), then sent."""

    path: Path = setting(state_file="outbox.db", help="the SQLite file")
    max_messages: int = setting(100_000, low=1, help="when full: metrics go first, then status, alerts last")
    max_bytes: int = setting(256 * 1024**2, low=1024, size=True, help="bytes, or with a unit")


@dataclass(frozen=True)
class CredentialsConfig:
    """Where the device's temporary AWS credentials come from (for an s3 image upload), refreshed before they expire."""

    kind: str = setting("auto", choices=CREDENTIAL_KINDS, help=(
        "iot (the AWS IoT credentials provider: the device certificate buys the role alias's credentials), "
        "greengrass (the Token Exchange Service: AWS_CONTAINER_CREDENTIALS_FULL_URI and "
        "AWS_CONTAINER_AUTHORIZATION_TOKEN; the component depends on aws.greengrass.TokenExchangeService), "
        "environment (AWS_ACCESS_KEY_ID, ...: a development box), or auto: greengrass when those variables are "
        "set, else iot"))
    endpoint: str = setting("", help="iot: the credentials endpoint host (describe-endpoint iot:CredentialProvider), "
                            "e.g. xxxxxxxx.credentials.iot.eu-west-1.amazonaws.com; required for iot")
    port: int = setting(443, low=1, high=65535, help="iot: 443 for AWS")
    role_alias: str = setting("", help="iot: the role alias (required); the thing's IoT policy must allow "
                              "iot:AssumeRoleWithCertificate on it")
    cert: Path | None = setting(None, file=True, help="iot: the device certificate; transport's when empty")
    key: Path | None = setting(None, file=True, help="iot: its private key; transport's when empty")
    ca: Path | None = setting(None, file=True, help="iot: the endpoint's CA; transport's when empty")
    refresh_before_s: float = setting(300.0, low=0.0, high=43200.0,
                                      help="fetch new credentials this long before the current ones expire")
    timeout_s: float = setting(10.0, low=0.1, high=600.0, help="one credentials request")


@dataclass(frozen=True)
class ImageUploadConfig:
    """Full images of alerted parts to the cloud (the alert carries a thumbnail), through a durable queue.

    Keys: <prefix>images/<thing>/<YYYY-MM-DD>/<alert_id>.jpg. Each alert names its image before it is
    uploaded (image_ref: s3://bucket/key, file:///path for a folder; image_sha256); the object exists
    only once complete. Images wait in a durable queue (stored before their alert, nothing lost on a
    crash), are retried with backoff while the link, the store or the credentials fail, and a full
    queue evicts the oldest; every image that will not arrive is named in a status error message.
    """

    queue: Path = setting(state_file="uploads.db", help="the upload queue (SQLite, 0600), like the outbox")
    kind: str = setting("none", choices=IMAGE_UPLOAD_KINDS, help=(
        "none (images stay in image_store only), s3, or folder (a local or mounted folder standing in for the bucket)"))
    bucket: str = setting("", help="s3: the bucket (required), e.g. my-qcsight-images")
    region: str = setting("", help="s3: the bucket's region (required; SigV4 signs for it), e.g. eu-west-1")
    prefix: str = setting("", custom=True, help="e.g. plant-7/ ; a '/' is added when missing")
    endpoint: str = setting("", help="s3: an http(s) URL instead of AWS's (VPC endpoint, S3-compatible store, "
                            "http://127.0.0.1:5000 for a local moto server)")
    path_style: bool = setting(False, help="s3: <endpoint>/<bucket>/<key> addressing; default true when endpoint "
                               "is set")
    ca: Path | None = setting(None, file=True, help="s3: a CA bundle for https instead of the system's")
    path: Path | None = setting(None, help="folder: the folder (required)")
    max_images: int = setting(10_000, low=1, help="the backlog's bounds; beyond them the OLDEST pending images are "
                              "evicted (counted, named in status as lost)")
    max_bytes: int = setting(1024**3, low=1024, size=True, help="the backlog's size bound")
    timeout_s: float = setting(60.0, low=0.1, high=3600.0, help="connect, and each wait for the store during one "
                               "upload")
    retry_initial_s: float = setting(1.0, low=0.001, high=3600.0, help="backoff after a failed upload: doubles "
                                     "(jittered) up to retry_max_s")
    retry_max_s: float = setting(300.0, high=86400.0, help="the backoff's longest wait (at least retry_initial_s)")
    credentials: CredentialsConfig = setting(default_factory=CredentialsConfig, help="s3: temporary credentials")


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """Everything the agent needs, validated once at the edge of the program."""

    thing_name: str = setting(custom=True, example="line1-cam1",
                              help="the IoT thing (1-128 of letters, digits, ':', '_', '-')")
    state_dir: Path = setting(Path("qcsight-state"), help="where the outbox, the image store and the upload queue "
                              "live unless their own paths are given")
    model: ModelConfig = setting(help="which bundle runs and how")
    source: SourceConfig = setting(default_factory=SourceConfig, help="where frames come from")
    roi: Roi | None = setting(None, help="a crop before preprocessing, in source pixels")
    queue_size: int = setting(4, low=1, high=10_000, help=(
        "frames waiting for inference; when inference falls behind a camera the OLDEST are dropped (counted in "
        "metrics 'dropped'); the hot folder waits instead (its files wait on disk)"))
    alerts: AlertConfig = setting(default_factory=AlertConfig, help="alerts")
    line_signal: LineSignalConfig = setting(default_factory=LineSignalConfig, help="the reject signal to the line")
    image_store: ImageStoreConfig = setting(help="full images of alerted frames")
    metrics: MetricsConfig = setting(default_factory=MetricsConfig, help="metrics")
    outbox: OutboxConfig = setting(help="the durable outbox")
    transport: TransportConfig = setting(default_factory=TransportConfig, help="the way to the cloud")
    image_upload: ImageUploadConfig | None = setting(None, help="full images to the cloud")
    stop_deadline_s: float = setting(10.0, low=0.0, high=600.0, help=(
        "on SIGTERM/SIGINT: finish the frame in flight, then flush the outbox for at most this long; the rest stays "
        "for the next start"))
    config_reload_s: float = setting(5.0, low=0.0, high=3600.0, help=(
        "how often the configuration file is checked for a changed model bundle (0 = never); other changes need a "
        "restart"))

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
        """The resolved configuration, JSON/YAML-serialisable (paths as strings); from_dict reads it back."""
        plain: dict[str, Any] = _plain(self)
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


def settings_of(cls: type) -> list[Field[Any]]:
    """The fields of a configuration dataclass the configuration holds (not the internal ones), in file order.

    A subclass's own fields come before those it inherits (a section's kind before its MQTT settings).
    """
    own = list(inspect.get_annotations(cls))
    listed = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}
    return [listed[n] for n in own if n in listed] + [f for n, f in listed.items() if n not in own]


_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of each field of a configuration dataclass."""
    if cls not in _FIELD_TYPES:
        _FIELD_TYPES[cls] = typing.get_type_hints(cls)
    return _FIELD_TYPES[cls]


def section_type(hint: Any) -> type | None:
    """The dataclass a field holds (``Roi | None`` -> Roi), or None for a plain value."""
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and is_dataclass(candidate):
            return candidate
    return None


def _check_typed(settings: MqttSettings, f: Field[Any], value: Any) -> None:
    """A directly built MqttSettings: the field's type and bounds, with nothing coerced (the reader coerces)."""
    name = f"{settings.where}.{f.name}"
    hint = field_types(type(settings))[f.name]
    meta = f.metadata
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(name, value, "true or false")
    if hint in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                 or (hint is int and not isinstance(value, int))):
        raise ConfigError(name, value, "an integer" if hint is int else "a number")
    if hint is int:
        check_int(name, value, _int(meta["low"]), _int(meta["high"]))
    elif hint is float:
        check_number(name, value, meta["low"], meta["high"], open_low=meta["open_low"])
    elif meta["choices"] and value not in meta["choices"]:
        raise ConfigError(name, value, f"one of {', '.join(meta['choices'])}")
    elif hint is str and not isinstance(value, str):
        raise ConfigError(name, value, "a string")
    elif meta["file"] and value is not None and (not isinstance(value, Path) or not str(value)):
        raise ConfigError(name, value, "a path to a PEM file")


def _int(bound: float | None) -> int | None:
    return None if bound is None else int(bound)


def default_of(f: Field[Any], state_dir: Path | None = None) -> Any:
    """What a setting is when the configuration leaves it out: MISSING when it is required."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    if f.metadata.get("absent", MISSING) is not MISSING:
        return f.metadata["absent"]
    if f.metadata.get("state_file"):
        return (state_dir or Path("qcsight-state")) / f.metadata["state_file"]
    return MISSING


# ---------------------------------------------------------------- reading


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
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in settings_of(type(value))}
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

    def integer(self, key: str, default: int, low: int | None, high: int | None = None) -> int:
        return check_int(self.name(key), self.raw(key, default), low, high)

    def number(self, key: str, default: float, low: float | None, high: float | None = None, *,
               open_low: bool = False) -> float:
        return check_number(self.name(key), self.raw(key, default), low, high, open_low=open_low)

    def size(self, key: str, default: int, low: int) -> int:
        """A byte count: an integer or a string such as '256MiB' or '1GB'."""
        return check_size(self.name(key), self.raw(key, default), low)

    def text(self, key: str, default: str = "") -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise ConfigError(self.name(key), value, "a string")
        return value

    def path(self, key: str, default: str | Path | None = None) -> Path:
        value = self.required(key) if default is None else self.raw(key, str(default))
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



    def read(self, cls: type, name: str, *, default: Any = MISSING, low: float | None = None,
             state_dir: Path | None = None) -> Any:
        """One setting of cls, read by its type and metadata; default and low override the definition's."""
        f = next(f for f in fields(cls) if f.name == name)
        hint = field_types(cls)[name]
        meta = f.metadata
        if default is MISSING:
            default = default_of(f, state_dir)
        low = meta["low"] if low is None else low
        if hint is bool:
            return self.boolean(name, default)
        if hint is int and meta["size"]:
            return self.size(name, default, int(low or 0))
        if hint is int:
            return self.integer(name, _none_if_missing(default), _int(low), _int(meta["high"]))
        if hint is float:
            return self.number(name, default, low, meta["high"], open_low=meta["open_low"])
        if meta["choices"]:
            return self.choice(name, default, meta["choices"])
        if hint is str:
            return self.text(name, default)
        if hint is Path:
            return self.path(name, None if default is MISSING else default)
        if meta["file"]:
            return self.existing_file(name)
        if hint == Path | None:
            return self.optional_path(name)
        raise TypeError(f"{cls.__name__}.{name}: no reader for {hint}")  # a definition error, found by the tests

    def read_all(self, cls: type, *, defaults: Mapping[str, Any] | None = None,
                 lows: Mapping[str, float] | None = None, state_dir: Path | None = None,
                 skip: Collection[str] = ()) -> dict[str, Any]:
        """Every plain setting of cls (not sections, not custom ones, not those in skip), by name."""
        values: dict[str, Any] = {}
        for f in settings_of(cls):
            if f.name in skip or f.metadata["custom"] or section_type(field_types(cls)[f.name]) is not None:
                continue
            values[f.name] = self.read(cls, f.name, default=(defaults or {}).get(f.name, MISSING),
                                       low=(lows or {}).get(f.name), state_dir=state_dir)
        return values


def _none_if_missing(value: Any) -> Any:
    """A required integer: the check names it when absent (None is never an integer)."""
    return None if value is MISSING else value


def _parse(data: Mapping[str, Any], base_dir: Path | None) -> AgentConfig:
    top = _Section(data, "", base_dir)
    thing = check_thing_name(top.required("thing_name"))
    values = top.read_all(AgentConfig)
    state_dir: Path = values["state_dir"]
    cfg = AgentConfig(
        thing_name=thing,
        model=_model(top.section("model")),
        source=_source(top.section("source")),
        roi=_roi(top.raw("roi")),
        alerts=_alerts(top.section("alerts")),
        line_signal=_line_signal(top.section("line_signal")),
        image_store=_read(ImageStoreConfig, top.section("image_store"), state_dir=state_dir),
        metrics=_read(MetricsConfig, top.section("metrics")),
        outbox=_read(OutboxConfig, top.section("outbox"), state_dir=state_dir),
        transport=_transport(top.section("transport")),
        image_upload=_image_upload(top.section("image_upload"), state_dir),
        **values,
    )
    top.finish()
    return cfg


_T = typing.TypeVar("_T")


def _read(cls: type[_T], s: _Section, state_dir: Path | None = None) -> _T:
    """A section that the definition says all of."""
    cfg = cls(**s.read_all(cls, state_dir=state_dir))
    s.finish()
    return cfg


def _model(s: _Section) -> ModelConfig:
    return _read(ModelConfig, s)


def _source(s: _Section) -> SourceConfig:
    kind = s.read(SourceConfig, "kind")
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
    mode = s.read(SourceConfig, "mode", default="trigger" if kind == "hotfolder" else "free")
    if kind == "camera" and mode == "trigger":
        raise ConfigError(s.name("mode"), mode, "free for a camera (a hardware part trigger is not supported)")
    if kind == "hotfolder" and mode == "free":
        raise ConfigError(s.name("mode"), mode, "trigger for a hot folder (each file is one part)")
    initial = s.read(SourceConfig, "reconnect_initial_s")
    values = s.read_all(SourceConfig, defaults={"mode": mode, "reconnect_max_s": max(30.0, initial)},
                        lows={"reconnect_max_s": initial})
    cfg = SourceConfig(uri=uri, **values)
    s.finish()
    return cfg


def _roi(value: Any) -> Roi | None:
    if value is None:
        return None
    s = _Section(value, "roi", None)
    for key in ("width", "height"):
        s.required(key)
    return _read(Roi, s)


def _alerts(s: _Section) -> AlertConfig:
    cfg = _read(AlertConfig, s)
    side, quality = cfg.thumbnail_max_side, cfg.thumbnail_quality
    if thumbnails.worst_case_size(side, quality) > thumbnails.THUMBNAIL_BUDGET:
        fits = thumbnails.largest_side_that_fits(side, quality)
        raise ConfigError(s.name("thumbnail_max_side"), side,
                          f"at most about {fits} at thumbnail_quality {quality} (or a lower quality): a thumbnail "
                          f"must fit with its alert in IoT Core's 128 KiB message whatever the picture holds")
    return cfg


def _line_signal(s: _Section) -> LineSignalConfig:
    cfg = _read(LineSignalConfig, s)
    _check_connection(s, cfg, cfg.kind == "mqtt")
    return cfg


def _transport(s: _Section) -> TransportConfig:
    cfg = _read(TransportConfig, s)
    _check_connection(s, cfg, cfg.kind in PROTOCOLS)
    return replace(cfg, protocol=cfg.kind) if cfg.kind in PROTOCOLS else cfg


def _check_connection(s: _Section, cfg: MqttSettings, connects: bool) -> None:
    """The MQTT rules between fields, named in the section: a host without scheme, TLS files, backoff bounds."""
    _check_endpoint(s, cfg.endpoint, required=connects)
    if cfg.max_reconnect_delay_s < cfg.min_reconnect_delay_s:
        raise ConfigError(s.name("max_reconnect_delay_s"), cfg.max_reconnect_delay_s,
                          f"at least min_reconnect_delay_s ({cfg.min_reconnect_delay_s})")
    if len(cfg.client_id) > 128:
        raise ConfigError(s.name("client_id"), cfg.client_id, "at most 128 characters, or empty for thing_name")
    if connects:
        for name in ("cert", "key", "ca"):
            if getattr(cfg, name) is None:
                raise ConfigError(s.name(name), None, "required: MQTT connections use TLS with a client certificate "
                                  "(cert, key and the broker's ca, PEM files)")


def _check_endpoint(s: _Section, endpoint: str, required: bool) -> None:
    if required and not endpoint:
        raise ConfigError(s.name("endpoint"), None, "required: the broker host name")
    if "://" in endpoint:
        raise ConfigError(s.name("endpoint"), endpoint, "a host name without scheme (no mqtts://)")


def _image_upload(s: _Section, state_dir: Path) -> ImageUploadConfig:
    endpoint = s.read(ImageUploadConfig, "endpoint")
    if endpoint and not re.match(r"^https?://[^/\s]+(/\S*)?$", endpoint):
        raise ConfigError(s.name("endpoint"), endpoint, "an http:// or https:// URL (empty for AWS)")
    initial = s.read(ImageUploadConfig, "retry_initial_s")
    values = s.read_all(ImageUploadConfig, defaults={"path_style": bool(endpoint), "retry_max_s": max(300.0, initial)},
                        lows={"retry_max_s": initial}, state_dir=state_dir)
    cfg = ImageUploadConfig(prefix=_key_prefix(s), credentials=_credentials(s.section("credentials")), **values)
    if cfg.kind == "s3":
        if not _BUCKET.match(cfg.bucket):
            raise ConfigError(s.name("bucket"), cfg.bucket or None, "required for s3: an S3 bucket name (3-63 of "
                              "lowercase letters, digits, '.', '-')")
        if not _REGION.match(cfg.region):
            raise ConfigError(s.name("region"), cfg.region or None, "required for s3: the bucket's region, e.g. "
                              "eu-west-1")
    if cfg.kind == "folder" and cfg.path is None:
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
    kind = s.read(CredentialsConfig, "kind")
    _check_endpoint(s, s.read(CredentialsConfig, "endpoint"), required=kind == "iot")
    cfg = _read(CredentialsConfig, s)
    if cfg.role_alias and not _ROLE_ALIAS.match(cfg.role_alias):
        raise ConfigError(s.name("role_alias"), cfg.role_alias, "1-128 of letters, digits and '=,@-_'")
    if kind == "iot" and not cfg.role_alias:
        raise ConfigError(s.name("role_alias"), None, "required for iot: the role alias the device's IoT policy "
                          "may assume")
    return cfg
