"""`qcsight agent --greengrass` as both nuclei run it: configuration, validation, the model slot and a lost IPC link.

The peer is qcsight_gg/ipc_server.py, the IPC server of `qcsight gg run-local` (event-stream RPC on a
Unix socket, checking the handshake, request shapes and the recipe's mqttproxy allow-list as the
nucleus does), in its classic (Java nucleus) and lite (Greengrass nucleus lite) flavours. The agent
is started the way the recipe's run script starts it; the configuration served is the recipe's
DefaultConfiguration (every scalar a string on lite, as Lite's YAML decoder serves it). New models
are offered with the model component's own script (greengrass/scripts/offer_model.sh).
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from qcsight_core import messages
from qcsight_edge.greengrass_ipc import SOCKET_ENV, TOKEN_ENV
from qcsight_gg import ipc_server as ipc
from qcsight_gg.build import as_lite_serves
from qcsight_gg.ipc_server import IpcServer, publish_resources
from tests.edge.agent_helpers import write_atomically
from tests.helpers.models import make_tiny_bundle, make_unloadable_bundle
from tests.helpers.wait import eventually

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "greengrass" / "recipes" / "com.qcsight.EdgeAgent.yaml"
OFFER = REPO / "greengrass" / "scripts" / "offer_model.sh"
COMPONENT = "com.qcsight.EdgeAgent"
THING = "line-7-camera-2"
SVCUID = "0d7c4d8a-2f51-4a0e-a1a5-6d2f0b8c9e10"


def served(tmp_path: Path, flavor: str, **settings: Any) -> tuple[dict[str, Any], list[str]]:
    """The recipe's DefaultConfiguration as the nucleus serves it, with this device's hot folder merged in."""
    recipe = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    config = copy.deepcopy(recipe["ComponentConfiguration"]["DefaultConfiguration"])
    allow = publish_resources(config["accessControl"], THING)
    config["source"] = {"kind": "hotfolder", "uri": str(tmp_path / "inbox"), "settle_s": 0.0, "poll_s": 0.02}
    config["line_signal"] = {"kind": "none"}
    config.update(settings)
    return (as_lite_serves(config) if flavor == ipc.LITE else config), allow


def offer(bundle: Path, slot: Path, wait_s: int = 30) -> subprocess.CompletedProcess[str]:
    """Run the model component's startup step, as the nucleus does."""
    return subprocess.run(["sh", str(OFFER), str(bundle), str(slot), str(wait_s)], capture_output=True, text=True,
                          timeout=wait_s + 10, check=False)


def published(server: IpcServer) -> list[dict[str, Any]]:
    return [messages.decode(p.payload) for p in server.published]


def events(server: IpcServer) -> list[str]:
    return [m["event"] for m in published(server) if m["schema"] == messages.STATUS]


