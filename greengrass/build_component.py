"""Build the com.qcsight.Model Greengrass component from a model bundle: artifact + versioned recipe.

Writes, with no AWS call, the layout both `greengrass-cli deployment create --recipeDir
--artifactDir` and an S3 upload expect:

    OUT/recipes/com.qcsight.Model-<version>.yaml
    OUT/artifacts/com.qcsight.Model/<version>/bundle.zip

The component version comes from the bundle manifest's model version (``3`` -> ``3.0.0``,
``1.2`` -> ``1.2.0``, semantic versions as they are). The bundle is verified before it is packed
and the packed ZIP is unpacked and verified again, so a component is never built from a bundle
the agent would refuse.

Example:
    python greengrass/build_component.py runs/42/bundle --out build/greengrass \\
        --artifact-base s3://my-bucket/qcsight
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import logging
import re
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from qcsight_core.bundle import MANIFEST_NAME, Bundle, Manifest, load_bundle
from qcsight_core.cli import configure_logging
from qcsight_core.errors import QcsightError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
COMPONENT = "com.qcsight.Model"
AGENT = "com.qcsight.EdgeAgent"
ARTIFACT = "bundle.zip"
HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "recipes" / f"{COMPONENT}.yaml"
AGENT_RECIPE = HERE / "recipes" / f"{AGENT}.yaml"
DEFAULT_ARTIFACT_BASE = "s3://REPLACE_WITH_BUCKET/qcsight"
# Fixed timestamp so the same bundle always packs to the same bytes (and the same digest).
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")

log = logging.getLogger("qcsight.greengrass")


class BuildError(QcsightError):
    """The component cannot be built from this bundle."""


def component_version(bundle_version: str) -> str:
    """The Greengrass (semantic) version for a bundle manifest's model version.

    Raises:
        BuildError: the version is not N, N.N or a semantic version.
    """
    version = bundle_version.strip()
    if _SEMVER.match(version):
        return version
    if re.fullmatch(r"\d+", version):
        return f"{int(version)}.0.0"
    if re.fullmatch(r"\d+\.\d+", version):
        major, minor = version.split(".")
        return f"{int(major)}.{int(minor)}.0"
    raise BuildError(f"bundle version {bundle_version!r} is not N, N.N or a semantic version (MAJOR.MINOR.PATCH); "
                     "pass --component-version")


def _parse_semver(version: str) -> tuple[int, int, int]:
    match = _SEMVER.match(version)
    if not match:
        raise BuildError(f"{version!r} is not a semantic version")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def satisfies(version: str, requirement: str) -> bool:
    """Whether version meets a Greengrass VersionRequirement made of comparisons (">=1.0.0 <2.0.0")."""
    ops = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
           "<": lambda a, b: a < b, "=": lambda a, b: a == b}
    have = _parse_semver(version)
    for term in requirement.split():
        match = re.fullmatch(r"(>=|<=|>|<|=)?(.+)", term)
        assert match is not None  # the pattern matches any non-empty term
        op, bound = match.group(1) or "=", match.group(2)
        if not ops[op](have, _parse_semver(bound)):
            return False
    return True


def pack_zip(bundle: Bundle, target: Path) -> None:
    """Write the manifest and the files it lists (nothing else) at the root of a deterministic ZIP."""
    names = [MANIFEST_NAME, *sorted(bundle.manifest.files)]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in names:
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with (bundle.path / name).open("rb") as src, archive.open(info, "w") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    tmp.replace(target)


def verify_zip(path: Path) -> Manifest:
    """Unpack the artifact as the nucleus will and verify the bundle inside it; returns its manifest."""
    with tempfile.TemporaryDirectory(prefix="qcsight-gg-verify-") as tmp, zipfile.ZipFile(path) as archive:
        root = Path(tmp).resolve()
        for member in archive.namelist():
            if not (root / member).resolve().is_relative_to(root):
                raise BuildError(f"{path}: member {member!r} would unpack outside the component folder")
        archive.extractall(root)
        return load_bundle(root).manifest


def artifact_digest(path: Path) -> str:
    """SHA-256 of the artifact, base64-encoded as Greengrass recipes record it."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode("ascii")


