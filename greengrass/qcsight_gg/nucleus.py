"""``qcsight gg run-local``: a local Greengrass nucleus that installs, runs and deploys the built components.

It does for a component layout what a nucleus does with a deployment, on this machine, with the
real protocols:

* installs components from the layout (recipes/ and artifacts/): each artifact is copied into
  ``<root>/packages/artifacts/<name>/<version>/``, verified against the recipe's Digest and, for
  ``Unarchive: ZIP``, unpacked into ``<root>/packages/artifacts-unarchived/<name>/<version>/<zip
  name>/`` (both nuclei name the folder after the archive);
* selects each recipe's manifest and runs its lifecycle (install, startup, run, shutdown) with
  ``sh -c`` in ``<root>/work/<name>``, with the environment a nucleus gives (``SVCUID``,
  ``AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT``, ``AWS_IOT_THING_NAME``, ``AWS_REGION``,
  the recipe's Setenv) and the recipe variables interpolated into the scripts; a component that
  errors is restarted, and broken after three errors, as both nuclei do;
* serves Greengrass IPC on ``<root>/ipc.socket`` (qcsight_gg.ipc_server): each component
  authenticates with its SVCUID, reads and follows its configuration, and may PublishToIoTCore only
  on the topics its recipe's accessControl grants (anything else: UnauthorizedError); accepted
  messages are relayed to an MQTT broker over mutual TLS (qcsight_gg.relay);
* applies deployments (root components to add or remove, configuration merges and resets) one at
  a time: validates proposed configurations with the components that subscribed, notifies
  components of updates and waits while they defer, stops, reconfigures, installs and starts in
  dependency order, waits for every new component to stay up, and with ``ROLLBACK`` restores the
  previous versions and configurations when one breaks; reports the deployment's status as the
  Greengrass CLI's GetLocalDeploymentStatus does;
* keeps ``<root>/state.json`` (components, their versions, states and the last deployments) and
  redeploys it when started again on the same root.

``flavor="lite"`` behaves like Greengrass nucleus lite where our components could tell the
difference: only manifests with ``Platform.runtime`` "*" or "aws_nucleus_lite", lifecycle phases in
lowercase only and at least one required, ``{work:path}`` and the artifact paths with a trailing
slash, no other component's variables in scripts (the phase fails), DefaultConfiguration scalars
served as strings (YAML recipes), no configuration validation, component-update notice or
shutdown phase, and error replies carrying only ``_message``. Neither flavour interpolates recipe
variables inside configuration (the Java nucleus's default).

Python API (what ``qcsight cloud serve`` calls)::

    from qcsight_gg.nucleus import LocalDeployment, LocalNucleus, NucleusConfig, deploy_to_running

    with LocalNucleus(NucleusConfig(root=..., store=layout, thing_name="line-7")) as nucleus:
        result = nucleus.deploy(LocalDeployment({"com.qcsight.EdgeAgent": "0.1.0",
                                                 "com.qcsight.Model": "1.0.0"})).wait(600)
        assert result.succeeded, result.failure_cause

    # against a nucleus started by `qcsight gg run-local` (through its IPC socket, as greengrass-cli):
    result = deploy_to_running(root, LocalDeployment({"com.qcsight.Model": "1.1.0"}), timeout_s=300)
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
import zipfile
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from qcsight_gg.archive import artifact_digest
from qcsight_gg.errors import NucleusError
from qcsight_gg.ipc_server import (
    CLASSIC,
    CREATE_LOCAL_DEPLOYMENT,
    FLAVORS,
    GET_LOCAL_DEPLOYMENT_STATUS,
    LITE,
    IpcServer,
    ModeledError,
    publish_resources,
)
from qcsight_gg.relay import BrokerSettings, MqttRelay
from qcsight_gg.semver import Requirement, Version

log = logging.getLogger(__name__)

CLI_COMPONENT = "aws.greengrass.Cli"
NUCLEUS_COMPONENTS = ("aws.greengrass.Nucleus", "aws.greengrass.NucleusLite")
# Components a real nucleus provides itself (the Java nucleus as built-in plugins, Lite as its own
# services): a dependency on one is met without a recipe in the store. The local nucleus does not serve
# the Token Exchange Service: a component that needs its credentials (the agent's s3 image upload) gets
# them here from its environment or a merge naming another credentials kind.
BUILTIN_COMPONENTS = (*NUCLEUS_COMPONENTS, "aws.greengrass.TokenExchangeService")
PHASES = ("bootstrap", "install", "startup", "run", "shutdown", "recover")
UP = ("RUNNING", "FINISHED")
_ARCH = {"x86_64": "amd64", "aarch64": "aarch64", "armv7l": "arm", "i686": "x86"}
# Greengrass Lite: StartLimitBurst=3 (modules/recipe2unit/src/unit_file_generator.c); the Java nucleus
# also marks a component broken after three errors.
MAX_ERRORS = 3


@dataclass(frozen=True)
class NucleusConfig:
    """A local nucleus.

    Attributes:
        root: the nucleus root (packages/, work/, logs/, ipc.socket, state.json).
        store: the component layout deployments take recipes and artifacts from.
        thing_name: what ``{iot:thingName}`` and AWS_IOT_THING_NAME say.
        flavor: ``classic`` (the Java nucleus) or ``lite`` (Greengrass nucleus lite).
        broker: where PublishToIoTCore goes (mutual TLS); None keeps messages in the IPC server only.
        region: AWS_REGION for components.
        settle_s: a component's run process must stay up this long before a deployment counts it started
            (the agent refuses a bad configuration or model within about 3 s of its start).
        restart_delay_s: wait before restarting a component that errored.
        stop_timeout_s: SIGTERM, then SIGKILL after this long.
        extra_env: more environment for lifecycle scripts (a test's PATH for python3, say).
    """

    root: Path
    store: Path
    thing_name: str
    flavor: str = CLASSIC
    broker: BrokerSettings | None = None
    region: str = "us-east-1"
    settle_s: float = 5.0
    restart_delay_s: float = 0.5
    stop_timeout_s: float = 20.0
    extra_env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LocalDeployment:
    """One deployment, as greengrass-cli's CreateLocalDeployment takes it.

    Attributes:
        components: root components to add or update: name -> version.
        remove: root components to remove.
        merges: component -> configuration to merge into it.
        resets: component -> JSON pointers reset to the recipe's defaults ("" resets everything).
        failure_policy: ROLLBACK or DO_NOTHING.
        notify_components: tell components before stopping them and wait while they defer (the
            Java nucleus only); update_timeout_s bounds the wait.
        store: take recipes and artifacts from this layout instead of the nucleus's.
    """

    components: Mapping[str, str] = field(default_factory=dict)
    remove: Sequence[str] = ()
    merges: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    resets: Mapping[str, list[str]] = field(default_factory=dict)
    failure_policy: str = "ROLLBACK"
    notify_components: bool = True
    update_timeout_s: float = 60.0
    validation_timeout_s: float = 30.0
    store: Path | None = None


@dataclass
class DeploymentResult:
    """A deployment's outcome, in GetLocalDeploymentStatus's terms."""

    deployment_id: str
    created_on: str
    status: str = "QUEUED"  # QUEUED, IN_PROGRESS, SUCCEEDED, FAILED
    detailed_status: str = ""  # SUCCESSFUL, FAILED_NO_STATE_CHANGE, FAILED_ROLLBACK_COMPLETE, ...
    failure_cause: str = ""
    error_stack: list[str] = field(default_factory=list)
    components: dict[str, str] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCEEDED"

    @property
    def done(self) -> bool:
        return self.status in ("SUCCEEDED", "FAILED")

    def as_status(self) -> dict[str, Any]:
        details: dict[str, Any] = {"detailedDeploymentStatus": self.detailed_status or "SUCCESSFUL"}
        if self.error_stack:
            details["deploymentErrorStack"] = list(self.error_stack)
        if self.failure_cause:
            details["deploymentFailureCause"] = self.failure_cause
        return {"deploymentId": self.deployment_id, "status": self.status, "createdOn": self.created_on,
                "deploymentStatusDetails": details}


class _DeploymentFailed(Exception):
    def __init__(self, cause: str, stack: Sequence[str] = ()) -> None:
        super().__init__(cause)
        self.cause = cause
        self.stack = list(stack) or [cause]


# -------------------------------------------------------------------- recipes and their variables


@dataclass(frozen=True)
class Package:
    """A component version this nucleus can run: its recipe and the manifest selected for this device."""

    name: str
    version: str
    recipe: dict[str, Any]
    manifest: dict[str, Any]
    lifecycle: dict[str, Any]
    yaml_recipe: bool

    @property
    def dependencies(self) -> dict[str, dict[str, Any]]:
        deps = self.recipe.get("ComponentDependencies") or {}
        return {n: d for n, d in deps.items() if n not in BUILTIN_COMPONENTS}

    def default_configuration(self, flavor: str) -> dict[str, Any]:
        defaults = copy.deepcopy((self.recipe.get("ComponentConfiguration") or {}).get("DefaultConfiguration") or {})
        # Greengrass Lite's YAML decoder keeps every scalar as text (modules/ggl-yaml/src/yaml_decode.c).
        return _as_text(defaults) if flavor == LITE and self.yaml_recipe else defaults


def _as_text(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _as_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_text(v) for v in value]
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def select_manifest(recipe: Mapping[str, Any], flavor: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The first manifest this device takes, and its lifecycle (phase keys as the nucleus reads them).

    Raises:
        NucleusError: no manifest matches, or its lifecycle is one this nucleus refuses.
    """
    name = recipe.get("ComponentName")
    arch = _ARCH.get(platform.machine(), platform.machine())
    skipped: list[str] = []
    for i, manifest in enumerate(recipe.get("Manifests") or []):
        plat = manifest.get("Platform") or {}
        runtime = plat.get("runtime")
        if flavor == LITE and runtime not in ("*", "aws_nucleus_lite"):
            skipped.append(f"manifest {i}: no Platform.runtime \"*\" or \"aws_nucleus_lite\" (Lite skips it)")
            continue
        if flavor == CLASSIC and runtime not in (None, "*", "aws_nucleus_classic"):
            skipped.append(f"manifest {i}: runtime {runtime!r}")
            continue
        if plat.get("os", "all") not in ("linux", "all", "*"):
            skipped.append(f"manifest {i}: os {plat.get('os')!r}")
            continue
        if plat.get("architecture", "*") not in ("*", arch):
            skipped.append(f"manifest {i}: architecture {plat.get('architecture')!r} (this device: {arch})")
            continue
        return manifest, _lifecycle(recipe, manifest, flavor)
    raise NucleusError(f"{name}: no manifest for this device ({flavor} nucleus, linux {arch}): {'; '.join(skipped)}")


def _lifecycle(recipe: Mapping[str, Any], manifest: Mapping[str, Any], flavor: str) -> dict[str, Any]:
    raw = manifest.get("Lifecycle")
    if not raw and manifest.get("Selections"):
        global_lifecycle = recipe.get("Lifecycle") or {}
        raw = next((global_lifecycle[s] for s in manifest["Selections"] if s in global_lifecycle), None)
    raw = dict(raw or {})
    if flavor == LITE:
        phases = {k: v for k, v in raw.items() if k in PHASES}
        if not phases:
            unknown = ", ".join(repr(k) for k in raw if k != "Setenv")
            raise NucleusError(f"{recipe.get('ComponentName')}: no lifecycle phase Greengrass nucleus lite reads "
                               f"(lowercase {', '.join(PHASES)}){'; it ignores ' + unknown if unknown else ''}")
        if "Setenv" in raw:
            phases["Setenv"] = raw["Setenv"]
        return phases
    # The Java nucleus reads its configuration, the lifecycle included, case-insensitively.
    lowered = {str(k).lower(): v for k, v in raw.items()}
    phases = {k: lowered[k] for k in PHASES if k in lowered}
    if "setenv" in lowered:
        phases["Setenv"] = lowered["setenv"]
    return phases


def _step(value: Any) -> tuple[str, float | None, dict[str, str]]:
    """(script, timeout, setenv) of a lifecycle step written as text or as an object."""
    if isinstance(value, str):
        return value, None, {}
    if isinstance(value, Mapping):
        lowered = {str(k).lower(): v for k, v in value.items()}
        timeout = lowered.get("timeout")
        return (str(lowered.get("script", "")), float(timeout) if timeout not in (None, "") else None,
                {str(k): str(v) for k, v in (lowered.get("setenv") or {}).items()})
    return "", None, {}


@dataclass(frozen=True)
class Paths:
    """Where a component version lives under the nucleus root."""

    root: Path
    name: str
    version: str

    @property
    def work(self) -> Path:
        return self.root / "work" / self.name

    @property
    def artifacts(self) -> Path:
        return self.root / "packages" / "artifacts" / self.name / self.version

    @property
    def unarchived(self) -> Path:
        return self.root / "packages" / "artifacts-unarchived" / self.name / self.version


class Interpolator:
    """Recipe variables in lifecycle scripts, as each nucleus expands them.

    The Java nucleus expands what it knows, including other components' variables
    (``{com.x:artifacts:path}``), and leaves the rest as written. Greengrass nucleus lite reads every
    ``{`` as a variable, expands only the component's own (aws-greengrass-lite
    ``modules/recipe-runner/src/runner.c``, ``substitute_escape``: kernel:rootPath, iot:thingName,
    work:path, artifacts:path, artifacts:decompressedPath with a trailing slash, configuration:/x)
    and fails the phase on anything else.
    """

    def __init__(self, root: Path, thing: str, flavor: str, packages: Mapping[str, Package],
                 configurations: Mapping[str, dict[str, Any]]) -> None:
        self.root = root
        self.thing = thing
        self.flavor = flavor
        self.packages = packages
        self.configurations = configurations

    def expand(self, text: str, component: str) -> str:
        if self.flavor == LITE:
            return self._lite(text, component)
        return re.sub(r"\{([^{}]+)\}", lambda m: self._classic(m.group(1), component, m.group(0)), text)

    def _own(self, kind: str, key: str, component: str, slash: str) -> str | None:
        package = self.packages.get(component)
        if package is None:
            return None
        paths = Paths(self.root, component, package.version)
        if kind == "work" and key == "path":
            return f"{paths.work}{slash}"
        if kind == "artifacts" and key == "path":
            return f"{paths.artifacts}{slash}"
        if kind == "artifacts" and key == "decompressedPath":
            return f"{paths.unarchived}{slash}"
        if kind == "configuration":
            node: Any = self.configurations.get(component, {})
            for part in [p for p in key.strip("/").split("/") if p]:
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(node, Mapping) or part not in node:
                    return None
                node = node[part]
            return node if isinstance(node, str) else json.dumps(node)
        return None

    def _classic(self, name: str, component: str, written: str) -> str:
        if name == "iot:thingName":
            return self.thing
        if name == "kernel:rootPath":
            return str(self.root)
        parts = name.split(":", 2)
        if len(parts) == 3 and parts[0] in self.packages:  # another component's variable
            value = self._own(parts[1], parts[2], parts[0], "")
        elif len(parts) == 2:
            value = self._own(parts[0], parts[1], component, "")
        else:
            value = None
        return written if value is None else value

    def _lite(self, text: str, component: str) -> str:
        out: list[str] = []
        i = 0
        while i < len(text):
            if text[i] != "{":
                out.append(text[i])
                i += 1
                continue
            end = text.find("}", i)
            if end < 0:
                raise NucleusError(f"{component}: recipe escape not terminated in {text!r} (Greengrass nucleus lite)")
            escape = text[i + 1:end]
            kind, _, key = escape.partition(":")
            value: str | None = None
            if kind == "kernel" and key == "rootPath":
                value = str(self.root)
            elif kind == "iot" and key == "thingName":
                value = self.thing
            elif kind in ("work", "artifacts", "configuration"):
                value = self._own(kind, key, component, "/")
            if value is None:
                raise NucleusError(f"{component}: unhandled variable substitution: {escape} (Greengrass nucleus lite "
                                   "resolves only the component's own variables)")
            out.append(value)
            i = end + 1
        return "".join(out)


# -------------------------------------------------------------------- one running component


class Component:
    """A component version under this nucleus: its lifecycle processes and its state."""

    def __init__(self, nucleus: LocalNucleus, package: Package, configuration: dict[str, Any]) -> None:
        self.nucleus = nucleus
        self.package = package
        self.configuration = configuration
        self.name = package.name
        self.version = package.version
        self.svcuid = secrets.token_hex(16)
        self.paths = Paths(nucleus.config.root, self.name, self.version)
        self.errors = 0
        self.last_error = ""
        self._state = "NEW"
        self._lock = threading.RLock()
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._monitor: threading.Thread | None = None

    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    def _set(self, state: str, why: str = "") -> None:
        with self._lock:
            if state == self._state:
                return
            old, self._state = self._state, state
        log.info("%s %s: %s -> %s%s", self.name, self.version, old, state, f" ({why})" if why else "")
        self.nucleus._state_changed()

    # -- lifecycle -------------------------------------------------------------------------------

    def launch(self) -> None:
        """install then start, in a thread (a startup step blocks); errors are retried, then BROKEN."""
        threading.Thread(target=self._launch, name=f"gg-launch-{self.name}", daemon=True).start()

    def _launch(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
            problem = self._install_and_start()
            if problem is None:
                return
            with self._lock:
                if self._stopping:
                    return  # the step failed because the nucleus stopped it
            self._error(problem)
            if self.state == "BROKEN":
                return
            time.sleep(self.nucleus.config.restart_delay_s)

    def _install_and_start(self) -> str | None:
        """None when the component is up (or finished); else why it is not."""
        lifecycle = self.package.lifecycle
        self.paths.work.mkdir(parents=True, exist_ok=True)
        if "install" in lifecycle:
            code, tail = self._run_step("install", default_timeout=120.0)
            if code != 0:
                return f"install exited {code}: {tail}"
        self._set("INSTALLED")
        if "startup" in lifecycle:
            self._set("STARTING")
            code, tail = self._run_step("startup", default_timeout=120.0)
            if code != 0:
                return f"startup exited {code}: {tail}"
            self._set("RUNNING", "startup finished")
            return None
        if "run" in lifecycle:
            try:
                process = self._spawn("run")
            except NucleusError as exc:
                return str(exc)
            with self._lock:
                if self._stopping:
                    _kill_group(process, self.nucleus.config.stop_timeout_s)
                    return None
                self._process = process
            self._set("RUNNING")
            self._monitor = threading.Thread(target=self._watch, args=(process,), name=f"gg-run-{self.name}",
                                             daemon=True)
            self._monitor.start()
            return None
        self._set("FINISHED", "no startup or run step")
        return None

    def _error(self, problem: str) -> None:
        self.errors += 1
        self.last_error = problem
        if self.errors >= MAX_ERRORS:
            self._set("BROKEN", f"{self.errors} errors; last: {problem}")
        else:
            self._set("ERRORED", problem)

    def _watch(self, process: subprocess.Popen[bytes]) -> None:
        code = process.wait()
        with self._lock:
            stopping = self._stopping
            self._process = None
        if stopping:
            return
        if code == 0:
            self._set("FINISHED", "run exited 0")
            return
        self._error(f"run exited {code}: {self._log_tail()}")
        if self.state != "BROKEN":
            time.sleep(self.nucleus.config.restart_delay_s)
            self._launch()

    def stop(self) -> None:
        """Stop the component: shutdown step (Java nucleus), then SIGTERM, then SIGKILL after the timeout."""
        with self._lock:
            self._stopping = True
            process = self._process
        if self.state == "BROKEN":
            return  # nothing runs; a broken component stays reported as such
        if self.state in ("NEW", "FINISHED", "STOPPED"):
            self._set("STOPPED")
            return
        self._set("STOPPING")
        if self.nucleus.config.flavor == CLASSIC and "shutdown" in self.package.lifecycle:
            self._run_step("shutdown", default_timeout=15.0)
        if process is not None:
            _kill_group(process, self.nucleus.config.stop_timeout_s)
        if self._monitor is not None:
            self._monitor.join(self.nucleus.config.stop_timeout_s)
        self._set("STOPPED")

    # -- processes -------------------------------------------------------------------------------

    def environment(self, step_env: Mapping[str, str]) -> dict[str, str]:
        config = self.nucleus.config
        env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "LC_ALL", "USER", "TMPDIR") if k in os.environ}
        env.update(config.extra_env)
        env.update({"SVCUID": self.svcuid,
                    "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT": self.nucleus.socket_path,
                    "AWS_IOT_THING_NAME": config.thing_name,
                    "AWS_REGION": config.region, "AWS_DEFAULT_REGION": config.region})
        if config.broker is not None:
            env["GG_ROOT_CA_PATH"] = str(config.broker.ca)
        interpolate = self.nucleus.interpolator()
        for key, value in {**(self.package.lifecycle.get("Setenv") or {}), **step_env}.items():
            env[str(key)] = interpolate.expand(str(value), self.name)
        return env

    def _spawn(self, phase: str) -> subprocess.Popen[bytes]:
        script, _, step_env = _step(self.package.lifecycle[phase])
        try:
            text = self.nucleus.interpolator().expand(script, self.name)
            env = self.environment(step_env)
        except NucleusError as exc:
            raise NucleusError(f"{phase}: {exc}") from exc
        log_path = self.nucleus.log_path(self.name)
        with log_path.open("ab") as out:
            out.write(f"--- {datetime.now(timezone.utc).isoformat()} {self.name} {self.version} {phase}\n".encode())
            out.flush()
            return subprocess.Popen(["sh", "-c", text], cwd=self.paths.work, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def _run_step(self, phase: str, default_timeout: float) -> tuple[int, str]:
        _, timeout, _ = _step(self.package.lifecycle[phase])
        try:
            process = self._spawn(phase)
        except NucleusError as exc:
            return 1, str(exc)
        with self._lock:
            self._process = process
        try:
            code = process.wait(timeout or default_timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process, 2.0)
            code = -1
        finally:
            with self._lock:
                self._process = None
        return code, "" if code == 0 else self._log_tail()

    def _log_tail(self, lines: int = 6) -> str:
        try:
            text = self.nucleus.log_path(self.name).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text[-lines:] if line.strip())


