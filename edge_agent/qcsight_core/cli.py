"""The `qcsight` command: dispatches each subcommand to the package that owns it.

Subcommand modules are named by string and imported only when run, so `qcsight data` runs
without torch and a missing extra is reported, not a traceback (tests/core/test_cli.py checks
that every named module and its main exist).
qcsight_core never imports the other qcsight packages at module level.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qcsight_core import __version__
from qcsight_core.errors import QcsightError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
log = logging.getLogger("qcsight")


@dataclass(frozen=True)
class Command:
    module: str
    extra: str | None
    summary: str
    requires: tuple[str, ...] = ()  # top-level modules of the extra, checked before anything runs


COMMANDS: dict[str, Command] = {
    "data": Command("qcsight_data.cli", None, "index, split, fingerprint and synthesise datasets"),
    "train": Command(
        "qcsight_train.cli", "train", "train a model and export a bundle (local, torchrun, SageMaker)",
        ("torch", "torchvision", "albumentations", "onnx"),
    ),
    "evaluate": Command(
        "qcsight_train.evaluate_cli", "train", "evaluate a bundle on a labelled dataset", ("matplotlib", "onnx")
    ),
    "batch": Command("qcsight_batch.cli", "batch", "score bulk imagery with a bundle; submit Batch Transform jobs"),
    "agent": Command("qcsight_edge.cli", "edge", "run the edge agent: camera -> verdict -> MQTT", ("awscrt", "awsiot")),
    "bundle": Command("qcsight_core.bundle_cli", None, "inspect, verify, pack and unpack model bundles"),
    "gg": Command(
        "qcsight_gg.cli", "gg", "Greengrass: build, validate, publish, deploy the components; run-local",
        ("boto3", "jsonschema", "awscrt", "awsiot"),
    ),
    "cloud": Command("qcsight_cloud.cli", "cloud", "ingest fleet messages, show the fleet, run the retraining policy",
                     ("boto3",)),
    "review": Command("qcsight_review.cli", "review", "the operators' review web app; users; label export",
                      ("starlette", "jinja2", "uvicorn", "bcrypt", "itsdangerous")),
    "runs": Command("qcsight_train.runs_cli", "tracking", "list and compare tracked training runs (MLflow)",
                    ("mlflow",)),
}


def _parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<10} {cmd.summary}" for name, cmd in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="qcsight",
        description="qcsight: visual quality control for factory lines.",
        epilog=f"commands:\n{lines}\n\nRun 'qcsight COMMAND --help' for a command's options.\n"
        "Exit codes: 0 done, 1 failed, 2 usage error or missing extra.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"qcsight {__version__}")
    parser.add_argument("command", nargs="?", metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    return parser


def missing_extra_message(name: str, command: Command, missing: str) -> str:
    return (
        f"qcsight {name} needs the '{command.extra}' extra (module '{missing}' is not installed).\n"
        f"Install it with: pip install 'qcsight[{command.extra}]'"
    )


def missing_module(command: Command) -> str | None:
    """The first of the command's required modules that cannot be found, without importing any."""
    for module in command.requires:
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except (ImportError, ValueError):
            return module
    return None


def load_command(name: str) -> Any:
    """Import a subcommand's module; raises ModuleNotFoundError for a missing dependency."""
    return importlib.import_module(COMMANDS[name].module)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not args or args[0] in ("-h", "--help", "--version"):
        parser.parse_args(args or ["--help"])
        return EXIT_OK
    name, rest = args[0], args[1:]
    command = COMMANDS.get(name)
    if command is None:
        parser.print_usage(sys.stderr)
        print(f"qcsight: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    absent = missing_module(command)
    if absent is not None and command.extra is not None:
        print(missing_extra_message(name, command, absent), file=sys.stderr)
        return EXIT_USAGE
    try:
        module = load_command(name)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if command.extra is None or missing.startswith("qcsight_") or not missing:
            raise
        print(missing_extra_message(name, command, missing), file=sys.stderr)
        return EXIT_USAGE
    run = module.main
    try:
        return int(run(rest, prog=f"qcsight {name}"))
    except QcsightError as exc:
        log.debug("failed", exc_info=True)
        print(f"qcsight {name}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"qcsight {name}: interrupted", file=sys.stderr)
        return 130


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace | int:
    """A subcommand's arguments, or the exit code argparse chose (--help: 0, a usage error: 2, already printed).

    Subcommands run inside the dispatcher, which turns the returned code into the process's exit code.
    """
    try:
        return parser.parse_args(list(argv))
    except SystemExit as exc:
        if exc.code is None:
            return EXIT_OK
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


def configure_logging(verbose: int = 0) -> None:
    """One line per record, to stderr; called once by each subcommand's main()."""
    level = logging.DEBUG if verbose > 0 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
