"""Reviewed alert images (the SageMaker `reviewed` channel, `--reviewed`) join the training split only."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from qcsight_core.errors import DataError
from qcsight_core.review_manifest import DEFECT, FALSE_ALARM, ReviewedImage, write_manifest
from tests.train.synth_data import dataset, make_dataset  # noqa: F401  (dataset is a fixture)

pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from qcsight_train.cli import get_args_parser, resolve_config  # noqa: E402  (after the torch skip)
from qcsight_train.config import build_config  # noqa: E402
from qcsight_train.data import fetch_reviewed, load_data  # noqa: E402


def _alerts(root: Path) -> list[Path]:
    """Six alert images (different seeds from the base data): what devices uploaded."""
    make_dataset(root, count=6, seed=42)
    return sorted(root.rglob("*.png"))


def _channel(folder: Path, images: list[ReviewedImage]) -> Path:
    """A SageMaker channel directory: the manifest object SageMaker copied into it."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "run-1.manifest").open("w") as out:
        write_manifest(out, images)
    return folder


def _reviewed(paths: list[Path]) -> list[ReviewedImage]:
    # Operators confirmed the first two (one relabelled to spot), called the third a false alarm.
    return [ReviewedImage(str(paths[0]), "scratch", DEFECT, alert_id="a0", thing="cam-1"),
            ReviewedImage(str(paths[1]), "spot", DEFECT, alert_id="a1", predicted="scratch"),
            ReviewedImage(str(paths[2]), "good", FALSE_ALARM, alert_id="a2", predicted="spot")]


