"""`qcsight agent --greengrass` as the nucleus runs it: configuration, validation and publishing over IPC.

The peer is tests/edge/ipc_server.py (event-stream RPC on a Unix socket, checking the handshake,
request shapes and the recipe's mqttproxy allow-list as the nucleus does). The configuration it
serves is the agent recipe's DefaultConfiguration with the recipe variables resolved.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from qcsight_core import messages
from qcsight_edge.greengrass_ipc import SOCKET_ENV, TOKEN_ENV
from tests.edge.agent_helpers import write_atomically
from tests.edge.ipc_server import IpcServer
from tests.helpers.models import make_tiny_bundle

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "greengrass" / "recipes" / "com.qcsight.EdgeAgent.yaml"
COMPONENT = "com.qcsight.EdgeAgent"
THING = "line-7-camera-2"
SVCUID = "0d7c4d8a-2f51-4a0e-a1a5-6d2f0b8c9e10"


def recipe_configuration(tmp_path: Path) -> tuple[dict[str, Any], list[str]]:
    """The recipe's DefaultConfiguration and publish allow-list with variables resolved as the nucleus does."""
    recipe = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    text = json.dumps(recipe["ComponentConfiguration"]["DefaultConfiguration"])
    text = text.replace("{iot:thingName}", THING).replace("{work:path}", str(tmp_path / "work"))
    text = text.replace("{com.qcsight.Model:artifacts:decompressedPath}", str(tmp_path / "model-1.0.0"))
    config = json.loads(text)
    policies = config["accessControl"]["aws.greengrass.ipc.mqttproxy"]
    allow = [r for p in policies.values() if "aws.greengrass#PublishToIoTCore" in p["operations"]
             for r in p["resources"]]
    # This device drops part pictures in a folder instead of having a USB camera.
    config["source"] = {"kind": "hotfolder", "uri": str(tmp_path / "inbox"), "settle_s": 0.0, "poll_s": 0.02}
    config["line_signal"] = {"kind": "none"}
    return config, allow


def published(server: IpcServer) -> list[dict[str, Any]]:
    return [messages.decode(p.payload) for p in server.published]


def events(server: IpcServer) -> list[str]:
    return [m["event"] for m in published(server) if m["schema"] == messages.STATUS]


def test_agent_runs_from_the_component_configuration_validates_deployments_and_hot_swaps(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path / "model-1.0.0" / "bundle", version="1")
    make_tiny_bundle(tmp_path / "model-1.1.0" / "bundle", version="2")
    config, allow = recipe_configuration(tmp_path)
    with IpcServer(SVCUID, COMPONENT, config, allow) as server:
        env = {**os.environ, "PYTHONPATH": str(REPO / "edge_agent"), SOCKET_ENV: server.socket_path,
               TOKEN_ENV: SVCUID}
        process = subprocess.Popen([sys.executable, "-m", "qcsight_core.cli", "agent", "--greengrass"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            server.wait_until(lambda: "start" in events(server), 30.0, "the start status")
            server.wait_for_subscriptions(10.0)
            start = next(m for m in published(server) if m.get("event") == "start")
            assert start["thing"] == THING and start["model"]["version"] == "1"

            # A deployment with a bad value is refused before the nucleus applies it, naming the field.
            bad = copy.deepcopy(config)
            bad["metrics"]["window_s"] = 0
            report = server.propose_configuration(bad, "deployment-bad", 10.0)
            assert report["status"] == "REJECTED" and "metrics.window_s" in report["message"]
            new = copy.deepcopy(config)
            new["model"]["bundle"] = str(tmp_path / "model-1.1.0" / "bundle")
            assert server.propose_configuration(new, "deployment-good", 10.0)["status"] == "ACCEPTED"

            # The accepted deployment is applied: the new bundle is hot-swapped in, no restart.
            server.set_configuration(new)
            server.wait_until(lambda: "model_change" in events(server), 30.0, "the model change")
            write_atomically(tmp_path / "inbox" / "part-1.png", 240, size=(40, 40))
            server.wait_until(lambda: any(m["schema"] == messages.ALERT for m in published(server)), 30.0,
                              "an alert")
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        log_text = output.decode(errors="replace")
        assert process.returncode == 0, log_text
        stored = published(server)
        assert {p.topic for p in server.published} <= set(allow)
        (alert,) = [m for m in stored if m["schema"] == messages.ALERT]
        assert alert["model"]["version"] == "2" and alert["source"] == "part-1.png"
        assert events(server) == ["start", "model_change", "stop"]
        assert [m["seq"] for m in stored] == sorted(m["seq"] for m in stored)
        assert server.violations == []
