"""The reviewed-image manifest: what is written reads back the same; a malformed line is refused by file and line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from qcsight_core.errors import DataError
from qcsight_core.review_manifest import (
    DEFECT,
    FALSE_ALARM,
    SCHEMA,
    ManifestError,
    ReviewedImage,
    manifest_bytes,
    read_manifest,
    read_numbered,
    write_manifest,
)

IMAGES = [
    ReviewedImage("s3://qcsight-images/cam-1/a.jpg", "scratch", DEFECT, alert_id="a", thing="cam-1", line="line-1",
                  reviewer="ana", time="2026-11-30T22:00:00.000Z", predicted="spot", model_version="7"),
    ReviewedImage("/data/b.jpg", "good", FALSE_ALARM, alert_id="b"),
    ReviewedImage("c.png", "crack", DEFECT),
]


def test_what_is_written_reads_back_the_same(tmp_path: Path) -> None:
    path = tmp_path / "r.manifest"
    with path.open("w") as out:
        assert write_manifest(out, IMAGES) == 3
    assert read_manifest(path) == IMAGES
    assert path.read_bytes() == manifest_bytes(IMAGES)
    assert [where for where, _ in read_numbered(path)] == [f"{path}:1", f"{path}:2", f"{path}:3"]


def test_a_line_is_a_ground_truth_image_classification_record() -> None:
    out = io.StringIO()
    write_manifest(out, IMAGES)
    first = json.loads(out.getvalue().splitlines()[0])
    assert first["source-ref"] == "s3://qcsight-images/cam-1/a.jpg"
    assert first["qcsight-review"] == 2, "Ground Truth's class index: scratch among crack, good, scratch"
    assert first["qcsight-review-metadata"] == {
        "schema": SCHEMA, "class-name": "scratch", "verdict": "defect", "type": "groundtruth/image-classification",
        "job-name": "qcsight-review", "human-annotated": "yes", "alert-id": "a", "thing": "cam-1", "line": "line-1",
        "reviewer": "ana", "creation-date": "2026-11-30T22:00:00.000Z", "predicted": "spot", "model-version": "7"}


def test_an_empty_manifest_holds_no_images(tmp_path: Path) -> None:
    assert manifest_bytes([]) == b""
    (tmp_path / "e.manifest").write_bytes(b"\n\n")
    assert read_manifest(tmp_path / "e.manifest") == []


@pytest.mark.parametrize(("line", "message"), [
    ("[1, 2]", "not a JSON object"),
    ('{"qcsight-review-metadata": {}}', "no source-ref"),
    ('{"source-ref": "a.jpg", "qcsight-review-metadata": {"schema": "qcsight.reviewed/1", "verdict": "defect"}}',
     "class-name is missing"),
    ('{"source-ref": "a.jpg", "qcsight-review-metadata": {"class-name": "x", "verdict": "defect"}}',
     "schema '' is not qcsight.reviewed/1"),
])
def test_a_malformed_line_names_the_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.manifest"
    path.write_text(manifest_bytes(IMAGES[:1]).decode() + "\n" + line + "\n")
    with pytest.raises(ManifestError, match=f"bad.manifest:3: .*{message}"):
        read_manifest(path)
    assert issubclass(ManifestError, DataError), "training reports it as any unreadable data source"


def test_a_minor_version_is_read_and_a_record_without_a_verdict_is_not_made() -> None:
    line = json.loads(manifest_bytes(IMAGES[:1]))
    line["qcsight-review-metadata"]["schema"] = "qcsight.reviewed/1.1"
    line["qcsight-review-metadata"]["added-later"] = True
    path_text = json.dumps(line)
    from qcsight_core.review_manifest import parse_line

    assert parse_line(path_text, "x:1") == IMAGES[0]
    with pytest.raises(ManifestError, match="verdict 'maybe'"):
        ReviewedImage("a.jpg", "good", "maybe")
