"""Publish built components: upload each artifact to S3, then CreateComponentVersion with the inline recipe.

Every request is a plain dict checked against botocore's own service model before anything is
sent (the same check boto3 makes), so ``--dry-run`` prints exactly what would be sent, already
validated. S3 verifies each upload against the artifact's SHA-256 (``ChecksumSHA256`` is the
recipe's Digest: both are the base64 SHA-256), so an object that does not match its recipe never
lands. A component version that already exists is reported, never overwritten (Greengrass
refuses to change a published version).
"""

from __future__ import annotations

import copy
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from qcsight_gg.build import CONFIG_CHECKS, NoAliasDumper
from qcsight_gg.errors import PublishError
from qcsight_gg.recipes import ComponentRecipe, artifact_file, check

log = logging.getLogger(__name__)


class S3Client(Protocol):
    def put_object(self, **kwargs: Any) -> dict[str, Any]: ...

    def head_object(self, **kwargs: Any) -> dict[str, Any]: ...


class GreengrassClient(Protocol):
    def create_component_version(self, **kwargs: Any) -> dict[str, Any]: ...


def validate_request(service: str, operation: str, params: dict[str, Any]) -> None:
    """Check a request against botocore's service model (raises PublishError naming the problems)."""
    import botocore.session
    from botocore.validate import ParamValidator

    model = botocore.session.get_session().get_service_model(service).operation_model(operation)
    report = ParamValidator().validate(params, model.input_shape)
    if report.has_errors():
        raise PublishError(f"{service} {operation} request is not valid:\n{report.generate_report()}")


def split_s3(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise PublishError(f"{uri!r} is not an s3://bucket/key URI")
    bucket, key = uri[5:].split("/", 1)
    return bucket, key


def rebase(recipe: ComponentRecipe, artifact_base: str) -> ComponentRecipe:
    """The recipe with every artifact URI under artifact_base (same file names, same Digests)."""
    data = copy.deepcopy(recipe.data)
    for manifest in data.get("Manifests") or []:
        for artifact in manifest.get("Artifacts") or []:
            file_name = str(artifact["URI"]).rsplit("/", 1)[-1]
            artifact["URI"] = f"{artifact_base.rstrip('/')}/{recipe.name}/{recipe.version}/{file_name}"
    return ComponentRecipe(data, recipe.path)


@dataclass(frozen=True)
class Upload:
    bucket: str
    key: str
    path: Path
    digest: str

    def request(self) -> dict[str, Any]:
        """PutObject parameters (Body filled in when sent)."""
        return {"Bucket": self.bucket, "Key": self.key, "ChecksumAlgorithm": "SHA256", "ChecksumSHA256": self.digest,
                "ContentType": "application/zip" if self.key.endswith(".zip") else "application/octet-stream"}


@dataclass(frozen=True)
class PublishPlan:
    """What publishing a set of components sends."""

    uploads: tuple[Upload, ...]
    create_requests: tuple[dict[str, Any], ...]

    def describe(self) -> str:
        """The requests as JSON (recipes as text), for --dry-run."""
        return json.dumps({
            "s3:PutObject": [{**u.request(), "Body": f"<{u.path} {u.path.stat().st_size} bytes>"}
                             for u in self.uploads],
            "greengrassv2:CreateComponentVersion": [
                {**r, "inlineRecipe": r["inlineRecipe"].decode("utf-8")} for r in self.create_requests],
        }, indent=2)


def plan(recipes: Sequence[ComponentRecipe], layout: Path, artifact_base: str | None = None) -> PublishPlan:
    """Validate the recipes (with their artifacts) and build every request, checked against the service models.

    Raises:
        RecipeError: a recipe breaks a rule (nothing is sent).
        PublishError: an artifact URI is still the template's placeholder, or a request is invalid.
    """
    if artifact_base is not None:
        if not artifact_base.startswith("s3://"):
            raise PublishError(f"--artifact-base must be an s3:// URI, got {artifact_base!r}")
        recipes = [rebase(r, artifact_base) for r in recipes]
    check(recipes, layout, CONFIG_CHECKS)
    uploads: list[Upload] = []
    creates: list[dict[str, Any]] = []
    for recipe in recipes:
        seen: set[str] = set()
        for manifest in recipe.data.get("Manifests") or []:
            for artifact in manifest.get("Artifacts") or []:
                uri = str(artifact["URI"])
                if uri in seen:
                    continue
                seen.add(uri)
                bucket, key = split_s3(uri)
                if "REPLACE" in bucket.upper():
                    raise PublishError(f"{recipe.ident}: artifact URI {uri} still names the template's bucket; pass "
                                       "--artifact-base s3://your-bucket/prefix")
                upload = Upload(bucket, key, artifact_file(layout, recipe, uri), str(artifact["Digest"]))
                validate_request("s3", "PutObject", {**upload.request(), "Body": b""})
                uploads.append(upload)
        text = yaml.dump(recipe.data, Dumper=NoAliasDumper, sort_keys=False, allow_unicode=True, width=110)
        request = {"inlineRecipe": text.encode("utf-8"), "clientToken": str(uuid.uuid5(uuid.NAMESPACE_URL, text))}
        validate_request("greengrassv2", "CreateComponentVersion", request)
        creates.append(request)
    return PublishPlan(tuple(uploads), tuple(creates))


def publish(publish_plan: PublishPlan, s3: S3Client, greengrass: GreengrassClient) -> list[str]:
    """Upload the artifacts, then create the component versions; returns their ARNs.

    Artifacts go first: the service checks a recipe's artifacts when it creates the version.

    Raises:
        PublishError: an upload or a creation failed (an existing version is named as such).
    """
    from botocore.exceptions import BotoCoreError, ClientError

    for upload in publish_plan.uploads:
        log.info("uploading %s to s3://%s/%s", upload.path, upload.bucket, upload.key)
        try:
            with upload.path.open("rb") as body:
                s3.put_object(**upload.request(), Body=body)
        except (ClientError, BotoCoreError, OSError) as exc:
            raise PublishError(f"upload of {upload.path} to s3://{upload.bucket}/{upload.key} failed: {exc}") from exc
    arns: list[str] = []
    for request in publish_plan.create_requests:
        recipe = yaml.safe_load(request["inlineRecipe"])
        ident = f"{recipe['ComponentName']} {recipe['ComponentVersion']}"
        try:
            response = greengrass.create_component_version(**request)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "ConflictException":
                raise PublishError(f"{ident} is already published; Greengrass does not change a published version: "
                                   "build a new version") from exc
            raise PublishError(f"creating {ident} failed: {exc}") from exc
        status = response.get("status", {})
        log.info("created %s: %s %s", response.get("arn"), status.get("componentState"), status.get("message", ""))
        if status.get("componentState") == "FAILED":
            raise PublishError(f"Greengrass could not create {ident}: {status.get('message')} {status.get('errors')}")
        arns.append(str(response["arn"]))
    return arns
