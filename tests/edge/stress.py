"""The zero-loss stress scenario: the real agent through broker restarts and kill -9s, checked against batch scoring.

Parts (real PNG files) arrive in the hot folder throughout while the broker (real Mosquitto,
TLS client certificates, per-thing ACLs, persistence) is restarted and the `qcsight agent`
process is killed with SIGKILL and started again. Every part whose batch verdict
(`qcsight batch score`, run as its own process on the same files with the same bundle) is an
alert must reach the cloud subscriber, de-duplicated by message id, with the same verdict.
Used by tests/edge/test_agent_e2e.py (small) and benchmarks/stress_agent.py (bigger).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qcsight_core import messages
from qcsight_edge.capture import DONE_DIR, FAILED_DIR
from tests.edge.agent_helpers import AgentProcess, agent_config
from tests.edge.broker import Broker, MqttSubscriber, Received
from tests.helpers.images import write_image
from tests.helpers.models import make_tiny_bundle
from tests.helpers.wait import eventually

REPO = Path(__file__).resolve().parents[2]
THING = "line1-cam1"
ALERT_VERDICTS = ("defect", "uncertain")  # alerts.on_uncertain is true in the scenario's configuration


@dataclass(frozen=True)
class StressPlan:
    """How big the run is: parts arriving, broker restarts and agent kills spread over the arrivals."""

    parts: int = 100
    broker_restarts: int = 10
    agent_kills: int = 10
    fault_every_s: float = 1.2
    broker_down_s: float = 0.3
    corrupt_parts: int = 2
    seed: int = 0


@dataclass
class StressResult:
    """What the cloud received against what batch scoring expects; ``lost`` must be empty."""

    parts: int
    broker_restarts: int
    agent_kills: int
    expected: set[str]
    received: set[str]
    alert_messages: int
    unique_alert_ids: int
    verdict_mismatches: list[str]
    done: int
    failed: int
    seconds: float
    agent_log: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lost(self) -> set[str]:
        return self.expected - self.received

    @property
    def unexpected(self) -> set[str]:
        return self.received - self.expected

    def figures(self) -> dict[str, Any]:
        return {"parts": self.parts, "faults": {"broker_restarts": self.broker_restarts,
                                                "agent_kills": self.agent_kills},
                "expected": len(self.expected), "received": len(self.received), "lost": len(self.lost),
                "unexpected": len(self.unexpected), "verdict_mismatches": len(self.verdict_mismatches),
                "alert_messages": self.alert_messages, "unique_alert_ids": self.unique_alert_ids,
                "done": self.done, "failed": self.failed, "seconds": round(self.seconds, 1)}


def make_parts(folder: Path, plan: StressPlan) -> list[Path]:
    """Real PNGs, dark (good) to bright (defect) for the tiny model, plus a few undecodable files.

    Brightness stays away from the tiny model's decision boundary (about 100-150), so batch
    and agent cannot disagree through float rounding of a borderline score.
    """
    rng = random.Random(plan.seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(plan.parts - plan.corrupt_parts):
        value = rng.choice([rng.randint(10, 90), rng.randint(165, 245)])
        paths.append(write_image(folder / f"part-{index:04d}.png", value=value, size=(48, 64), seed=index))
    for index in range(plan.corrupt_parts):
        path = folder / f"corrupt-{index:02d}.jpg"
        path.write_bytes(b"\xff\xd8\xff\xe0 not a picture " + bytes([index]))
        paths.append(path)
    rng.shuffle(paths)
    return paths


def batch_verdicts(bundle: Path, parts: Path, output: Path) -> dict[str, dict[str, Any]]:
    """`qcsight batch score` on the same files with the same bundle, as its own process: file name -> row."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / root) for root in ("edge_agent", "batch"))}
    completed = subprocess.run(
        [sys.executable, "-m", "qcsight_core.cli", "batch", "score", "--bundle", str(bundle), "--input", str(parts),
         "--output", str(output), "--workers", "0", "--threads", "1", "--no-count"],
        env=env, capture_output=True, text=True, timeout=120, check=False)
    if completed.returncode != 0:
        raise AssertionError(f"qcsight batch score failed ({completed.returncode}): {completed.stderr[-2000:]}")
    rows = [json.loads(line) for line in output.read_text().splitlines() if line.strip()]
    return {Path(row["source"]).name: row for row in rows}


def _write_config(workdir: Path, broker: Broker) -> Path:
    ident = broker.pki.identity(THING)
    data = agent_config(
        workdir, workdir / "bundle",
        transport={"kind": "mqtt5", "endpoint": broker.host, "port": broker.port, "cert": str(ident.cert),
                   "key": str(ident.key), "ca": str(broker.pki.ca), "iot_core_limits": False,
                   "connect_timeout_s": 3, "min_reconnect_delay_s": 0.1, "max_reconnect_delay_s": 0.5,
                   "ack_timeout_s": 5},
        alerts={"on_uncertain": True},
        metrics={"window_s": 3600, "heartbeat_s": 3600},
        stop_deadline_s=10,
    )
    path = workdir / "agent.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class _Feeder(threading.Thread):
    """Drops parts into the inbox (hidden name, then rename: the rename-on-complete convention), up to a quota.

    The scenario raises the quota before each fault, so parts arrive evenly between all the
    faults, however long restarts take.
    """

    def __init__(self, parts: list[Path], inbox: Path, interval_s: float) -> None:
        super().__init__(name="stress-feeder", daemon=True)
        self.parts = parts
        self.inbox = inbox
        self.interval_s = interval_s
        self.stop = threading.Event()
        self.dropped = 0
        self._quota = 0
        self._more = threading.Condition()

    def allow(self, count: int) -> None:
        with self._more:
            self._quota = min(count, len(self.parts))
            self._more.notify_all()

    def run(self) -> None:
        for part in self.parts:
            with self._more:
                while self.dropped >= self._quota and not self.stop.is_set():
                    self._more.wait(0.2)
            if self.stop.is_set():
                return
            hidden = self.inbox / f".{part.name}"
            shutil.copyfile(part, hidden)
            os.replace(hidden, self.inbox / part.name)
            self.dropped += 1
            if self.stop.wait(self.interval_s):
                return


