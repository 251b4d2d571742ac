"""`qcsight data`: index, split, inspect, fingerprint and synthesise labelled image datasets."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from qcsight_core.cli import EXIT_OK, configure_logging, parse_args
from qcsight_core.errors import DataError
from qcsight_core.synth import DEFAULT_CLASSES
from qcsight_data.dataset import (
    SPLITS,
    DatasetIndex,
    fingerprint,
    load_index,
    split_index,
    write_index,
)
from qcsight_data.synth import generate

log = logging.getLogger(__name__)

SOURCE_HELP = (
    "a folder with one subfolder per class (masks/ is ignored), an index CSV (path,label[,group][,split], "
    "paths relative to the CSV), or a SageMaker Ground Truth / Lookout for Vision manifest (.manifest/.jsonl)"
)
ELPV_HELP = """\
Copy the ELPV solar-cell set (pip package elpv-dataset, 2,624 grey 300x300 EL images) into
OUTPUT/good and OUTPUT/defect as PNGs. Each cell carries a defect probability from expert
review: 0 -> good, 1 -> defect; 1/3 and 2/3 are left out unless --include-uncertain puts them
in defect. OUTPUT/elpv_labels.csv keeps file, class, probability and module type (mono/poly).

No groups CSV is written: the package records no solar-module ids, so cells cut from one
module cannot be kept together and a random split may put neighbours on both sides. The
package is licensed CC BY-NC-SA 4.0 (non-commercial)."""


class ProgressReporter:
    """Progress on stderr: a redrawn bar on a terminal, otherwise a line every `every` items."""

    def __init__(self, what: str, stream: TextIO | None = None, every: int = 500) -> None:
        self.what = what
        self.stream = stream if stream is not None else sys.stderr
        self.every = every
        self.tty = self.stream.isatty()
        self._last_draw = 0.0

    def __call__(self, done: int, total: int) -> None:
        if self.tty:
            now = time.monotonic()
            if done < total and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            filled = 30 * done // max(total, 1)
            end = "\n" if done >= total else ""
            self.stream.write(f"\r{self.what} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}{end}")
            self.stream.flush()
        elif done % self.every == 0 or (done == total and total >= self.every):
            self.stream.write(f"{self.what}: {done}/{total}\n")
            self.stream.flush()


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Index, split, inspect, fingerprint and synthesise labelled image datasets.",
        epilog="Unreadable images (missing, empty, truncated, not an image) are skipped and listed by path, "
        "never fatal. Exit codes: 0 done, 1 failed (bad path or format), 2 usage error.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def source_command(name: str, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
        command.add_argument("--groups", metavar="CSV", type=Path,
                             help="near-duplicate groups: CSV file,class,group with files relative to the dataset root")
        command.add_argument("--image-root", metavar="DIR", type=Path,
                             help="local copy of the images a manifest names by s3:// URI "
                             "(s3://bucket/prefix/x.jpg -> DIR/x.jpg)")
        command.add_argument("--label-attribute", metavar="NAME",
                             help="the manifest's label attribute when a line holds several (e.g. my-job)")
        command.add_argument("--no-check", dest="check", action="store_false",
                             help="do not decode every image (faster; unreadable files stay in the index)")
        return command

    index = source_command("index", "list a dataset's samples and skipped files; optionally write an index CSV")
    index.add_argument("--output", "-o", type=Path, metavar="CSV", help="write path,label,group,split here")

    split = source_command("split", "split by near-duplicate group, stratified by class, into train/val/test")
    split.add_argument("--val", type=float, default=0.15, help="validation fraction (default 0.15)")
    split.add_argument("--test", type=float, default=0.15, help="test fraction (default 0.15)")
    split.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    split.add_argument("--output", "-o", type=Path, metavar="CSV", required=True,
                       help="the index CSV to write (path,label,group,split)")

    stats = source_command("stats", "counts per class and split, skipped files, image aspect ratios and defect sizes "
                           "after the resize (from masks/<class>/<stem>.png), and a recommended --img-size")
    stats.add_argument("--sample", type=int, default=2000, metavar="N",
                       help="measure sizes on at most N images, an even random sample (default 2000)")
    source_command("fingerprint", "sha256 of the dataset's relative paths, labels and file contents")

    synth = sub.add_parser("synth", help="generate a synthetic surface-defect dataset with masks",
                           description="Generate seeded, reproducible surface images (brushed metal, cast, woven, "
                           "wood-like) folder per class, with pixel masks under OUTPUT/masks/<class>/.")
    synth.add_argument("--output", "-o", type=Path, required=True, metavar="DIR", help="a new or empty directory")
    synth.add_argument("--count", type=int, required=True, help="images per class (N good, N of each defect class)")
    synth.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical files (default 0)")
    synth.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    synth.add_argument("--classes", default=",".join(DEFAULT_CLASSES),
                       help=f"comma-separated subset of {','.join(DEFAULT_CLASSES)}")

    elpv = sub.add_parser("import-elpv", help="write the elpv-dataset solar cells as good/defect folders",
                          description=ELPV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    elpv.add_argument("--output", "-o", type=Path, required=True, metavar="DIR", help="a new or empty directory")
    elpv.add_argument("--include-uncertain", action="store_true",
                      help="also put cells with defect probability 1/3 and 2/3 in defect")
    elpv.add_argument("--source", type=Path, metavar="DIR",
                      help="an elpv data folder (labels.csv + images/), e.g. from a clone of the "
                      "zae-bayern/elpv-dataset repository; default: the installed package's")
    return parser


def main(argv: Sequence[str], prog: str = "qcsight data") -> int:
    parser = _parser(prog)
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    configure_logging(args.verbose)
    handlers = {"index": _index, "split": _split, "stats": _stats, "fingerprint": _fingerprint,
                "synth": _synth, "import-elpv": _import_elpv}
    return handlers[args.action](args)


def _load(args: argparse.Namespace) -> DatasetIndex:
    return load_index(args.source, groups=args.groups, check_images=args.check, image_root=args.image_root,
                      label_attribute=args.label_attribute, progress=ProgressReporter("checking images"))


def _index(args: argparse.Namespace) -> int:
    index = _load(args)
    print_summary(index)
    if args.output:
        write_index(index, args.output)
        print(f"wrote {args.output} ({len(index.samples)} samples)")
    return EXIT_OK


def _split(args: argparse.Namespace) -> int:
    index = split_index(_load(args), val=args.val, test=args.test, seed=args.seed)
    write_index(index, args.output)
    print_summary(index)
    print(f"wrote {args.output} (seed {args.seed}, {len({s.group for s in index.samples})} groups)")
    return EXIT_OK


def _stats(args: argparse.Namespace) -> int:
    from qcsight_data import sizing

    index = _load(args)
    print_summary(index)
    if index.samples:
        sizes = sizing.measure([(s.path, s.label) for s in index.samples], index.root, limit=max(1, args.sample),
                               progress=ProgressReporter("measuring sizes"))
        for line in sizing.report(sizes, sizing.recommend(sizes)):
            print(line)
    return EXIT_OK


def _fingerprint(args: argparse.Namespace) -> int:
    index = _load(args)
    print(fingerprint(index, progress=ProgressReporter("hashing")))
    if index.skipped:
        log.warning("%d skipped files are not part of the fingerprint (see 'qcsight data stats')", len(index.skipped))
    return EXIT_OK


def _synth(args: argparse.Namespace) -> int:
    classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
    started = time.monotonic()
    total = args.count * len(classes)
    index = generate(args.output, total, args.seed, args.size, classes, progress=ProgressReporter("generating"))
    elapsed = time.monotonic() - started
    print_summary(index)
    print(f"wrote {total} images to {args.output} in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.0f}/s)")
    return EXIT_OK


def format_counts(index: DatasetIndex) -> list[str]:
    """Rows of a class x split table with totals."""
    counts = index.counts()
    splits = [s for s in (*SPLITS, "") if s in counts]
    names = [s or "unsplit" for s in splits]
    width = max([len("class"), len("total"), *(len(c) for c in index.classes)])
    lines = [f"{'class':<{width}}" + "".join(f"{n:>9}" for n in names) + f"{'total':>9}"]
    for label in index.classes:
        row = [counts[s].get(label, 0) for s in splits]
        lines.append(f"{label:<{width}}" + "".join(f"{n:>9}" for n in row) + f"{sum(row):>9}")
    totals = [sum(counts[s].values()) for s in splits]
    lines.append(f"{'total':<{width}}" + "".join(f"{n:>9}" for n in totals) + f"{sum(totals):>9}")
    return lines


def print_summary(index: DatasetIndex, stream: TextIO | None = None) -> None:
    """Source, class x split counts, and every skipped file with its reason."""
    out = stream if stream is not None else sys.stdout
    print(f"source: {index.source} ({index.format}): {len(index.samples)} samples, {len(index.classes)} classes, "
          f"{len({s.group for s in index.samples})} groups, {len(index.skipped)} skipped", file=out)
    if index.samples:
        for line in format_counts(index):
            print(line, file=out)
    if index.skipped:
        print(f"skipped {len(index.skipped)}:", file=out)
        for item in index.skipped:
            print(f"  {item.path}: {item.reason}", file=out)


def elpv_data_dir() -> Path:
    """The data folder of the installed elpv-dataset package (found without importing it or Pillow)."""
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the elpv-dataset package is not installed; pip install elpv-dataset")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not (data / "labels.csv").is_file():
        raise DataError(f"{data}: elpv-dataset has no data/labels.csv; is the package complete?")
    return data


def read_elpv_labels(data: Path) -> list[tuple[str, float, str]]:
    """(image path relative to data, defect probability, module type) per cell, as labels.csv lists them."""
    rows = []
    labels = data / "labels.csv"
    for line_no, line in enumerate(labels.read_text(encoding="utf-8").splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            rows.append((parts[0], float(parts[1]), parts[2] if len(parts) > 2 else ""))
        except (IndexError, ValueError) as exc:
            raise DataError(f"{labels} line {line_no}: expected 'path probability type', got {line!r}") from exc
    return rows


def _import_elpv(args: argparse.Namespace) -> int:
    output: Path = args.output
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise DataError(f"{output}: exists and is not an empty directory; choose a new output directory")
    data = args.source if args.source is not None else elpv_data_dir()
    if not (data / "labels.csv").is_file():
        raise DataError(f"{data}: no labels.csv; expected an elpv data folder (labels.csv + images/)")
    rows = read_elpv_labels(data)
    report = ProgressReporter("copying")
    written = {"good": 0, "defect": 0}
    left_out, failed = 0, []
    for label in written:
        (output / label).mkdir(parents=True, exist_ok=True)
    with (output / "elpv_labels.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["file", "class", "probability", "type"])
        for done, (rel, probability, module_type) in enumerate(rows, start=1):
            cell_class = elpv_class(probability, args.include_uncertain)
            if cell_class is None:
                left_out += 1
            else:
                target = output / cell_class / Path(rel).name
                try:
                    shutil.copyfile(data / rel, target)
                except OSError as exc:
                    failed.append(f"{data / rel}: {exc.strerror or exc}")
                else:
                    writer.writerow([target.relative_to(output).as_posix(), cell_class, f"{probability:.4f}",
                                     module_type])
                    written[cell_class] += 1
            report(done, len(rows))
    print(f"wrote {written['good']} good and {written['defect']} defect cells to {output}"
          + (f"; left out {left_out} uncertain (use --include-uncertain)" if left_out else ""))
    print("no groups CSV: elpv-dataset records no module ids (see --help)")
    if failed:
        print(f"skipped {len(failed)}:")
        for line in failed:
            print(f"  {line}")
    return EXIT_OK


def elpv_class(probability: float, include_uncertain: bool) -> str | None:
    """good for probability 0, defect for 1 (and for 1/3, 2/3 when include_uncertain), else None."""
    if probability <= 0.0:
        return "good"
    if probability >= 1.0 or include_uncertain:
        return "defect"
    return None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
