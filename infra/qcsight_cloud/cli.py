"""`qcsight cloud`: ingest device messages, show the fleet, run the retraining policy, read its decisions."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

import yaml

from qcsight_cloud import aws_cli, codec, timestamps
from qcsight_cloud.errors import CloudError
from qcsight_cloud.fleet import Fleet, FleetSettings, FleetView, fleet_view, resolve
from qcsight_cloud.policy import PolicySettings, explain
from qcsight_cloud.store import Store, StoreSettings, open_store
from qcsight_cloud.trigger import evaluate
from qcsight_core.cli import EXIT_OK, configure_logging, parse_args
from qcsight_core.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_STORE = "sqlite:qcsight-cloud.sqlite"
STORE_HELP = ("the store: sqlite:PATH (local file) or dynamodb:PREFIX (tables PREFIX-alerts, ...; region and "
              "credentials from the AWS environment). Default: $QCSIGHT_STORE, else " + DEFAULT_STORE)
FLEET_HELP = ("fleet file (YAML/JSON): lines and their things or IoT thing groups, heartbeat_s, silent_heartbeats; "
              "see infra/README.md")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> timedelta:
    """'90s', '15m', '1h', '7d'."""
    match = _DURATION.match(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 15m, 1h or 7d")
    return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])


def get_args_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="The cloud side of the loop: ingestion, fleet view, retraining policy, model gate, "
        "registry, and the whole loop locally (serve).",
        epilog="Locally: 'ingest' subscribes to the loopback broker and writes the SQLite store; 'fleet', 'policy' "
               "and 'decisions' read it. In AWS the same code runs as Lambda functions behind IoT rules "
               "(qcsight_cloud.lambda_ingest.handler) on DynamoDB.",
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", default=os.environ.get("QCSIGHT_STORE", DEFAULT_STORE), help=STORE_HELP)
        p.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")

    ingest = sub.add_parser("ingest", help="subscribe to the broker and store what devices send (until Ctrl-C)",
                            description="Subscribe to qcsight/+/+ on an MQTT broker with a client certificate and "
                            "store every valid message; the broker's ACL binds each thing to its own topics.")
    common(ingest)
    ingest.add_argument("--fleet", type=Path, help=FLEET_HELP + " (tags each message with its line)")
    ingest.add_argument("--endpoint", required=True, help="broker host, e.g. 127.0.0.1")
    ingest.add_argument("--port", type=int, required=True, help="broker TLS port")
    ingest.add_argument("--cert", type=Path, required=True, help="the subscriber's client certificate (PEM)")
    ingest.add_argument("--key", type=Path, required=True, help="its private key (PEM)")
    ingest.add_argument("--ca", type=Path, required=True, help="the CA that signed the broker's certificate")
    ingest.add_argument("--client-id", default="qcsight-cloud", help="MQTT client id (the broker keeps the "
                        "session under it); default %(default)s")
    ingest.add_argument("--stats-every", type=duration, default=timedelta(seconds=60),
                        help="log progress this often (default 60s)")

    fleet = sub.add_parser("fleet", help="print each line and device: defect rate, drift, latency, silence",
                           description="Per line and per device over the last --period: defect rate, confidence "
                           "and brightness drift (PSI, latest window), worst p95 latency, dropped frames, model "
                           "version, last heartbeat; devices quiet for silent_heartbeats heartbeats are SILENT.")
    common(fleet)
    fleet.add_argument("--fleet", type=Path, help=FLEET_HELP + "; without it, lines come from what devices sent")
    fleet.add_argument("--period", type=duration, default=timedelta(hours=1), help="window of time (default 1h)")
    fleet.add_argument("--json", action="store_true", help="print JSON instead of tables")

    policy = sub.add_parser("policy", help="run the retraining policy now: decide per line, record, request runs",
                            description="Evaluate the retraining policy for every line of the fleet, record each "
                            "decision (fire or hold, with its numbers) and request a retraining run where it fires.")
    common(policy)
    policy.add_argument("--fleet", type=Path, required=True, help=FLEET_HELP)
    policy.add_argument("--settings", type=Path, help="policy settings YAML (fields of PolicySettings; "
                        "defaults otherwise)")
    policy.add_argument("--line", action="append", help="only this line (repeatable)")
    policy.add_argument("--no-runs", action="store_true", help="record decisions but request no run")

    decisions = sub.add_parser("decisions", help="print recorded retraining decisions and the numbers behind them")
    common(decisions)
    decisions.add_argument("--line", help="only this line")
    decisions.add_argument("--since", type=duration, help="only decisions this recent, e.g. 7d")
    decisions.add_argument("--limit", type=int, default=20, help="at most this many, newest first (default 20)")
    decisions.add_argument("--json", action="store_true", help="print JSON")

    # ---- SageMaker: the retraining pipeline and the real-time endpoint (qcsight_cloud.aws_cli)
    aws_cli.add_parsers(sub)
    # ---- the loop's subcommands (gate, models, serve): qcsight_cloud.loop_cli
    from qcsight_cloud import loop_cli

    loop_cli.add_parsers(sub, common)
    # ---- end of the loop's subcommands
    return parser


def _store(args: argparse.Namespace, *, must_exist: bool = False) -> Store:
    """ingest writes the store (and creates it); the commands that read it refuse a file that is not there."""
    return open_store(StoreSettings(args.store, must_exist=must_exist))


def _fleet(path: Path | None) -> Fleet:
    settings = FleetSettings.from_file(path) if path is not None else FleetSettings()
    iot = None
    if any(line.thing_group for line in settings.lines):
        import boto3

        iot = boto3.client("iot")
    return resolve(settings, iot)


def run_ingest(args: argparse.Namespace) -> int:
    from qcsight_cloud.ingest import Ingestor

    try:
        from qcsight_cloud.subscriber import Subscriber, SubscriberSettings
    except ModuleNotFoundError as exc:
        raise CloudError(f"ingest needs the AWS IoT device SDK ({exc.name}): pip install 'qcsight[cloud]'") from exc

    settings = SubscriberSettings(args.endpoint, args.port, args.cert, args.key, args.ca, client_id=args.client_id)
    fleet = _fleet(args.fleet)
    store = _store(args)
    subscriber = Subscriber(settings, Ingestor(store, fleet.line_of))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    subscriber.start()
    try:
        while not stop.wait(args.stats_every.total_seconds()):
            s = subscriber.stats
            log.info("ingested %d messages: %d stored, %d duplicates, %d dropped (%d batches)", s.received, s.stored,
                     s.duplicates, s.dropped, s.batches)
    finally:
        subscriber.stop()
        store.close()
    return EXIT_OK


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n")


def print_fleet(view: FleetView, out: TextIO) -> None:
    out.write(f"Fleet at {view.time}, last {view.period_s / 3600:g} h; a device is SILENT after "
              f"{view.silent_after_s:g} s without a message\n\n")
    if not view.devices:
        out.write("No devices: nothing ingested yet and no fleet file lists any.\n")
        return
    rows = [["LINE", "DEVICES", "SILENT", "FRAMES", "DEFECT %", "CONF PSI", "BRIGHT PSI", "P95 MS", "DROPPED",
             "MODELS"]]
    for line in view.lines:
        rows.append([line.line, str(line.devices), str(line.silent), str(line.frames),
                     _num(None if line.defect_rate is None else 100 * line.defect_rate, 2),
                     _num(line.confidence_psi), _num(line.brightness_psi), _num(line.latency_p95_ms, 1),
                     str(line.dropped), ", ".join(line.model_versions) or "-"])
    _table(rows, out)
    out.write("\n")
    rows = [["DEVICE", "LINE", "FRAMES", "DEFECT %", "CONF PSI", "BRIGHT PSI", "P95 MS", "DROPPED", "MODEL",
             "LAST SEEN", "FLAGS"]]
    for d in view.devices:
        flags = [name for name, on in (("SILENT", d.silent), (f"GAPS {d.gaps}", d.gaps),
                                       (f"DUPS {d.duplicates}", d.duplicates), (f"DROPS {d.drops}", d.drops),
                                       (f"ERRORS {d.error_count}", d.error_count),
                                       (f"OUTBOX {d.outbox_depth}", bool(d.outbox_depth))) if on]
        rows.append([d.thing, d.line, str(d.frames), _num(None if d.defect_rate is None else 100 * d.defect_rate, 2),
                     _num(d.confidence_psi), _num(d.brightness_psi), _num(d.latency_p95_ms, 1), str(d.dropped),
                     d.model_version or "-", _age(d.silent_s), " ".join(flags)])
    _table(rows, out)
    if view.unknown_identities:
        out.write("\nDropped from identities that are no device:\n")
        for identity, counts in sorted(view.unknown_identities.items()):
            out.write(f"  {identity}: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}\n")


def run_fleet(args: argparse.Namespace) -> int:
    store = _store(args, must_exist=True)
    try:
        view = fleet_view(store, _fleet(args.fleet), period=args.period)
    finally:
        store.close()
    if args.json:
        json.dump(view.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_fleet(view, sys.stdout)
    return EXIT_OK


def _policy_settings(path: Path | None) -> PolicySettings:
    if path is None:
        return PolicySettings()
    try:
        data: Any = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError("policy settings", str(path), f"a readable YAML file ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError("policy settings", str(path), "a mapping of PolicySettings fields")
    return PolicySettings.from_mapping(data)


def run_policy(args: argparse.Namespace) -> int:
    settings = _policy_settings(args.settings)
    store = _store(args, must_exist=True)
    try:
        decisions = evaluate(store, _fleet(args.fleet), settings, scopes=args.line, request_runs=not args.no_runs)
    finally:
        store.close()
    for decision in decisions:
        sys.stdout.write(explain(decision) + "\n\n")
    return EXIT_OK


def run_decisions(args: argparse.Namespace) -> int:
    since = timestamps.now() - args.since if args.since else None
    store = _store(args, must_exist=True)
    try:
        found = store.decisions(args.line, since, args.limit)
    finally:
        store.close()
    if args.json:
        payload = [{**codec.decision_row(d), "body": None, "triggers": list(d.triggers),
                    "blocked_by": list(d.blocked_by), "checks": [asdict(c) for c in d.checks]} for d in found]
        json.dump([{k: v for k, v in row.items() if v is not None} for row in payload], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    if not found:
        sys.stdout.write("No decisions recorded" + (f" for line {args.line}" if args.line else "") + ".\n")
    for decision in found:
        sys.stdout.write(explain(decision) + "\n\n")
    return EXIT_OK


def main(argv: Sequence[str], prog: str = "qcsight cloud") -> int:
    args = parse_args(get_args_parser(prog), argv)
    if isinstance(args, int):
        return args
    configure_logging(args.verbose)
    actions = {"ingest": run_ingest, "fleet": run_fleet, "policy": run_policy, "decisions": run_decisions}
    actions.update(aws_cli.ACTIONS)  # pipeline, endpoint
    # ---- the loop's subcommands: qcsight_cloud.loop_cli
    from qcsight_cloud import loop_cli

    actions.update({"gate": loop_cli.run_gate, "models": loop_cli.run_models, "serve": loop_cli.run_serve})
    # ---- end of the loop's subcommands
    return actions[args.action](args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
