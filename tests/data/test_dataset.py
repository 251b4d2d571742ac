"""Loading folders, CSVs, Ground Truth and Lookout for Vision manifests; bad images; fingerprint; index CSV."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qcsight_core.errors import ConfigError, DataError
from qcsight_data.dataset import DatasetIndex, Sample, fingerprint, load_index, split_index, write_index
from tests.helpers.images import truncate, write_image


def make_folder(root: Path, per_class: dict[str, int], suffix: str = ".png") -> Path:
    for c, (label, n) in enumerate(per_class.items()):
        for i in range(n):
            write_image(root / label / f"{label}_{i}{suffix}", value=40 + 30 * c, seed=100 * c + i)
    return root


def test_folder_per_class_ignores_masks_hidden_and_non_images(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", {"good": 3, "scratch": 2})
    write_image(root / "scratch" / "sub" / "deep.jpg", seed=9)  # nested images belong to the class
    write_image(root / "masks" / "scratch" / "scratch_0.png", color=False)
    write_image(root / "good" / ".hidden.png")
    write_image(root / ".cache" / "x.png")
    (root / "good" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("readme")

    index = load_index(root)

    assert index.classes == ("good", "scratch")
    assert index.format == "folder"
    assert [Path(s.path).name for s in index.samples] == [
        "good_0.png", "good_1.png", "good_2.png", "scratch_0.png", "scratch_1.png", "deep.jpg"]
    assert all(Path(s.path).is_absolute() and s.group == s.path and s.split == "" for s in index.samples)
    assert index.skipped == ()
    assert index.counts() == {"": {"good": 3, "scratch": 3}}


def test_corrupt_images_are_skipped_with_reasons_not_fatal(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", {"good": 2, "spot": 2})
    truncated = truncate(write_image(root / "spot" / "cut.jpg", seed=5), keep=0.5)
    fake = root / "good" / "fake.png"
    fake.write_text("this is a text file with an image name")
    empty = root / "good" / "empty.jpg"
    empty.write_bytes(b"")
    progress: list[tuple[int, int]] = []

    index = load_index(root, progress=lambda done, total: progress.append((done, total)))

    reasons = {Path(s.path).name: s.reason for s in index.skipped}
    assert set(reasons) == {"cut.jpg", "fake.png", "empty.jpg"}
    assert "truncated JPEG" in reasons["cut.jpg"]
    assert "not a decodable image" in reasons["fake.png"]
    assert "empty file" in reasons["empty.jpg"]
    assert str(truncated.resolve()) in {s.path for s in index.skipped}
    assert len(index.samples) == 4
    assert progress[-1] == (7, 7) and len(progress) == 7

    unchecked = load_index(root, check_images=False)
    assert len(unchecked.samples) == 7 and unchecked.skipped == ()


def test_wrong_paths_and_formats_raise_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such dataset"):
        load_index(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_index(tmp_path / "empty")
    odd = tmp_path / "data.xml"
    odd.write_text("<xml/>")
    with pytest.raises(DataError, match="unknown dataset format"):
        load_index(odd)
    make_folder(tmp_path / "ds", {"good": 1})
    with pytest.raises(DataError, match="no such groups CSV"):
        load_index(tmp_path / "ds", groups=tmp_path / "nope.csv")


def test_csv_with_header_relative_paths_groups_and_splits(tmp_path: Path) -> None:
    make_folder(tmp_path / "imgs", {"good": 2, "crack": 2})
    absolute = write_image(tmp_path / "elsewhere" / "abs.png", seed=3)
    csv_path = tmp_path / "index.csv"
    csv_path.write_text(
        "path,label,group,split\n"
        "imgs/good/good_0.png,good,g1,train\n"
        "imgs/good/good_1.png,good,g1,\n"
        "imgs/crack/crack_0.png,crack,,validation\n"
        "imgs/crack/crack_1.png,crack,,test\n"
        f"{absolute},crack,,\n"
        "imgs/crack/gone.png,crack,,\n"
        "imgs/good/good_0.png,crack,,\n"
    )

    index = load_index(csv_path)

    by_name = {Path(s.path).name: s for s in index.samples}
    assert index.format == "csv" and index.classes == ("crack", "good")
    assert by_name["good_0.png"] == Sample(str((tmp_path / "imgs/good/good_0.png").resolve()), "good", "g1", "train")
    assert by_name["good_1.png"].group == "g1" and by_name["good_1.png"].split == ""
    assert by_name["crack_0.png"].split == "val"
    assert by_name["crack_1.png"].group == by_name["crack_1.png"].path
    assert by_name["abs.png"].path == str(absolute.resolve())
    reasons = sorted(s.reason for s in index.skipped)
    assert reasons == ["index.csv line 7: file not found", "index.csv line 8: listed again with label 'crack' "
                       "(first label 'good')"]


def test_csv_without_header_and_bad_split_value(tmp_path: Path) -> None:
    make_folder(tmp_path, {"good": 1, "dent": 1})
    plain = tmp_path / "plain.csv"
    plain.write_text("good/good_0.png,good\ndent/dent_0.png,dent,grp\n")
    index = load_index(plain)
    assert [(Path(s.path).name, s.label) for s in index.samples] == [("good_0.png", "good"), ("dent_0.png", "dent")]
    assert index.samples[1].group == "grp"

    bad = tmp_path / "bad.csv"
    bad.write_text("path,label,group,split\ngood/good_0.png,good,,holdout\n")
    with pytest.raises(DataError, match="line 2: split 'holdout'"):
        load_index(bad)


def test_groups_csv_assigns_near_duplicate_groups(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", {"free": 3, "crack": 2})
    groups = tmp_path / "near_dup_groups.csv"
    groups.write_text("file,class,group\nfree/free_0.png,free,7\nfree/free_1.png,free,7\ncrack/crack_0.png,crack,7\n"
                      "crack/not_here.png,crack,9\n")

    index = load_index(root, groups=groups)

    group = {Path(s.path).name: s.group for s in index.samples}
    assert group["free_0.png"] == group["free_1.png"] == group["crack_0.png"] == "7"
    assert group["free_2.png"].endswith("free_2.png") and group["crack_1.png"].endswith("crack_1.png")

    wrong_root = tmp_path / "wrong.csv"
    wrong_root.write_text("file,class,group\nds/free/free_0.png,free,1\n")
    with pytest.raises(DataError, match="relative to the dataset root"):
        load_index(root, groups=wrong_root)


def _gt_line(ref: str, label: str, index: int, job: str = "my-job") -> str:
    # Exactly the shape of a Ground Truth image classification job's output manifest line.
    return json.dumps({
        "source-ref": ref,
        job: index,
        f"{job}-metadata": {
            "confidence": 0.9,
            "job-name": f"labeling-job/{job}",
            "class-name": label,
            "human-annotated": "yes",
            "creation-date": "2024-03-14T10:21:05.000000",
            "type": "groundtruth/image-classification",
        },
    })


def test_ground_truth_manifest_with_s3_uris_mapped_to_image_root(tmp_path: Path) -> None:
    images = tmp_path / "downloaded"
    write_image(images / "a.jpg", seed=1)
    write_image(images / "b.jpg", seed=2)
    write_image(images / "c.jpg", seed=3)
    manifest = tmp_path / "output.manifest"
    manifest.write_text("\n".join([
        _gt_line("s3://my-bucket/line-7/images/a.jpg", "good", 0),
        _gt_line("s3://my-bucket/line-7/images/b.jpg", "scratch", 1),
        _gt_line("s3://my-bucket/line-7/images/c.jpg", "good", 0),
        "{not json",
        json.dumps({"source-ref": "s3://my-bucket/line-7/images/a.jpg"}),
    ]) + "\n")

    with pytest.raises(DataError, match=r"image_root \(--image-root DIR\)"):
        load_index(manifest)
    index = load_index(manifest, image_root=images)

    assert index.format == "groundtruth"
    assert [(Path(s.path).name, s.label) for s in index.samples] == [("a.jpg", "good"), ("b.jpg", "scratch"),
                                                                     ("c.jpg", "good")]
    assert all(s.path.startswith(str(images.resolve())) for s in index.samples)
    assert [s.path.rsplit("/", 1)[-1] for s in index.skipped] == ["output.manifest:4", "output.manifest:5"]
    assert index.skipped[0].reason.startswith("not valid JSON")
    assert index.skipped[1].reason.startswith("no label attribute")


def test_ground_truth_manifest_keeps_bucket_folders_and_local_refs(tmp_path: Path) -> None:
    write_image(tmp_path / "root" / "good" / "a.png", seed=1)
    write_image(tmp_path / "root" / "bad" / "b.png", seed=2)
    write_image(tmp_path / "local.png", seed=3)
    manifest = tmp_path / "out.jsonl"
    manifest.write_text("\n".join([
        _gt_line("s3://bkt/p/good/a.png", "good", 0, job="job-2"),
        _gt_line("s3://bkt/p/bad/b.png", "dent", 1, job="job-2"),
    ]) + "\n")
    index = load_index(manifest, image_root=tmp_path / "root")
    assert [Path(s.path).relative_to((tmp_path / "root").resolve()).as_posix() for s in index.samples] == [
        "good/a.png", "bad/b.png"]

    local = tmp_path / "local.manifest"
    local.write_text(_gt_line(str(tmp_path / "local.png"), "good", 0) + "\n" + _gt_line("local.png", "good", 0) + "\n")
    index = load_index(local)
    assert len(index.samples) == 1 and index.skipped[0].reason.endswith("listed twice (first label 'good')")


def test_lookout_for_vision_manifest(tmp_path: Path) -> None:
    for name in ("n1", "n2", "a1"):
        write_image(tmp_path / "imgs" / f"{name}.jpg", seed=len(name) + ord(name[0]))
    lines = []
    for name, value, cls in (("n1", 0, "normal"), ("n2", 0, "normal"), ("a1", 1, "anomaly")):
        lines.append(json.dumps({
            "source-ref": f"s3://lookout-bucket/circuitboard/train/{name}.jpg",
            "anomaly-label": value,
            "anomaly-label-metadata": {
                "confidence": 1,
                "job-name": "labeling-job/circuitboard",
                "class-name": cls,
                "human-annotated": "yes",
                "creation-date": "2021-01-22T17:25:09.520Z",
                "type": "groundtruth/image-classification",
            },
        }))
    write_image(tmp_path / "imgs" / "a2.jpg", seed=77)
    lines.append(json.dumps({  # no class-name: Lookout's 1 still means anomaly
        "source-ref": "s3://lookout-bucket/circuitboard/train/a2.jpg",
        "anomaly-label": 1,
        "anomaly-label-metadata": {"job-name": "labeling-job/circuitboard", "human-annotated": "yes",
                                   "type": "groundtruth/image-classification"},
    }))
    manifest = tmp_path / "train.manifest"
    manifest.write_text("\n".join(lines) + "\n")

    index = load_index(manifest, image_root=tmp_path / "imgs")

    assert index.format == "lookout"
    assert index.classes == ("anomaly", "normal")
    assert index.counts() == {"": {"anomaly": 2, "normal": 2}}
    assert index.skipped == ()


def test_fingerprint_tracks_content_and_labels_not_order_or_location(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", {"good": 3, "spot": 3})
    index = load_index(root)
    reference = fingerprint(index)
    assert len(reference) == 64

    shuffled = DatasetIndex(tuple(reversed(index.samples)), index.classes)
    assert fingerprint(shuffled) == reference
    moved = tmp_path / "moved" / "deeper"
    shutil.copytree(root, moved)
    assert fingerprint(load_index(moved)) == reference
    assert fingerprint(split_index(index, seed=4)) == reference  # splits are not data

    relabelled = DatasetIndex((Sample(index.samples[0].path, "spot", "g"), *index.samples[1:]), index.classes)
    assert fingerprint(relabelled) != reference

    target = Path(index.samples[4].path)
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    assert fingerprint(index) != reference

    target.unlink()
    with pytest.raises(DataError, match="cannot read for the fingerprint"):
        fingerprint(index)


def test_write_index_round_trips_through_load_index(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "ds", {"good": 4, "crack": 4})
    groups = tmp_path / "groups.csv"
    groups.write_text("file,class,group\ngood/good_0.png,good,A\ngood/good_1.png,good,A\n")
    index = split_index(load_index(root, groups=groups), val=0.25, test=0.25, seed=1)

    inside = write_index(index, root / "index.csv")
    outside = write_index(index, tmp_path / "other" / "index.csv")

    assert inside.read_text().splitlines()[0] == "path,label,group,split"
    assert inside.read_text().splitlines()[1].startswith("crack/crack_0.png,crack,,")
    assert outside.read_text().splitlines()[1].startswith(f"{root.resolve()}/crack/crack_0.png,crack,,")
    for path in (inside, outside):
        again = load_index(path)
        assert again.samples == index.samples
        assert again.classes == index.classes
        assert fingerprint(again) == fingerprint(index)


def test_subset_keeps_all_classes_and_rejects_unknown_split(tmp_path: Path) -> None:
    index = split_index(load_index(make_folder(tmp_path, {"good": 6, "rare": 3})), seed=0)
    test = index.subset("test")
    assert test.classes == ("good", "rare")
    assert {s.split for s in test.samples} == {"test"}
    assert sum(len(index.subset(s).samples) for s in ("train", "val", "test")) == 9
    with pytest.raises(ConfigError, match="split"):
        index.subset("holdout")


def test_manifest_with_two_jobs_needs_label_attribute_and_multilabel_is_skipped(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", seed=1)
    write_image(tmp_path / "b.png", seed=2)
    chained = json.loads(_gt_line("a.png", "scratch", 1, job="first-pass"))
    chained.update(json.loads(_gt_line("a.png", "good", 0, job="review")))
    multilabel = {"source-ref": "b.png", "tags": [0, 1], "tags-metadata": {
        "job-name": "labeling-job/tags", "class-map": {"0": "scratch", "1": "dent"}, "human-annotated": "yes",
        "type": "groundtruth/image-classification-multilabel"}}
    manifest = tmp_path / "out.manifest"
    manifest.write_text(json.dumps(chained) + "\n" + json.dumps(multilabel) + "\n")

    ambiguous = load_index(manifest)
    assert ambiguous.samples == ()
    assert "several label attributes ['first-pass', 'review']" in ambiguous.skipped[0].reason
    assert "multi-label" in ambiguous.skipped[1].reason

    chosen = load_index(manifest, label_attribute="review")
    assert [s.label for s in chosen.samples] == ["good"]
