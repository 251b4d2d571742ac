"""What the local pipeline trains on: reviewed alerts become a reviewed-image manifest with their images; a run a
stopped process left behind is requested again."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from qcsight_cloud.fleet import Fleet
from qcsight_cloud.ingest import Ingestor
from qcsight_cloud.localloop import Loop, LoopSettings, export_reviewed
from qcsight_cloud.records import Run
from qcsight_cloud.sqlite_store import SqliteStore
from qcsight_core.review_manifest import read_manifest
from qcsight_data.dataset import load_index
from tests.cloud.builders import T0, alert, incoming


def test_reviews_become_a_manifest_the_training_data_loader_reads(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite")
    messages = [alert("cam-1", seq, T0 + timedelta(seconds=seq), label="crack", thumbnail=seq != 5)
                for seq in range(1, 6)]
    Ingestor(store, lambda thing: "line-1").ingest_batch([incoming(m) for m in messages])
    a1, a2, a3, a4, a5 = (str(m["message_id"]) for m in messages)
    full = tmp_path / "device-images"
    full.mkdir()
    (full / "cam-1-2.jpg").write_bytes(b"full image of part 2")
    store.add_review(a1, "op", "confirm")
    store.add_review(a2, "op", "relabel", "scratch")
    store.add_review(a3, "op", "false_alarm")
    store.add_review(a4, "op", "confirm")
    store.add_review(a4, "op", "undo")  # taken back: no verdict, not trained on
    store.add_review(a5, "op", "confirm")  # no thumbnail and no reachable image: left out
    manifest = export_reviewed(store, tmp_path / "export", image_roots={"cam-1": full})
    rows = sorted(read_manifest(manifest), key=lambda r: [a1, a2, a3].index(r.alert_id))
    assert [(r.alert_id, r.label, r.verdict) for r in rows] == [
        (a1, "crack", "defect"), (a2, "scratch", "defect"), (a3, "good", "false_alarm")]
    assert all(r.reviewer == "op" and r.thing == "cam-1" and r.predicted == "crack" for r in rows)
    assert Path(rows[0].source_ref).read_bytes() == b"\x00\x01\x02"  # the alert's thumbnail
    assert Path(rows[1].source_ref).read_bytes() == b"full image of part 2"  # the device's full image
    index = load_index(manifest, check_images=False)  # any Ground Truth reader takes it too
    assert sorted((Path(s.path).stem, s.label) for s in index.samples) == sorted(
        [(a1, "crack"), (a2, "scratch"), (a3, "good")])


def test_a_run_left_running_by_a_stopped_process_is_requested_again(tmp_path: Path) -> None:
    import threading

    store = SqliteStore(tmp_path / "s.sqlite")
    store.put_run(Run("r1", "line-1", "2026-03-02T08:00:00.000Z", "running"))
    store.put_run(Run("r2", "line-1", "2026-03-02T08:01:00.000Z", "running", model_version="4"))  # soaking
    loop = Loop(LoopSettings(), store, Fleet({"line-1": ("cam-1",)}), None, None, threading.Event())  # type: ignore[arg-type]
    loop.resume()
    assert [(r.run_id, r.status) for r in store.runs("line-1")] == [("r1", "requested"), ("r2", "running")]
