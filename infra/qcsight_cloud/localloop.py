"""The loop on one machine: reviewed alerts → training manifest → train → evaluate → gate → register, and `serve`.

``export_reviewed`` writes what the review export gives the training pipeline: every reviewed alert's
image (the full image from the device's image folder when it is reachable, else the alert's
thumbnail) and a reviewed-image manifest (qcsight_core.review_manifest) naming the copies, selected
and labelled by the rule every manifest follows (qcsight_cloud.reviewed). Training takes it as
``qcsight train --reviewed``: the images join the training split only, beside the base data.
``LocalPipeline`` takes a run the policy requested and does what the SageMaker pipeline
does, as local processes (``qcsight train``, ``qcsight evaluate``), then the gate and the registry.
``Loop`` is ``qcsight cloud serve``: ingestion, the policy on a schedule, the pipeline, the registry
and the rollout in one process; everything it does is in the store or the registry, so a restart
picks up where it stopped (a run left ``running`` by a stopped process is trained again, resuming
from its checkpoints).
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from qcsight_cloud import timestamps
from qcsight_cloud.errors import CloudError
from qcsight_cloud.fleet import Fleet
from qcsight_cloud.gate import GateMargins, gate_files
from qcsight_cloud.policy import PolicySettings
from qcsight_cloud.records import Run
from qcsight_cloud.registry import APPROVED, PENDING, Registry
from qcsight_cloud.reviewed import reviewed_alerts
from qcsight_cloud.rollout import Rollout
from qcsight_cloud.store import Store
from qcsight_cloud.trigger import evaluate
from qcsight_core.review_manifest import SUFFIX as REVIEWED_SUFFIX
from qcsight_core.review_manifest import read_manifest, write_manifest

log = logging.getLogger(__name__)


class PipelineError(CloudError):
    """A pipeline step failed; the run is marked failed with this message."""


# ---------------------------------------------------------------- the reviewed images


def export_reviewed(store: Store, out: Path, *, since: datetime | None = None, good_class: str = "good",
                    image_roots: Mapping[str, Path] | None = None, line: str | None = None) -> Path:
    """Write the reviewed alerts' images and their manifest into out/; returns the manifest path."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    selection = reviewed_alerts(store, since=since, line=line, good_label=good_class)
    if selection.disputed:
        log.info("%d disputed alert(s) left out (reviewers disagree): %s", len(selection.disputed),
                 ", ".join(selection.disputed[:5]))
    rows = []
    for labelled in selection.labelled:
        alert, alert_id = labelled.alert, labelled.alert.message_id
        target = images / f"{alert_id}.jpg"
        source = _full_image(alert.image_ref, (image_roots or {}).get(alert.origin.thing))
        if source is not None:
            target = target.with_suffix(source.suffix.lower() or ".jpg")
            shutil.copyfile(source, target)
        elif alert.thumbnail and alert.thumbnail.get("data"):
            target = target.with_suffix("." + str(alert.thumbnail.get("format", "jpeg")).replace("jpeg", "jpg"))
            target.write_bytes(base64.b64decode(str(alert.thumbnail["data"])))
        else:
            log.warning("reviewed alert %s has neither a reachable image nor a thumbnail; left out", alert_id)
            continue
        rows.append(labelled.image(str(target.resolve())))
    manifest = out / f"reviewed{REVIEWED_SUFFIX}"
    tmp = manifest.with_name(manifest.name + ".part")
    with tmp.open("w", encoding="utf-8") as handle:
        write_manifest(handle, rows)
    tmp.replace(manifest)
    log.info("exported %d reviewed images to %s", len(rows), manifest)
    return manifest


def _full_image(image_ref: str | None, root: Path | None) -> Path | None:
    if not image_ref:
        return None
    ref = image_ref.removeprefix("file://")
    candidates = [Path(ref)] if os.path.isabs(ref) else []
    if root is not None:
        candidates += [root / ref, *root.rglob(Path(ref).name)]
    return next((c for c in candidates if c.is_file()), None)


