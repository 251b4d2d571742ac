"""Recipe validation before anything is published: the recipe format (a JSON Schema), then the rules both nuclei need.

The schema is written from the Greengrass developer guide's component recipe reference
(https://docs.aws.amazon.com/greengrass/v2/developerguide/component-recipe-reference.html): the
top-level keys, ComponentDependencies (VersionRequirement, DependencyType HARD|SOFT), Manifests
(Platform os/architecture/runtime, Lifecycle, Selections, Artifacts with URI, Digest, Algorithm,
Unarchive NONE|ZIP, Permission Read/Execute NONE|OWNER|ALL), and the lifecycle phases (setenv,
bootstrap, install, startup, run, shutdown, recover; each a script or an object with Script,
RequiresPrivilege, Skipif, Timeout, Setenv). Keys are matched exactly: the Java nucleus reads its
configuration case-insensitively (aws-greengrass-nucleus ``config/CaseInsensitiveString.java``), but
Greengrass nucleus lite reads every recipe key case-sensitively and lifecycle phases in lowercase
only (aws-greengrass-lite ``docs/RECIPE_SUPPORT_CHANGES.md``; ``modules/recipe2unit/src/
unit_file_generator.c`` looks up "install", "startup", "run"), so ``Run:`` loads on one and is
silently skipped by the other.

The semantic rules (each problem names the recipe, the field and what is allowed):

* portability: a manifest with ``Platform.runtime: "*"`` (Lite skips a manifest without one:
  ``modules/recipe/src/recipe.c``, ``manifest_selection``) beside a classic manifest without it,
  and every manifest with at least one lifecycle phase (Lite refuses an empty lifecycle);
* placeholders resolve: in lifecycle scripts and Setenv only the variables both nuclei expand
  (``iot:thingName``, ``work:path``, ``artifacts:path``, ``artifacts:decompressedPath``,
  ``kernel:rootPath``, ``configuration:/pointer`` to a key that exists); Lite reads every ``{`` of a
  script as a variable (``modules/recipe-runner/src/runner.c``, ``handle_escape``) and resolves no
  other component's variables (``substitute_escape``); none at all inside DefaultConfiguration
  outside accessControl (neither nucleus interpolates configuration by default);
* accessControl: PublishToIoTCore resources stay under ``qcsight/{iot:thingName}/``;
* dependencies: every VersionRequirement parses, can be met, and is met by the version being
  built alongside;
* artifacts: an archive to unpack ends in ``.zip`` (Lite names the folder after it), and with a
  component layout every artifact's file exists and matches its Digest;
* a component's own rules on its DefaultConfiguration (the agent's configuration validator).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from qcsight_gg.archive import artifact_digest
from qcsight_gg.errors import RecipeError
from qcsight_gg.semver import Requirement, Version, VersionError

PHASES = ("bootstrap", "install", "startup", "run", "shutdown", "recover")
PORTABLE_VARIABLES = ("iot:thingName", "work:path", "artifacts:path", "artifacts:decompressedPath", "kernel:rootPath")
TOPIC_PREFIX = "qcsight/{iot:thingName}/"
PUBLISH_TO_IOT_CORE = "aws.greengrass#PublishToIoTCore"

_ACCESS = {"type": "string", "enum": ["NONE", "OWNER", "ALL"]}
_SEMVER = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$"
_TEXT_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_STEP = {
    "oneOf": [
        {"type": "string"},
        {
            "type": "object",
            "properties": {
                "Script": {"type": "string"},
                "RequiresPrivilege": {"type": ["boolean", "string"], "enum": [True, False, "true", "false"]},
                "Skipif": {"type": "string", "pattern": r"^(onpath|exists) \S.*$"},
                "Timeout": {"type": ["integer", "string"], "minimum": 0,
                            "pattern": r"^(\d+|\{configuration:/[^{}]+\})$"},
                "Setenv": _TEXT_MAP,
            },
            "required": ["Script"],
            "additionalProperties": False,
        },
    ]
}
_LIFECYCLE = {
    "type": "object",
    "properties": {"Setenv": _TEXT_MAP, **{phase: _STEP for phase in PHASES}},
    "additionalProperties": False,
}
RECIPE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "AWS IoT Greengrass component recipe (RecipeFormatVersion 2020-01-25)",
    "type": "object",
    "required": ["RecipeFormatVersion", "ComponentName", "ComponentVersion"],
    "additionalProperties": False,
    "properties": {
        "RecipeFormatVersion": {"type": "string", "enum": ["2020-01-25"]},
        "ComponentName": {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"},
        "ComponentVersion": {"type": "string", "pattern": _SEMVER},
        "ComponentDescription": {"type": "string"},
        "ComponentPublisher": {"type": "string"},
        "ComponentType": {"type": "string", "enum": ["aws.greengrass.generic", "aws.greengrass.lambda",
                                                      "aws.greengrass.plugin", "aws.greengrass.nucleus"]},
        "ComponentSource": {"type": "string"},
        "ComponentConfiguration": {
            "type": "object",
            "properties": {"DefaultConfiguration": {"type": "object"}},
            "additionalProperties": False,
        },
        "ComponentDependencies": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "properties": {"VersionRequirement": {"type": "string", "minLength": 1},
                               "DependencyType": {"type": "string", "enum": ["HARD", "SOFT"]}},
                "required": ["VersionRequirement"],
                "additionalProperties": False,
            },
        },
        "Manifests": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "Name": {"type": "string"},
                    "Platform": {
                        "type": "object",
                        "properties": {
                            "os": {"type": "string"},
                            "architecture": {"type": "string"},
                            "architecture.detail": {"type": "string"},
                            "runtime": {"type": "string", "enum": ["aws_nucleus_classic", "aws_nucleus_lite", "*"]},
                        },
                        "additionalProperties": {"type": "string"},
                    },
                    "Lifecycle": _LIFECYCLE,
                    "Selections": {"type": "array", "items": {"type": "string"}},
                    "Artifacts": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "URI": {"type": "string", "pattern": r"^(s3://[a-z0-9.-]{3,63}/.+|docker:.+|greengrass:.+)$"},
                                "Digest": {"type": "string", "pattern": r"^[A-Za-z0-9+/]{43}=$"},
                                "Algorithm": {"type": "string", "enum": ["SHA-256"]},
                                "Unarchive": {"type": "string", "enum": ["NONE", "ZIP"]},
                                "Permission": {"type": "object", "properties": {"Read": _ACCESS, "Execute": _ACCESS},
                                               "additionalProperties": False},
                            },
                            "required": ["URI"],
                            "additionalProperties": False,
                        },
                    },
                },
                "required": ["Platform"],
                "additionalProperties": False,
            },
        },
        "Lifecycle": {"type": "object", "additionalProperties": _LIFECYCLE},
    },
}


@dataclass(frozen=True)
class ComponentRecipe:
    """A parsed recipe and where it came from."""

    data: dict[str, Any]
    path: Path | None = None

    @property
    def name(self) -> str:
        return str(self.data.get("ComponentName", "?"))

    @property
    def version(self) -> str:
        return str(self.data.get("ComponentVersion", "?"))

    @property
    def ident(self) -> str:
        return f"{self.name}-{self.version}"


def load_recipe(path: Path) -> ComponentRecipe:
    """Read a YAML or JSON recipe file.

    Raises:
        RecipeError: unreadable, not YAML/JSON, or not a mapping.
    """
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise RecipeError([f"{path}: cannot read the recipe: {exc}"]) from exc
    if not isinstance(data, dict):
        raise RecipeError([f"{path}: a recipe is a mapping of keys, got {type(data).__name__}"])
    return ComponentRecipe(data, path)


def layout_recipes(layout: Path) -> list[ComponentRecipe]:
    """Every recipe in a component layout's recipes/ folder, sorted by file name."""
    folder = layout / "recipes"
    paths = sorted(p for p in folder.glob("*") if p.suffix in (".yaml", ".yml", ".json")) if folder.is_dir() else []
    return [load_recipe(p) for p in paths]


