"""`qcsight runs`: tracked training runs (MLflow) in the terminal: list them, compare a few side by side."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qcsight_core.cli import EXIT_FAILED, EXIT_OK, configure_logging, parse_args
from qcsight_train import tracking

log = logging.getLogger(__name__)

LIST_METRICS = ("best_val_macro_f1", "test_accuracy", "test_macro_f1", "test_roc_auc", "test_defect_recall",
                "train_seconds")
COMPARE_PARAMS = ("arch", "img_size", "resize", "epochs", "freeze_epochs", "select", "refit", "threshold_source",
                  "batch_size", "lr", "augment.dropout_p", "augment.blur_p", "augment.hflip", "images.train",
                  "images.val", "images.test")


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n", 1)[0] if __doc__ else None,
        epilog="The store is --tracking-uri, else $MLFLOW_TRACKING_URI, else ./mlruns (where `qcsight train` "
               "logs by default). Exit codes: 0 done, 1 failed (no mlflow, no such run), 2 usage error.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")
    parser.add_argument("--tracking-uri", default="", metavar="URI",
                        help="a directory (mlruns/), sqlite:///, http(s):// or a SageMaker MLflow ARN")
    parser.add_argument("--experiment", default="qcsight", help="experiment name (default: qcsight)")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = sub.add_parser("list", help="the newest runs, one line each")
    listing.add_argument("--limit", type=int, default=20, help="at most this many runs (default 20)")
    compare = sub.add_parser("compare", help="settings and figures of runs side by side, differences marked")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="MLflow run ids or run names (qcsight run ids)")
    return parser


def _client(uri: str) -> tuple[Any, str]:
    target = tracking.resolve(uri or os.environ.get("MLFLOW_TRACKING_URI", ""), Path.cwd() / tracking.DEFAULT_DIR)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=target.uri, registry_uri=target.uri), target.uri


def main(argv: Sequence[str], prog: str = "qcsight runs") -> int:
    parser = _parser(prog)
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    configure_logging(args.verbose)
    if not tracking.mlflow_available():
        print(f"{prog}: needs mlflow: pip install 'qcsight[tracking]'", file=sys.stderr)
        return EXIT_FAILED
    client, uri = _client(args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        print(f"{prog}: no experiment {args.experiment!r} at {uri}", file=sys.stderr)
        return EXIT_FAILED
    if args.action == "list":
        runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"],
                                  max_results=max(1, args.limit))
        for line in format_list(runs):
            print(line)
        return EXIT_OK
    chosen = []
    for wanted in args.runs:
        found = _find(client, experiment.experiment_id, wanted)
        if found is None:
            print(f"{prog}: no run {wanted!r} in experiment {args.experiment!r} at {uri}", file=sys.stderr)
            return EXIT_FAILED
        chosen.append(found)
    for line in format_compare(chosen):
        print(line)
    return EXIT_OK


def _find(client: Any, experiment_id: str, wanted: str) -> Any:
    for run in client.search_runs([experiment_id], max_results=1000):
        if wanted in (run.info.run_id, run.info.run_name) or run.info.run_id.startswith(wanted):
            return run
    return None


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def format_list(runs: Sequence[Any]) -> list[str]:
    """One line per run: id, name, status, input size and epochs, the headline figures."""
    header = ["run", "name", "status", "img_size", "epochs", *LIST_METRICS, "model version"]
    rows = [header]
    for run in runs:
        metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
        rows.append([run.info.run_id[:8], run.info.run_name or "", run.info.status, params.get("img_size", "-"),
                     params.get("epochs", "-"), *(_num(metrics.get(m)) for m in LIST_METRICS),
                     tags.get("qcsight.registered_version", "-") or "-"])
    return _table(rows)


def format_compare(runs: Sequence[Any]) -> list[str]:
    """Rows of settings and figures, one column per run; rows whose values differ are marked with *."""
    metric_names = sorted({k for run in runs for k in run.data.metrics
                           if not k.startswith(("refit_", "lr", "images_per_s", "seconds", "train_loss"))})
    rows = [["", *(run.info.run_name or run.info.run_id[:8] for run in runs)]]
    for name in COMPARE_PARAMS:
        values = [run.data.params.get(name, "-") for run in runs]
        rows.append([("* " if len(set(values)) > 1 else "  ") + name, *values])
    adapted = [run.data.params.get("adapted.1", "") for run in runs]
    if any(adapted):
        rows.append(["  adapted.1", *(a[:40] for a in adapted)])
    for name in metric_names:
        values = [_num(run.data.metrics.get(name)) for run in runs]
        rows.append([("* " if len(set(values)) > 1 else "  ") + name, *values])
    return _table(rows)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