# ---------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class PipelineSettings:
    """The local pipeline.

    Attributes:
        base_data: the base training data (a folder per class, or a manifest).
        holdout: the fixed held-out set both the candidate and production are evaluated on.
        work: where each run's data, training output and reports go (<work>/<run_id>/).
        train_args: extra ``qcsight train`` arguments (architecture, epochs, image size, ...).
        evaluate_args: extra ``qcsight evaluate`` arguments.
        margins: the gate's.
        good_class: the class a false alarm is relabelled to.
        image_roots: each thing's image folder (full images of alerted parts); else thumbnails are used.
        command: how to run qcsight.
        auto_approve: approve a version that passed the gate at once (the demo); else it waits for
            ``qcsight cloud models approve``.
    """

    base_data: Path
    holdout: Path
    work: Path
    train_args: tuple[str, ...] = ()
    evaluate_args: tuple[str, ...] = ()
    margins: GateMargins = field(default_factory=GateMargins)
    good_class: str = "good"
    image_roots: Mapping[str, Path] = field(default_factory=dict)
    command: tuple[str, ...] = ("qcsight",)
    auto_approve: bool = False
    step_timeout_s: float = 3600.0


class LocalPipeline:
    """train → evaluate (candidate and production on the held-out set) → gate → register."""

    def __init__(self, settings: PipelineSettings, store: Store, registry: Registry,
                 stop: threading.Event | None = None) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.stop = stop or threading.Event()

    def _run(self, args: Sequence[str], what: str, log_path: Path) -> None:
        log.info("pipeline: %s: %s", what, " ".join(args))
        with log_path.open("ab") as out:
            process = subprocess.Popen([*self.settings.command, *args], stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            deadline = time.monotonic() + self.settings.step_timeout_s
            while process.poll() is None:
                if self.stop.wait(0.5) or time.monotonic() > deadline:
                    os.killpg(process.pid, signal.SIGTERM)
                    try:
                        process.wait(30)
                    except subprocess.TimeoutExpired:
                        os.killpg(process.pid, signal.SIGKILL)
                        process.wait()
                    why = "stopped" if self.stop.is_set() else f"timed out after {self.settings.step_timeout_s:g} s"
                    raise PipelineError(f"{what} {why}")
        if process.returncode != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise PipelineError(f"{what} failed (exit {process.returncode}; {log_path}): {' | '.join(tail)}")

    def run(self, run: Run) -> str | None:
        """Carry one requested run through; returns the registered version (None when the gate refused it).

        Raises:
            PipelineError: a step failed (the run is marked failed); a stop leaves it ``running``.
        """
        s = self.settings
        self.store.put_run(Run(run.run_id, run.scope, run.requested, "running", run.decision_id, None, None,
                               {**run.detail, "started": timestamps.iso(timestamps.now())}))
        work = s.work / run.run_id
        work.mkdir(parents=True, exist_ok=True)
        logs = work / "pipeline.log"
        try:
            production = self.registry.production(run.scope)
            reviewed = export_reviewed(self.store, work / "reviewed", since=None, good_class=s.good_class,
                                       image_roots=s.image_roots, line=run.scope)
            count = len(read_manifest(reviewed))
            version = str(max((int(v.version) for v in self.registry.versions()), default=0) + 1)
            print(f"[pipeline] run {run.run_id[:8]} ({run.scope}): training version {version} on {s.base_data} + "
                  f"{count} reviewed images ({reviewed}); log {logs}", flush=True)
            # The reviewed images join the training split only: the base data's split stays the one it was.
            self._run(["train", "--data", str(s.base_data), "--reviewed", str(reviewed), "--output",
                       str(work / "train"), "--version", version, "--run-id", f"run-{run.run_id[:12]}",
                       *s.train_args], "qcsight train", logs)
            bundle = work / "train" / "bundle"
            self._run(["evaluate", "--bundle", str(bundle), "--data", str(s.holdout), "--output",
                       str(work / "eval-candidate"), "--split", "all", *s.evaluate_args], "evaluate candidate", logs)
            production_report = None
            if production is not None:
                self._run(["evaluate", "--bundle", str(production.bundle), "--data", str(s.holdout), "--output",
                           str(work / "eval-production"), "--split", "all", *s.evaluate_args],
                          "evaluate production", logs)
                production_report = work / "eval-production" / "metrics.json"
            decision = gate_files(work / "eval-candidate" / "metrics.json", production_report, s.margins,
                                  work / "gate.json")
            print(f"[pipeline] gate {'PASSED' if decision.passed else 'REFUSED'}: " + "; ".join(decision.reasons),
                  flush=True)
            if not decision.passed:
                self._finish(run, "failed", None, {"gate": list(decision.reasons)})
                return None
            model = self.registry.register(bundle, work / "eval-candidate" / "metrics.json", decision.to_dict(),
                                           scope=run.scope, run_id=run.run_id,
                                           production_evaluation=production_report, version=version)
            print(f"[pipeline] registered model version {model.version} ({PENDING}) in {self.registry.root}",
                  flush=True)
            if s.auto_approve:
                self.registry.decide(model.version, APPROVED, "qcsight-serve --auto-approve",
                                     "auto-approved: passed the gate")
                print(f"[pipeline] model version {model.version} approved (auto)", flush=True)
            self._finish(run, "running", model.version, {"registered": model.version})
            return model.version
        except PipelineError as exc:
            if not self.stop.is_set():
                self._finish(run, "failed", None, {"error": str(exc)})
            raise

    def _finish(self, run: Run, status: str, version: str | None, detail: Mapping[str, Any]) -> None:
        finished = timestamps.iso(timestamps.now()) if status != "running" else None
        self.store.put_run(Run(run.run_id, run.scope, run.requested, status, run.decision_id, finished, version,
                               {**run.detail, **detail}))


# ---------------------------------------------------------------- serve


@dataclass(frozen=True)
class LoopSettings:
    policy_every_s: float = 30.0
    tick_s: float = 2.0
    policy: PolicySettings = field(default_factory=PolicySettings)


class Loop:
    """Ingestion (started by the caller), the policy on a schedule, the pipeline and the rollout, until stopped."""

    def __init__(self, settings: LoopSettings, store: Store, fleet: Fleet, pipeline: LocalPipeline, rollout: Rollout,
                 stop: threading.Event, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.store = store
        self.fleet = fleet
        self.pipeline = pipeline
        self.rollout = rollout
        self.stop = stop
        self.clock = clock
        self._next_policy = 0.0

    def resume(self) -> None:
        """Runs a stopped process left ``running`` without a registered model go back to ``requested``."""
        for scope in self.fleet.lines:
            for run in self.store.runs(scope):
                if run.status == "running" and not run.model_version:
                    log.info("run %s was interrupted; requesting it again", run.run_id)
                    self.store.put_run(Run(run.run_id, run.scope, run.requested, "requested", run.decision_id,
                                           None, None, run.detail))

    def tick(self) -> None:
        if self.clock() >= self._next_policy:
            self._next_policy = self.clock() + self.settings.policy_every_s
            for decision in evaluate(self.store, self.fleet, self.settings.policy):
                if decision.action == "fire":
                    print(f"[policy] {decision.scope}: FIRE ({', '.join(decision.triggers)}) -> retraining requested; "
                          "see `qcsight cloud decisions`", flush=True)
        for scope in sorted(self.fleet.lines):
            for run in self.store.runs(scope):
                if run.status == "requested" and not self.stop.is_set():
                    try:
                        self.pipeline.run(run)
                    except PipelineError as exc:
                        if self.stop.is_set():
                            print(f"[pipeline] run {run.run_id[:8]} interrupted ({exc}); it starts again when serve "
                                  "does", flush=True)
                        else:
                            print(f"[pipeline] run {run.run_id[:8]} failed: {exc}", flush=True)
        try:
            stepped = self.rollout.step()
        except CloudError as exc:  # a deployment tool failed: said, and tried again on the next tick
            log.error("rollout: %s", exc)
            print(f"[rollout] error: {exc}; trying again", flush=True)
            stepped = []
        for model, soak in stepped:
            if soak.action != "wait":
                print(f"[rollout] model {model.version} on {model.scope}: {soak.action.upper()} — "
                      + "; ".join(soak.reasons), flush=True)

    def run_forever(self) -> None:
        self.resume()
        while not self.stop.is_set():
            self.tick()
            self.stop.wait(self.settings.tick_s)

