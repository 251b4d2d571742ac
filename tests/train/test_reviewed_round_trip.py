"""Operators' reviews to training, both ways they travel: `qcsight review export` and the policy function's manifest.

The same reviews, written by the review export (images found in a local mirror) and by the policy
function (images named by s3:// URI, fetched by training from S3 on a moto server), give training
the same images with the same labels; the SageMaker channel is the policy's manifest object copied
into the container as SageMaker's File mode does.
"""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path

import pytest

from tests.train.synth_data import dataset, make_dataset  # noqa: F401  (dataset is a fixture)

pytest.importorskip("torch")
pytest.importorskip("moto")
pytestmark = [pytest.mark.torch, pytest.mark.cloud]

from qcsight_cloud.ingest import Ingestor  # noqa: E402  (after the skips)
from qcsight_cloud.lambda_policy import reviewed_manifest  # noqa: E402
from qcsight_cloud.records import CONFIRM, FALSE_ALARM, RELABEL, UNDO  # noqa: E402
from qcsight_cloud.sqlite_store import SqliteStore  # noqa: E402
from qcsight_core.bundle import sha256_file  # noqa: E402
from qcsight_data.dataset import Sample  # noqa: E402
from qcsight_review.export import export_manifest  # noqa: E402
from qcsight_review.images import FolderImages  # noqa: E402
from qcsight_train.cli import get_args_parser, resolve_config  # noqa: E402
from qcsight_train.data import fetch_reviewed, load_data  # noqa: E402
from tests.cloud.builders import T0, alert, incoming  # noqa: E402

BUCKET = "qcsight-images"


def test_export_and_policy_manifests_train_the_same_images_as_reviewed(dataset: Path, tmp_path: Path,  # noqa: F811
                                                                       aws_endpoint: str) -> None:
    import boto3

    # Six alerts of cam-1 whose full images are in S3 (and mirrored in a folder for the review app).
    pictures = sorted(p for p in make_dataset(tmp_path / "pictures", count=6, seed=42).rglob("*.png")
                      if "masks" not in p.parts)
    mirror = tmp_path / "mirror"
    s3 = boto3.client("s3", endpoint_url=aws_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    store = SqliteStore(tmp_path / "cloud.sqlite")
    messages = []
    for seq, picture in enumerate(pictures, start=1):
        key = f"cam-1/2026/03/02/{seq}.png"
        s3.upload_file(str(picture), BUCKET, key)
        (mirror / key).parent.mkdir(parents=True, exist_ok=True)
        (mirror / key).write_bytes(picture.read_bytes())
        message = alert("cam-1", seq, T0 + timedelta(seconds=seq), label="scratch")
        message["image_ref"] = f"s3://{BUCKET}/{key}"
        messages.append(message)
    Ingestor(store, lambda thing: "line-1").ingest_batch([incoming(m) for m in messages])
    a = [str(m["message_id"]) for m in messages]
    when = T0 + timedelta(minutes=5)
    store.add_review(a[0], "ana", CONFIRM, time=when)
    store.add_review(a[1], "ana", RELABEL, "spot", time=when)
    store.add_review(a[2], "ana", FALSE_ALARM, "good", time=when)
    store.add_review(a[3], "ana", CONFIRM, time=when)
    store.add_review(a[3], "bob", FALSE_ALARM, "good", time=when)  # disputed: trained by neither
    store.add_review(a[4], "ana", CONFIRM, time=when)
    store.add_review(a[4], "ana", UNDO, time=when)  # taken back: not trained on
    expected = {a[0]: "scratch", a[1]: "spot", a[2]: "good"}

    exported = tmp_path / "export" / "reviewed.manifest"
    exported.parent.mkdir()
    buffer = io.StringIO()
    summary = export_manifest(store, FolderImages(mirror), buffer)
    exported.write_text(buffer.getvalue())
    assert summary.written == 3 and summary.disputed == [a[3]]

    body, counts = reviewed_manifest(store, "line-1", T0)
    assert counts == {"reviewed": 4, "listed": 3, "without_s3_image": 0, "disputed": 1}
    # SageMaker's File mode copies the channel's one object into the container's channel folder.
    channel = tmp_path / "opt" / "ml" / "input" / "data" / "reviewed"
    channel.mkdir(parents=True)
    (channel / "0123abcd.manifest").write_bytes(body)

    environ = {"SM_CHANNEL_TRAIN": str(dataset), "SM_CHANNEL_REVIEWED": str(channel),
               "SM_MODEL_DIR": str(tmp_path / "model")}
    on_sagemaker, _ = resolve_config(get_args_parser().parse_args([]), environ)
    cache = tmp_path / "cache"
    assert fetch_reviewed(on_sagemaker.reviewed, cache) == 3
    from_policy = load_data(on_sagemaker, cache)
    local, _ = resolve_config(get_args_parser().parse_args(
        ["--data", str(dataset), "--reviewed", str(exported), "--output", str(tmp_path / "out")]), {})
    from_export = load_data(local, cache)

    def trained(samples: tuple[Sample, ...]) -> dict[str, str]:
        return {sha256_file(Path(s.path)): s.label for s in samples}

    by_picture = {sha256_file(pictures[i]): expected[a[i]] for i in range(3)}
    assert trained(from_policy.reviewed) == trained(from_export.reviewed) == by_picture
    assert from_policy.val == from_export.val and from_policy.test == from_export.test