def artifact_file(layout: Path, recipe: ComponentRecipe, uri: str) -> Path:
    """Where a component layout keeps an artifact: artifacts/<name>/<version>/<file name of the URI>."""
    return layout / "artifacts" / recipe.name / recipe.version / uri.rstrip("/").rsplit("/", 1)[-1]


# -------------------------------------------------------------------- checking

ConfigCheck = Callable[[dict[str, Any]], None]


def validate(recipes: Sequence[ComponentRecipe], layout: Path | None = None,
             config_checks: Mapping[str, ConfigCheck] | None = None) -> list[str]:
    """Every problem in a set of recipes (empty when they may be published).

    Args:
        recipes: the recipes published together (dependency versions are checked against each other).
        layout: the component layout holding their artifacts; artifact files and digests are
            checked when given.
        config_checks: per component name, a check of its DefaultConfiguration that raises
            QcsightError naming the field (the agent's own validator for com.qcsight.EdgeAgent).
    """
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(RECIPE_SCHEMA)
    versions: dict[str, list[str]] = {}
    for r in recipes:
        versions.setdefault(r.name, []).append(r.version)
    problems: list[str] = []
    for recipe in recipes:
        schema_errors = sorted(validator.iter_errors(recipe.data), key=lambda e: list(e.absolute_path))
        problems += [f"{recipe.ident}: {_field(e.absolute_path)}: {_schema_message(e)}" for e in schema_errors]
        if schema_errors:
            continue  # the semantic rules assume the format
        problems += [f"{recipe.ident}: {p}" for p in _semantic(recipe, versions, layout, config_checks or {})]
    return problems


