"""A small evaluator of AWS IoT Core policy documents, faithful to the parts qcsight's policies use.

What it implements (AWS IoT Core developer guide, "AWS IoT Core policies" and "policy variables"):

* Effect Allow/Deny; an explicit Deny in any attached policy wins, then any Allow, else the
  request is denied implicitly.
* Action / NotAction matched case-insensitively, with ``*`` and ``?`` wildcards ("iot:*").
* Resource / NotResource matched case-sensitively with ``*`` and ``?``. MQTT's ``+`` and ``#``
  are *not* policy wildcards: in a subscribe request's topic filter they are literal characters
  of the ``topicfilter/`` resource, which a policy's ``*`` may match.
* The resource kinds per action: iot:Connect -> ``client/<client id>``, iot:Publish and
  iot:Receive -> ``topic/<topic name>``, iot:Subscribe -> ``topicfilter/<topic filter>``,
  iot:AssumeRoleWithCertificate -> ``rolealias/<alias>``.
* Policy variables ``${iot:ClientId}`` and ``${iot:Connection.Thing.ThingName}``; the latter
  resolves only when the client id is the name of a thing attached to the certificate. A
  statement whose resource uses a variable that does not resolve matches nothing. A
  substituted value is literal (a ``*`` in a client id is not a wildcard). ``${*}``, ``${?}``
  and ``${$}`` stand for the literal characters.
* Conditions: Bool, StringEquals, StringNotEquals, StringLike and their ``...IfExists`` forms,
  on the keys ``iot:Connection.Thing.IsAttached``, ``iot:ClientId`` and
  ``iot:Connection.Thing.ThingName``. Anything else raises, rather than being guessed at.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ALLOW, DENY, IMPLICIT_DENY = "allow", "deny", "implicit-deny"
THING_NAME_VAR = "iot:Connection.Thing.ThingName"
CLIENT_ID_VAR = "iot:ClientId"
IS_ATTACHED = "iot:Connection.Thing.IsAttached"
_VARIABLE = re.compile(r"\$\{([^}]*)\}")
_ESCAPES = {"*": "*", "?": "?", "$": "$"}


class PolicyEvaluationError(ValueError):
    """The policy uses something this evaluator does not implement."""


@dataclass(frozen=True)
class Connection:
    """Who is asking: the MQTT client id and the things attached to the certificate it presented."""

    client_id: str
    attached_things: frozenset[str] = field(default_factory=frozenset)

    @property
    def thing_name(self) -> str | None:
        return self.client_id if self.client_id in self.attached_things else None

    def value(self, key: str) -> str | None:
        if key == CLIENT_ID_VAR:
            return self.client_id
        if key == THING_NAME_VAR:
            return self.thing_name
        if key == IS_ATTACHED:
            return "true" if self.thing_name is not None else "false"
        raise PolicyEvaluationError(f"policy variable or condition key {key!r} is not implemented")


@dataclass(frozen=True)
class Request:
    action: str
    resource: str


def _glob(pattern: str, *, literal: Sequence[bool] | None = None, ignore_case: bool = False) -> re.Pattern[str]:
    """A regex for an IAM-style glob; literal[i] marks characters that came from a substituted variable."""
    out = []
    for index, char in enumerate(pattern):
        is_literal = literal is not None and literal[index]
        if char == "*" and not is_literal:
            out.append(".*")
        elif char == "?" and not is_literal:
            out.append(".")
        else:
            out.append(re.escape(char))
    return re.compile("^" + "".join(out) + "$", re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _substitute(pattern: str, connection: Connection) -> tuple[str, list[bool]] | None:
    """Resolve policy variables; None when one does not resolve (the statement then matches nothing)."""
    text: list[str] = []
    literal: list[bool] = []
    position = 0
    for match in _VARIABLE.finditer(pattern):
        chunk = pattern[position:match.start()]
        text.append(chunk)
        literal.extend([False] * len(chunk))
        name = match.group(1)
        if name in _ESCAPES:
            value: str | None = _ESCAPES[name]
        else:
            value = connection.value(name)
            if value is None:
                return None
        text.append(value)
        literal.extend([True] * len(value))
        position = match.end()
    tail = pattern[position:]
    text.append(tail)
    literal.extend([False] * len(tail))
    return "".join(text), literal


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _action_matches(patterns: Iterable[str], action: str) -> bool:
    return any(_glob(pattern, ignore_case=True).match(action) for pattern in patterns)


def _resource_matches(patterns: Iterable[str], resource: str, connection: Connection) -> bool:
    for pattern in patterns:
        resolved = _substitute(pattern, connection)
        if resolved is not None and _glob(resolved[0], literal=resolved[1]).match(resource):
            return True
    return False


def _condition_holds(condition: Mapping[str, Mapping[str, Any]], connection: Connection) -> bool:
    for operator, tests in condition.items():
        base, if_exists = (operator[:-8], True) if operator.endswith("IfExists") else (operator, False)
        for key, expected in tests.items():
            actual = connection.value(key)
            if actual is None:
                if if_exists:
                    continue
                return False
            wanted = [str(item).lower() if base == "Bool" else str(item) for item in _as_list(expected)]
            if base == "Bool":
                ok = actual.lower() in wanted
            elif base == "StringEquals":
                ok = actual in wanted
            elif base == "StringNotEquals":
                ok = actual not in wanted
            elif base == "StringLike":
                ok = any(_glob(item).match(actual) for item in wanted)
            else:
                raise PolicyEvaluationError(f"condition operator {operator!r} is not implemented")
            if not ok:
                return False
    return True


def _statement_applies(statement: Mapping[str, Any], request: Request, connection: Connection) -> bool:
    known = {"Sid", "Effect", "Action", "NotAction", "Resource", "NotResource", "Condition"}
    unknown = set(statement) - known
    if unknown:
        raise PolicyEvaluationError(f"statement element(s) {sorted(unknown)} not implemented")
    if "Action" in statement:
        if not _action_matches(_as_list(statement["Action"]), request.action):
            return False
    elif "NotAction" in statement:
        if _action_matches(_as_list(statement["NotAction"]), request.action):
            return False
    else:
        raise PolicyEvaluationError("a statement needs Action or NotAction")
    if "Resource" in statement:
        if not _resource_matches(_as_list(statement["Resource"]), request.resource, connection):
            return False
    elif "NotResource" in statement:
        if _resource_matches(_as_list(statement["NotResource"]), request.resource, connection):
            return False
    else:
        raise PolicyEvaluationError("a statement needs Resource or NotResource")
    return _condition_holds(statement.get("Condition", {}), connection)


def evaluate(policies: Iterable[Mapping[str, Any]], request: Request, connection: Connection) -> str:
    """ALLOW, DENY (an explicit Deny matched) or IMPLICIT_DENY for one request under the attached policies."""
    allowed = False
    for policy in policies:
        for statement in _as_list_of_statements(policy.get("Statement", [])):
            if not _statement_applies(statement, request, connection):
                continue
            effect = statement.get("Effect")
            if effect == "Deny":
                return DENY
            if effect != "Allow":
                raise PolicyEvaluationError(f"Effect {effect!r} is neither Allow nor Deny")
            allowed = True
    return ALLOW if allowed else IMPLICIT_DENY


def _as_list_of_statements(value: Any) -> list[Mapping[str, Any]]:
    return [value] if isinstance(value, Mapping) else list(value)


class Arn:
    """IoT resource ARNs of one account and region, as the service builds them for each request."""

    def __init__(self, region: str, account: str, partition: str = "aws") -> None:
        self.prefix = f"arn:{partition}:iot:{region}:{account}"

    def client(self, client_id: str) -> str:
        return f"{self.prefix}:client/{client_id}"

    def topic(self, name: str) -> str:
        return f"{self.prefix}:topic/{name}"

    def topicfilter(self, topic_filter: str) -> str:
        return f"{self.prefix}:topicfilter/{topic_filter}"

    def rolealias(self, alias: str) -> str:
        return f"{self.prefix}:rolealias/{alias}"


def connect(arn: Arn, client_id: str) -> Request:
    return Request("iot:Connect", arn.client(client_id))


def publish(arn: Arn, topic: str) -> Request:
    return Request("iot:Publish", arn.topic(topic))


def receive(arn: Arn, topic: str) -> Request:
    return Request("iot:Receive", arn.topic(topic))


def subscribe(arn: Arn, topic_filter: str) -> Request:
    return Request("iot:Subscribe", arn.topicfilter(topic_filter))
