"""The image upload queue: durable, bounded by count and bytes (oldest evicted, counted, recorded as lost),
one row per alert, refused images kept aside with the reason, private files."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from qcsight_edge.errors import ImageNotQueuedError, UploadQueueError
from qcsight_edge.uploadqueue import UploadJob, UploadQueue


def put(queue: UploadQueue, n: int, size: int = 100) -> str:
    return queue.put(f"a{n}", f"images/t/2024-01-01/a{n}.jpg", f"s3://b/images/t/2024-01-01/a{n}.jpg",
                     bytes([n]) * size).uri


def test_a_full_queue_evicts_the_oldest_counts_them_and_remembers_them_as_lost(tmp_path: Path) -> None:
    with UploadQueue(tmp_path / "uploads.db", max_images=3, max_bytes=10_000) as queue:
        for n in range(5):
            put(queue, n)
        stats = queue.stats()
        assert (stats.backlog, stats.bytes, stats.enqueued, stats.evicted) == (3, 300, 5, 2)
        assert [job.alert_id for job in _drain(queue)] == ["a2", "a3", "a4"]
        lost = queue.lost()
        assert [(item.alert_id, item.kind) for item in lost] == [("a0", "evicted"), ("a1", "evicted")]
        assert lost[0].uri == "s3://b/images/t/2024-01-01/a0.jpg" and "max_images=3" in lost[0].reason
        assert queue.lost_image(lost[0].row_id) is None  # evicted for lack of room: not kept


def test_bytes_bound_the_queue_too_and_the_image_in_flight_is_never_evicted(tmp_path: Path) -> None:
    with UploadQueue(tmp_path / "uploads.db", max_images=100, max_bytes=250) as queue:
        put(queue, 0)
        put(queue, 1)
        in_flight = queue.claim()
        assert in_flight is not None and in_flight.alert_id == "a0"
        put(queue, 2)  # 300 bytes > 250: the oldest not in flight (a1) goes
        assert [item.alert_id for item in queue.lost()] == ["a1"]
        assert queue.done(in_flight.row_id)
        assert [job.alert_id for job in _drain(queue)] == ["a2"]
        with pytest.raises(ImageNotQueuedError, match="more than the whole upload queue"):
            queue.put("big", "k", "u", b"x" * 251)


def test_an_alert_stores_its_image_once_and_keeps_the_first_uri(tmp_path: Path) -> None:
    with UploadQueue(tmp_path / "uploads.db") as queue:
        first = queue.put("a1", "images/t/2024-01-01/a1.jpg", "s3://b/images/t/2024-01-01/a1.jpg", b"one")
        # The same part judged again after a crash, on the next day: the alert must name the first object.
        again = queue.put("a1", "images/t/2024-01-02/a1.jpg", "s3://b/images/t/2024-01-02/a1.jpg", b"one")
        assert again == first and first.sha256 == hashlib.sha256(b"one").hexdigest()
        assert queue.stats().backlog == 1


def test_the_queue_survives_a_reopen_with_its_counters_and_in_flight_images_come_back(tmp_path: Path) -> None:
    path = tmp_path / "uploads.db"
    queue = UploadQueue(path)
    put(queue, 1)
    put(queue, 2)
    job = queue.claim()
    assert job is not None
    queue.done(job.row_id)
    assert queue.claim() is not None  # a2 in flight when the process goes away
    queue.close()
    with UploadQueue(path) as again:
        stats = again.stats()
        assert (stats.backlog, stats.enqueued, stats.uploaded) == (1, 2, 1)
        job = again.claim()
        assert job is not None and job.alert_id == "a2" and job.data == bytes([2]) * 100


def test_refused_images_are_kept_aside_with_the_reason_and_reported_once(tmp_path: Path) -> None:
    with UploadQueue(tmp_path / "uploads.db") as queue:
        put(queue, 7)
        job = queue.claim()
        assert job is not None
        queue.retry(job.row_id, "HTTP 503 SlowDown")
        job = queue.claim()
        assert job is not None and job.attempts == 1
        assert queue.dead_letter(job.row_id, "PUT s3://b/...: HTTP 403 AccessDenied: Access Denied")
        assert queue.stats().backlog == 0 and queue.stats().dead_lettered == 1
        lost = queue.lost(unreported_only=True)
        assert [(item.alert_id, item.kind) for item in lost] == [("a7", "refused")]
        assert "AccessDenied" in lost[0].reason and queue.lost_image(lost[0].row_id) == bytes([7]) * 100
        queue.mark_reported([item.row_id for item in lost])
        assert queue.lost(unreported_only=True) == [] and len(queue.lost()) == 1


def test_the_queue_is_private_and_has_one_user(tmp_path: Path) -> None:
    path = tmp_path / "state" / "uploads.db"
    with UploadQueue(path) as queue:
        put(queue, 1)
        with pytest.raises(UploadQueueError, match="in use by another process"):
            UploadQueue(path)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in path.parent.iterdir())


def _drain(queue: UploadQueue) -> list[UploadJob]:
    jobs = []
    while (job := queue.claim()) is not None:
        jobs.append(job)
        queue.done(job.row_id)
    return jobs