class Agent:
    def __init__(self, server: IpcServer, tmp_path: Path, slot: Path, give_up_s: float = 60.0) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO / "edge_agent"), SOCKET_ENV: server.socket_path,
               TOKEN_ENV: SVCUID}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qcsight_core.cli", "agent", "--greengrass", "--thing-name", THING,
             "--state-dir", str(tmp_path / "state"), "--model-slot", str(slot), "--ipc-give-up", str(give_up_s)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        self.output = ""

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            out, _ = self.process.communicate(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                out, _ = self.process.communicate(timeout=10)
        self.output = out.decode(errors="replace")
        return self.process.returncode


@pytest.fixture
def slot(tmp_path: Path) -> Path:
    """The model component has started once: its bundle 1 is on offer."""
    make_tiny_bundle(tmp_path / "model-1.0.0" / "bundle", version="1")
    folder = tmp_path / "work" / "com.qcsight.Model"
    first = offer(tmp_path / "model-1.0.0" / "bundle", folder)
    assert first.returncode == 0 and "no agent is running" in first.stdout, first.stderr
    return folder


@pytest.mark.parametrize("flavor", [ipc.CLASSIC, ipc.LITE])
def test_the_agent_runs_on_both_nuclei_validates_configuration_and_swaps_offered_models(
        tmp_path: Path, slot: Path, flavor: str) -> None:
    make_tiny_bundle(tmp_path / "model-1.1.0" / "bundle", version="2")
    make_unloadable_bundle(tmp_path / "model-1.2.0" / "bundle", version="3")
    config, allow = served(tmp_path, flavor)
    with IpcServer(SVCUID, COMPONENT, config, allow, flavor=flavor) as server:
        agent = Agent(server, tmp_path, slot)
        try:
            server.wait_until(lambda: "start" in events(server), 30.0, "the start status")
            start = next(m for m in published(server) if m.get("event") == "start")
            # Thing name, state folder and model came through the run script, not configuration.
            assert start["thing"] == THING and start["model"]["version"] == "1"
            assert start["detail"]["config"]["outbox"]["path"] == str(tmp_path / "state" / "outbox.db")
            server.wait_for_subscriptions(10.0, validation=flavor == ipc.CLASSIC)

            bad = {**server.configuration(), "metrics": {"window_s": "0" if flavor == ipc.LITE else 0}}
            if flavor == ipc.CLASSIC:  # the Java nucleus asks before it applies a deployment
                report = server.propose_configuration(bad, "deployment-bad", 10.0)
                assert report["status"] == "REJECTED" and "metrics.window_s" in report["message"]
            else:  # Lite cannot ask: the agent refuses the bad update when it arrives, and says so
                assert not server.validates()
                server.set_configuration(bad)
                server.wait_until(lambda: any("metrics.window_s" in m.get("error", "") for m in published(server)),
                                  10.0, "the refusal in status")

            # A new model component version offers its bundle: swapped in, the offer answered.
            swapped = offer(tmp_path / "model-1.1.0" / "bundle", slot)
            assert swapped.returncode == 0, swapped.stderr
            assert "swapped in" in swapped.stdout
            write_atomically(tmp_path / "inbox" / "part-1.png", value=240, size=(40, 40))
            server.wait_until(lambda: any(m["schema"] == messages.ALERT for m in published(server)), 30.0, "an alert")

            # A bundle the agent cannot load is refused with the reason; the model in use stays.
            refused = offer(tmp_path / "model-1.2.0" / "bundle", slot)
            assert refused.returncode == 1 and "refused" in refused.stderr
            rejected = next(m for m in published(server) if m.get("event") == "model_rejected")
            assert "model-1.2.0" in rejected["detail"]["bundle"] and rejected["error"]
            write_atomically(tmp_path / "inbox" / "part-2.png", value=240, size=(40, 40))
            server.wait_until(lambda: sum(m["schema"] == messages.ALERT for m in published(server)) == 2, 30.0,
                              "the second alert")
        finally:
            code = agent.stop()
        assert code == 0, agent.output
        alerts = [m for m in published(server) if m["schema"] == messages.ALERT]
        assert [(a["source"], a["model"]["version"]) for a in alerts] == [("part-1.png", "2"), ("part-2.png", "2")]
        assert {p.topic for p in server.published} <= set(allow)
        assert server.violations == []
    assert not (slot / "agent.pid").exists(), "the agent releases the slot when it stops"


def test_a_dropped_ipc_connection_is_reopened_and_the_agent_keeps_reporting(tmp_path: Path, slot: Path) -> None:
    config, allow = served(tmp_path, ipc.CLASSIC, metrics={"window_s": 60, "heartbeat_s": 0.5})
    with IpcServer(SVCUID, COMPONENT, config, allow) as server:
        agent = Agent(server, tmp_path, slot)
        try:
            server.wait_until(lambda: "heartbeat" in events(server), 30.0, "a heartbeat")
            server.wait_for_subscriptions(10.0)
            assert server.drop_connections() >= 1
            server.wait_until(lambda: sum(a.accepted for a in server.connect_attempts) >= 2, 15.0, "a new session")
            before = len(published(server))
            server.wait_until(lambda: len(published(server)) > before, 15.0, "messages on the new session")
            server.wait_for_subscriptions(10.0)
        finally:
            code = agent.stop()
        assert code == 0, agent.output
        assert "reconnected" in agent.output


def test_a_nucleus_gone_past_the_limit_ends_the_agent_with_an_error(tmp_path: Path, slot: Path) -> None:
    """Today the agent never reconnects: it runs on, quiet, and the nucleus never restarts it."""
    # With no nucleus nothing can be flushed: a short stop deadline keeps the test short (the
    # messages stay in the outbox for the next start either way).
    config, allow = served(tmp_path, ipc.CLASSIC, stop_deadline_s=1)
    with IpcServer(SVCUID, COMPONENT, config, allow) as server:
        agent = Agent(server, tmp_path, slot, give_up_s=1.5)
        try:
            server.wait_until(lambda: "start" in events(server), 30.0, "the start status")
            server.stop(remove_dir=False)
            stopped = time.monotonic()
            eventually(lambda: agent.process.poll() is not None, timeout_s=20.0,
                       message="the agent still runs with no nucleus")
            assert time.monotonic() - stopped >= 1.5
        finally:
            code = agent.stop()
            server.start()
    assert code == 1, agent.output
    assert "unreachable" in agent.output and "limit 1.5s" in agent.output
