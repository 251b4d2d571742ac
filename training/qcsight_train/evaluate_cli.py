"""`qcsight evaluate`: score a bundle on a labelled dataset and write metrics.json, plots and report.md."""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

from qcsight_core.bundle import load_bundle
from qcsight_core.checks import argument, check_int, check_number
from qcsight_core.cli import EXIT_OK, configure_logging, parse_args
from qcsight_data.dataset import SPLITS, DatasetIndex, load_index
from qcsight_train.errors import EvaluationError
from qcsight_train.evaluate import METRICS_FILE, REPORT_FILE, Unreadable, evaluate_bundle

log = logging.getLogger(__name__)

ALL = "all"


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Evaluate a model bundle on labelled images exactly as the device runs it "
        "(qcsight_core: read_image -> preprocess_batch -> ONNX Runtime -> Decider). Writes metrics.json "
        "(accuracy, balanced accuracy, per-class precision/recall/F1, confusion matrix, defect-vs-good ROC AUC "
        "and PR AUC, the threshold reaching --target-recall and the false-reject rate it costs), "
        "confusion_matrix.png, roc.png, pr.png and report.md (with the worst misclassified images).",
        epilog="Unreadable images are listed in metrics.json and report.md, never fatal. "
        "Exit codes: 0 done, 1 failed (bad bundle, dataset or labels), 2 usage error.",
    )
    parser.add_argument("--bundle", required=True, type=Path, help="a bundle directory or its model.tar.gz")
    parser.add_argument("--data", required=True, type=Path,
                        help="a folder with one subfolder per class, an index CSV (path,label[,group][,split]) "
                        "or a SageMaker Ground Truth / Lookout for Vision manifest")
    parser.add_argument("--output", required=True, type=Path, help="directory for metrics.json, PNGs and report.md")
    parser.add_argument("--split", default=None, choices=[*SPLITS, ALL],
                        help="which split to evaluate; default: 'test' when the dataset assigns splits, "
                        "otherwise every image ('all')")
    parser.add_argument("--target-recall", type=argument(check_number, 0.0, 1.0, open_low=True), default=0.99,
                        help="defect recall for the reported operating threshold (default 0.99)")
    parser.add_argument("--int8", action="store_true", help="evaluate the bundle's INT8 model instead of FP32")
    parser.add_argument("--image-root", type=Path, default=None,
                        help="local folder holding the images a manifest names by s3:// URI")
    parser.add_argument("--batch-size", type=argument(check_int, 1), default=32,
                        help="images per inference call (default 32)")
    parser.add_argument("--worst", type=argument(check_int, 1), default=20,
                        help="how many misclassified images report.md lists (default 20)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")
    return parser


def choose_split(index: DatasetIndex, split: str | None) -> DatasetIndex:
    """The samples to evaluate: an explicit split, 'all', or test when the dataset has splits."""
    if split == ALL:
        return index
    if split is None:
        if not any(s.split for s in index.samples):
            log.info("%s assigns no splits: evaluating all %d images", index.source, len(index.samples))
            return index
        split = "test"
    chosen = index.subset(split)
    if not chosen.samples:
        present = sorted({s.split or "(unassigned)" for s in index.samples})
        raise EvaluationError(f"{index.source}: no samples in split {split!r}; splits present: {present} "
                              f"(pass --split {ALL} to evaluate everything)")
    return chosen


def main(argv: Sequence[str], prog: str = "qcsight evaluate") -> int:
    parser = _parser(prog)
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    configure_logging(args.verbose)
    # Decoding happens once, during scoring, where unreadable images are reported rather than dropped.
    index = load_index(args.data, check_images=False, image_root=args.image_root)
    chosen = choose_split(index, args.split)
    skipped = [Unreadable(s.path, "", f"skipped by the dataset loader: {s.reason}") for s in index.skipped]
    with tempfile.TemporaryDirectory(prefix="qcsight-evaluate-") as scratch:
        bundle = load_bundle(args.bundle, extract_to=Path(scratch) if args.bundle.is_file() else None)
        if bundle.manifest.task == "anomaly":
            from qcsight_train.anomaly.evaluate import evaluate_dataset

            return evaluate_dataset(bundle, chosen, args.output, precision="int8" if args.int8 else "fp32",
                                    batch_size=args.batch_size)
        metrics = evaluate_bundle(bundle, chosen.samples, args.output, target_defect_recall=args.target_recall,
                                  precision="int8" if args.int8 else "fp32", batch_size=args.batch_size,
                                  worst=args.worst, skipped=skipped)
    cls, binary, op = metrics["classification"], metrics["binary"], metrics["operating_point"]

    def show(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    print(f"{metrics['images']} images ({len(metrics['unreadable'])} unreadable): accuracy {show(cls['accuracy'])}, "
          f"balanced accuracy {show(cls['balanced_accuracy'])}, macro F1 {show(cls['macro_f1'])}, "
          f"ROC AUC {show(binary['roc_auc'])}, PR AUC {show(binary['pr_auc'])}")
    print(f"threshold for defect recall {op['target_defect_recall']}: {show(op['threshold'])} "
          f"(false-reject rate {show(op['false_reject_rate'])})")
    at = metrics["at_bundle_threshold"]
    ci = at.get("defect_recall_ci95")
    print(f"at the bundle's threshold {show(at['threshold'])}: defect recall {show(at['defect_recall'])}"
          + (f" (95 % CI {ci[0]:.3f}-{ci[1]:.3f}, {at['defect_images']} defects)" if ci else "")
          + f", false-reject rate {show(at['false_reject_rate'])}")
    print(f"wrote {args.output / METRICS_FILE}, {', '.join(metrics['plots'])} and {args.output / REPORT_FILE}")
    return EXIT_OK
