"""`qcsight agent`: run the edge agent from a YAML file or, under Greengrass, from the component configuration."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from qcsight_core.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, configure_logging
from qcsight_core.errors import ConfigError, QcsightError
from qcsight_edge.agent import Agent, FileConfigWatcher, build_parts
from qcsight_edge.config import AgentConfig, from_greengrass, load_config

log = logging.getLogger(__name__)

EPILOG = """\
Settings are documented in edge_agent/agent.example.yaml. A bad setting is refused before
anything starts, with the field, the value and what is allowed.

Examples:
  qcsight agent --config agent.yaml             run until SIGTERM/SIGINT (or a video file ends)
  qcsight agent --config agent.yaml --check     validate and print the resolved configuration
  qcsight agent --greengrass                    as a Greengrass component: settings from the
                                                component configuration; proposed updates are
                                                validated before a deployment applies them

While running, a changed config file (or a Greengrass configuration update) that names a new
model bundle is loaded, verified and warmed up in the background and swapped in between frames;
a broken or tampered bundle is refused and the running model stays (status model_rejected).
SIGTERM/SIGINT: the frame in flight is finished, the outbox is flushed up to stop_deadline_s,
exit 0. Exit codes: 0 stopped cleanly, 1 failed, 2 bad configuration or usage.
"""


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Run the qcsight edge agent: camera -> verdict -> MQTT.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, metavar="YAML", help="the agent configuration file")
    where.add_argument("--greengrass", action="store_true",
                       help="read the configuration from Greengrass IPC (run as a Greengrass component)")
    parser.add_argument("--check", action="store_true", help="validate the configuration, print it resolved, exit")
    parser.add_argument("--ipc-timeout", type=float, default=10.0, metavar="S",
                        help="seconds to wait for the Greengrass nucleus (default 10)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")
    return parser


def main(argv: list[str], prog: str = "qcsight agent") -> int:
    args = _parser(prog).parse_args(argv)
    configure_logging(args.verbose)
    try:
        if args.greengrass:
            return _run_greengrass(args)
        config = load_config(args.config)
        if args.check:
            print(json.dumps(config.redacted_dict(), indent=2))
            return EXIT_OK
        return _run(config, watcher=FileConfigWatcher(args.config))
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except QcsightError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _run(config: AgentConfig, watcher: FileConfigWatcher | None = None, publisher: Any = None,
         subscribe: Callable[[Agent], None] | None = None) -> int:
    stop = threading.Event()
    _stop_on_signals(stop)
    parts = build_parts(config, publisher=publisher)
    agent = Agent(config, parts, config_poll=watcher)
    if subscribe is not None:
        subscribe(agent)
    return agent.run(stop)


def _run_greengrass(args: argparse.Namespace) -> int:
    from qcsight_edge.config import validate_config
    from qcsight_edge.greengrass_ipc import GreengrassConfig, IpcPublisher, connect_ipc

    session = connect_ipc(args.ipc_timeout)
    try:
        component = GreengrassConfig(session.client, validate_config)
        config = from_greengrass(component.get())
        if args.check:
            print(json.dumps(config.redacted_dict(), indent=2))
            return EXIT_OK
        publisher = IpcPublisher.from_session(session) if config.transport.kind == "ipc" else None

        def follow(agent: Agent) -> None:
            def on_update(data: dict[str, Any]) -> None:
                try:
                    agent.apply_config(from_greengrass(data))
                except ConfigError as exc:  # validation normally refused it already; never raise into the SDK
                    log.error("Greengrass configuration update refused: %s", exc)

            component.subscribe(on_update)

        try:
            return _run(config, publisher=publisher, subscribe=follow)
        finally:
            component.close()
    finally:
        session.close(2.0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
