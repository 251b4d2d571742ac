"""Compare training recipes by k-fold cross-validation inside the training images: no test split is read.

A recipe default decided on one 160-image validation split picks noise (issue 17: flips tied
there, 0.938 against 0.945). Here every training image is scored once, by the model of the fold
that did not train on it, and every variant sees the same folds, so the comparison is paired:

- the folds are `qcsight_train.folds.assign_folds` (near-duplicate groups whole, stratified by
  class), the same for every variant;
- each fold trains with `qcsight_train.trainer.fit`, the code `qcsight train` runs, on the
  settings `qcsight train` would resolve from the variant's flags (`--img-size auto` measured
  once on all the images, so every variant gets the same input size);
- the out-of-fold probabilities are pooled: accuracy, macro-F1, defect-vs-good AUROC, per-class F1;
- each variant against the first: the macro-F1, accuracy and defect AUROC differences, each with a
  95 % interval from one paired bootstrap over near-duplicate groups (the same draws for all three),
  and the images only one of the two got right;
- each variant's validation macro-F1 per epoch averaged over the folds (every image scored each
  epoch), and the first epoch within 0.01 of its last: the time-to-accuracy figure of
  bench_train.py, on the whole pool instead of one small validation split.

Each fold's probabilities are saved as it ends; running the same command again skips finished
folds (and `fit` resumes a fold killed mid-way). `--fold K` trains only fold K (repeat it for
several), so the folds can run in separate processes or machines on one shared workdir; the
report is printed by a run that finds every fold done.

Example (the magnetic-tile README split's 1,087 training images; bench_train.py writes them):
  nice -n 10 .venv/bin/python benchmarks/cv_recipe.py --data /tmp/t2/a/mt-readme-data/train \\
      --groups /work/shared/data/magnetic_tile/near_dup_groups.csv --folds 3 \\
      --variant default= --variant flips='--hflip --vflip' --workdir /tmp/cv --json cv.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

log = logging.getLogger("cv_recipe")


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=FLAGS (FLAGS may be empty)")
    return name, shlex.split(flags)


def resolve(flags: list[str], data: str, groups: str, workdir: Path) -> Any:
    """The TrainConfig `qcsight train --data DATA [--groups G] FLAGS` resolves to (no SageMaker environment)."""
    from qcsight_train.cli import get_args_parser, resolve_config

    argv = ["--data", data, "--output", str(workdir), *(["--groups", groups] if groups else []), *flags]
    cfg, _ = resolve_config(get_args_parser().parse_args(argv), {})
    return cfg


def pooled_figures(labels: np.ndarray, probs: np.ndarray, classes: tuple[str, ...],
                   defects: tuple[str, ...]) -> dict[str, Any]:
    from qcsight_train.metrics import binary_curves, classification_metrics

    pred = probs.argmax(axis=1)
    figures = classification_metrics(labels, pred, classes)
    defect_idx = [classes.index(c) for c in defects]
    is_defect = np.isin(labels, defect_idx)
    result = {"accuracy": figures["accuracy"], "balanced_accuracy": figures["balanced_accuracy"],
              "macro_f1": figures["macro_f1"],
              "per_class_f1": {c: figures["per_class"][c]["f1"] for c in classes}}
    if 0 < is_defect.sum() < len(is_defect):
        result["defect_auroc"] = binary_curves(is_defect, probs[:, defect_idx].sum(axis=1))["roc_auc"]
    return result


def macro_f1(labels: np.ndarray, pred: np.ndarray, k: int) -> float:
    from qcsight_train.metrics import classification_metrics

    return float(classification_metrics(labels, pred, [str(i) for i in range(k)])["macro_f1"])


def paired_difference(labels: np.ndarray, base: np.ndarray, other: np.ndarray, groups: list[str], k: int,
                      rounds: int, seed: int, *, base_score: np.ndarray | None = None,
                      other_score: np.ndarray | None = None, is_defect: np.ndarray | None = None) -> dict[str, Any]:
    """other - base macro-F1 and accuracy, with 95 % intervals from resampling near-duplicate groups.

    Both variants are resampled together, and every figure's interval comes from the same draws. With
    defect scores and the defect truth given, the defect-vs-good AUROC difference is added the same way
    (a draw holding one kind only adds no AUROC difference).
    """
    from qcsight_train.metrics import binary_curves

    def auroc(rows: np.ndarray, score: np.ndarray) -> float | None:
        assert is_defect is not None
        area = binary_curves(is_defect[rows], score[rows])["roc_auc"]
        return None if area is None else float(area)

    names = sorted(set(groups))
    members = {g: [] for g in names}
    for i, g in enumerate(groups):
        members[g].append(i)
    index = [np.array(members[g]) for g in names]
    with_auroc = base_score is not None and other_score is not None and is_defect is not None
    rng = np.random.default_rng(seed)
    diffs, acc_diffs, auroc_diffs = [], [], []
    for _ in range(rounds):
        rows = np.concatenate([index[j] for j in rng.integers(0, len(names), len(names))])
        diffs.append(macro_f1(labels[rows], other[rows], k) - macro_f1(labels[rows], base[rows], k))
        acc_diffs.append(float(np.mean(other[rows] == labels[rows]) - np.mean(base[rows] == labels[rows])))
        if with_auroc:
            assert base_score is not None and other_score is not None
            pair = auroc(rows, other_score), auroc(rows, base_score)
            if pair[0] is not None and pair[1] is not None:
                auroc_diffs.append(pair[0] - pair[1])
    base_right, other_right = base == labels, other == labels
    result = {"macro_f1_difference": macro_f1(labels, other, k) - macro_f1(labels, base, k),
              "interval_95": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))],
              "share_of_bootstrap_above_0": float(np.mean(np.array(diffs) > 0)),
              "accuracy_difference": float(np.mean(other_right) - np.mean(base_right)),
              "accuracy_interval_95": [float(np.percentile(acc_diffs, 2.5)), float(np.percentile(acc_diffs, 97.5))],
              "only_this_right": int((other_right & ~base_right).sum()),
              "only_first_right": int((base_right & ~other_right).sum()),
              "bootstrap_rounds": rounds, "groups": len(names)}
    everything = np.arange(len(labels))
    if with_auroc and auroc_diffs:
        assert base_score is not None and other_score is not None
        whole = auroc(everything, other_score), auroc(everything, base_score)
        if whole[0] is not None and whole[1] is not None:
            result["auroc_difference"] = whole[0] - whole[1]
            result["auroc_interval_95"] = [float(np.percentile(auroc_diffs, 2.5)),
                                           float(np.percentile(auroc_diffs, 97.5))]
    return result


def bench_train() -> ModuleType:
    """benchmarks/bench_train.py, for the one definition of "reached its final validation figure"."""
    if "bench_train" in sys.modules:
        return sys.modules["bench_train"]
    path = Path(__file__).with_name("bench_train.py")
    spec = importlib.util.spec_from_file_location("bench_train", path)
    if spec is None or spec.loader is None:  # pragma: no cover - the file ships beside this one
        raise ImportError(f"{path}: not importable")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def fold_mean_curve(per_fold: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The validation macro-F1 per epoch averaged over the folds, and the epoch it reaches its final figure.

    One 267-image validation split moves by 0.02 between late epochs, more than the recipes being
    compared; each epoch's fold mean is over every image of the pool. "Reached" is bench_train's
    definition (within REACHED of the last epoch's figure). None when the folds ran different epochs.
    """
    curves = [f["val_macro_f1_per_epoch"] for f in per_fold]
    if not curves or len({len(c) for c in curves}) != 1 or not curves[0]:
        return None
    history = [{"epoch": e + 1, "val_macro_f1": float(np.mean([c[e] for c in curves])),
                "seconds": float(np.mean([f["seconds_per_epoch"][e] for f in per_fold]))}
               for e in range(len(curves[0]))]
    bench = bench_train()
    epoch, to_final = bench.epochs_to_final(history)
    return {"val_macro_f1_per_epoch": [round(h["val_macro_f1"], 4) for h in history], "epochs": len(history),
            "epochs_to_final": epoch, "seconds_to_final_per_fold": to_final, "within": bench.REACHED}


