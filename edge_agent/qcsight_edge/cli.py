"""`qcsight agent`: run the edge agent from a YAML file or, under Greengrass, from the component configuration."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from qcsight_core.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, configure_logging
from qcsight_core.errors import ConfigError, QcsightError
from qcsight_edge.agent import Agent, FileConfigWatcher, build_parts
from qcsight_edge.config import AgentConfig, from_greengrass, load_config, validate_config
from qcsight_edge.publisher import Publisher

if TYPE_CHECKING:  # imported where used: `qcsight agent --config` needs no Greengrass SDK
    from qcsight_edge.greengrass_ipc import IpcLink
    from qcsight_edge.model_slot import Offer

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
  qcsight agent --greengrass --thing-name {iot:thingName} --state-dir {work:path}/state \
      --model-slot {kernel:rootPath}/work/com.qcsight.Model
                                                what the com.qcsight.EdgeAgent recipe runs: values
                                                neither nucleus interpolates in configuration come
                                                from the lifecycle script; the model comes from the
                                                com.qcsight.Model component (qcsight_edge/model_slot.py)

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
    gg = parser.add_argument_group("under --greengrass (passed by the component's lifecycle script)")
    gg.add_argument("--thing-name", metavar="NAME",
                    help="the device's thing name when the configuration names none (default $AWS_IOT_THING_NAME, "
                         "which both nuclei set)")
    gg.add_argument("--state-dir", type=Path, metavar="DIR",
                    help="state folder (outbox, images) when the configuration names none")
    gg.add_argument("--model-slot", type=Path, metavar="DIR",
                    help="the folder where com.qcsight.Model offers its bundle: the agent runs the offered bundle "
                         "and answers each new offer (swapped in, or refused with the reason)")
    gg.add_argument("--ipc-give-up", type=float, default=60.0, metavar="S",
                    help="a lost IPC connection is reopened; unreachable this long, the agent exits 1 so that "
                         "the nucleus restarts it (default 60)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")
    return parser


def main(argv: list[str], prog: str = "qcsight agent") -> int:
    args = _parser(prog).parse_args(argv)
    args.prog = prog
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
         subscribe: Callable[[Agent], None] | None = None, stop: threading.Event | None = None) -> int:
    stop = stop or threading.Event()
    _stop_on_signals(stop)
    parts = build_parts(config, publisher=publisher)
    agent = Agent(config, parts, config_poll=watcher)
    if subscribe is not None:
        subscribe(agent)
    return agent.run(stop)


def _run_greengrass(args: argparse.Namespace) -> int:
    from qcsight_edge.greengrass_ipc import IpcLink, ReconnectPolicy, connect_ipc

    stop = threading.Event()
    gave_up: list[str] = []

    def give_up(reason: str) -> None:
        gave_up.append(reason)
        stop.set()

    link = IpcLink(lambda on_lost: connect_ipc(args.ipc_timeout, on_lost=on_lost),
                   ReconnectPolicy(give_up_after_s=args.ipc_give_up), give_up)
    link.start()
    component = _Component(args, link)
    try:
        config = component.configuration()
        if args.check:
            print(json.dumps(config.redacted_dict(), indent=2))
            return EXIT_OK
        code = _run(config, publisher=component.publisher(config), subscribe=component.follow, stop=stop)
    finally:
        component.close()
        link.close(2.0)
    if gave_up:
        print(f"{args.prog}: error: {gave_up[0]}", file=sys.stderr)
        return EXIT_FAILED
    return code


class _Component:
    """The agent as a Greengrass component over an open IPC link, in steps: configuration(), then
    follow(agent) once the agent is built; close() ends what they started, in reverse order."""

    def __init__(self, args: argparse.Namespace, link: IpcLink) -> None:
        from qcsight_edge.greengrass_ipc import GreengrassConfig
        from qcsight_edge.model_slot import ModelSlot

        self._link = link
        self._thing = args.thing_name or os.environ.get("AWS_IOT_THING_NAME", "")
        self._state_dir: Path | None = args.state_dir
        self._slot = ModelSlot(args.model_slot) if args.model_slot is not None else None
        self._offer: Offer | None = None
        self._running: list[Path | None] = [None]  # the bundle judged with, kept across configuration updates
        self._closers: list[Callable[[], None]] = []
        self._settings = GreengrassConfig(link, lambda data: validate_config(self._complete(data)))
        self._closers.append(self._settings.close)

    def _complete(self, data: dict[str, Any]) -> dict[str, Any]:
        return lifecycle_values(data, self._thing, self._state_dir, self._running[0])

    def configuration(self) -> AgentConfig:
        """The agent's configuration: the component's, completed with the lifecycle values and the offered bundle."""
        if self._slot is not None:
            self._offer = self._slot.require_offer()
            self._running[0] = self._offer.bundle
        return from_greengrass(self._complete(self._settings.get()))

    def publisher(self, config: AgentConfig) -> Publisher | None:
        """IPC publishing through the nucleus when the configuration asks for it (else the agent's own transport)."""
        from qcsight_edge.greengrass_ipc import IpcPublisher

        return IpcPublisher(self._link) if config.transport.kind == "ipc" else None

    def follow(self, agent: Agent) -> None:
        """Keep the running agent in step with the component: configuration, deployments, model offers."""
        self._follow_configuration(agent)
        self._defer_updates_while_busy(agent)
        self._follow_model_slot(agent)

    def _follow_configuration(self, agent: Agent) -> None:
        def on_update(data: dict[str, Any]) -> None:
            try:
                agent.apply_config(from_greengrass(self._complete(data)))
            except ConfigError as exc:  # validation normally refused it already; never raise into the SDK
                log.error("Greengrass configuration update refused: %s", exc)
                agent.status("error", error=f"configuration refused: {exc}")

        def on_refused(reason: str) -> None:
            agent.status("error", error=f"configuration refused: {reason}")

        self._settings.subscribe(on_update, on_refused=on_refused)

    def _defer_updates_while_busy(self, agent: Agent) -> None:
        from qcsight_edge.greengrass_ipc import ComponentUpdates

        updates = ComponentUpdates(self._link, lambda: _busy(agent), recheck_ms=250)
        updates.subscribe()
        self._closers.append(updates.close)

    def _follow_model_slot(self, agent: Agent) -> None:
        from qcsight_edge.model_slot import SlotWatcher

        if self._slot is None or self._offer is None:
            return

        def current_bundle() -> Path | None:
            model = agent.current_model()
            return None if model is None else model.source

        watcher = SlotWatcher(self._slot, self._offer, lambda path: _load(agent, path), current_bundle)
        agent.model_listeners.append(_Running(self._running))
        agent.model_listeners.append(watcher)
        self._slot.claim()
        self._closers.append(self._slot.release)
        watcher.start()
        self._closers.append(watcher.stop)

    def close(self) -> None:
        for close in reversed(self._closers):
            close()


def lifecycle_values(data: dict[str, Any], thing_name: str, state_dir: Path | None,
                     bundle: Path | None) -> dict[str, Any]:
    """The component configuration completed with what the lifecycle script passed.

    Neither nucleus interpolates recipe variables inside component configuration by default (Lite
    never does), so the recipe leaves thing_name and state_dir out and the script passes them; a
    value the configuration sets (a deployment merge) wins. The model bundle is always the one
    running from the model slot.
    """
    completed = dict(data)
    if thing_name and not completed.get("thing_name"):
        completed["thing_name"] = thing_name
    if state_dir is not None and not completed.get("state_dir"):
        completed["state_dir"] = str(state_dir)
    if bundle is not None:
        model = completed.get("model")
        completed["model"] = {**(model if isinstance(model, dict) else {}), "bundle": str(bundle)}
    return completed


class _Running:
    """Keeps the bundle the agent judges with, so configuration updates keep it."""

    def __init__(self, running: list[Path | None]) -> None:
        self._running = running

    def model_loaded(self, bundle: Path) -> None:
        self._running[0] = bundle

    def model_rejected(self, bundle: Path, reason: str) -> None:
        pass


def _load(agent: Agent, bundle: Path) -> None:
    if agent.models is not None:
        agent.models.request(replace(agent.config.model, bundle=bundle))


def _busy(agent: Agent) -> bool:
    """A part is being judged right now, or a model is loading.

    Not "parts are queued": on a running line the queue is rarely empty, and deferring every
    deployment until it is would hold updates back for the policy's whole timeout.
    """
    pipeline, models = agent.pipeline, agent.models
    if models is not None and models.busy:
        return True
    if pipeline is None:
        return False
    counts = pipeline.snapshot()
    in_flight = counts["captured"] - counts["judged"] - counts["errors"] - counts["dropped"] - counts["queued"]
    return int(in_flight) > 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