def render_recipe(version: str, artifact_uri: str, digest: str, description: str) -> dict[str, Any]:
    recipe: dict[str, Any] = yaml.safe_load(TEMPLATE.read_text(encoding="utf-8"))
    recipe["ComponentVersion"] = version
    recipe["ComponentDescription"] = description
    (manifest,) = recipe["Manifests"]
    (artifact,) = manifest["Artifacts"]
    artifact.update({"URI": artifact_uri, "Digest": digest, "Algorithm": "SHA-256"})
    return recipe


def agent_model_requirement() -> str:
    agent = yaml.safe_load(AGENT_RECIPE.read_text(encoding="utf-8"))
    return str(agent["ComponentDependencies"][COMPONENT]["VersionRequirement"])


def build(bundle_path: Path, out: Path, artifact_base: str, version: str | None = None) -> Path:
    """Build the component; returns the recipe path.

    Raises:
        BundleError: the bundle is missing, partial or tampered.
        BuildError: the version is unusable.
    """
    with tempfile.TemporaryDirectory(prefix="qcsight-gg-bundle-") as tmp:
        bundle = load_bundle(bundle_path, extract_to=Path(tmp) / "bundle" if bundle_path.is_file() else None)
        manifest = bundle.manifest
        version = component_version(version or manifest.version)
        _parse_semver(version)
        log.info("bundle %s %s verified (%d files) -> %s %s", manifest.name, manifest.version,
                 len(manifest.files), COMPONENT, version)
        artifact = out / "artifacts" / COMPONENT / version / ARTIFACT
        pack_zip(bundle, artifact)
    verify_zip(artifact)
    uri = f"{artifact_base.rstrip('/')}/{COMPONENT}/{version}/{ARTIFACT}"
    description = (f"qcsight model {manifest.name} {manifest.version} ({manifest.architecture}, "
                   f"classes {', '.join(manifest.classes)}; run {manifest.run_id or 'unknown'})")
    recipe = render_recipe(version, uri, artifact_digest(artifact), description)
    recipe_path = out / "recipes" / f"{COMPONENT}-{version}.yaml"
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Generated by greengrass/build_component.py from {manifest.name} {manifest.version}; do not edit.\n"
    recipe_path.write_text(header + yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    requirement = agent_model_requirement()
    if not satisfies(version, requirement):
        log.warning("%s %s is outside %s's dependency range %r: deploy a new agent recipe with it",
                    COMPONENT, version, AGENT, requirement)
    log.info("wrote %s and %s", recipe_path, artifact)
    return recipe_path


def get_args_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0],
        epilog="Exit codes: 0 built, 1 failed (bad bundle or version), 2 usage error.")
    parser.add_argument("bundle", type=Path, help="the model bundle: a directory or a model.tar.gz")
    parser.add_argument("--out", type=Path, required=True, help="output folder (recipes/ and artifacts/ go here)")
    parser.add_argument("--artifact-base", default=DEFAULT_ARTIFACT_BASE,
                        help="S3 prefix the artifacts folder will be uploaded under "
                             f"(default {DEFAULT_ARTIFACT_BASE}; local deployments ignore it)")
    parser.add_argument("--component-version", default=None,
                        help="override the version taken from the bundle manifest (MAJOR.MINOR.PATCH)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "build_component.py") -> int:
    configure_logging()
    args = get_args_parser(prog).parse_args(argv)
    if not args.artifact_base.startswith("s3://"):
        print(f"{prog}: --artifact-base must be an s3:// URI, got {args.artifact_base!r}", file=sys.stderr)
        return EXIT_USAGE
    try:
        recipe = build(args.bundle, args.out, args.artifact_base, args.component_version)
    except QcsightError as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    print(recipe)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
