"""One `cdk synth` of the whole app per test session, through the pinned CDK CLI, shared by every infra test.

The app runs with a dummy account and region and no AWS credentials: anything that would need an
AWS call at synth time fails the session instead of being skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.infra.cfn import ACCOUNT, REGION

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
if str(INFRA) not in sys.path:  # the CDK app's `stacks` package lives beside app.py, not in site-packages
    sys.path.insert(0, str(INFRA))

FLEET = "qcsight"
STACKS = ("storage", "iot", "compute", "review", "monitoring")
CONTEXT = {
    "qcsight:account": ACCOUNT,
    "qcsight:region": REGION,
    "qcsight:lines": "line-7,line-8",
    "qcsight:alertEmail": "quality@example.com",
    "qcsight:reviewCertificateArn": f"arn:aws:acm:{REGION}:{ACCOUNT}:certificate/00000000-0000-0000-0000-000000000000",
    "qcsight:reviewDomainName": "review.example.com",
}
# jsii warns on every start that Debian's Node 20 is past its end of life; it runs the CDK correctly.
QUIET_NODE = {"JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20",
              "JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION": "1"}


@dataclass(frozen=True)
class Assembly:
    """The cloud assembly `cdk synth` wrote: templates by stack short name, and what the CLI printed."""

    outdir: Path
    templates: Mapping[str, dict[str, Any]]
    output: str
    seconds: float

    def asset_dir(self, stack: str, kind: str, contains: str) -> Path:
        """The staged directory of one of the stack's assets (kind 'files' or 'dockerImages')."""
        manifest = json.loads((self.outdir / f"{FLEET}-{stack}.assets.json").read_text())
        for asset in manifest.get(kind, {}).values():
            path = self.outdir / asset["source"]["path" if kind == "files" else "directory"]
            if kind == "files" and (path / contains).exists():
                return path
            if kind == "dockerImages" and asset["source"].get("dockerFile", "").endswith(contains):
                return path
        raise AssertionError(f"no {kind} asset of {stack} with {contains}")


def cdk_cli() -> list[str]:
    cli = INFRA / "node_modules" / ".bin" / "cdk"
    if not cli.exists() or shutil.which("node") is None:
        pytest.fail("the CDK CLI is not installed: run `npm ci --prefix infra` (needs node/npm from Debian)")
    return [str(cli)]


def synth(outdir: Path, context: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **QUIET_NODE, "CDK_DISABLE_CLI_TELEMETRY": "true", "AWS_EC2_METADATA_DISABLED": "true",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(INFRA), os.environ.get("PYTHONPATH", "")])}
    for key in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        env.pop(key, None)
    command = [*cdk_cli(), "synth", "--all", "--quiet", "--no-notices", "--no-version-reporting",
               "--app", f"{sys.executable} app.py", "-o", str(outdir)]
    for key, value in context.items():
        command += ["-c", f"{key}={value}"]
    return subprocess.run(command, cwd=INFRA, env=env, capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture(scope="session")
def assembly(tmp_path_factory: pytest.TempPathFactory) -> Assembly:
    outdir = tmp_path_factory.mktemp("cdk") / "cdk.out"
    started = time.monotonic()
    result = synth(outdir, CONTEXT)
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"cdk synth failed ({result.returncode}):\n{output[-6000:]}"
    templates = {name: json.loads((outdir / f"{FLEET}-{name}.template.json").read_text()) for name in STACKS}
    sys.stderr.write(f"\n[infra] cdk synth of {len(templates)} stacks took {seconds:.1f} s\n")
    return Assembly(outdir, templates, output, seconds)


@pytest.fixture(scope="session")
def templates(assembly: Assembly) -> Mapping[str, dict[str, Any]]:
    return assembly.templates
