"""Zero-loss stress run of the real edge agent: broker restarts and kill -9s while parts keep arriving.

The scenario of tests/edge/stress.py, bigger: a real Mosquitto on loopback (TLS client
certificates, per-thing ACLs, persistence), the real `qcsight agent` process on a hot folder over
MQTT5, parts dropped throughout while the broker is restarted and the agent SIGKILLed and
started again. What the cloud subscriber receives (de-duplicated by message id) is compared
with the verdicts `qcsight batch score` gives the same files with the same bundle. Prints the
figures as JSON and exits 1 if any expected alert was lost. Needs the ``edge``, ``batch`` and
``dev`` extras and the ``mosquitto`` binary. Example::

    nice -n 10 .venv/bin/python benchmarks/stress_agent.py --parts 400 --restarts 20 --kills 20
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "edge_agent")]

from tests.edge.broker import Broker, Pki, find_mosquitto, subscriber  # noqa: E402
from tests.edge.stress import StressPlan, run_stress  # noqa: E402

log = logging.getLogger("stress_agent")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, default=400, help="part pictures dropped into the hot folder (400)")
    parser.add_argument("--restarts", type=int, default=20, help="broker restarts (20)")
    parser.add_argument("--kills", type=int, default=20, help="kill -9s of the agent (20)")
    parser.add_argument("--fault-every", type=float, default=1.5, metavar="S",
                        help="seconds between faults; parts arrive evenly over all of them (1.5)")
    parser.add_argument("--broker-down", type=float, default=0.3, metavar="S", help="each broker outage (0.3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, metavar="DIR", help="work here and keep it (default: a temp folder)")
    return parser


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    binary = find_mosquitto()
    if binary is None:
        print("mosquitto is not installed (apt-get install mosquitto)", file=sys.stderr)
        return 2
    plan = StressPlan(parts=args.parts, broker_restarts=args.restarts, agent_kills=args.kills,
                      fault_every_s=args.fault_every, broker_down_s=args.broker_down, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="qcsight-stress-") as temp:
        folder = args.keep or Path(temp)
        folder.mkdir(parents=True, exist_ok=True)
        broker = Broker(binary, Pki(folder / "pki"), folder / "broker")
        broker.start()
        started = time.monotonic()
        try:
            with subscriber(broker) as cloud:
                result = run_stress(folder / "run", broker, cloud, plan, progress=log.info)
        finally:
            broker.kill()
    figures = result.figures()
    figures["wall_s"] = round(time.monotonic() - started, 1)
    figures["parts_alerted_twice"] = result.extra["parts_alerted_twice"]
    if result.lost:
        figures["lost_parts"] = sorted(result.lost)
    print(json.dumps(figures, indent=2))
    return 1 if result.lost or result.unexpected or result.verdict_mismatches else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
