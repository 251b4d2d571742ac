#!/usr/bin/env python3
"""Count what a synthesized cloud assembly holds: stacks, resources, IAM statements, cdk-nag outcomes.

    python infra/figures.py infra/cdk.out
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def _statements(template: dict[str, Any]) -> int:
    count = 0
    for resource in template.get("Resources", {}).values():
        props = resource.get("Properties", {})
        if resource["Type"] == "AWS::IAM::Policy":
            count += len(props["PolicyDocument"]["Statement"])
        elif resource["Type"] == "AWS::IAM::Role":
            count += sum(len(policy["PolicyDocument"]["Statement"]) for policy in props.get("Policies", []))
    return count


def figures(outdir: Path) -> dict[str, Any]:
    manifest = json.loads((outdir / "manifest.json").read_text())
    stacks = sorted(name for name, artifact in manifest["artifacts"].items()
                    if artifact["type"] == "aws:cloudformation:stack")
    per_stack: dict[str, dict[str, int]] = {}
    kinds: Counter[str] = Counter()
    acknowledged = 0
    for stack in stacks:
        template = json.loads((outdir / f"{stack}.template.json").read_text())
        resources = template.get("Resources", {})
        kinds.update(resource["Type"] for resource in resources.values())
        metadata_file = outdir / f"{stack}.metadata.json"
        metadata = json.loads(metadata_file.read_text()) if metadata_file.exists() else {}
        acks = sum(1 for entries in metadata.values() for entry in entries
                   if entry["type"] == "aws:cdk:acknowledged-rules")
        acknowledged += acks
        per_stack[stack] = {"resources": len(resources), "iam_statements": _statements(template), "acknowledged": acks}
    report_file = outdir / "validation-report.json"
    violations: dict[str, int] = {}
    if report_file.exists():
        for plugin in json.loads(report_file.read_text())["pluginReports"]:
            violations[plugin["pluginName"]] = sum(len(v["violatingConstructs"]) for v in plugin["violations"])
    return {
        "stacks": len(stacks), "resources": sum(s["resources"] for s in per_stack.values()),
        "iam_statements": sum(s["iam_statements"] for s in per_stack.values()),
        "nag_acknowledged": acknowledged, "validation_violations": violations,
        "per_stack": per_stack, "iam_roles": kinds["AWS::IAM::Role"],
        "lambda_functions": kinds["AWS::Lambda::Function"],
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", type=Path, help="a cloud assembly written by `cdk synth -o DIR`")
    args = parser.parse_args(argv)
    print(json.dumps(figures(args.outdir), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