def judged(inbox: Path) -> int:
    return sum(1 for d in (DONE_DIR, FAILED_DIR) for p in (inbox / d).iterdir() if p.is_file())


def run_stress(workdir: Path, broker: Broker, cloud: MqttSubscriber, plan: StressPlan,
               progress: Any = None) -> StressResult:
    """Run the scenario; returns the counts (the caller asserts or prints them)."""
    started = time.monotonic()
    make_tiny_bundle(workdir / "bundle")
    parts = make_parts(workdir / "parts", plan)
    rows = batch_verdicts(workdir / "bundle", workdir / "parts", workdir / "batch.jsonl")
    expected = {name for name, row in rows.items() if row["verdict"] in ALERT_VERDICTS}
    inbox = workdir / "inbox"
    for folder in (DONE_DIR, FAILED_DIR):
        (inbox / folder).mkdir(parents=True, exist_ok=True)
    agent = AgentProcess(_write_config(workdir, broker), workdir / "agent.log")
    faults = ["restart"] * plan.broker_restarts + ["kill"] * plan.agent_kills
    random.Random(plan.seed).shuffle(faults)
    per_fault = len(parts) / (len(faults) + 1)
    feeder = _Feeder(parts, inbox, plan.fault_every_s / max(per_fault, 1.0) * 0.8)
    kills = restarts = 0
    try:
        agent.start()
        feeder.start()
        for number, fault in enumerate(faults, 1):
            feeder.allow(round(per_fault * number))
            before = judged(inbox)
            time.sleep(plan.fault_every_s)  # parts arrive meanwhile: the pace of the line, not a wait for anything
            if fault == "kill":
                # Kill an agent that is working: it has judged one of the parts that arrived meanwhile.
                eventually(lambda before=before: judged(inbox) > before, timeout_s=30.0, interval_s=0.02,
                           message=lambda: "the agent judged nothing:\n" + agent.log()[-3000:])
                agent.kill()
                agent.start()
                kills += 1
            else:
                broker.restart(plan.broker_down_s)  # an outage of that length, not a wait for anything
                restarts += 1
            if progress is not None:
                progress(f"fault {number}/{len(faults)}: {fault}; {feeder.dropped}/{len(parts)} parts dropped, "
                         f"{judged(inbox)} judged")
        feeder.allow(len(parts))
        feeder.join(300)
        eventually(lambda: judged(inbox) == len(parts), timeout_s=60.0, interval_s=0.05,
                   message=lambda: f"{judged(inbox)}/{len(parts)} parts judged:\n{agent.log()[-3000:]}")
        cloud.wait_for(lambda got: _alert_sources(got) >= expected, 60.0)
        eventually(lambda: agent.running, timeout_s=30.0, message=lambda: agent.log()[-3000:])
        stopped = agent.signal_stop(30.0)
        if stopped != 0:
            raise AssertionError(f"the agent exited {stopped} on SIGTERM:\n{agent.log()[-3000:]}")
    finally:
        feeder.stop.set()
        agent.kill()
    alerts = [messages.decode(r.payload) for r in cloud.messages() if r.topic == f"qcsight/{THING}/alerts"]
    unique = {m["message_id"]: m for m in alerts}
    received = {m["source"] for m in unique.values()}
    mismatches = [f"{m['source']}: agent {m['verdict']['status']}/{m['verdict']['label']}, batch "
                  f"{rows[m['source']]['verdict']}/{rows[m['source']]['class']}"
                  for m in unique.values() if m["source"] in rows
                  and (m["verdict"]["status"], m["verdict"]["label"]) != (rows[m["source"]]["verdict"],
                                                                         rows[m["source"]]["class"])]
    per_source = Counter(m["source"] for m in unique.values())
    return StressResult(
        parts=len(parts), broker_restarts=restarts, agent_kills=kills, expected=expected, received=received,
        alert_messages=len(alerts), unique_alert_ids=len(unique), verdict_mismatches=mismatches,
        done=len(list((inbox / DONE_DIR).iterdir())), failed=len(list((inbox / FAILED_DIR).iterdir())),
        seconds=time.monotonic() - started, agent_log=agent.log(),
        extra={"parts_alerted_twice": sorted(s for s, n in per_source.items() if n > 1)})


def _alert_sources(received: list[Received]) -> set[str]:
    return {messages.decode(r.payload)["source"] for r in received if r.topic == f"qcsight/{THING}/alerts"}
