"""A SageMaker pipeline definition checked the way the service would: each step's arguments against botocore's model.

Every step's ``Arguments`` is the request of the API call SageMaker makes for it (Training ->
CreateTrainingJob without its name, Processing -> CreateProcessingJob, RegisterModel ->
CreateModelPackage). A value may instead be a pipeline expression (``{"Get": ...}``,
``{"Std:Join": ...}``, ``{"Std:JsonGet": ...}``), resolved at run time; each ``Get`` must name a
declared parameter, the execution, or a step that comes earlier, and a JsonGet a declared property file.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from typing import Any

# SageMaker's patterns use Unicode classes (\p{L}, ...) that `re` lacks; `regex` has them (installed with cfn-lint).
import regex

STEP_OPERATIONS = {
    "Training": ("CreateTrainingJob", {"TrainingJobName": "placeholder"}),
    "Processing": ("CreateProcessingJob", {"ProcessingJobName": "placeholder"}),
    "RegisterModel": ("CreateModelPackage", {}),
}
EXPRESSIONS = ("Get", "Std:Join", "Std:JsonGet")
_STEP_REFERENCE = re.compile(r"^Steps\.([A-Za-z0-9-]+)\.")


def _is_expression(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in EXPRESSIONS


@functools.cache
def _sagemaker_model() -> Any:
    import botocore.session

    return botocore.session.get_session().get_service_model("sagemaker")


class Checker:
    def __init__(self, body: Mapping[str, Any]) -> None:
        self.model = _sagemaker_model()
        self.body = body
        self.parameters = {p["Name"]: p["Type"] for p in body.get("Parameters", [])}
        self.seen: list[str] = []
        self.property_files: set[str] = set()

    def problems(self) -> list[str]:
        found: list[str] = []
        if self.body.get("Version") != "2020-12-01":
            found.append(f"Version {self.body.get('Version')!r} is not 2020-12-01")
        for parameter in self.body.get("Parameters", []):
            if parameter["Type"] not in ("String", "Integer", "Float", "Boolean"):
                found.append(f"parameter {parameter['Name']}: type {parameter['Type']}")
        found += list(self._steps(self.body.get("Steps", []), "Steps"))
        names = self.seen
        if len(names) != len(set(names)):
            found.append(f"step names repeat: {names}")
        return found

    def _steps(self, steps: list[dict[str, Any]], path: str) -> Iterator[str]:
        for step in steps:
            where = f"{path}.{step['Name']}"
            kind = step["Type"]
            if kind in STEP_OPERATIONS:
                operation, name = STEP_OPERATIONS[kind]
                shape = self.model.operation_model(operation).input_shape
                yield from self._value(shape, {**name, **step["Arguments"]}, f"{where}({operation})")
            elif kind == "Condition":
                for condition in step["Arguments"]["Conditions"]:
                    for side in ("LeftValue", "RightValue"):
                        yield from self._expression(condition[side], f"{where}.{side}")
                self.seen.append(step["Name"])
                for branch in ("IfSteps", "ElseSteps"):
                    yield from self._steps(step["Arguments"][branch], f"{where}.{branch}")
                continue
            elif kind == "Fail":
                yield from self._expression(step["Arguments"]["ErrorMessage"], f"{where}.ErrorMessage")
            else:
                yield f"{where}: step type {kind} is not checked here"
            for property_file in step.get("PropertyFiles", []):
                outputs = [o["OutputName"] for o in step["Arguments"]["ProcessingOutputConfig"]["Outputs"]]
                if property_file["OutputName"] not in outputs:
                    yield f"{where}: property file on unknown output {property_file['OutputName']}"
                self.property_files.add(f"Steps.{step['Name']}.PropertyFiles.{property_file['PropertyFileName']}")
            self.seen.append(step["Name"])

    def _expression(self, value: Any, path: str) -> Iterator[str]:
        if not isinstance(value, dict):
            return
        if "Get" in value:
            reference = value["Get"]
            if reference.startswith("Parameters."):
                if reference.split(".", 1)[1] not in self.parameters:
                    yield f"{path}: {reference} is not a declared parameter"
            elif reference.startswith("Steps."):
                match = _STEP_REFERENCE.match(reference)
                if not match or match.group(1) not in self.seen:
                    yield f"{path}: {reference} does not name an earlier step"
            elif reference not in ("Execution.PipelineExecutionId", "Execution.PipelineExecutionArn"):
                yield f"{path}: {reference} is not a known property"
        elif "Std:Join" in value:
            for i, item in enumerate(value["Std:Join"]["Values"]):
                yield from self._expression(item, f"{path}.Values[{i}]")
        elif "Std:JsonGet" in value:
            reference = value["Std:JsonGet"]["PropertyFile"]["Get"]
            if reference not in self.property_files:
                yield f"{path}: {reference} is not a property file of an earlier step"

    def _value(self, shape: Any, value: Any, path: str) -> Iterator[str]:
        if _is_expression(value):
            if shape.type_name not in ("string", "integer", "long", "float", "double", "boolean"):
                yield f"{path}: an expression where a {shape.type_name} is needed"
            yield from self._expression(value, path)
            return
        kind, meta = shape.type_name, shape.metadata
        if kind == "structure":
            if not isinstance(value, dict):
                yield f"{path}: expected an object"
                return
            for name in shape.required_members:
                if name not in value:
                    yield f"{path}.{name}: required but missing"
            for name, item in value.items():
                if name not in shape.members:
                    yield f"{path}.{name}: not a member of {shape.name}"
                else:
                    yield from self._value(shape.members[name], item, f"{path}.{name}")
        elif kind == "list":
            if not isinstance(value, list):
                yield f"{path}: expected a list"
                return
            if not meta.get("min", 0) <= len(value) <= meta.get("max", 10**9):
                yield f"{path}: {len(value)} items outside [{meta.get('min')}, {meta.get('max')}]"
            for i, item in enumerate(value):
                yield from self._value(shape.member, item, f"{path}[{i}]")
        elif kind == "map":
            if not isinstance(value, dict) or not meta.get("min", 0) <= len(value) <= meta.get("max", 10**9):
                yield f"{path}: expected a map within [{meta.get('min')}, {meta.get('max')}] entries"
                return
            for key, item in value.items():
                yield from self._value(shape.key, key, f"{path}<key {key}>")
                yield from self._value(shape.value, item, f"{path}.{key}")
        elif kind == "string":
            if not isinstance(value, str):
                yield f"{path}: expected a string, got {value!r}"
                return
            if shape.enum and value not in shape.enum:
                yield f"{path}: {value!r} not in enum {shape.name}"
            if "pattern" in meta and not regex.fullmatch(meta["pattern"], value, flags=regex.DOTALL):
                yield f"{path}: {value!r} does not match {meta['pattern']}"
            if not meta.get("min", 0) <= len(value) <= meta.get("max", 10**9):
                yield f"{path}: length {len(value)} outside [{meta.get('min')}, {meta.get('max')}]"
        elif kind in ("integer", "long"):
            if isinstance(value, bool) or not isinstance(value, int) or \
                    not meta.get("min", -(10**18)) <= value <= meta.get("max", 10**18):
                yield f"{path}: {value!r} is not an integer within [{meta.get('min')}, {meta.get('max')}]"
        elif kind == "boolean" and not isinstance(value, bool):
            yield f"{path}: expected true/false, got {value!r}"


def definition_problems(body: Mapping[str, Any]) -> list[str]:
    return Checker(body).problems()
