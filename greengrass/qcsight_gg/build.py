"""Build the component layout: com.qcsight.EdgeAgent (a hashed wheelhouse) and com.qcsight.Model (a bundle).

Writes, with no AWS call, the layout both ``greengrass-cli deployment create --recipeDir
--artifactDir``, ``qcsight gg run-local`` and ``qcsight gg publish`` read::

    OUT/recipes/com.qcsight.EdgeAgent-<version>.yaml
    OUT/artifacts/com.qcsight.EdgeAgent/<version>/wheelhouse.zip
    OUT/recipes/com.qcsight.Model-<version>.yaml
    OUT/artifacts/com.qcsight.Model/<version>/bundle.zip
    OUT/artifacts/com.qcsight.Model/<version>/offer_model.sh

The agent's wheelhouse holds our own wheel, built from the source tree, and every wheel of the
``edge`` extra for the device's CPython and platform (``pip download --only-binary=:all:
--python-version --platform``), a ``requirements.lock`` pinning each with its sha256, and the
install script the recipe runs. The model component's version comes from the bundle manifest's
model version (``3`` -> ``3.0.0``); the bundle is verified before it is packed and the packed ZIP is
verified again as the nucleus will unpack it.

Reproducible: zip entries are sorted with one timestamp (SOURCE_DATE_EPOCH, else 1980-01-01), our
wheel is normalised the same way, so the same source, bundle and downloaded wheels give the same
Digests. Every recipe written is validated (qcsight_gg.recipes) against the layout.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qcsight_gg.archive import artifact_digest, normalise_zip, sha256_file, source_date_epoch, write_zip
from qcsight_gg.errors import BuildError
from qcsight_gg.recipes import ComponentRecipe, check, layout_recipes
from qcsight_gg.semver import Version, VersionError

log = logging.getLogger(__name__)

AGENT = "com.qcsight.EdgeAgent"
MODEL = "com.qcsight.Model"
WHEELHOUSE = "wheelhouse.zip"
BUNDLE_ZIP = "bundle.zip"
OFFER_SCRIPT = "offer_model.sh"
LOCK = "requirements.lock"
INSTALLER_SUMS = "installer.sha256"
VERSION_TOKEN = "@COMPONENT_VERSION@"
DEFAULT_ARTIFACT_BASE = "s3://replace-with-bucket/qcsight"
# Greengrass's names for the CPU architectures pip's platform tags spell out.
ARCHITECTURES = {"x86_64": "amd64", "aarch64": "aarch64", "armv7l": "arm", "i686": "x86"}
_WHEEL_NAME = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


@dataclass(frozen=True)
class DeviceTarget:
    """The device a wheelhouse is for.

    Attributes:
        python_version: the device's CPython, MAJOR.MINOR.
        platforms: pip platform tags the device accepts, best first (e.g. manylinux_2_28_x86_64).
    """

    python_version: str
    platforms: tuple[str, ...]

    @classmethod
    def this_machine(cls) -> DeviceTarget:
        machine = platform.machine()
        return cls(f"{sys.version_info.major}.{sys.version_info.minor}",
                   (f"manylinux_2_28_{machine}", f"manylinux2014_{machine}"))

    @property
    def architecture(self) -> str:
        """Greengrass's Platform.architecture for these platform tags.

        Raises:
            BuildError: the tags name no single architecture Greengrass knows.
        """
        arches = {ARCHITECTURES.get(arch) for tag in self.platforms for arch in ARCHITECTURES if tag.endswith(arch)}
        if len(arches) != 1 or None in arches:
            known = ", ".join(ARCHITECTURES)
            raise BuildError(f"platform tags {', '.join(self.platforms)} must name one of {known} "
                             f"(Greengrass architectures {', '.join(ARCHITECTURES.values())})")
        (arch,) = arches
        assert arch is not None
        return arch


@dataclass
class Built:
    """What one build wrote."""

    recipe: Path
    artifacts: list[Path] = field(default_factory=list)

    def describe(self) -> str:
        sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB {artifact_digest(p)}" for p in self.artifacts)
        return f"{self.recipe} ({sizes})"


# -------------------------------------------------------------------- the source tree


def find_source(start: Path | None = None) -> Path:
    """The qcsight source tree: the folder holding pyproject.toml with name "qcsight", from start upwards.

    Raises:
        BuildError: not inside a qcsight checkout (pass --source).
    """
    candidates = [start] if start is not None else [Path.cwd(), Path(__file__).resolve().parents[2]]
    for first in candidates:
        for folder in [first.resolve(), *first.resolve().parents]:
            pyproject = folder / "pyproject.toml"
            if pyproject.is_file() and re.search(r'^name = "qcsight"$', pyproject.read_text(encoding="utf-8"), re.M):
                return folder
    raise BuildError(f"no qcsight source tree (pyproject.toml with name = \"qcsight\") at or above "
                     f"{', '.join(str(c) for c in candidates)}; pass --source")


def project_version(source: Path) -> str:
    match = re.search(r'^version = "([^"]+)"$', (source / "pyproject.toml").read_text(encoding="utf-8"), re.M)
    if match is None:
        raise BuildError(f"{source / 'pyproject.toml'} has no version")
    return match.group(1)


def _template(source: Path, name: str) -> dict[str, Any]:
    path = source / "greengrass" / "recipes" / f"{name}.yaml"
    try:
        data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise BuildError(f"cannot read the recipe template {path}: {exc}") from exc
    return data


def _replace_token(value: Any, token: str, text: str) -> Any:
    if isinstance(value, dict):
        return {k: _replace_token(v, token, text) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_token(v, token, text) for v in value]
    return value.replace(token, text) if isinstance(value, str) else value


class NoAliasDumper(yaml.SafeDumper):
    """The same manifest twice stays written out twice: no &anchors for another parser to resolve."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def write_recipe(recipe: dict[str, Any], out: Path, header: str) -> Path:
    path = out / "recipes" / f"{recipe['ComponentName']}-{recipe['ComponentVersion']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.dump(recipe, Dumper=NoAliasDumper, sort_keys=False, allow_unicode=True, width=110)
    path.write_text(f"# {header}; do not edit.\n" + text, encoding="utf-8")
    return path