def run_variant(name: str, flags: list[str], args: argparse.Namespace, pool: tuple[Any, ...], folds: list[int],
                classes: tuple[str, ...], sized: Any) -> dict[str, Any] | None:
    """One variant's folds: trained (or read back), pooled. None when `--fold` left a fold not done."""
    from qcsight_train import folds as folds_mod
    from qcsight_train.data import Splits
    from qcsight_train.distributed import init_distributed
    from qcsight_train.models import preprocess_spec
    from qcsight_train.run import input_size
    from qcsight_train.trainer import fit

    workdir = args.workdir / name
    cfg = resolve(flags, args.data, args.groups, workdir)
    if cfg.img_size == "auto":  # every variant gets the size measured once on all the images
        cfg = dataclasses.replace(cfg, img_size=sized.img_size, resize=sized.resize)
    spec = preprocess_spec(cfg.arch, input_size(cfg), cfg.resize)
    info = init_distributed()
    probs = np.zeros((len(pool), len(classes)))
    per_fold = []
    missing = []
    for k in range(args.folds):
        saved = workdir / f"fold{k + 1}.npz"
        if args.fold and k + 1 not in args.fold and not saved.exists():
            missing.append(k + 1)
            continue
        held = tuple(s for s, f in zip(pool, folds, strict=True) if f == k)
        rest = tuple(s for s, f in zip(pool, folds, strict=True) if f != k)
        rows = [i for i, f in enumerate(folds) if f == k]
        start = time.perf_counter()
        if saved.exists():
            data = np.load(saved, allow_pickle=False)
            probs[rows], history = data["probs"], json.loads(str(data["history"]))
            log.info("%s fold %d/%d: done before, read %s", name, k + 1, args.folds, saved)
        else:
            log.info("%s fold %d/%d: training on %d images, scoring %d (%s)", name, k + 1, args.folds, len(rest),
                     len(held), " ".join(flags) or "defaults")
            splits = Splits(rest, held, (), classes, "cv", args.data)
            result = fit(cfg, splits, info, workdir / f"fold{k + 1}", log_as="fold")
            model = folds_mod.load_weights(cfg, len(classes), result.best_path)
            probs[rows] = folds_mod.predict(model, held, classes, spec, cfg.batch_size * 2, cfg.workers)
            history = [{"epoch": h["epoch"], "val_macro_f1": h["val_macro_f1"], "val_accuracy": h["val_acc"],
                        "seconds": h["seconds"]} for h in result.history]
            tmp = saved.with_suffix(".tmp.npz")
            np.savez(tmp, probs=probs[rows], history=json.dumps(history))
            tmp.replace(saved)
        labels = np.array([classes.index(s.label) for s in held])
        per_fold.append({"fold": k + 1, "train_images": len(rest), "held_images": len(held),
                         "macro_f1": macro_f1(labels, probs[rows].argmax(axis=1), len(classes)),
                         "val_macro_f1_per_epoch": [round(h["val_macro_f1"], 4) for h in history],
                         "seconds_per_epoch": [round(h["seconds"], 1) for h in history],
                         "seconds": round(time.perf_counter() - start, 1)})
        log.info("%s fold %d/%d: held-out macro-F1 %.3f", name, k + 1, args.folds, per_fold[-1]["macro_f1"])
    if missing:
        log.info("%s: fold(s) %s not done yet (--fold %s); the report waits for every fold", name,
                 ", ".join(map(str, missing)), " ".join(map(str, args.fold)))
        return None
    return {"flags": flags, "img_size": cfg.img_size, "resize": cfg.resize, "epochs": cfg.epochs,
            "folds": per_fold, "fold_mean": fold_mean_curve(per_fold), "probs": probs}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the training images only (class per folder); never a test set")
    parser.add_argument("--groups", default="", help="near-duplicate groups CSV (file,class,group)")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--variant", action="append", type=parse_variant, required=True,
                        help="NAME=FLAGS: `qcsight train` flags of one recipe (the first is the baseline)")
    parser.add_argument("--fold", type=int, action="append", default=[],
                        help="train only fold K (1..--folds; repeatable); the others are read if done, else skipped")
    parser.add_argument("--seed", type=int, default=0, help="fold assignment and bootstrap seed")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if bad := [k for k in args.fold if not 1 <= k <= args.folds]:
        parser.error(f"--fold {bad[0]}: a fold from 1 to --folds {args.folds}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")

    from qcsight_train import folds as folds_mod
    from qcsight_train.data import defect_classes, load_data
    from qcsight_train.run import resolve_input_size

    base = resolve([], args.data, args.groups, args.workdir / "base")
    splits = load_data(dataclasses.replace(base, val_fraction=0.15, test_fraction=0.0), args.workdir / "cache")
    pool = (*splits.train, *splits.val, *splits.test)
    classes, defects = splits.classes, defect_classes(base, splits.classes)
    sized, _ = resolve_input_size(base, pool)
    folds = folds_mod.assign_folds(pool, args.folds, args.seed)
    labels = np.array([classes.index(s.label) for s in pool])
    log.info("%d images, %d classes, %d folds of %s images; input %s (%s)", len(pool), len(classes), args.folds,
             [folds.count(k) for k in range(args.folds)], sized.img_size, sized.resize)

    ran = {name: run_variant(name, flags, args, pool, folds, classes, sized) for name, flags in args.variant}
    results = {name: result for name, result in ran.items() if result is not None}
    if len(results) < len(ran):
        print("not every fold is done: run again without --fold (finished folds are read back) for the report")
        return 0
    first = args.variant[0][0]
    report: dict[str, Any] = {"data": args.data, "images": len(pool), "folds": args.folds, "seed": args.seed,
                              "classes": list(classes), "variants": {}}
    preds = {name: result["probs"].argmax(axis=1) for name, result in results.items()}
    defect_idx = [classes.index(c) for c in defects]
    is_defect = np.isin(labels, defect_idx)
    scores = {name: result["probs"][:, defect_idx].sum(axis=1) for name, result in results.items()}
    for name, result in results.items():
        probs = result.pop("probs")
        entry = {**result, "pooled": pooled_figures(labels, probs, classes, defects), "pred": preds[name].tolist()}
        if name != first:
            entry["against_" + first] = paired_difference(
                labels, preds[first], preds[name], [s.group for s in pool], len(classes), args.bootstrap, args.seed,
                base_score=scores[first], other_score=scores[name], is_defect=is_defect)
        report["variants"][name] = entry
        pooled = entry["pooled"]
        print(f"{name:>12}  out-of-fold accuracy {pooled['accuracy']:.3f}  macro-F1 {pooled['macro_f1']:.3f}  "
              f"AUROC {pooled.get('defect_auroc', float('nan')):.3f}  per fold "
              + " ".join(f"{f['macro_f1']:.3f}" for f in entry["folds"]))
        curve = entry["fold_mean"]
        if curve is not None:
            print(f"{'':>12}  validation macro-F1 per epoch, mean of the folds: "
                  + " ".join(f"{v:.3f}" for v in curve["val_macro_f1_per_epoch"])
                  + f"; within {curve['within']} of its last from epoch {curve['epochs_to_final']} "
                  f"of {curve['epochs']}")
        if name != first:
            diff = entry["against_" + first]
            print(f"{'':>12}  macro-F1 - {first}: {diff['macro_f1_difference']:+.3f} "
                  f"(95 % {diff['interval_95'][0]:+.3f} to {diff['interval_95'][1]:+.3f}, group bootstrap); "
                  f"only this right {diff['only_this_right']}, only {first} right {diff['only_first_right']}")
            print(f"{'':>12}  accuracy - {first}: {diff['accuracy_difference']:+.4f} "
                  f"(95 % {diff['accuracy_interval_95'][0]:+.4f} to {diff['accuracy_interval_95'][1]:+.4f})"
                  + (f"; AUROC: {diff['auroc_difference']:+.4f} (95 % {diff['auroc_interval_95'][0]:+.4f} to "
                     f"{diff['auroc_interval_95'][1]:+.4f})" if "auroc_difference" in diff else ""))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
