"""The loop on one machine: reviewed alerts → training manifest → train → evaluate → gate → register, and `serve`.

``export_reviewed`` writes what the review export gives the training pipeline: every reviewed alert's
image (the full image from the device's image folder when it is reachable, else the alert's
thumbnail) and a Ground-Truth-style manifest line per image::

    {"source-ref": "/abs/path.jpg", "class": "scratch",
     "class-metadata": {"class-name": "scratch", "type": "groundtruth/image-classification",
                        "human-annotated": "yes", "creation-date": "..."},
     "reviewer": "op-1", "time": "...", "alert_id": "...", "thing": "cam-1"}

(``qcsight train --data`` reads it as a SageMaker Ground Truth manifest: the label attribute is
``class``.) ``LocalPipeline`` takes a run the policy requested and does what the SageMaker pipeline
does, as local processes (``qcsight train``, ``qcsight evaluate``), then the gate and the registry.
``Loop`` is ``qcsight cloud serve``: ingestion, the policy on a schedule, the pipeline, the registry
and the rollout in one process; everything it does is in the store or the registry, so a restart
picks up where it stopped (a run left ``running`` by a stopped process is trained again, resuming
from its checkpoints).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from qcsight_cloud import timestamps
from qcsight_cloud.errors import CloudError
from qcsight_cloud.fleet import Fleet
from qcsight_cloud.gate import GateMargins, gate_files
from qcsight_cloud.policy import PolicySettings
from qcsight_cloud.records import GOOD, Review, Run
from qcsight_cloud.registry import APPROVED, PENDING, Registry
from qcsight_cloud.rollout import Rollout
from qcsight_cloud.store import Store, latest_per_alert
from qcsight_cloud.trigger import evaluate

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class PipelineError(CloudError):
    """A pipeline step failed; the run is marked failed with this message."""


# ---------------------------------------------------------------- the reviewed images


def review_label(review: Review, good_class: str) -> str | None:
    """The class an operator's current verdict gives the image (None: no verdict, e.g. all undone)."""
    if review.verdict is None:
        return None
    if review.verdict == GOOD:  # a false alarm: the part is good (or the class the app passed for good)
        return review.label or good_class
    return review.label or review.predicted_label


def export_reviewed(store: Store, out: Path, *, since: datetime | None = None, good_class: str = "good",
                    image_roots: Mapping[str, Path] | None = None, line: str | None = None) -> Path:
    """Write the reviewed alerts' images and their manifest into out/; returns the manifest path."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    latest = latest_per_alert([r for r in store.export_reviews(since=since) if line is None or r.line == line])
    lines = []
    alerts = {a.message_id: a for a in store.get_alerts(sorted(latest))}
    for alert_id, review in sorted(latest.items()):
        label = review_label(review, good_class)
        alert = alerts.get(alert_id)
        if label is None or alert is None:
            continue
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
        lines.append({"source-ref": str(target.resolve()), "class": label,
                      "class-metadata": {"class-name": label, "type": "groundtruth/image-classification",
                                         "human-annotated": "yes", "creation-date": review.time},
                      "reviewer": review.reviewer, "time": review.time, "alert_id": alert_id,
                      "thing": alert.origin.thing})
    manifest = out / "reviewed.manifest"
    _write_lines(manifest, lines)
    log.info("exported %d reviewed images to %s", len(lines), manifest)
    return manifest


def _full_image(image_ref: str | None, root: Path | None) -> Path | None:
    if not image_ref:
        return None
    ref = image_ref.removeprefix("file://")
    candidates = [Path(ref)] if os.path.isabs(ref) else []
    if root is not None:
        candidates += [root / ref, *root.rglob(Path(ref).name)]
    return next((c for c in candidates if c.is_file()), None)


def _write_lines(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".part")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
    tmp.replace(path)


def base_manifest(data: Path) -> list[dict[str, Any]]:
    """The base data (a folder per class) as manifest lines; a manifest file is read as it is."""
    if data.is_file():
        return [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for folder in sorted(p for p in data.iterdir() if p.is_dir() and p.name != "masks"):
        for image in sorted(folder.iterdir()):
            if image.suffix.lower() in IMAGE_SUFFIXES:
                rows.append({"source-ref": str(image.resolve()), "class": folder.name,
                             "class-metadata": {"class-name": folder.name}})
    if not rows:
        raise PipelineError(f"{data}: no images in class folders")
    return rows


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
            reviewed_rows = [json.loads(x) for x in reviewed.read_text().splitlines() if x.strip()]
            manifest = work / "train.manifest"
            _write_lines(manifest, [*base_manifest(s.base_data), *reviewed_rows])
            version = str(max((int(v.version) for v in self.registry.versions()), default=0) + 1)
            print(f"[pipeline] run {run.run_id[:8]} ({run.scope}): training version {version} on {s.base_data} + "
                  f"{len(reviewed_rows)} reviewed images ({reviewed}); log {logs}", flush=True)
            self._run(["train", "--data", str(manifest), "--output", str(work / "train"), "--version", version,
                       "--run-id", f"run-{run.run_id[:12]}", *s.train_args], "qcsight train", logs)
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