def _fill_artifacts(recipe: dict[str, Any], artifact_base: str, files: dict[str, Path],
                    architecture: str | None = None) -> None:
    """Point each manifest's artifacts at the built files (matched by file name) with their Digest."""
    name, version = recipe["ComponentName"], recipe["ComponentVersion"]
    digests = {file_name: artifact_digest(path) for file_name, path in files.items()}
    for manifest in recipe["Manifests"]:
        if architecture is not None:
            manifest["Platform"]["architecture"] = architecture
        for artifact in manifest.get("Artifacts") or []:
            file_name = str(artifact["URI"]).rsplit("/", 1)[-1]
            if file_name not in files:
                raise BuildError(f"{name} template names an artifact {file_name!r} the build does not make")
            artifact["URI"] = f"{artifact_base.rstrip('/')}/{name}/{version}/{file_name}"
            artifact["Digest"] = digests[file_name]
            artifact["Algorithm"] = "SHA-256"


# -------------------------------------------------------------------- the agent


def build_own_wheel(source: Path, dest: Path) -> Path:
    """Our wheel, built from a copy of the source tree and normalised to reproducible bytes.

    Raises:
        BuildError: the build failed (pip's output is in the message).
    """
    with tempfile.TemporaryDirectory(prefix="qcsight-wheel-") as tmp:
        src = Path(tmp) / "src"
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".*")
        src.mkdir()
        for item in ("pyproject.toml", "README.md"):
            shutil.copy2(source / item, src / item)
        for root in ("edge_agent", "batch", "training", "infra", "greengrass"):
            if (source / root).is_dir():
                shutil.copytree(source / root, src / root, ignore=ignore)
        dist = Path(tmp) / "dist"
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(source_date_epoch())}
        _pip(["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(dist), str(src)], env, "build our wheel")
        (wheel,) = dist.glob("qcsight-*.whl")
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / wheel.name
        shutil.copy2(wheel, target)
    normalise_zip(target)
    return target


def _pip(args: Sequence[str], env: dict[str, str], what: str) -> None:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    log.info("%s: %s", what, " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False, timeout=1800)
    if result.returncode != 0:
        raise BuildError(f"pip could not {what} (exit {result.returncode}):\n{result.stderr[-3000:]}")


def pip_environment(wheels: Path | None) -> dict[str, str]:
    """The environment pip runs in: this one, or, when the wheels come from a folder, one that adds no source.

    ``--no-index --find-links FOLDER`` alone does not mean "from FOLDER only": pip appends the
    command line's find-links to those of pip.conf and PIP_FIND_LINKS, and keeps their constraints.
    A machine whose configuration lists a wheel folder (a mirror, a build cache) would then build a
    wheelhouse from it, and the same source would give other bytes on another machine. So no pip
    configuration file (PIP_CONFIG_FILE=/dev/null, pip's documented switch) and no PIP_* variable.
    """
    if wheels is None:
        return dict(os.environ)
    env = {name: value for name, value in os.environ.items() if not name.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def download_wheels(own_wheel: Path, dest: Path, target: DeviceTarget, wheels: Path | None = None) -> None:
    """Every wheel the edge extra needs on the device, into dest.

    Args:
        wheels: take them from this folder only (no index): a previous wheelhouse, or a mirror.

    Raises:
        BuildError: a dependency has no wheel for the device (pip's reason is in the message).
    """
    abi = "cp" + target.python_version.replace(".", "")
    args = ["download", "--dest", str(dest), "--only-binary=:all:", "--python-version", target.python_version,
            "--implementation", "cp", "--abi", abi]
    for tag in target.platforms:
        args += ["--platform", tag]
    if wheels is not None:
        args += ["--no-index", "--find-links", str(wheels)]
    args.append(f"{own_wheel}[edge]")
    _pip(args, pip_environment(wheels), f"download the edge wheels for CPython {target.python_version} "
         f"{', '.join(target.platforms)}")


def download_installer(dest: Path, wheels: Path | None = None) -> Path:
    """pip's own wheel, the installer install.sh runs from the wheelhouse; its sha256 goes to installer.sha256.

    The device's venv is made without pip (``venv --without-pip``): ensurepip costs seconds of CPU
    per install (27 s on this shared 2-core machine) and is missing where Debian's python3-venv is
    not installed. pip runs from its wheel instead, as pip documents for bootstrapping.

    Raises:
        BuildError: pip's wheel cannot be downloaded.
    """
    from importlib.metadata import version as installed_version

    pip_version = installed_version("pip")
    args = ["download", "--dest", str(dest), "--only-binary=:all:", "--no-deps", f"pip=={pip_version}"]
    if wheels is not None:
        args += ["--no-index", "--find-links", str(wheels)]
    _pip(args, pip_environment(wheels), f"download pip {pip_version} (the installer)")
    (wheel,) = dest.glob(f"pip-{pip_version}-*.whl")
    (dest / INSTALLER_SUMS).write_text(f"{sha256_file(wheel).hex()}  {wheel.name}\n", encoding="utf-8")
    return wheel


def write_lock(wheelhouse: Path, target: DeviceTarget) -> Path:
    """requirements.lock: every wheel pinned by version and sha256, sorted by name (pip, the installer, apart)."""
    lines = [f"# qcsight edge agent wheelhouse for CPython {target.python_version} on {', '.join(target.platforms)}.",
             "# Installed by install.sh: pip install --no-index --find-links . --require-hashes -r requirements.lock"]
    for wheel in sorted(wheelhouse.glob("*.whl"), key=lambda p: p.name.lower()):
        if wheel.name.startswith("pip-"):
            continue
        match = _WHEEL_NAME.match(wheel.name)
        if match is None:
            raise BuildError(f"{wheel.name} is not a wheel file name")
        name = match.group("name").replace("_", "-").lower()
        lines.append(f"{name}=={match.group('version')} \\\n    --hash=sha256:{sha256_file(wheel).hex()}")
    lock = wheelhouse / LOCK
    lock.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lock


def build_agent(source: Path, out: Path, artifact_base: str = DEFAULT_ARTIFACT_BASE,
                target: DeviceTarget | None = None, wheels: Path | None = None,
                version: str | None = None) -> Built:
    """Build com.qcsight.EdgeAgent: the wheelhouse artifact and its recipe.

    Raises:
        BuildError: our wheel or a dependency cannot be built or downloaded for the device.
    """
    target = target or DeviceTarget.this_machine()
    version = version or project_version(source)
    _check_version(version)
    with tempfile.TemporaryDirectory(prefix="qcsight-wheelhouse-") as tmp:
        house = Path(tmp) / "wheelhouse"
        own = build_own_wheel(source, house)
        download_wheels(own, house, target, wheels)
        download_installer(house, wheels)
        write_lock(house, target)
        shutil.copy2(source / "greengrass" / "scripts" / "install_wheelhouse.sh", house / "install.sh")
        (house / "python-version").write_text(target.python_version + "\n", encoding="utf-8")
        artifact = out / "artifacts" / AGENT / version / WHEELHOUSE
        write_zip(artifact, [(p.name, p) for p in house.iterdir()], compress=False, executable=["install.sh"])
    recipe = _replace_token(_template(source, AGENT), VERSION_TOKEN, version)
    recipe["ComponentVersion"] = version
    _fill_artifacts(recipe, artifact_base, {WHEELHOUSE: artifact}, target.architecture)
    path = write_recipe(recipe, out, f"Generated by qcsight gg build from qcsight {version} for CPython "
                                     f"{target.python_version} {target.architecture}")
    built = Built(path, [artifact])
    log.info("built %s", built.describe())
    return built


# -------------------------------------------------------------------- the model


def component_version(bundle_version: str) -> str:
    """The Greengrass (semantic) version for a bundle manifest's model version.

    Raises:
        BuildError: the version is not N, N.N or a semantic version.
    """
    version = bundle_version.strip()
    if re.fullmatch(r"\d+", version):
        return f"{int(version)}.0.0"
    if re.fullmatch(r"\d+\.\d+", version):
        major, minor = version.split(".")
        return f"{int(major)}.{int(minor)}.0"
    try:
        Version.parse(version)
    except VersionError:
        raise BuildError(f"bundle version {bundle_version!r} is not N, N.N or a semantic version "
                         "(MAJOR.MINOR.PATCH); pass --model-version") from None
    return version


def _check_version(version: str) -> None:
    try:
        Version.parse(version)
    except VersionError as exc:
        raise BuildError(str(exc)) from None


def verify_zip(path: Path) -> Any:
    """Unpack the artifact as the nucleus will and verify the bundle inside it; returns its manifest.

    Raises:
        BuildError: a member would unpack outside the folder.
        BundleError: the bundle inside does not verify.
    """
    from qcsight_core.bundle import load_bundle

    with tempfile.TemporaryDirectory(prefix="qcsight-gg-verify-") as tmp, zipfile.ZipFile(path) as archive:
        root = Path(tmp).resolve()
        for member in archive.namelist():
            if not (root / member).resolve().is_relative_to(root):
                raise BuildError(f"{path}: member {member!r} would unpack outside the component folder")
        archive.extractall(root)
        return load_bundle(root).manifest


def build_model(bundle_path: Path, out: Path, source: Path, artifact_base: str = DEFAULT_ARTIFACT_BASE,
                version: str | None = None) -> Built:
    """Build com.qcsight.Model from a bundle directory or model.tar.gz.

    Raises:
        BundleError: the bundle is missing, partial or tampered.
        BuildError: the version is unusable.
    """
    from qcsight_core.bundle import MANIFEST_NAME, load_bundle

    with tempfile.TemporaryDirectory(prefix="qcsight-gg-bundle-") as tmp:
        bundle = load_bundle(bundle_path, extract_to=Path(tmp) / "bundle" if bundle_path.is_file() else None)
        manifest = bundle.manifest
        version = component_version(version or manifest.version)
        log.info("bundle %s %s verified (%d files) -> %s %s", manifest.name, manifest.version,
                 len(manifest.files), MODEL, version)
        folder = out / "artifacts" / MODEL / version
        names = [MANIFEST_NAME, *sorted(manifest.files)]
        archive = write_zip(folder / BUNDLE_ZIP, [(name, bundle.path / name) for name in names])
    verify_zip(archive)
    offer = folder / OFFER_SCRIPT
    shutil.copyfile(source / "greengrass" / "scripts" / OFFER_SCRIPT, offer)
    recipe = _template(source, MODEL)
    recipe["ComponentVersion"] = version
    recipe["ComponentDescription"] = (f"qcsight model {manifest.name} {manifest.version} ({manifest.architecture}, "
                                      f"classes {', '.join(manifest.classes)}; run {manifest.run_id or 'unknown'})")
    _fill_artifacts(recipe, artifact_base, {BUNDLE_ZIP: archive, OFFER_SCRIPT: offer})
    path = write_recipe(recipe, out, f"Generated by qcsight gg build from model {manifest.name} {manifest.version}")
    built = Built(path, [archive, offer])
    log.info("built %s", built.describe())
    return built


# -------------------------------------------------------------------- checking a layout


def agent_config_check(defaults: dict[str, Any]) -> None:
    """The agent's own validator on a DefaultConfiguration (or a merged one), as both nuclei serve it.

    The lifecycle script supplies the thing name, the state folder and the model; Greengrass nucleus
    lite serves every scalar of a YAML recipe as a string, so the configuration must pass that way too.

    Raises:
        ConfigError: naming the field.
    """
    from qcsight_edge.cli import lifecycle_values
    from qcsight_edge.config import from_greengrass

    completed = lifecycle_values(dict(defaults), "validation-thing", Path("/greengrass/v2/work") / AGENT / "state",
                                 Path("/greengrass/v2/work") / MODEL / "bundle")
    from_greengrass(completed)
    from_greengrass(as_lite_serves(completed))


def as_lite_serves(value: Any) -> Any:
    """A configuration as Greengrass nucleus lite serves a YAML recipe's: every scalar as its YAML text."""
    if isinstance(value, dict):
        return {k: as_lite_serves(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_lite_serves(v) for v in value]
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


CONFIG_CHECKS = {AGENT: agent_config_check}


def check_layout(out: Path, extra: Sequence[ComponentRecipe] = ()) -> list[ComponentRecipe]:
    """Validate every recipe of a layout (artifacts and digests included); returns them.

    Raises:
        RecipeError: listing every problem.
    """
    recipes = [*layout_recipes(out), *extra]
    check(recipes, out, CONFIG_CHECKS)
    return recipes
