"""Reading synthesized CloudFormation: resources by type, and intrinsic functions resolved to plain strings."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

ACCOUNT, REGION, PARTITION = "111111111111", "eu-west-1", "aws"
PSEUDO = {"AWS::Partition": PARTITION, "AWS::Region": REGION, "AWS::AccountId": ACCOUNT,
          "AWS::URLSuffix": "amazonaws.com"}


def resolve(value: Any) -> Any:
    """Fn::Join and pseudo-parameter Refs become strings; other references become <Ref:X>/<GetAtt:X.Y> markers."""
    if isinstance(value, Mapping):
        if set(value) == {"Ref"}:
            return PSEUDO.get(value["Ref"], f"<Ref:{value['Ref']}>")
        if set(value) == {"Fn::Join"}:
            separator, parts = value["Fn::Join"]
            return separator.join(str(resolve(part)) for part in parts)
        if set(value) == {"Fn::GetAtt"}:
            return f"<GetAtt:{'.'.join(value['Fn::GetAtt'])}>"
        if set(value) == {"Fn::ImportValue"}:
            return f"<Import:{resolve(value['Fn::ImportValue'])}>"
        return {key: resolve(item) for key, item in value.items()}
    if isinstance(value, list):
        return [resolve(item) for item in value]
    return value


def resources(templates: Mapping[str, Mapping[str, Any]], kind: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(stack, logical id, properties) of every resource of one type, across the templates."""
    for stack, template in templates.items():
        for logical_id, resource in template.get("Resources", {}).items():
            if resource["Type"] == kind:
                yield stack, logical_id, resource.get("Properties", {})


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]
