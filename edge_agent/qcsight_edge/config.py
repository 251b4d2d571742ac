"""The agent's configuration: one frozen AgentConfig, read once from YAML or Greengrass, validated by field.

The dataclasses below are the only definition of a setting: its type, its default, its bounds and
its help text (``field(metadata=...)`` through `qcsight_edge.settings.setting`). The reader (`AgentConfig.from_dict`),
the annotated example file (``agent.example.yaml``) and the JSON Schema (``agent.schema.json``,
both written by ``python -m qcsight_edge.config_docs``) are derived from them; what a field cannot
say by itself (a default that depends on another field, a rule between fields) is written once in
the section's reader below.

Greengrass Lite serves every scalar of a YAML recipe's DefaultConfiguration as a string (its YAML
decoder keeps scalars as text: max_fps 2 arrives as '2', true as 'true'), and a configuration merge
on the Java nucleus can turn 10 into 10.0. The reader takes those forms for what they mean
(`qcsight_core.checks`) and then applies the same range checks; anything else is refused by name.
"""

# RUF009: `setting` is the dataclass field specifier of these classes (it returns `field(...)`), not a call
# whose result every instance would share.
# ruff: noqa: RUF009

from __future__ import annotations

import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import yaml

from qcsight_core.errors import ConfigError
from qcsight_core.runner import PRECISION_CHOICES
from qcsight_core.topics import check_thing_name
from qcsight_edge import thumbnails
from qcsight_edge.redact import redact_uri
from qcsight_edge.settings import (
    Section,
    check_typed,
    coerce_integer,
    plain,
    setting,
)

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
            check_typed(self, f, value)
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
        resolved: dict[str, Any] = plain(self)
        return resolved

    def redacted_dict(self) -> dict[str, Any]:
        """to_dict() for what leaves the device (the status config echo, --check): no credentials in the camera URI."""
        resolved = self.to_dict()
        if resolved["source"]["uri"] is not None:
            resolved["source"]["uri"] = redact_uri(resolved["source"]["uri"])
        return resolved

    def hot_fields_equal(self, other: AgentConfig) -> bool:
        """Whether other differs from self only in what the agent applies without a restart (the model)."""
        return self.to_dict() | {"model": None} == other.to_dict() | {"model": None}


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


def _parse(data: Mapping[str, Any], base_dir: Path | None) -> AgentConfig:
    top = Section(data, "", base_dir)
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


def _read(cls: type[_T], s: Section, state_dir: Path | None = None) -> _T:
    """A section that the definition says all of."""
    cfg = cls(**s.read_all(cls, state_dir=state_dir))
    s.finish()
    return cfg


def _model(s: Section) -> ModelConfig:
    return _read(ModelConfig, s)


def _source(s: Section) -> SourceConfig:
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
    s = Section(value, "roi", None)
    for key in ("width", "height"):
        s.required(key)
    return _read(Roi, s)


def _alerts(s: Section) -> AlertConfig:
    cfg = _read(AlertConfig, s)
    side, quality = cfg.thumbnail_max_side, cfg.thumbnail_quality
    if thumbnails.worst_case_size(side, quality) > thumbnails.THUMBNAIL_BUDGET:
        fits = thumbnails.largest_side_that_fits(side, quality)
        raise ConfigError(s.name("thumbnail_max_side"), side,
                          f"at most about {fits} at thumbnail_quality {quality} (or a lower quality): a thumbnail "
                          f"must fit with its alert in IoT Core's 128 KiB message whatever the picture holds")
    return cfg


def _line_signal(s: Section) -> LineSignalConfig:
    cfg = _read(LineSignalConfig, s)
    _check_connection(s, cfg, cfg.kind == "mqtt")
    return cfg


def _transport(s: Section) -> TransportConfig:
    cfg = _read(TransportConfig, s)
    _check_connection(s, cfg, cfg.kind in PROTOCOLS)
    return replace(cfg, protocol=cfg.kind) if cfg.kind in PROTOCOLS else cfg


def _check_connection(s: Section, cfg: MqttSettings, connects: bool) -> None:
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


def _check_endpoint(s: Section, endpoint: str, required: bool) -> None:
    if required and not endpoint:
        raise ConfigError(s.name("endpoint"), None, "required: the broker host name")
    if "://" in endpoint:
        raise ConfigError(s.name("endpoint"), endpoint, "a host name without scheme (no mqtts://)")


def _image_upload(s: Section, state_dir: Path) -> ImageUploadConfig:
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


def _key_prefix(s: Section) -> str:
    prefix = s.text("prefix", "")
    if prefix.startswith("/") or "//" in prefix or any(part in (".", "..") for part in prefix.split("/")):
        raise ConfigError(s.name("prefix"), prefix, "a key prefix without a leading '/', '//', '.' or '..' parts")
    if len(prefix) > 512 or not prefix.isprintable():
        raise ConfigError(s.name("prefix"), prefix, "at most 512 printable characters")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def _credentials(s: Section) -> CredentialsConfig:
    kind = s.read(CredentialsConfig, "kind")
    _check_endpoint(s, s.read(CredentialsConfig, "endpoint"), required=kind == "iot")
    cfg = _read(CredentialsConfig, s)
    if cfg.role_alias and not _ROLE_ALIAS.match(cfg.role_alias):
        raise ConfigError(s.name("role_alias"), cfg.role_alias, "1-128 of letters, digits and '=,@-_'")
    if kind == "iot" and not cfg.role_alias:
        raise ConfigError(s.name("role_alias"), None, "required for iot: the role alias the device's IoT policy "
                          "may assume")
    return cfg