def test_the_reviewed_channel_adds_its_images_to_train_and_leaves_the_base_split_as_it_was(
        dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    alerts = _alerts(tmp_path / "alerts")
    channel = _channel(tmp_path / "input" / "data" / "reviewed", _reviewed(alerts))
    environ = {"SM_CHANNEL_TRAIN": str(dataset), "SM_CHANNEL_REVIEWED": str(channel),
               "SM_MODEL_DIR": str(tmp_path / "model")}
    cfg, _ = resolve_config(get_args_parser().parse_args([]), environ)
    assert cfg.reviewed == str(channel)

    base = load_data(build_config({"data": str(dataset), "output": str(tmp_path)}), tmp_path / "cache")
    with_reviewed = load_data(cfg, tmp_path / "cache")
    assert with_reviewed.val == base.val and with_reviewed.test == base.test, "validation and test are frozen"
    assert with_reviewed.train[:len(base.train)] == base.train
    added = with_reviewed.train[len(base.train):]
    assert added == with_reviewed.reviewed
    assert [(Path(s.path).name, s.label, s.split) for s in added] == [
        (alerts[0].name, "scratch", "train"), (alerts[1].name, "spot", "train"), (alerts[2].name, "good", "train")]
    assert len({s.group for s in added}) == 3, "each reviewed image is its own group"
    assert with_reviewed.fingerprint != base.fingerprint, "the data trained on changed"


def test_a_reviewed_image_that_is_a_held_out_image_is_not_trained_on(dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    base = load_data(build_config({"data": str(dataset), "output": str(tmp_path)}), tmp_path / "cache")
    copy = tmp_path / "alerts" / "copy.png"
    copy.parent.mkdir()
    shutil.copyfile(base.val[0].path, copy)  # an alert of a part whose picture is in validation
    other = _alerts(tmp_path / "more")[0]
    channel = _channel(tmp_path / "reviewed", [ReviewedImage(str(copy), base.val[0].label, DEFECT),
                                               ReviewedImage(str(other), "good", FALSE_ALARM)])
    splits = load_data(build_config({"data": str(dataset), "output": str(tmp_path), "reviewed": str(channel)}),
                       tmp_path / "cache")
    assert [Path(s.path).name for s in splits.reviewed] == [other.name]


@pytest.mark.parametrize(("line", "message"), [
    ("not json", r"run-1\.manifest:2: not valid JSON"),
    ('{"source-ref": "x.png", "class": "good"}', r"run-1\.manifest:2: no 'qcsight-review-metadata' object"),
    ('{"source-ref": "x.png", "qcsight-review": 0, "qcsight-review-metadata": {"schema": "qcsight.reviewed/2", '
     '"class-name": "good", "verdict": "defect"}}', r":2: schema 'qcsight.reviewed/2' is not qcsight.reviewed/1"),
    ('{"source-ref": "x.png", "qcsight-review": 0, "qcsight-review-metadata": {"schema": "qcsight.reviewed/1", '
     '"class-name": "good", "verdict": "maybe"}}', r":2: .*verdict 'maybe' is not one of defect, false_alarm"),
])
def test_a_malformed_line_is_refused_naming_the_file_and_line(dataset: Path, tmp_path: Path, line: str,  # noqa: F811
                                                                message: str) -> None:
    alerts = _alerts(tmp_path / "alerts")
    channel = _channel(tmp_path / "reviewed", _reviewed(alerts)[:1])
    with (channel / "run-1.manifest").open("a") as out:
        out.write(line + "\n")
    with pytest.raises(DataError, match=message):
        load_data(build_config({"data": str(dataset), "output": str(tmp_path), "reviewed": str(channel)}),
                  tmp_path / "cache")


def test_a_missing_image_an_unknown_class_and_a_conflicting_label_are_refused(dataset: Path,  # noqa: F811
                                                                               tmp_path: Path) -> None:
    alerts = _alerts(tmp_path / "alerts")
    cases = [
        ([ReviewedImage(str(tmp_path / "gone.png"), "scratch", DEFECT)], r"run-1\.manifest:1 .*no such image file"),
        ([ReviewedImage(str(alerts[0]), "crack", DEFECT)],
         r"run-1\.manifest:1 .*class 'crack' is not a class of the base data \['good', 'scratch', 'spot'\]"),
        ([ReviewedImage(str(alerts[0]), "ok", FALSE_ALARM)], r"class 'ok' is not a class .*--good-label"),
        ([ReviewedImage(str(alerts[0]), "scratch", DEFECT), ReviewedImage(str(alerts[0]), "spot", DEFECT)],
         r"run-1\.manifest:2 .*listed again as 'spot' \(first as 'scratch'"),
    ]
    for index, (images, message) in enumerate(cases):
        channel = _channel(tmp_path / f"reviewed-{index}", images)
        with pytest.raises(DataError, match=message):
            load_data(build_config({"data": str(dataset), "output": str(tmp_path), "reviewed": str(channel)}),
                      tmp_path / "cache")
    with pytest.raises(DataError, match=r"no \*\.manifest file"):
        load_data(build_config({"data": str(dataset), "output": str(tmp_path), "reviewed": str(tmp_path / "alerts")}),
                  tmp_path / "cache")


def test_an_empty_manifest_adds_nothing(dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    channel = _channel(tmp_path / "reviewed", [])
    assert (channel / "run-1.manifest").read_bytes() == b""
    splits = load_data(build_config({"data": str(dataset), "output": str(tmp_path), "reviewed": str(channel)}),
                       tmp_path / "cache")
    assert splits.reviewed == ()


@pytest.mark.cloud
def test_images_named_by_s3_uri_are_downloaded_into_the_cache(dataset: Path, tmp_path: Path,  # noqa: F811
                                                              aws_endpoint: str) -> None:
    boto3 = pytest.importorskip("boto3")
    s3 = boto3.client("s3", endpoint_url=aws_endpoint)
    s3.create_bucket(Bucket="qcsight-images")
    alerts = _alerts(tmp_path / "alerts")
    for path in alerts[:2]:
        s3.upload_file(str(path), "qcsight-images", f"cam-1/2026/11/30/{path.name}")
    images = [ReviewedImage(f"s3://qcsight-images/cam-1/2026/11/30/{alerts[0].name}", "scratch", DEFECT),
              ReviewedImage(f"s3://qcsight-images/cam-1/2026/11/30/{alerts[1].name}", "good", FALSE_ALARM)]
    channel = _channel(tmp_path / "reviewed", images)
    cache = tmp_path / "cache"
    assert fetch_reviewed(str(channel), cache) == 2  # what every host's first rank does before rank 0 indexes
    splits = load_data(build_config({"data": str(dataset), "output": str(tmp_path), "reviewed": str(channel)}), cache)
    assert [(s.path, s.label) for s in splits.reviewed] == [
        (str(cache / "reviewed" / "qcsight-images" / "cam-1/2026/11/30" / alerts[0].name), "scratch"),
        (str(cache / "reviewed" / "qcsight-images" / "cam-1/2026/11/30" / alerts[1].name), "good")]
    missing = _channel(tmp_path / "missing", [ReviewedImage("s3://qcsight-images/cam-1/nope.png", "good", FALSE_ALARM)])
    with pytest.raises(DataError, match=r"manifest:1 \(s3://qcsight-images/cam-1/nope\.png\): .*cannot download"):
        load_data(build_config({"data": str(dataset), "output": str(tmp_path), "reviewed": str(missing)}), cache)


def test_an_anomaly_run_fits_the_false_alarms_and_not_the_confirmed_defects(tmp_path: Path) -> None:
    from qcsight_train.anomaly.data import load_anomaly_data
    from tests.train.synth_data import make_anomaly_dataset

    data = make_anomaly_dataset(tmp_path / "data", good=12, defects=3)
    alerts = _alerts(tmp_path / "alerts")
    channel = _channel(tmp_path / "reviewed", [ReviewedImage(str(alerts[0]), "good", FALSE_ALARM),
                                               ReviewedImage(str(alerts[1]), "scratch", DEFECT)])
    base = load_anomaly_data(build_config({"data": str(data), "output": str(tmp_path), "task": "anomaly",
                                           "arch": "resnet18"}), tmp_path / "cache")
    cfg = build_config({"data": str(data), "output": str(tmp_path), "task": "anomaly", "arch": "resnet18",
                        "reviewed": str(channel)})
    splits = load_anomaly_data(cfg, tmp_path / "cache")
    assert splits.val == base.val and splits.test == base.test
    assert [Path(s.path).name for s in splits.train[len(base.train):]] == [alerts[0].name]