def check(recipes: Sequence[ComponentRecipe], layout: Path | None = None,
          config_checks: Mapping[str, ConfigCheck] | None = None) -> None:
    """Raises RecipeError listing every problem of validate()."""
    problems = validate(recipes, layout, config_checks)
    if problems:
        raise RecipeError(problems)


def _field(path: Iterable[Any]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(recipe)"


def _schema_message(error: Any) -> str:
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        hint = ""
        lowered = [k for k in extra if k.lower() in allowed and k not in allowed]
        if lowered:
            hint = (f"; keys are case-sensitive on Greengrass nucleus lite and lifecycle phases are lowercase: "
                    f"use {', '.join(repr(k.lower()) for k in lowered)}")
        return f"unknown key(s) {', '.join(map(repr, extra))}; allowed: {', '.join(allowed)}{hint}"
    if error.validator == "enum":
        return f"{error.instance!r} is not one of {', '.join(map(repr, error.validator_value))}"
    if error.validator == "pattern":
        return f"{error.instance!r} does not match {error.validator_value}"
    if error.validator == "oneOf":
        return f"{error.instance!r} is neither a script (text) nor an object with Script, Timeout, Setenv, " \
               "RequiresPrivilege, Skipif"
    return str(error.message)


def _semantic(recipe: ComponentRecipe, versions: Mapping[str, Sequence[str]], layout: Path | None,
              config_checks: Mapping[str, ConfigCheck]) -> list[str]:
    data = recipe.data
    defaults = (data.get("ComponentConfiguration") or {}).get("DefaultConfiguration") or {}
    problems: list[str] = []
    manifests = data.get("Manifests") or []
    runtimes = [(m.get("Platform") or {}).get("runtime") for m in manifests]
    if not any(r in ("*", "aws_nucleus_lite") for r in runtimes):
        problems.append("Manifests: no manifest has Platform.runtime \"*\" (or aws_nucleus_lite): Greengrass nucleus "
                        "lite skips every manifest without it")
    if not any(r is None or r in ("*", "aws_nucleus_classic") for r in runtimes):
        problems.append("Manifests: no manifest for the Java nucleus (Platform without runtime, or runtime \"*\")")
    for i, manifest in enumerate(manifests):
        where = f"Manifests[{i}]"
        lifecycle = manifest.get("Lifecycle") or {}
        if not any(phase in lifecycle for phase in PHASES) and not manifest.get("Selections"):
            problems.append(f"{where}.Lifecycle: no lifecycle phase ({', '.join(PHASES)}): Greengrass nucleus lite "
                            "refuses a component without one")
        problems += _lifecycle_placeholders(f"{where}.Lifecycle", lifecycle, defaults)
        problems += _artifacts(recipe, f"{where}.Artifacts", manifest.get("Artifacts") or [], layout)
    for key, value in (data.get("Lifecycle") or {}).items():
        problems += _lifecycle_placeholders(f"Lifecycle.{key}", value, defaults)
    problems += _configuration_placeholders(defaults)
    problems += _access_control(defaults.get("accessControl"))
    problems += _dependencies(data.get("ComponentDependencies") or {}, versions)
    check_config = config_checks.get(recipe.name)
    if check_config is not None:
        from qcsight_core.errors import QcsightError

        try:
            check_config(dict(defaults))
        except QcsightError as exc:
            problems.append(f"ComponentConfiguration.DefaultConfiguration: the component refuses it: {exc}")
    return problems


_BRACES = re.compile(r"\{([^{}]*)\}")


def script_placeholders(text: str) -> tuple[list[str], str | None]:
    """The ``{...}`` variables of a script, and the first stray brace (as Lite reads it), if any."""
    names = _BRACES.findall(text)
    rest = _BRACES.sub("", text)
    stray = next((c for c in rest if c in "{}"), None)
    return names, stray


def _lifecycle_placeholders(where: str, lifecycle: Any, defaults: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    texts: list[tuple[str, str]] = []
    if isinstance(lifecycle, Mapping):
        for key, value in lifecycle.items():
            if key == "Setenv" and isinstance(value, Mapping):
                texts += [(f"{where}.Setenv.{k}", str(v)) for k, v in value.items()]
            elif isinstance(value, str):
                texts.append((f"{where}.{key}", value))
            elif isinstance(value, Mapping):
                texts.append((f"{where}.{key}.Script", str(value.get("Script", ""))))
                texts += [(f"{where}.{key}.Setenv.{k}", str(v)) for k, v in (value.get("Setenv") or {}).items()]
    for field, text in texts:
        names, stray = script_placeholders(text)
        if stray is not None:
            problems.append(f"{field}: a stray {stray!r}: Greengrass nucleus lite reads every '{{' of a script as "
                            "the start of a recipe variable, up to the next '}}'")
        for name in names:
            problem = _variable_problem(name, defaults)
            if problem:
                problems.append(f"{field}: {{{name}}} {problem}")
    return problems


def _variable_problem(name: str, defaults: Mapping[str, Any]) -> str | None:
    if name in PORTABLE_VARIABLES:
        return None
    if name.startswith("configuration:"):
        pointer = name[len("configuration:"):]
        node: Any = defaults
        for part in pointer.strip("/").split("/") if pointer.strip("/") else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, Mapping) or part not in node:
                return f"names {pointer!r}, which DefaultConfiguration does not have"
            node = node[part]
        return None
    parts = name.split(":")
    if len(parts) == 1:
        return ("is read as a recipe variable by Greengrass nucleus lite, which then fails the script "
                "(write $VAR, not ${VAR})")
    if len(parts) == 3:
        return ("names another component's variable: only the Java nucleus resolves those (Greengrass nucleus lite "
                "fails the script)")
    return f"is not a recipe variable both nuclei resolve ({', '.join(PORTABLE_VARIABLES)}, configuration:/pointer)"


def _configuration_placeholders(defaults: Mapping[str, Any], path: str = "") -> list[str]:
    problems: list[str] = []
    for key, value in defaults.items():
        if not path and key == "accessControl":
            continue  # both nuclei resolve {iot:thingName} inside authorisation policies
        field = f"{path}.{key}" if path else str(key)
        if isinstance(value, Mapping):
            problems += _configuration_placeholders(value, field)
        elif isinstance(value, str) and _BRACES.search(value):
            problems.append(f"ComponentConfiguration.DefaultConfiguration.{field}: {value!r} holds a recipe variable, "
                            "which neither nucleus interpolates in configuration by default (Lite never does): pass "
                            "it through the lifecycle script")
    return problems


def _access_control(access: Any) -> list[str]:
    if access is None:
        return []
    where = "ComponentConfiguration.DefaultConfiguration.accessControl"
    if not isinstance(access, Mapping):
        return [f"{where}: a mapping of IPC services to policies"]
    problems: list[str] = []
    for service, policies in access.items():
        if not isinstance(policies, Mapping):
            problems.append(f"{where}.{service}: a mapping of policy ids to policies")
            continue
        for policy_id, policy in policies.items():
            field = f"{where}.{service}.{policy_id}"
            if not isinstance(policy, Mapping) or not policy.get("operations") or not policy.get("resources"):
                problems.append(f"{field}: a policy needs operations and resources")
                continue
            if service != "aws.greengrass.ipc.mqttproxy":
                continue
            for resource in policy["resources"]:
                if not str(resource).startswith(TOPIC_PREFIX) or str(resource) == TOPIC_PREFIX:
                    problems.append(f"{field}.resources: {resource!r} is outside {TOPIC_PREFIX} (a device publishes "
                                    "only under its own thing name)")
    return problems


def _dependencies(dependencies: Mapping[str, Any], versions: Mapping[str, Sequence[str]]) -> list[str]:
    problems: list[str] = []
    for name, dependency in dependencies.items():
        field = f"ComponentDependencies.{name}.VersionRequirement"
        text = str(dependency.get("VersionRequirement", ""))
        try:
            requirement = Requirement.parse(text)
        except VersionError as exc:
            problems.append(f"{field}: {exc}")
            continue
        if not requirement.satisfiable:
            problems.append(f"{field}: {text!r} can never be met")
        elif name in versions and not any(requirement.allows(Version.parse(v)) for v in versions[name]):
            problems.append(f"{field}: {text!r} excludes {name} {', '.join(versions[name])}, published with it")
    return problems


def _artifacts(recipe: ComponentRecipe, where: str, artifacts: Sequence[Mapping[str, Any]],
               layout: Path | None) -> list[str]:
    problems: list[str] = []
    for i, artifact in enumerate(artifacts):
        field = f"{where}[{i}]"
        uri = str(artifact.get("URI", ""))
        if artifact.get("Unarchive") == "ZIP" and not uri.lower().endswith(".zip"):
            problems.append(f"{field}.URI: {uri!r} is unarchived as ZIP but does not end in .zip (Greengrass nucleus "
                            "lite names the unpacked folder after the file without .zip)")
        if layout is None or not uri.startswith("s3://"):
            continue
        if "Digest" not in artifact:
            problems.append(f"{field}.Digest: missing: the nucleus verifies each download against it")
            continue
        path = artifact_file(layout, recipe, uri)
        if not path.is_file():
            problems.append(f"{field}.URI: no file {path} in the component layout")
        elif artifact_digest(path) != artifact["Digest"]:
            problems.append(f"{field}.Digest: {artifact['Digest']!r} is not the SHA-256 of {path} "
                            f"({artifact_digest(path)!r})")
    return problems
