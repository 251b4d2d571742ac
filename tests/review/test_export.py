"""Labels back to training: the manifest qcsight_data reads, disputed alerts left out; burst notifications."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from qcsight_cloud import timestamps
from qcsight_cloud.records import CONFIRM, FALSE_ALARM, RELABEL, UNDO
from qcsight_core.cli import main as qcsight
from qcsight_data.dataset import load_index
from qcsight_review.export import LABEL_ATTRIBUTE, export_manifest
from qcsight_review.images import FolderImages, NoImages
from qcsight_review.notify import BurstWatcher, LogNotifier, WebhookNotifier
from qcsight_review.settings import BurstSettings
from tests.review.conftest import Env
from tests.review.seed import LINE


def _review_some(env: Env) -> dict[str, str]:
    """Reviews with every outcome; returns the label each exported alert must carry."""
    ids, predicted, store = env.seeded.alert_ids[1:], env.seeded.predicted, env.store  # [0]: the anomaly alert
    store.add_review(ids[0], "ana", CONFIRM)
    store.add_review(ids[1], "ana", FALSE_ALARM, "good")
    store.add_review(ids[2], "ana", CONFIRM)
    store.add_review(ids[2], "ana", RELABEL, "spot")  # the same reviewer correcting themselves
    store.add_review(ids[3], "ana", CONFIRM)
    store.add_review(ids[3], "bob", FALSE_ALARM, "good")  # two reviewers disagree: disputed
    store.add_review(ids[4], "ana", CONFIRM)
    store.add_review(ids[4], "ana", UNDO)  # nothing in effect: not reviewed
    store.add_review(ids[5], "ana", CONFIRM)
    store.add_review(ids[5], "bob", CONFIRM)  # two reviewers agree
    return {ids[0]: predicted[ids[0]], ids[1]: "good", ids[2]: "spot", ids[5]: predicted[ids[5]]}


def test_the_manifest_holds_agreed_labels_and_qcsight_data_reads_it(env: Env, tmp_path: Path) -> None:
    expected = _review_some(env)
    out = io.StringIO()
    summary = export_manifest(env.store, FolderImages(env.seeded.images), out)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert summary.written == 4 and summary.disputed == [env.seeded.alert_ids[4]]
    assert summary.not_reviewed == [env.seeded.alert_ids[5]]
    by_alert = {row[f"{LABEL_ATTRIBUTE}-metadata"]["alert-id"]: row for row in lines}
    assert {k: v[f"{LABEL_ATTRIBUTE}-metadata"]["class-name"] for k, v in by_alert.items()} == expected
    meta = by_alert[env.seeded.alert_ids[3]][f"{LABEL_ATTRIBUTE}-metadata"]
    assert meta["reviewer"] == "ana" and meta["predicted"] == env.seeded.predicted[env.seeded.alert_ids[3]]
    manifest = tmp_path / "labels.manifest"
    manifest.write_text(out.getvalue())
    index = load_index(manifest)
    assert not index.skipped and index.format == "groundtruth"
    assert sorted(s.label for s in index.samples) == sorted(expected.values())


def test_an_alert_whose_image_never_arrived_is_left_out(env: Env) -> None:
    _review_some(env)
    summary = export_manifest(env.store, NoImages(), io.StringIO())
    assert summary.written == 0 and len(summary.no_image) == 4


def test_the_cli_writes_the_manifest_and_the_audit_log(env: Env, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    _review_some(env)
    manifest, audit = tmp_path / "out.manifest", tmp_path / "audit.jsonl"
    store = ["--store", env.settings.store, "--images", str(env.seeded.images)]
    assert qcsight(["review", "export", *store, "--output", str(manifest), "--line", LINE]) == 0
    assert "4 labels" in capsys.readouterr().out and len(manifest.read_text().splitlines()) == 4
    assert qcsight(["review", "audit", "--store", env.settings.store, "--output", str(audit)]) == 0
    rows = [json.loads(line) for line in audit.read_text().splitlines()]
    assert len(rows) == 10 and {"reviewer", "time", "action", "previous_label", "previous_verdict"} <= set(rows[0])
    assert qcsight(["review", "export", *store, "--output", str(manifest), "--since", "yesterday"]) == 1


class _Hook:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []


@pytest.fixture
def webhook() -> Iterator[tuple[str, _Hook]]:
    hook = _Hook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hook.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", hook
    server.shutdown()
    server.server_close()


def test_a_defect_burst_notifies_once_per_window_with_a_link_to_the_inbox(env: Env, webhook: tuple[str, _Hook],
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    url, hook = webhook
    now = timestamps.now()
    settings = BurstSettings(max_alerts=20, window_s=7200, webhook=url)
    clock = [now]
    watcher = BurstWatcher(env.store, settings, [LogNotifier(), WebhookNotifier(url)], "https://review.example.com",
                           clock=lambda: clock[0])
    sent = watcher.check()
    assert [b.line for b in sent] == [LINE] and sent[0].alerts == 21
    assert hook.bodies[0]["link"].startswith("https://review.example.com/inbox?line=line-1&status=defect&since=")
    assert "defect burst on line-1" in caplog.text
    assert watcher.check() == [], "the same burst does not notify again within its window"
    quiet = BurstWatcher(env.store, BurstSettings(max_alerts=40, window_s=7200), [LogNotifier()], "http://x")
    assert quiet.check() == []
    clock[0] = now + timedelta(hours=5)
    assert watcher.check() == [], "the alerts are older than the window now"
