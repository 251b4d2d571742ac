"""The qcsight_gg exception hierarchy, rooted in QcsightError."""

from __future__ import annotations

from qcsight_core.errors import QcsightError


class GreengrassToolError(QcsightError):
    """Base of every error qcsight_gg raises on purpose."""


class RecipeError(GreengrassToolError):
    """One or more recipes break the recipe format or a rule we check before publishing.

    Attributes:
        problems: every problem found, each naming the recipe, the field and the rule.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__(f"{len(problems)} recipe problem(s):\n  " + "\n  ".join(problems))


class BuildError(GreengrassToolError):
    """A component cannot be built (bad bundle, version, or a wheelhouse pip cannot fill)."""


class PublishError(GreengrassToolError):
    """Artifacts could not be uploaded or the component version not created."""


class DeployError(GreengrassToolError):
    """A deployment request cannot be built or was refused."""


class NucleusError(GreengrassToolError):
    """The local nucleus cannot install, run or deploy a component."""
