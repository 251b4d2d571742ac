"""The whole loop on one machine (`make demo`, after the first model is trained; also the loop's end-to-end test).

Two devices on local Greengrass nuclei (`qcsight gg run-local`) run the edge agent on a hot-folder
camera fed by this script; their messages go to Mosquitto on loopback over mutual TLS;
`qcsight cloud serve` ingests them, runs the retraining policy, the local pipeline, the registry
and the rollout. This script plays the line and the people: it feeds parts, darkens the camera
(the drift), reviews alerts as an operator would (the store's add_review, the true class known
from the part it fed), approves the candidate the gate passed, and waits for the canary to be
promoted. Each step prints where to look. The last line is a JSON summary (times measured here).

Usage: python scripts/loop_demo.py --out DIR --data DIR --bundle DIR [--img-size 64 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.edge.broker: the loopback Mosquitto and its PKI, as the broker tests use

from qcsight_cloud import timestamps  # noqa: E402
from qcsight_cloud.registry import PENDING, PROMOTED, ROLLED_BACK, Registry, component_version  # noqa: E402
from qcsight_cloud.sqlite_store import SqliteStore  # noqa: E402
from qcsight_edge.capture import file_frame_id  # noqa: E402
from tests.edge.broker import CLOUD, Broker, Pki, find_mosquitto  # noqa: E402

PY = sys.executable
QC = [PY, "-m", "qcsight_core.cli"]
AGENT, MODEL = "com.qcsight.EdgeAgent", "com.qcsight.Model"
AGENT_VERSION = "0.0.1"
LINE = "line-1"
THINGS = ("cam-1", "cam-2")
DARKEN = 0.45  # the drift: the line's lighting drops to 45 %
T_START = time.monotonic()


def say(text: str) -> None:
    print(f"[demo {time.monotonic() - T_START:6.1f}s] {text}", flush=True)


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, poll_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:g} s")
        time.sleep(poll_s)


def qc(*args: str, log: Path | None = None) -> str:
    done = subprocess.run([*QC, *args], capture_output=True, text=True, check=False)
    if log is not None:
        with log.open("a") as handle:
            handle.write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"qcsight {' '.join(args)} failed ({done.returncode}): {done.stderr[-1500:]}")
    return done.stdout


def write_dev_agent(layout: Path) -> None:
    """com.qcsight.EdgeAgent for this machine: the agent recipe with the installed qcsight instead of a wheelhouse.

    The production component installs its locked wheelhouse into a venv (a minute and 115 MB); here
    the run step starts the agent from the interpreter running the demo, with the same arguments.
    """
    recipe = yaml.safe_load((REPO / "greengrass" / "recipes" / f"{AGENT}.yaml").read_text())
    recipe["ComponentVersion"] = AGENT_VERSION
    run = (f"exec {shlex.quote(PY)} -m qcsight_core.cli agent --greengrass --thing-name \"{{iot:thingName}}\" "
           "--state-dir \"{work:path}/state\" --model-slot \"{kernel:rootPath}/work/com.qcsight.Model\"")
    lifecycle = {"Setenv": {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}, "run": run}
    recipe["Manifests"] = [{"Platform": {"os": "linux", "runtime": "*"}, "Lifecycle": lifecycle},
                           {"Platform": {"os": "linux"}, "Lifecycle": lifecycle}]
    (layout / "recipes").mkdir(parents=True, exist_ok=True)
    (layout / "recipes" / f"{AGENT}-{AGENT_VERSION}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def darken(image: np.ndarray) -> np.ndarray:
    return np.clip(image.astype(np.float32) * DARKEN, 0, 255).astype(np.uint8)


def holdout(source: Path, out: Path) -> Path:
    """The fixed held-out set: unseen parts as the line saw them before the drift and after it."""
    for folder in sorted(p for p in source.iterdir() if p.is_dir() and p.name != "masks"):
        (out / folder.name).mkdir(parents=True, exist_ok=True)
        for image in sorted(folder.glob("*.png")):
            pixels = cv2.imread(str(image))
            cv2.imwrite(str(out / folder.name / image.name), pixels)
            cv2.imwrite(str(out / folder.name / f"dark-{image.name}"), darken(pixels))
    return out


class Line:
    """Feeds parts into each device's hot folder; after drift() the camera is darker. Knows each part's class."""

    def __init__(self, pool: Path, inboxes: dict[str, Path], fps: float) -> None:
        self.parts = [(p.parent.name, cv2.imread(str(p))) for p in sorted(pool.glob("*/*.png"))
                      if p.parent.name != "masks"]
        self.inboxes = inboxes
        self.fps = fps
        self.truth: dict[str, str] = {}  # frame_id -> class
        self.dark = threading.Event()
        self.stop = threading.Event()
        self.fed = 0
        self.thread = threading.Thread(target=self._run, name="line", daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng(5)
        n = 0
        while not self.stop.wait(1.0 / self.fps):
            for thing, inbox in self.inboxes.items():
                label, pixels = self.parts[int(rng.integers(len(self.parts)))]
                name = f"part-{n:06d}.png"
                tmp = inbox.parent / f".{thing}-{name}"
                cv2.imwrite(str(tmp), darken(pixels) if self.dark.is_set() else pixels)
                tmp.replace(inbox / name)
                self.truth[file_frame_id(name, os.stat(inbox / name))] = label
                self.fed += 1
            n += 1


def review_alerts(store: SqliteStore, line: Line, since: str, reviewed: set[str], good: str) -> int:
    """An operator works through the line's new alerts: confirms, relabels, or calls false alarms."""
    from qcsight_cloud.store import InboxQuery

    page = store.inbox(InboxQuery(line=LINE, since=timestamps.parse(since), reviewed=False, limit=200))
    for alert in page.items:
        if alert.message_id in reviewed or alert.review.reviewed:
            continue
        truth = line.truth.get(alert.frame_id)
        if truth is None:
            continue
        if truth == good:
            store.add_review(alert.message_id, "operator-1", "false_alarm", good)
        elif truth == alert.label:
            store.add_review(alert.message_id, "operator-1", "confirm")
        else:
            store.add_review(alert.message_id, "operator-1", "relabel", truth)
        reviewed.add(alert.message_id)
    return len(reviewed)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="the base training data (class folders)")
    parser.add_argument("--bundle", type=Path, required=True, help="the first model's bundle (production)")
    parser.add_argument("--img-size", type=int, default=64, help="synthetic part size for the line and hold-out")
    # The line draws parts from the pool at random, and each alert an operator reviews becomes a training image:
    # with 12 parts per class the 120 reviewed images held ~70 distinct parts, copies fell on both sides of the
    # retraining's train/validation split, and its threshold was chosen on images it had trained on.
    parser.add_argument("--parts", type=int, default=60,
                        help="distinct synthetic parts per class in the line's pool (a line rarely sees a part twice)")
    parser.add_argument("--holdout-parts", type=int, default=20,
                        help="held-out parts per class (each also darkened: the set covers both conditions)")
    parser.add_argument("--classes", default="good,scratch,crack,spot,dent,missing", help="the model's classes")
    parser.add_argument("--fps", type=float, default=8.0, help="parts per second per device")
    # PSI over a window of n frames in 10 bins carries sampling noise of about 9/n: at 16 frames the
    # drift check fired before any drift (PSI 1.4-5.9 on unchanged parts); 80 frames keep it near 0.1.
    parser.add_argument("--window-s", type=float, default=10.0, help="the agents' metrics window")
    parser.add_argument("--reviews", type=int, default=24, help="reviewed alerts the policy waits for")
    # A window's PSI against the bundle's reference carries sampling noise of about (occupied bins - 1) *
    # (1/frames + 1/reference images) even when nothing changed (qcsight_core.drift.psi).
    parser.add_argument("--drift-psi", type=float, default=0.25,
                        help="the policy's drift threshold (PSI of confidence or brightness, 2 windows in a row)")
    parser.add_argument("--train-args", default="--epochs 3 --freeze-epochs 1 --batch-size 32 --workers 0",
                        help="extra `qcsight train` arguments for the retraining")
    parser.add_argument("--review-from", choices=("drift", "start"), default="drift",
                        help="the operator reviews alerts from the drift on (default) or from the start")
    parser.add_argument("--gate", default="{}", help="the gate's margins (JSON of GateMargins fields)")
    parser.add_argument("--soak-s", type=float, default=12.0)
    parser.add_argument("--soak", default="{}", help="more SoakSettings fields as JSON (override the demo's)")
    parser.add_argument("--before-drift-s", type=float, default=15.0,
                        help="how long the line runs undrifted after the first windows are stored")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C or a TERM (also when started in the background, where SIGINT arrives ignored) stops the line,
        # the cloud, the nuclei and the broker through the finally below.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    processes: list[subprocess.Popen[bytes]] = []
    handles: list[Any] = []
    broker = None
    line = None
    try:
        # -------------------------------------------------------------- the world
        say(f"parts for the line and a fixed held-out set (normal and dark): {out / 'pool'}, {out / 'holdout'}")
        qc("data", "synth", "--output", str(out / "pool"), "--count", str(args.parts), "--seed", "99",
           "--size", str(args.img_size), "--classes", args.classes)
        qc("data", "synth", "--output", str(out / "holdout-src"), "--count", str(args.holdout_parts),
           "--seed", "31", "--size", str(args.img_size), "--classes", args.classes)
        hold = holdout(out / "holdout-src", out / "holdout")
        binary = find_mosquitto()
        if binary is None:
            raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
        pki = Pki(out / "pki")
        broker = Broker(binary, pki, out / "broker")
        broker.start()
        say(f"Mosquitto on {broker.host}:{broker.port} (mutual TLS, a thing may publish only under "
            f"qcsight/<its CN>/); log {broker.log}")
        fleet = out / "fleet.yaml"
        fleet.write_text(yaml.safe_dump({"heartbeat_s": 5, "lines": {LINE: {"things": list(THINGS)}}}))

        # -------------------------------------------------------------- the first model, on the nuclei
        layout = out / "layout"
        write_dev_agent(layout)
        qc("gg", "build", "--bundle", str(args.bundle), "--out", str(layout), "--no-agent", "--model-version",
           component_version(1))
        qc("evaluate", "--bundle", str(args.bundle), "--data", str(hold), "--output", str(out / "eval-v1"),
           "--split", "all")
        registry = Registry(out / "registry")
        registry.adopt(args.bundle, out / "eval-v1" / "metrics.json", scope=LINE, by="demo")
        say(f"model 1 is production on {LINE}: registry {registry.root} (`qcsight cloud models list --registry "
            f"{registry.root}`)")
        inboxes = {}
        roots = {}
        for thing in THINGS:
            ident = pki.identity(thing)
            inbox = out / "inbox" / thing
            inbox.mkdir(parents=True, exist_ok=True)
            inboxes[thing] = inbox
            roots[thing] = out / "gg" / thing
            merge = {"source": {"kind": "hotfolder", "mode": "trigger", "uri": str(inbox), "settle_s": 0.05,
                                "poll_s": 0.1, "retain_s": 600},
                     "metrics": {"window_s": args.window_s, "heartbeat_s": 5}}
            log = (logs / f"nucleus-{thing}.log").open("wb")
            handles.append(log)
            processes.append(subprocess.Popen(
                [*QC, "gg", "run-local", "--layout", str(layout), "--root", str(roots[thing]), "--thing-name", thing,
                 "--agent-version", AGENT_VERSION, "--model-version", component_version(1), "--merge",
                 json.dumps(merge), "--endpoint", broker.host, "--port", str(broker.port), "--cert", str(ident.cert),
                 "--key", str(ident.key), "--ca", str(pki.ca)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        for thing in THINGS:
            wait_for(f"the nucleus of {thing}", lambda t=thing: (roots[t] / "cli" / "token").is_file()
                     and "SUCCEEDED" in (logs / f"nucleus-{t}.log").read_text(errors="replace"), 180)
        say(f"agents running on local nuclei {', '.join(str(r) for r in roots.values())} "
            f"(`qcsight gg run-local status --root ...`; logs {logs})")

        # -------------------------------------------------------------- the cloud
        cloud = pki.identity(CLOUD)
        store_path = out / "cloud.sqlite"
        policy = out / "policy.yaml"
        policy.write_text(yaml.safe_dump({
            "drift_windows": 2, "drift_min_frames": max(4, int(args.fps * args.window_s * 0.75)),
            "drift_psi": args.drift_psi,
            "rate_min_frames": 100_000, "false_alarm_min_reviews": 100_000, "new_reviews_to_fire": 100_000,
            "min_new_reviews": args.reviews, "cooldown_hours": 1.0, "weekly_cap": 5}))
        soak = {"soak_s": args.soak_s, "min_windows": 2, "min_frames": max(4, int(args.fps * args.window_s)),
                # Under drift the fleet's old model is the suspect, not the yardstick: only a gross rise of the
                # canary's defect rate over it counts as a regression here.
                "rate_alpha": 1e-6, "max_latency_ratio": 3.0, "max_wait_s": 300, **json.loads(args.soak)}
        serve_log = logs / "serve.log"
        handles.append(serve_log.open("wb"))
        processes.append(subprocess.Popen(
            [*QC, "cloud", "serve", "--store", f"sqlite:{store_path}", "--fleet", str(fleet), "--registry",
             str(registry.root), "--policy-settings", str(policy), "--policy-every", "3", "--base-data",
             str(args.data), "--holdout", str(hold), "--work", str(out / "runs"), "--train-args",
             f"--img-size {args.img_size} {args.train_args}", "--layout", str(layout),
             *[x for t in THINGS for x in ("--nucleus", f"{t}={roots[t]}")], "--canary", THINGS[0],
             *[x for t in THINGS for x in ("--images", f"{t}={roots[t] / 'work' / AGENT / 'state'}")],
             "--soak", json.dumps(soak), "--gate", args.gate, "--endpoint", broker.host, "--port", str(broker.port),
             "--cert", str(cloud.cert), "--key", str(cloud.key), "--ca", str(pki.ca)],
            stdout=handles[-1], stderr=subprocess.STDOUT, start_new_session=True))
        say(f"qcsight cloud serve: ingestion, policy every 3 s, pipeline, registry, rollout; log {serve_log}")
        say(f"a retraining will run `qcsight train --data <base + reviewed manifest> --img-size {args.img_size} "
            f"{args.train_args}` in {out / 'runs'}/<run>/")
        store = SqliteStore(store_path)

        line = Line(out / "pool", inboxes, args.fps)
        line_start = timestamps.iso(timestamps.now())
        line.thread.start()
        wait_for("the first metrics windows in the store", lambda: len(store.windows(
            since=timestamps.parse("2000-01-01T00:00:00.000Z"), line=LINE)) >= 2, 120)
        say(f"alerts and metrics flowing (`qcsight cloud fleet --store sqlite:{store_path} --fleet {fleet}`)")
        time.sleep(args.before_drift_s)  # the line runs normally for a while: the policy holds (no drift)
        calm = store.windows(since=timestamps.parse(line_start), line=LINE)
        calm_psi = max((max(w.confidence_psi or 0, w.brightness_psi or 0) for w in calm), default=0.0)
        say(f"{len(calm)} windows before the drift: PSI up to {calm_psi:.2f} (confidence or "
            f"brightness; the policy's drift threshold {args.drift_psi:g} in {policy}); the policy holds")

        # -------------------------------------------------------------- the drift
        drift_at = timestamps.iso(timestamps.now())
        line.dark.set()
        say(f"DRIFT: the camera's lighting drops to {DARKEN:.0%} at {drift_at}")

        def drifted() -> str | None:
            for w in store.windows(since=timestamps.parse(drift_at), line=LINE):
                if (w.brightness_psi or 0) > args.drift_psi or (w.confidence_psi or 0) > args.drift_psi:
                    return w.origin.received
            return None

        first_drifted = wait_for("a drifted window", drifted, 120)
        say(f"first drifted window stored at {first_drifted} (PSI > {args.drift_psi:g}); the policy fires on drift "
            "after 2 such windows but holds "
            f"for reviewed images (`qcsight cloud decisions --store sqlite:{store_path}`)")
        reviewed: set[str] = set()
        review_since = drift_at if args.review_from == "drift" else line_start
        wait_for(f"{args.reviews} reviewed alerts", lambda: review_alerts(store, line, review_since, reviewed, "good")
                 >= args.reviews, 300, poll_s=1.0)
        say(f"operator-1 reviewed {len(reviewed)} alerts since the {args.review_from} (add_review: confirm / relabel "
            "/ false alarm); the policy can fire now")

        def pending() -> str | None:
            failed = [r for r in store.runs(LINE) if r.status == "failed"]
            if failed:
                raise SystemExit(f"the retraining run failed: {json.dumps(dict(failed[-1].detail))} (see "
                                 f"{out / 'runs'} and {serve_log})")
            return next((v.version for v in registry.versions() if v.status == PENDING), None)

        version = wait_for("a candidate in the registry", pending, args.timeout_s, poll_s=1.0)
        candidate = registry.get(version)
        gate = json.loads((candidate.path / "gate.json").read_text())
        margins = json.loads(args.gate)
        say(f"retrained, candidate and production evaluated on the held-out set {hold}; gate PASSED "
            f"({candidate.path / 'gate.json'}" + (f", margins {margins} set by --gate" if margins else
                                                   ", the default margins") + "):\n    "
            + "\n    ".join(gate["reasons"]) + "\n    good parts rejected at the operating point (not a check): "
            f"candidate {_share(gate['candidate'].get('false_reject_rate'))}, production "
            f"{_share((gate.get('production') or {}).get('false_reject_rate'))}")
        say(f"model {version} is {PENDING} in the registry: {candidate.path}")
        qc("cloud", "models", "--registry", str(registry.root), "approve", version, "--by", "lead-engineer",
           "--reason", "demo")
        say(f"model {version} APPROVED (`qcsight cloud models approve {version}`): canary {THINGS[0]} first")

        def finished() -> str | None:
            deployment = registry.get(version).deployment
            return deployment if deployment in (PROMOTED, ROLLED_BACK) else None

        outcome = wait_for("the rollout's decision", finished, args.timeout_s, poll_s=1.0)
        event = registry.get(version).events[-1]
        say(f"model {version} {outcome.upper()}: {event.get('reason')}")
        promoted_at = str(event["time"])
        summary = {"outcome": outcome, "version": version, "drift_at": drift_at,
                   "first_drifted_window": first_drifted, "decided_at": promoted_at,
                   "drift_to_promoted_s": round(timestamps.seconds_between(first_drifted, promoted_at), 1),
                   "reviews": len(reviewed), "parts_fed": line.fed, "out": str(out)}
        if outcome == PROMOTED:
            def everywhere() -> bool:
                latest = [store.device(t) for t in THINGS]
                return all(d is not None and d.model_version == version for d in latest)

            wait_for(f"both devices reporting model {version}", everywhere, 120)
            say(f"both devices now report model {version} (`qcsight cloud fleet`)")
        return summary
    finally:
        if line is not None:
            line.stop.set()
        for process in reversed(processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT if process is processes[-1] else signal.SIGTERM)
        for process in reversed(processes):
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        if broker is not None:
            broker.kill()
        for handle in handles:
            handle.close()


if __name__ == "__main__":
    result = main()
    print(json.dumps(result))
