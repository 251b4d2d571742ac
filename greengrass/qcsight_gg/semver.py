"""Semantic versions and the npm-style version ranges Greengrass uses in ComponentDependencies."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering
from typing import Any

_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?(?:\+([0-9A-Za-z.-]+))?$")
_PART = r"(\d+|[xX*])"
_COMPARATOR = re.compile(rf"^(>=|<=|>|<|=|\^|~)?v?{_PART}(?:\.{_PART})?(?:\.{_PART})?(?:-([0-9A-Za-z.-]+))?$")


class VersionError(ValueError):
    """Not a semantic version, or not a version range."""


@total_ordering
@dataclass(frozen=True)
class Version:
    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> Version:
        """MAJOR.MINOR.PATCH with an optional -prerelease and +build (ignored for ordering).

        Raises:
            VersionError: text is not a semantic version.
        """
        match = _SEMVER.match(text.strip())
        if not match:
            raise VersionError(f"{text!r} is not a semantic version (MAJOR.MINOR.PATCH)")
        pre = tuple(match.group(4).split(".")) if match.group(4) else ()
        return cls(int(match.group(1)), int(match.group(2)), int(match.group(3)), pre)

    def _key(self) -> tuple[Any, ...]:
        # A pre-release sorts before its release; numeric identifiers before alphanumeric ones.
        pre = tuple((0, int(p)) if p.isdigit() else (1, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, pre)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        return text + ("-" + ".".join(self.prerelease) if self.prerelease else "")


_ZERO = Version(0, 0, 0, ("0",))  # the lowest version there is (0.0.0-0)


@dataclass(frozen=True)
class Interval:
    """Versions v with low <= v (or low < v) and v < high (or v <= high); None is unbounded."""

    low: Version | None = None
    low_inclusive: bool = True
    high: Version | None = None
    high_inclusive: bool = False

    def contains(self, version: Version) -> bool:
        if self.low is not None and (version < self.low or (version == self.low and not self.low_inclusive)):
            return False
        if self.high is None:
            return True
        return version < self.high or (version == self.high and self.high_inclusive)

    def intersect(self, other: Interval) -> Interval:
        low, low_inc = self.low, self.low_inclusive
        if other.low is not None and (low is None or other.low > low or (other.low == low and not other.low_inclusive)):
            low, low_inc = other.low, other.low_inclusive
        high, high_inc = self.high, self.high_inclusive
        if other.high is not None and (high is None or other.high < high
                                       or (other.high == high and not other.high_inclusive)):
            high, high_inc = other.high, other.high_inclusive
        return Interval(low, low_inc, high, high_inc)

    @property
    def empty(self) -> bool:
        if self.low is None or self.high is None:
            return False
        return self.low > self.high or (self.low == self.high and not (self.low_inclusive and self.high_inclusive))


def _comparator(term: str) -> Interval:
    match = _COMPARATOR.match(term)
    if not match:
        raise VersionError(f"{term!r} is not a version comparator (such as >=1.0.0, <2.0.0, ^1.2.0, ~1.2.0, 1.x)")
    op = match.group(1) or "="
    parts = [match.group(2), match.group(3), match.group(4)]
    wild = next((i for i, p in enumerate(parts) if p is None or p in "xX*"), 3)
    numbers = [int(p) for p in parts[:wild]]
    pre = tuple(match.group(5).split(".")) if match.group(5) else ()
    if wild < 3 and pre:
        raise VersionError(f"{term!r}: a pre-release needs a full version")
    full = numbers + [0] * (3 - len(numbers))
    base = Version(full[0], full[1], full[2], pre)
    if wild < 3:  # 1.x, 1.2.x, * : a range whatever the operator's shape
        if wild == 0:
            return Interval() if op in ("=", ">=", "<=", "^", "~") else Interval(high=_ZERO)
        upper = Version(numbers[0] + 1, 0, 0, ("0",)) if wild == 1 else Version(numbers[0], numbers[1] + 1, 0, ("0",))
        span = Interval(base, True, upper, False)
        return {"=": span, "^": span, "~": span, ">=": Interval(low=base), ">": Interval(low=upper),
                "<": Interval(high=base), "<=": Interval(high=upper)}[op]
    if op == "^":
        if base.major:
            upper = Version(base.major + 1, 0, 0, ("0",))
        elif base.minor:
            upper = Version(0, base.minor + 1, 0, ("0",))
        else:
            upper = Version(0, 0, base.patch + 1, ("0",))
        return Interval(base, True, upper, False)
    if op == "~":
        return Interval(base, True, Version(base.major, base.minor + 1, 0, ("0",)), False)
    return {"=": Interval(base, True, base, True), ">=": Interval(low=base), ">": Interval(base, False),
            "<": Interval(high=base), "<=": Interval(high=base, high_inclusive=True)}[op]


@dataclass(frozen=True)
class Requirement:
    """A Greengrass VersionRequirement: comparators joined by spaces (and), alternatives by ``||`` (or)."""

    text: str
    alternatives: tuple[Interval, ...]

    @classmethod
    def parse(cls, text: str) -> Requirement:
        """Raises VersionError for a requirement that is not one."""
        alternatives: list[Interval] = []
        for alternative in text.split("||"):
            terms = re.sub(r"(>=|<=|>|<|=)\s+", r"\1", alternative.strip()).split()
            if not terms:
                raise VersionError(f"{text!r}: an empty alternative")
            interval = Interval()
            for term in terms:
                interval = interval.intersect(_comparator(term))
            alternatives.append(interval)
        return cls(text, tuple(alternatives))

    def allows(self, version: Version | str) -> bool:
        v = Version.parse(version) if isinstance(version, str) else version
        return any(a.contains(v) for a in self.alternatives)

    @property
    def satisfiable(self) -> bool:
        """Whether any version at all meets the requirement."""
        return any(not a.empty for a in self.alternatives)
