"""Normal-only anomaly detection (`qcsight train --task anomaly`): a PatchCore-style memory bank of good patches.

features (backbone mid-level patch features) -> coreset (greedy k-center bank) -> model (the
nn.Module the ONNX graph is exported from) -> export (bundle: parity, INT8 and size gates,
threshold) -> evaluate (image/pixel AUROC, PRO, plots, report); data makes the good-only
training split, run wires them for the CLI.
"""
