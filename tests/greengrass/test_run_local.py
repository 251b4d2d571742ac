"""`qcsight gg run-local` drives the built components end to end, as the Java nucleus and as Greengrass nucleus lite.

Real pieces only: the agent component's wheelhouse installed by its own install step (no index
reachable), the agent started by its run script, the model component's startup script handing
bundles to it, Greengrass IPC on a Unix socket, and the loopback Mosquitto (mutual TLS, per-thing
ACLs) standing in for IoT Core. One device root serves the session, so the agent is installed once,
as on a device the nucleus re-runs the (idempotent) install step at every start.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qcsight_core import messages, topics
from qcsight_edge.errors import PublishError
from qcsight_edge.greengrass_ipc import SOCKET_ENV, TOKEN_ENV, IpcPublisher, connect_ipc
from qcsight_gg import cli
from qcsight_gg.build import AGENT, MODEL
from qcsight_gg.ipc_server import CLASSIC, LITE
from qcsight_gg.nucleus import LocalDeployment, LocalNucleus, NucleusConfig, deploy_to_running
from qcsight_gg.relay import BrokerSettings
from tests.edge.broker import Broker, MqttSubscriber
from tests.greengrass.conftest import NO_NETWORK
from tests.helpers.images import write_image
from tests.helpers.wait import eventually

THING = "line-7-camera-2"
pytestmark = [pytest.mark.slow, pytest.mark.broker]


def fresh_device(root: Path) -> None:
    """The same device, freshly booted with nothing deployed: installed venvs stay, everything else goes."""
    for name in ("state.json", "logs", "packages/artifacts-unarchived", f"work/{MODEL}", f"work/{AGENT}/state"):
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def alerts(cloud: MqttSubscriber) -> list[dict[str, Any]]:
    return [messages.decode(m.payload) for m in cloud.messages() if m.topic == topics.alerts_topic(THING)]


def statuses(cloud: MqttSubscriber) -> list[dict[str, Any]]:
    return [messages.decode(m.payload) for m in cloud.messages() if m.topic == topics.status_topic(THING)]


def put_part(inbox: Path, name: str) -> None:
    """A bright (defect) part, moved in whole so the hot folder never sees half a file."""
    staged = write_image(inbox.parent / "staging" / name, value=240, size=(40, 40), seed=len(name))
    os.replace(staged, inbox / name)


def logs(root: Path) -> str:
    return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-25:])
                     for p in sorted((root / "logs").glob("*.log")))


@pytest.fixture
def device(layout: Path, nucleus_root: Path, installed_agent: tuple[Path, Any], broker: Broker,
           tmp_path: Path) -> Iterator[tuple[Path, BrokerSettings, Path]]:
    _, install = installed_agent
    assert install.returncode == 0, install.stderr[-2000:]
    fresh_device(nucleus_root)
    identity = broker.pki.identity(THING)
    settings = BrokerSettings(broker.host, broker.port, identity.cert, identity.key, broker.pki.ca, THING)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    yield nucleus_root, settings, inbox


@pytest.mark.parametrize("flavor", [CLASSIC, LITE])
def test_run_local_installs_runs_enforces_and_swaps_models_with_rollback(
        flavor: str, layout: Path, device: tuple[Path, BrokerSettings, Path], cloud: MqttSubscriber) -> None:
    root, settings, inbox = device
    config = NucleusConfig(root=root, store=layout, thing_name=THING, flavor=flavor, broker=settings,
                           extra_env=NO_NETWORK)
    merge = {"source": {"kind": "hotfolder", "mode": "trigger", "uri": str(inbox), "settle_s": 0, "poll_s": 0.02},
             "line_signal": {"kind": "none"}}
    with LocalNucleus(config) as nucleus:
        first = nucleus.deploy(LocalDeployment({AGENT: "0.1.0", MODEL: "1.0.0"}, merges={AGENT: merge})).wait(600)
        assert first.succeeded, f"{first}\n{logs(root)}"
        assert {n: s["state"] for n, s in nucleus.status().items()} == {AGENT: "RUNNING", MODEL: "RUNNING"}
        if flavor == LITE:  # Lite serves the recipe's YAML scalars as text; the agent took them anyway
            assert nucleus.configuration(AGENT)["source"]["max_fps"] == "10"

        # The agent, started by its run script, reports through the nucleus to the broker.
        put_part(inbox, "part-000.png")
        eventually(lambda: alerts(cloud), timeout_s=60, message=lambda: f"no alert at the broker\n{logs(root)}")
        (alert,) = alerts(cloud)
        assert alert["thing"] == THING and alert["model"]["version"] == "1"
        assert statuses(cloud)[0]["event"] == "start"

        # The recipe's accessControl is enforced: outside it, UnauthorizedError, with the nucleus's text.
        session = connect_ipc(10.0, environ={SOCKET_ENV: nucleus.socket_path, TOKEN_ENV: nucleus.svcuid(AGENT)})
        publisher = IpcPublisher(session)
        for topic in (topics.line_signal_topic(THING), topics.alerts_topic("another-thing")):
            with pytest.raises(PublishError, match="not authorized"):
                publisher.publish(topic, b"{}").result(10.0)
        session.close(5.0)

        # A new model version, deployed while parts arrive: swapped in, no part lost, no restart.
        sent = [f"part-{i:03d}.png" for i in range(1, 41)]
        feeder = threading.Thread(target=lambda: [put_part(inbox, n) or time.sleep(0.05) for n in sent])
        feeder.start()
        eventually(lambda: len(alerts(cloud)) >= 10, timeout_s=60, message="the line is not running")
        swap = deploy_to_running(root, LocalDeployment({MODEL: "1.1.0"}), timeout_s=300)
        feeder.join(60)
        assert swap.succeeded, f"{swap}\n{logs(root)}"
        eventually(lambda: len(alerts(cloud)) == 41, timeout_s=60,
                   message=lambda: f"{len(alerts(cloud))} of 41 alerts\n{logs(root)}")
        received = alerts(cloud)
        assert sorted(a["source"] for a in received) == ["part-000.png", *sent], "every part judged exactly once"
        versions = [a["model"]["version"] for a in sorted(received, key=lambda a: a["source"])]
        assert versions == sorted(versions) and set(versions) == {"1", "2"}, "old model, then the new one"
        assert len(list((inbox / "done").iterdir())) == 41
        assert [s["event"] for s in statuses(cloud)].count("start") == 1, "the agent was not restarted"

        # A model the agent cannot load: refused, the old one keeps running, the deployment rolled back.
        broken = deploy_to_running(root, LocalDeployment({MODEL: "1.2.0"}), timeout_s=300)
        assert broken.status == "FAILED" and broken.detailed_status == "FAILED_ROLLBACK_COMPLETE", broken
        assert "refused" in broken.failure_cause
        assert nucleus.status()[MODEL] == {**nucleus.status()[MODEL], "version": "1.1.0", "state": "RUNNING"}
        rejected = [s for s in statuses(cloud) if s["event"] == "model_rejected"]
        assert rejected and "1.2.0" in rejected[0]["detail"]["bundle"] and rejected[0]["error"]
        put_part(inbox, "part-999.png")
        eventually(lambda: any(a["source"] == "part-999.png" for a in alerts(cloud)), timeout_s=60,
                   message="no alert after the rollback")
        assert next(a for a in alerts(cloud) if a["source"] == "part-999.png")["model"]["version"] == "2"

    assert cli.main(["run-local", "status", "--root", str(root)]) == 0
    assert {p.topic for p in _all(cloud)} <= {topics.topic(THING, k) for k in topics.KINDS}


def _all(cloud: MqttSubscriber) -> list[Any]:
    return cloud.messages()


def test_a_component_that_fails_to_start_is_rolled_back(layout: Path, device: tuple[Path, BrokerSettings, Path],
                                                         cloud: MqttSubscriber) -> None:
    """The agent's first deployment with a model it cannot load: the agent exits non-zero, nothing stays deployed."""
    root, settings, inbox = device
    config = NucleusConfig(root=root, store=layout, thing_name=THING, broker=settings, extra_env=NO_NETWORK,
                           restart_delay_s=0.1)
    merge = {"source": {"kind": "hotfolder", "mode": "trigger", "uri": str(inbox)}, "line_signal": {"kind": "none"}}
    with LocalNucleus(config) as nucleus:
        result = nucleus.deploy(LocalDeployment({AGENT: "0.1.0", MODEL: "1.2.0"}, merges={AGENT: merge})).wait(600)
        assert result.status == "FAILED" and result.detailed_status == "FAILED_ROLLBACK_COMPLETE", result
        assert f"{AGENT} 0.1.0 is broken" in result.failure_cause and "run exited" in result.failure_cause
        assert nucleus.status() == {}, "rolled back to nothing deployed"
