"""`qcsight cloud gate | models | serve`: the gate, the local model registry, and the whole loop in one process."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qcsight_cloud.gate import GateMargins, gate_files
from qcsight_cloud.registry import APPROVED, REJECTED, Registry
from qcsight_core.cli import EXIT_OK
from qcsight_core.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_REGISTRY = "qcsight-registry"


def _pairs(values: list[str] | None, flag: str) -> dict[str, Path]:
    found = {}
    for value in values or []:
        thing, sep, path = value.partition("=")
        if not sep or not thing or not path:
            raise ConfigError(flag, value, "THING=PATH")
        found[thing] = Path(path)
    return found


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    gate = sub.add_parser("gate", help="compare a candidate's evaluation with production's: pass or refuse",
                          description="Read two metrics.json reports of `qcsight evaluate` (the candidate and the "
                          "production model on the same held-out set) and decide: the candidate passes only if "
                          "its macro-F1 is not below production's minus --macro-f1-margin, its defect recall at its "
                          "operating point not below production's minus --defect-recall-margin, and no class's "
                          "recall is down by more than --class-recall-margin. A first model (no --production) "
                          "passes. Writes {\"passed\", \"reasons\", \"candidate\", \"production\"} to --out.",
                          epilog="Exit 0 whether it passed or not (the pipeline's condition reads 'passed'); 1 when a "
                          "report cannot be read.")
    gate.add_argument("--candidate", type=Path, required=True, help="the candidate's metrics.json (or its folder)")
    gate.add_argument("--production", type=Path, help="production's metrics.json on the same set (none: first model)")
    gate.add_argument("--macro-f1-margin", type=float, default=GateMargins.macro_f1, help="default %(default)s")
    gate.add_argument("--defect-recall-margin", type=float, default=GateMargins.defect_recall,
                      help="default %(default)s")
    gate.add_argument("--class-recall-margin", type=float, default=GateMargins.class_recall,
                      help="default %(default)s")
    gate.add_argument("--out", type=Path, help="write the decision JSON here")
    gate.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")

    models = sub.add_parser("models", help="the local model registry: list, register, approve, reject",
                            description="A folder of model versions (bundle, evaluation, gate decision) with approval "
                            "state PendingManualApproval -> Approved | Rejected and an append-only history.jsonl.")
    models.add_argument("--registry", type=Path, default=Path(os.environ.get("QCSIGHT_REGISTRY", DEFAULT_REGISTRY)),
                        help="the registry folder (default $QCSIGHT_REGISTRY, else %(default)s)")
    models.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")
    verbs = models.add_subparsers(dest="verb", metavar="VERB", required=True)
    listing = verbs.add_parser("list", help="every version, its state, gate result and deployment")
    listing.add_argument("--json", action="store_true")
    for verb in ("approve", "reject"):
        p = verbs.add_parser(verb, help=f"{verb} a PendingManualApproval version (final)")
        p.add_argument("version")
        p.add_argument("--by", default=os.environ.get("USER", "operator"), help="who decides (default $USER)")
        p.add_argument("--reason", default="")
    adopt = verbs.add_parser("adopt", help="register the model a line already runs as its production version")
    adopt.add_argument("--bundle", type=Path, required=True)
    adopt.add_argument("--evaluation", type=Path, required=True, help="its metrics.json on the held-out set")
    adopt.add_argument("--line", required=True)
    adopt.add_argument("--by", default=os.environ.get("USER", "operator"))

    serve = sub.add_parser("serve", help="the whole loop locally: ingest, policy, pipeline, registry, rollout",
                           description="One process: ingestion from the broker into the store, the retraining policy "
                           "every --policy-every, the local pipeline (qcsight train -> qcsight evaluate of the "
                           "candidate and production on --holdout -> gate -> registry) for each run the policy "
                           "requests, and the rollout of approved versions through the local nuclei (canary, soak "
                           "against the fleet, promote or roll back). Ctrl-C stops it; started again it resumes.")
    common(serve)
    serve.add_argument("--fleet", type=Path, required=True, help="fleet file: lines and their things")
    serve.add_argument("--registry", type=Path, default=Path(DEFAULT_REGISTRY), help="registry folder")
    serve.add_argument("--policy-settings", type=Path, help="PolicySettings YAML")
    serve.add_argument("--policy-every", type=float, default=30.0, help="seconds between policy runs (default 30)")
    serve.add_argument("--base-data", type=Path, required=True, help="base training data (class folders)")
    serve.add_argument("--holdout", type=Path, required=True, help="the fixed held-out set (class folders)")
    serve.add_argument("--work", type=Path, required=True, help="pipeline runs go to WORK/<run id>/")
    serve.add_argument("--train-args", default="", help="extra `qcsight train` arguments, one shell-quoted string")
    serve.add_argument("--good-class", default="good", help="the class a false alarm becomes (default good)")
    serve.add_argument("--images", action="append", metavar="THING=DIR", help="a device's image folder (full "
                       "images of alerted parts; else the alert thumbnails are trained on)")
    serve.add_argument("--gate", default="{}", help="GateMargins as JSON, e.g. '{\"macro_f1\": 0.02}' (defaults: "
                       f"macro_f1 {GateMargins.macro_f1}, defect_recall {GateMargins.defect_recall}, class_recall "
                       f"{GateMargins.class_recall})")
    serve.add_argument("--auto-approve", action="store_true", help="approve versions that pass the gate at once")
    serve.add_argument("--layout", type=Path, required=True, help="the component layout the nuclei install from")
    serve.add_argument("--nucleus", action="append", metavar="THING=ROOT", required=True,
                       help="a device's `qcsight gg run-local` root (repeat per device)")
    serve.add_argument("--canary", action="append", metavar="THING", help="a canary device (default: the first "
                       "device of each line)")
    serve.add_argument("--soak", default="{}", help="SoakSettings as JSON, e.g. '{\"soak_s\": 60, \"min_windows\": 3}'")
    broker = serve.add_argument_group("ingestion (leave out --endpoint when `qcsight cloud ingest` runs apart)")
    broker.add_argument("--endpoint")
    broker.add_argument("--port", type=int, default=8883)
    broker.add_argument("--cert", type=Path)
    broker.add_argument("--key", type=Path)
    broker.add_argument("--ca", type=Path)
    broker.add_argument("--client-id", default="qcsight-cloud")


def run_gate(args: argparse.Namespace) -> int:
    margins = GateMargins(args.macro_f1_margin, args.defect_recall_margin, args.class_recall_margin)
    decision = gate_files(args.candidate, args.production, margins, args.out)
    print(("PASSED" if decision.passed else "FAILED") + f": {decision.candidate.model}"
          + (f" vs production {decision.production.model}" if decision.production else ""))
    for reason in decision.reasons:
        print("  " + reason)
    if args.out:
        print(f"wrote {args.out}")
    return EXIT_OK


def run_models(args: argparse.Namespace) -> int:
    registry = Registry(args.registry)
    if args.verb == "list":
        versions = registry.versions()
        if args.json:
            print(json.dumps([{"version": v.version, "status": v.status, "line": v.scope, "registered": v.registered,
                               "gate_passed": v.gate_passed, "deployment": v.deployment, "run_id": v.run_id,
                               "metrics": dict(v.metrics), "path": str(v.path)} for v in versions], indent=2))
            return EXIT_OK
        if not versions:
            print(f"No model versions in {registry.root}.")
        for v in versions:
            m = v.metrics
            f1 = f"{m['macro_f1']:.4f}" if isinstance(m.get("macro_f1"), float) else "-"
            print(f"{v.version:>4}  {v.status:<22} {v.deployment or '-':<12} line {v.scope:<10} macro-F1 {f1:<7} "
                  f"gate {'passed' if v.gate_passed else 'REFUSED'}  {v.registered}")
        return EXIT_OK
    if args.verb == "adopt":
        model = registry.adopt(args.bundle, args.evaluation, scope=args.line, by=args.by)
        print(f"model version {model.version} is production on {model.scope}")
        return EXIT_OK
    model = registry.decide(args.version, APPROVED if args.verb == "approve" else REJECTED, args.by, args.reason)
    print(f"model version {model.version}: {model.status}")
    return EXIT_OK


def run_serve(args: argparse.Namespace) -> int:
    from qcsight_cloud.cli import _fleet, _policy_settings
    from qcsight_cloud.ingest import Ingestor
    from qcsight_cloud.localloop import LocalPipeline, Loop, LoopSettings, PipelineSettings
    from qcsight_cloud.rollout import NucleusDeployer, Rollout, RolloutSettings, SoakSettings
    from qcsight_cloud.store import StoreSettings, open_store

    fleet = _fleet(args.fleet)
    try:
        soak = SoakSettings(**json.loads(args.soak))
    except (ValueError, TypeError) as exc:
        raise ConfigError("--soak", args.soak, f"a JSON object of SoakSettings fields ({exc})") from None
    try:
        margins = GateMargins(**json.loads(args.gate))
    except (ValueError, TypeError) as exc:
        raise ConfigError("--gate", args.gate, f"a JSON object of GateMargins fields ({exc})") from None
    canary = {line: tuple(t for t in things if t in (args.canary or [])) for line, things in fleet.lines.items()}
    command = (sys.executable, "-m", "qcsight_core.cli")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    store = open_store(StoreSettings(args.store))
    registry = Registry(args.registry)
    subscriber = None
    try:
        if args.endpoint:
            from qcsight_cloud.subscriber import Subscriber, SubscriberSettings

            if not (args.cert and args.key and args.ca):
                raise ConfigError("--endpoint", args.endpoint, "given with --cert, --key and --ca")
            subscriber = Subscriber(SubscriberSettings(args.endpoint, args.port, args.cert, args.key, args.ca,
                                                       client_id=args.client_id), Ingestor(store, fleet.line_of))
            subscriber.start()
            print(f"[ingest] subscribed to {args.endpoint}:{args.port}; storing into {args.store}", flush=True)
        pipeline = LocalPipeline(PipelineSettings(args.base_data, args.holdout, args.work,
                                                  tuple(shlex.split(args.train_args)), good_class=args.good_class,
                                                  margins=margins, image_roots=_pairs(args.images, "--images"),
                                                  command=command,
                                                  auto_approve=args.auto_approve), store, registry, stop)
        deployer = NucleusDeployer(args.layout, _pairs(args.nucleus, "--nucleus"), command)
        rollout = Rollout(registry, store, deployer, RolloutSettings(canary, soak), fleet.lines)
        loop = Loop(LoopSettings(policy_every_s=args.policy_every, policy=_policy_settings(args.policy_settings)),
                    store, fleet, pipeline, rollout, stop)
        print(f"[serve] policy every {args.policy_every:g} s on lines {', '.join(sorted(fleet.lines))}; registry "
              f"{registry.root}; Ctrl-C stops", flush=True)
        loop.run_forever()
    finally:
        if subscriber is not None:
            subscriber.stop()
        store.close()
        print("[serve] stopped", flush=True)
    return EXIT_OK
