"""The qcsight command: help, unknown commands, and the missing-extra message."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qcsight_core import cli

# Runs qcsight in a fresh interpreter where the given modules cannot be imported,
# as on a device that installed only the edge extra.
_BLOCKED = textwrap.dedent(
    """
    import sys
    from importlib.abc import MetaPathFinder

    class Block(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    from qcsight_core.cli import main
    sys.exit(main({argv!r}))
    """
)


def _run_blocked(blocked: set[str], argv: list[str]) -> subprocess.CompletedProcess[str]:
    code = _BLOCKED.format(blocked=blocked, argv=argv)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_top_level_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out
    assert "Exit codes" in out


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["frobnicate"]) == cli.EXIT_USAGE
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("command", "blocked", "extra"),
    [
        ("train", {"torch"}, "train"),
        ("evaluate", {"torch", "matplotlib"}, "train"),
        ("agent", {"awscrt", "awsiot"}, "edge"),
        ("cloud", {"boto3"}, "cloud"),
    ],
)
def test_missing_extra_names_the_extra_and_exits_2(command: str, blocked: set[str], extra: str) -> None:
    result = _run_blocked(blocked, [command, "--help"])
    assert result.returncode == 2, result.stderr
    assert f"qcsight {command} needs the '{extra}' extra" in result.stderr
    assert f"pip install 'qcsight[{extra}]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_data_command_works_without_torch() -> None:
    result = _run_blocked({"torch", "torchvision", "albumentations"}, ["data", "--help"])
    assert result.returncode == 0, result.stderr
    assert "synth" in result.stdout


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_names_a_module_with_the_main_the_dispatcher_calls(name: str) -> None:
    """The dispatcher names modules by string: a move that forgets COMMANDS fails here, not on a user's device.

    Read without importing, since a command's module may need an extra this venv lacks.
    """
    module = cli.COMMANDS[name].module
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"qcsight {name}: no module {module}"
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    mains = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"]
    assert mains, f"qcsight {name}: {module} has no top-level main()"
    parameters = [a.arg for a in mains[0].args.args]
    assert len(parameters) >= 2 and parameters[1] == "prog", f"{module}.main must take (argv, prog): {parameters}"
