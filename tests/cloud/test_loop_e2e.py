"""The whole loop on one machine, once, with tiny models: devices on local nuclei → broker → serve → drift →
policy → retraining with reviewed images → gate → approval → canary → promotion.

scripts/loop_demo.py drives it (the same driver `make demo` runs, with tiny settings): real Mosquitto
with mutual TLS, two `qcsight gg run-local` nuclei running the agent on hot-folder cameras,
`qcsight cloud serve`, `qcsight train` (mobilenet_v3_small, 32 px, one epoch) and `qcsight evaluate`
as processes. The production model is the tests' tiny ONNX bundle. The gate's margins and the soak's
bounds are opened wide here: what they decide is table-tested (test_gate.py, test_rollout.py);
this test proves the loop carries a candidate from a drift to every device.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qcsight_cloud.registry import APPROVED, CANARY, PROMOTED, Registry
from qcsight_cloud.sqlite_store import SqliteStore
from qcsight_data.synth import generate
from tests.edge.broker import find_mosquitto
from tests.helpers.models import make_tiny_bundle
from tests.helpers.scripts import load_script

pytestmark = [pytest.mark.slow, pytest.mark.torch, pytest.mark.broker, pytest.mark.timeout(900)]


def test_a_drift_ends_with_a_retrained_model_promoted_to_every_device(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed (apt-get install mosquitto)")
    generate(tmp_path / "data", 12, seed=7, size=32, classes=("good", "scratch", "spot"))
    make_tiny_bundle(tmp_path / "v1", size=32, version="1")
    demo = load_script("scripts/loop_demo.py")
    out = tmp_path / "loop"
    summary = demo.main(["--out", str(out), "--data", str(tmp_path / "data"), "--bundle", str(tmp_path / "v1"),
                         "--img-size", "32", "--parts", "8", "--holdout-parts", "4", "--classes", "good,scratch,spot",
                         "--reviews", "6",
                         "--review-from", "start", "--before-drift-s", "3", "--soak-s", "6", "--timeout-s", "600",
                         "--fps", "4", "--window-s", "4",  # short windows: this test needs a drift, not a clean one
                         "--gate", json.dumps({"macro_f1": 1, "defect_recall": 1, "class_recall": 1}),
                         # A 1-epoch mobilenet against a linear brightness model: it differs wildly in defect rate
                         # and latency (the soak rolled it back when it was held to the demo's bounds; with alpha
                         # 1e-300 too, when it called every part a defect: 33/33 vs 0/48 gives p = 0).
                         "--soak", json.dumps({"rate_alpha": 0, "max_latency_ratio": 1000}),
                         "--train-args", "--arch mobilenet_v3_small --weights none --epochs 1 --freeze-epochs 0 "
                         "--batch-size 16 --workers 0 --int8 false --torchscript false --threads 2"])
    assert summary["outcome"] == PROMOTED and summary["version"] == "2", summary
    registry = Registry(out / "registry")
    model = registry.get("2")
    assert model.status == APPROVED and registry.production("line-1") == model
    assert [e["event"] for e in model.events] == ["registered", APPROVED, CANARY, PROMOTED]
    assert model.events[2]["canary"] == ["cam-1"] and model.events[3]["things"] == ["cam-1", "cam-2"]
    # the retraining saw the operator's reviews as a Ground Truth manifest, beside the base data
    (run_dir,) = (out / "runs").iterdir()
    reviewed = (run_dir / "reviewed" / "reviewed.manifest").read_text().splitlines()
    assert len(reviewed) >= 6 and all(Path(json.loads(r)["source-ref"]).is_file() for r in reviewed)
    assert json.loads((run_dir / "gate.json").read_text())["production"]["model"] == "tiny 1"
    store = SqliteStore(out / "cloud.sqlite")
    fired = [d for d in store.decisions("line-1", limit=500) if d.action == "fire"]
    assert len(fired) == 1 and "drift" in fired[0].triggers
    (run,) = store.runs("line-1")
    assert run.status == "succeeded" and run.model_version == "2"
    (rollout,) = store.decisions("rollout:line-1")
    assert rollout.action == "promote"
    assert all(store.device(t).model_version == "2" for t in ("cam-1", "cam-2"))  # type: ignore[union-attr]
    assert summary["drift_to_promoted_s"] > 0