def _kill_group(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5.0)


# -------------------------------------------------------------------- the nucleus


class LocalNucleus:
    """A local Greengrass nucleus (see the module docstring); start(), deploy(), stop()."""

    def __init__(self, config: NucleusConfig) -> None:
        if config.flavor not in FLAVORS:
            raise NucleusError(f"flavor must be one of {', '.join(FLAVORS)}, not {config.flavor!r}")
        self.config = config
        self.root = config.root
        socket_path = self.root / "ipc.socket"
        # Unix socket paths are limited to about 107 bytes.
        self._short_dir: str | None = None
        if len(str(socket_path)) > 100:
            self._short_dir = tempfile.mkdtemp(prefix="qcs-gg-")
            socket_path = Path(self._short_dir) / "ipc.socket"
        self.socket_path = str(socket_path)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._state_lock = threading.Lock()
        self.components: dict[str, Component] = {}
        self.roots: set[str] = set()
        self._deployments: dict[str, DeploymentResult] = {}
        self._order: deque[str] = deque(maxlen=50)
        self._queue: deque[tuple[DeploymentResult, LocalDeployment]] = deque(maxlen=100)
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.relay: MqttRelay | None = None
        self.cli_token = secrets.token_hex(16)
        self.server = IpcServer(socket_path=self.socket_path, flavor=config.flavor,
                                on_publish=self._relay_publish,
                                handlers={CREATE_LOCAL_DEPLOYMENT: self._ipc_create_deployment,
                                          GET_LOCAL_DEPLOYMENT_STATUS: self._ipc_deployment_status})

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> LocalNucleus:
        for folder in ("packages/recipes", "packages/artifacts", "packages/artifacts-unarchived", "work", "logs",
                       "cli"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        if self.config.broker is not None:
            self.relay = MqttRelay(self.config.broker).start()
        self.server.add_component(CLI_COMPONENT, self.cli_token, {})
        self.server.start()
        token = self.root / "cli" / "token"
        token.write_text(json.dumps({"socket": self.socket_path, "svcuid": self.cli_token}))
        token.chmod(0o600)
        self._worker = threading.Thread(target=self._work, name="gg-deployments", daemon=True)
        self._worker.start()
        previous = self._read_state()
        if previous:
            log.info("redeploying the components of %s: %s", self.root / "state.json", previous)
            self.deploy(LocalDeployment(components=previous["roots"], merges=previous["configurations"],
                                        notify_components=False))
        log.info("local %s nucleus at %s, IPC on %s", self.config.flavor, self.root, self.socket_path)
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        if self._worker is not None:
            self._worker.join(10.0)
        with self._lock:
            components = list(self.components.values())
        for component in reversed(self._dependency_order([c.name for c in components])):
            with contextlib.suppress(Exception):
                self.components[component].stop()
        self.server.stop()
        if self.relay is not None:
            self.relay.close()
        with contextlib.suppress(FileNotFoundError):
            (self.root / "cli" / "token").unlink()
        if self._short_dir is not None:
            shutil.rmtree(self._short_dir, ignore_errors=True)

    def __enter__(self) -> LocalNucleus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what callers use ------------------------------------------------------------------------

    def deploy(self, deployment: LocalDeployment) -> DeploymentHandle:
        """Queue a deployment; returns a handle to wait for its result."""
        result = DeploymentResult(str(uuid.uuid4()), datetime.now(timezone.utc).isoformat())
        with self._changed:
            self._deployments[result.deployment_id] = result
            self._order.append(result.deployment_id)
            self._queue.append((result, deployment))
            self._changed.notify_all()
        return DeploymentHandle(self, result.deployment_id)

    def result(self, deployment_id: str) -> DeploymentResult | None:
        with self._lock:
            result = self._deployments.get(deployment_id)
            return None if result is None else copy.deepcopy(result)

    def wait(self, deployment_id: str, timeout_s: float) -> DeploymentResult:
        """The deployment's result once it finished.

        Raises:
            TimeoutError: it did not finish within timeout_s.
        """
        with self._changed:
            if not self._changed.wait_for(lambda: self._deployments[deployment_id].done, timeout_s):
                raise TimeoutError(f"deployment {deployment_id} did not finish within {timeout_s}s "
                                   f"(status {self._deployments[deployment_id].status})")
            return copy.deepcopy(self._deployments[deployment_id])

    def status(self) -> dict[str, dict[str, Any]]:
        """Every component: version, state, errors and the last error."""
        with self._lock:
            return {c.name: {"version": c.version, "state": c.state, "errors": c.errors, "last_error": c.last_error}
                    for c in self.components.values()}

    def configuration(self, component: str) -> dict[str, Any]:
        return self.server.configuration(component)

    def svcuid(self, component: str) -> str:
        with self._lock:
            return self.components[component].svcuid

    def log_path(self, component: str) -> Path:
        return self.root / "logs" / f"{component}.log"

    def interpolator(self) -> Interpolator:
        with self._lock:
            packages = {c.name: c.package for c in self.components.values()}
            configurations = {c.name: c.configuration for c in self.components.values()}
        return Interpolator(self.root, self.config.thing_name, self.config.flavor, packages, configurations)

    # -- deployments -----------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            with self._changed:
                while not self._queue and not self._stop.is_set():
                    self._changed.wait(0.5)
                if self._stop.is_set():
                    return
                result, deployment = self._queue.popleft()
                result.status = "IN_PROGRESS"
                self._changed.notify_all()
            try:
                self._apply(result, deployment)
            except Exception as exc:  # a nucleus bug must fail the deployment, not the worker
                log.exception("deployment %s", result.deployment_id)
                self._finish(result, "FAILED", "FAILED_UNABLE_TO_ROLLBACK", f"the local nucleus failed: {exc!r}",
                             [repr(exc)])

    def _finish(self, result: DeploymentResult, status: str, detailed: str, cause: str = "",
                stack: Sequence[str] = ()) -> None:
        with self._changed:
            result.status, result.detailed_status = status, detailed
            result.failure_cause, result.error_stack = cause, list(stack)
            result.components = {c.name: c.version for c in self.components.values()}
            self._changed.notify_all()
        level = logging.INFO if status == "SUCCEEDED" else logging.ERROR
        log.log(level, "deployment %s %s %s%s", result.deployment_id, status, detailed, f": {cause}" if cause else "")
        self._write_state()

    def _apply(self, result: DeploymentResult, deployment: LocalDeployment) -> None:
        store = deployment.store or self.config.store
        with self._lock:
            old_roots = set(self.roots)
            old = {name: (c.package, copy.deepcopy(c.configuration)) for name, c in self.components.items()}
        roots = {name: old[name][0].version for name in old_roots if name in old} | dict(deployment.components)
        for name in deployment.remove:
            roots.pop(name, None)
        try:
            packages = self._resolve(roots, store, {n: p.version for n, (p, _) in old.items()})
            for package in packages.values():
                if package.name not in old or old[package.name][0].version != package.version:
                    self._prepare(package, store)
            configs = self._configurations(packages, old, deployment)
        except (NucleusError, _DeploymentFailed) as exc:
            stack = exc.stack if isinstance(exc, _DeploymentFailed) else [str(exc)]
            self._finish(result, "FAILED", "FAILED_NO_STATE_CHANGE", str(exc), stack)
            return
        changed = {n for n, p in packages.items() if n not in old or old[n][0].version != p.version}
        restart = {n for n, p in packages.items()
                   if n not in changed and any(d in changed and (spec.get("DependencyType") or "HARD") == "HARD"
                                               for d, spec in p.dependencies.items())}
        to_stop = [n for n in old if n not in packages or n in changed or n in restart]
        to_start = [n for n in packages if n in changed or n in restart]
        reconfigure = [n for n in packages if n not in to_start and n in old and configs[n] != old[n][1]]
        try:
            self._validate(result.deployment_id, reconfigure, configs, deployment)
        except _DeploymentFailed as exc:
            self._finish(result, "FAILED", "FAILED_NO_STATE_CHANGE", exc.cause, exc.stack)
            return
        if to_stop and deployment.notify_components and self.config.flavor == CLASSIC:
            self._wait_for_deferrals(result.deployment_id, deployment.update_timeout_s)
        try:
            self._switch(to_stop, to_start, reconfigure, packages, configs)
            with self._lock:
                self.roots = set(roots)
            self._await_up(to_start)
        except _DeploymentFailed as failure:
            if deployment.failure_policy != "ROLLBACK":
                self._finish(result, "FAILED", "FAILED_ROLLBACK_NOT_REQUESTED", failure.cause, failure.stack)
                return
            log.warning("deployment %s failed (%s): rolling back", result.deployment_id, failure.cause)
            try:
                self._rollback(old, old_roots)
            except _DeploymentFailed as rollback:
                self._finish(result, "FAILED", "FAILED_UNABLE_TO_ROLLBACK", failure.cause,
                             [*failure.stack, f"rollback: {rollback.cause}"])
                return
            self._finish(result, "FAILED", "FAILED_ROLLBACK_COMPLETE", failure.cause, failure.stack)
            return
        if self.config.flavor == CLASSIC and deployment.notify_components:
            self.server.notify_component_update(result.deployment_id, post=True)
        self._finish(result, "SUCCEEDED", "SUCCESSFUL")

    def _switch(self, to_stop: Sequence[str], to_start: Sequence[str], reconfigure: Sequence[str],
                packages: Mapping[str, Package], configs: Mapping[str, dict[str, Any]]) -> None:
        for name in reversed(self._dependency_order(list(to_stop))):
            with self._lock:
                component = self.components.pop(name)
            component.stop()
            self.server.remove_component(name)
        for name in reconfigure:
            self._reconfigure(self.components[name], configs[name])
        for name in self._dependency_order(list(to_start), packages):
            component = Component(self, packages[name], configs[name])
            with self._lock:
                self.components[name] = component
            self._serve(component)
            component.launch()
            self._await_up([name], settle=False)

    def _reconfigure(self, component: Component, configuration: dict[str, Any]) -> None:
        """A running component's new configuration: its policies first, then one event per changed key."""
        with self._lock:
            component.configuration = configuration
        allow = publish_resources(configuration.get("accessControl"), self.config.thing_name)
        self.server.set_publish_allow(component.name, allow)
        self.server.set_configuration(configuration, component.name)

    def _serve(self, component: Component) -> None:
        allow = publish_resources(component.configuration.get("accessControl"), self.config.thing_name)
        self.server.add_component(component.name, component.svcuid, component.configuration, allow)

    def _await_up(self, names: Sequence[str], settle: bool = True, timeout_s: float = 1800.0) -> None:
        """Wait until each component is up (and stayed up settle_s); a BROKEN one fails the deployment."""
        deadline = time.monotonic() + timeout_s
        for name in names:
            component = self.components[name]
            up_since: float | None = None
            while True:
                state = component.state
                if state == "BROKEN":
                    raise _DeploymentFailed(f"{name} {component.version} is broken: {component.last_error}",
                                            [f"{name} {component.version}: {component.errors} errors; last: "
                                             f"{component.last_error}"])
                if state in UP:
                    # A finished startup step is up by definition; a run process must stay up settle_s.
                    if not settle or "run" not in component.package.lifecycle:
                        break
                    up_since = up_since or time.monotonic()
                    if time.monotonic() - up_since >= self.config.settle_s:
                        break
                else:
                    up_since = None
                if time.monotonic() > deadline:
                    raise _DeploymentFailed(f"{name} {component.version} did not start within {timeout_s}s")
                with self._changed:
                    self._changed.wait(0.1)

    def _rollback(self, old: Mapping[str, tuple[Package, dict[str, Any]]], old_roots: set[str]) -> None:
        with self._lock:
            current = {n: c.version for n, c in self.components.items()}
        to_stop = [n for n in current if n not in old or current[n] != old[n][0].version]
        to_start = [n for n in old if n not in current or current[n] != old[n][0].version]
        for name in reversed(self._dependency_order(to_stop)):
            with self._lock:
                component = self.components.pop(name)
            component.stop()
            self.server.remove_component(name)
        packages = {n: p for n, (p, _) in old.items()}
        for name in old:
            if name not in to_start and self.components[name].configuration != old[name][1]:
                self._reconfigure(self.components[name], old[name][1])
        for name in self._dependency_order(to_start, packages):
            component = Component(self, packages[name], old[name][1])
            with self._lock:
                self.components[name] = component
            self._serve(component)
            component.launch()
            self._await_up([name], settle=False)
        with self._lock:
            self.roots = set(old_roots)
        self._await_up(to_start)

    def _validate(self, deployment_id: str, names: Sequence[str], configs: Mapping[str, dict[str, Any]],
                  deployment: LocalDeployment) -> None:
        if self.config.flavor != CLASSIC:
            return  # Greengrass nucleus lite has no configuration validation
        for name in names:
            if not self.server.validates(name):
                continue
            try:
                report = self.server.propose_configuration(configs[name], deployment_id,
                                                           deployment.validation_timeout_s, component=name)
            except (TimeoutError, ConnectionError, LookupError) as exc:
                raise _DeploymentFailed(f"{name} did not validate the configuration: {exc}") from exc
            if report.get("status") != "ACCEPTED":
                raise _DeploymentFailed(f"{name} rejected the configuration: {report.get('message')}")

    def _wait_for_deferrals(self, deployment_id: str, timeout_s: float) -> None:
        """Tell subscribers an update is coming; wait while any defers, up to the policy's timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            subscribers = set(self.server.update_subscribers())
            if not subscribers:
                return
            seen = len(self.server.deferrals)
            self.server.notify_component_update(deployment_id)
            answers: dict[str, int] = {}
            answer_deadline = min(deadline, time.monotonic() + 5.0)
            while time.monotonic() < answer_deadline and set(answers) < subscribers:
                for deferral in self.server.deferrals[seen:]:
                    if deferral.deployment_id == deployment_id:
                        answers[deferral.component] = deferral.recheck_after_ms
                time.sleep(0.05)
            longest = max(answers.values(), default=0)
            if longest <= 0:
                return
            log.info("deployment %s deferred %d ms by %s", deployment_id, longest,
                     ", ".join(n for n, ms in answers.items() if ms))
            time.sleep(min(longest / 1000.0, max(0.0, deadline - time.monotonic())))
        log.warning("deployment %s: components still deferring after %.0fs; going ahead", deployment_id, timeout_s)

    def _configurations(self, packages: Mapping[str, Package], old: Mapping[str, tuple[Package, dict[str, Any]]],
                        deployment: LocalDeployment) -> dict[str, dict[str, Any]]:
        configs: dict[str, dict[str, Any]] = {}
        for name, package in packages.items():
            defaults = package.default_configuration(self.config.flavor)
            config = copy.deepcopy(old[name][1]) if name in old else copy.deepcopy(defaults)
            if name in old and old[name][0].version != package.version:
                config = _merge(defaults, config)  # new defaults, the device's settings kept
            for pointer in deployment.resets.get(name, []):
                config = _reset(config, defaults, pointer)
            if deployment.merges.get(name):
                config = _merge(config, deployment.merges[name])
            configs[name] = config
        return configs

    def _resolve(self, roots: Mapping[str, str], store: Path, installed: Mapping[str, str]) -> dict[str, Package]:
        """Every component to run: the roots at their versions, dependencies at the best version that fits."""
        available = self._available(store)
        chosen: dict[str, str] = dict(roots)
        requirements: dict[str, list[tuple[str, Requirement]]] = {}
        pending = list(roots)
        packages: dict[str, Package] = {}
        while pending:
            name = pending.pop()
            package = self._package(name, chosen[name], available)
            packages[name] = package
            for dep, spec in package.dependencies.items():
                requirement = Requirement.parse(str(spec.get("VersionRequirement", "*")))
                requirements.setdefault(dep, []).append((name, requirement))
                versions = sorted({v for (n, v) in available if n == dep}, key=Version.parse, reverse=True)
                fits = [v for v in versions if all(r.allows(v) for _, r in requirements[dep])]
                if dep in roots:
                    if not all(r.allows(roots[dep]) for _, r in requirements[dep]):
                        wanted = ", ".join(f"{n} needs {r.text}" for n, r in requirements[dep])
                        raise NucleusError(f"{dep} {roots[dep]} does not meet its dependents' requirements: {wanted}")
                    continue
                if not fits:
                    wanted = ", ".join(f"{n} needs {r.text}" for n, r in requirements[dep])
                    raise NucleusError(f"no version of {dep} in {store} meets {wanted} (have: {', '.join(versions)})")
                pick = installed[dep] if installed.get(dep) in fits else fits[0]
                if chosen.get(dep) != pick:
                    chosen[dep] = pick
                    pending.append(dep)
        return packages

    def _available(self, store: Path) -> dict[tuple[str, str], tuple[Path, dict[str, Any]]]:
        found: dict[tuple[str, str], tuple[Path, dict[str, Any]]] = {}
        for folder in (self.root / "packages" / "recipes", store / "recipes"):
            for path in sorted(folder.glob("*")) if folder.is_dir() else []:
                if path.suffix not in (".yaml", ".yml", ".json"):
                    continue
                try:
                    text = path.read_text(encoding="utf-8")
                    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
                except (OSError, ValueError, yaml.YAMLError) as exc:
                    log.warning("skipping the unreadable recipe %s: %s", path, exc)
                    continue
                if isinstance(data, dict) and data.get("ComponentName") and data.get("ComponentVersion"):
                    found[(str(data["ComponentName"]), str(data["ComponentVersion"]))] = (path, data)
        return found

    def _package(self, name: str, version: str,
                 available: Mapping[tuple[str, str], tuple[Path, dict[str, Any]]]) -> Package:
        if (name, version) not in available:
            raise NucleusError(f"no recipe for {name} {version} in the component layout")
        path, recipe = available[(name, version)]
        manifest, lifecycle = select_manifest(recipe, self.config.flavor)
        return Package(name, version, recipe, manifest, lifecycle, path.suffix != ".json")

    def _prepare(self, package: Package, store: Path) -> None:
        """Copy and verify the artifacts, unpack archives, keep the recipe (as a nucleus downloads them)."""
        paths = Paths(self.root, package.name, package.version)
        paths.artifacts.mkdir(parents=True, exist_ok=True)
        for artifact in package.manifest.get("Artifacts") or []:
            uri = str(artifact["URI"])
            file_name = uri.rstrip("/").rsplit("/", 1)[-1]
            target = paths.artifacts / file_name
            digest = artifact.get("Digest")
            if not (target.is_file() and digest and artifact_digest(target) == digest):
                source = store / "artifacts" / package.name / package.version / file_name
                if not source.is_file():
                    raise NucleusError(f"{package.name} {package.version}: artifact {file_name} is not in {store}")
                shutil.copyfile(source, target)
                if digest and artifact_digest(target) != digest:
                    target.unlink()
                    raise NucleusError(f"{package.name} {package.version}: artifact {file_name} does not match its "
                                       f"Digest {digest} (refused, as a nucleus refuses a corrupted download)")
            if str(artifact.get("Unarchive", "NONE")).upper() == "ZIP":
                folder = paths.unarchived / (file_name[:-4] if file_name.lower().endswith(".zip") else file_name)
                if folder.exists():
                    shutil.rmtree(folder)
                folder.mkdir(parents=True)
                _unzip(target, folder)
        suffix = "yaml" if package.yaml_recipe else "json"
        keep = self.root / "packages" / "recipes" / f"{package.name}-{package.version}.{suffix}"
        text = yaml.safe_dump(package.recipe, sort_keys=False) if package.yaml_recipe else json.dumps(package.recipe)
        keep.write_text(text, encoding="utf-8")

    def _dependency_order(self, names: Sequence[str], packages: Mapping[str, Package] | None = None) -> list[str]:
        """names with each component after the components it depends on."""
        with self._lock:
            known = {c.name: c.package for c in self.components.values()} | dict(packages or {})
        ordered: list[str] = []
        visiting: set[str] = set()

        def visit(name: str) -> None:
            if name in ordered or name in visiting:
                return
            visiting.add(name)
            for dep in known[name].dependencies if name in known else {}:
                if dep in names:
                    visit(dep)
            ordered.append(name)

        for name in sorted(names):
            visit(name)
        return ordered

    # -- IPC: the relay and greengrass-cli's local deployments ------------------------------------

    def _relay_publish(self, message: Any) -> None:
        if self.relay is not None:
            self.relay.submit(message)

    def _ipc_create_deployment(self, server: IpcServer, component: str, body: dict[str, Any]) -> dict[str, Any]:
        if component != CLI_COMPONENT:
            raise ModeledError("UnauthorizedError", f"{component} is not authorized to create local deployments")
        merges: dict[str, dict[str, Any]] = {}
        resets: dict[str, list[str]] = {}
        for name, update in (body.get("componentToConfiguration") or {}).items():
            if isinstance(update, dict):
                merges[name] = dict(update.get("MERGE") or {})
                resets[name] = list(update.get("RESET") or [])
        store = body.get("recipeDirectoryPath")
        deployment = LocalDeployment(components=dict(body.get("rootComponentVersionsToAdd") or {}),
                                     remove=list(body.get("rootComponentsToRemove") or []), merges=merges,
                                     resets=resets, failure_policy=str(body.get("failureHandlingPolicy") or "ROLLBACK"),
                                     store=Path(store).parent if store else None)
        return {"deploymentId": self.deploy(deployment).deployment_id}

    def _ipc_deployment_status(self, server: IpcServer, component: str, body: dict[str, Any]) -> dict[str, Any]:
        if component != CLI_COMPONENT:
            raise ModeledError("UnauthorizedError", f"{component} is not authorized to read local deployments")
        result = self.result(str(body.get("deploymentId", "")))
        if result is None:
            raise ModeledError("ResourceNotFoundError", f"no deployment {body.get('deploymentId')!r}")
        return {"deployment": result.as_status()}

    # -- state.json ------------------------------------------------------------------------------

    def _state_changed(self) -> None:
        with self._changed:
            self._changed.notify_all()
        self._write_state()

    def _write_state(self) -> None:
        # Snapshot and write under one lock: a writer that took its snapshot earlier can never
        # replace the file after one that took a later snapshot.
        with self._state_lock, self._lock:
            self._write_state_locked()

    def _write_state_locked(self) -> None:
        with self._lock:
            state = {
                "flavor": self.config.flavor,
                "thing_name": self.config.thing_name,
                "roots": {n: self.components[n].version for n in sorted(self.roots) if n in self.components},
                "components": self.status(),
                "configurations": {n: c.configuration for n, c in self.components.items()},
                "deployments": [self._deployments[d].as_status() for d in self._order if d in self._deployments],
            }
        path = self.root / "state.json"
        with contextlib.suppress(OSError):
            tmp = path.with_name(".state.json.tmp")
            tmp.write_text(json.dumps(state, indent=2, default=str))
            tmp.replace(path)

    def _read_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads((self.root / "state.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict) or not state.get("roots"):
            return None
        return state


@dataclass(frozen=True)
class DeploymentHandle:
    nucleus: LocalNucleus
    deployment_id: str

    def wait(self, timeout_s: float) -> DeploymentResult:
        return self.nucleus.wait(self.deployment_id, timeout_s)


def _merge(base: Mapping[str, Any], change: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in change.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _reset(config: dict[str, Any], defaults: Mapping[str, Any], pointer: str) -> dict[str, Any]:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.strip("/").split("/") if p]
    if not parts:
        return copy.deepcopy(dict(defaults))
    result = copy.deepcopy(config)
    node, default_node = result, defaults
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        default_node = default_node.get(part, {}) if isinstance(default_node, Mapping) else {}
    if isinstance(default_node, Mapping) and parts[-1] in default_node:
        node[parts[-1]] = copy.deepcopy(default_node[parts[-1]])
    else:
        node.pop(parts[-1], None)
    return result


def _unzip(archive: Path, folder: Path) -> None:
    root = folder.resolve()
    with zipfile.ZipFile(archive) as source:
        for member in source.namelist():
            if not (root / member).resolve().is_relative_to(root):
                raise NucleusError(f"{archive}: member {member!r} would unpack outside {folder}")
        source.extractall(root)


# -------------------------------------------------------------------- a running nucleus, through its IPC


def deploy_to_running(root: Path, deployment: LocalDeployment, timeout_s: float = 600.0,
                      poll_s: float = 0.5) -> DeploymentResult:
    """Deploy to a nucleus started by ``qcsight gg run-local`` on root, over its IPC socket.

    Speaks greengrass-cli's operations (CreateLocalDeployment, GetLocalDeploymentStatus) with the
    unmodified awsiotsdk client and the token the nucleus wrote to ``<root>/cli/token``.

    Raises:
        NucleusError: no nucleus runs on root, or it refused the deployment.
        TimeoutError: the deployment did not finish within timeout_s.
    """
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

    from qcsight_edge.errors import GreengrassError
    from qcsight_edge.greengrass_ipc import connect_ipc

    try:
        token = json.loads((root / "cli" / "token").read_text())
    except (OSError, ValueError) as exc:
        raise NucleusError(f"no local nucleus runs on {root} ({root / 'cli' / 'token'}: {exc}); start one with "
                           "qcsight gg run-local") from exc
    try:
        session = connect_ipc(10.0, environ={"AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT": token["socket"],
                                             "SVCUID": token["svcuid"]})
    except GreengrassError as exc:
        raise NucleusError(f"cannot reach the local nucleus on {root}: {exc}") from exc
    client: GreengrassCoreIPCClientV2 = session.client
    try:
        configuration = {name: {"MERGE": deployment.merges.get(name) or {}, "RESET": deployment.resets.get(name) or []}
                         for name in set(deployment.merges) | set(deployment.resets)}
        store = deployment.store
        response = client.create_local_deployment(
            root_component_versions_to_add=dict(deployment.components),
            root_components_to_remove=list(deployment.remove), component_to_configuration=configuration or None,
            recipe_directory_path=str(store / "recipes") if store else None,
            artifacts_directory_path=str(store / "artifacts") if store else None,
            failure_handling_policy=deployment.failure_policy)
        deployment_id = str(response.deployment_id)
        deadline = time.monotonic() + timeout_s
        while True:
            status = client.get_local_deployment_status(deployment_id=deployment_id).deployment
            if status.status in ("SUCCEEDED", "FAILED"):
                details = status.deployment_status_details
                return DeploymentResult(deployment_id, str(status.created_on), str(status.status),
                                        str(details.detailed_deployment_status or ""),
                                        str(details.deployment_failure_cause or ""),
                                        list(details.deployment_error_stack or []))
            if time.monotonic() > deadline:
                raise TimeoutError(f"deployment {deployment_id} did not finish within {timeout_s}s ({status.status})")
            time.sleep(poll_s)
    except (TimeoutError, NucleusError):
        raise
    except Exception as exc:
        raise NucleusError(f"the local nucleus refused the deployment: {getattr(exc, 'message', None) or exc}") from exc
    finally:
        session.close(5.0)
