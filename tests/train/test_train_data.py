"""The training data path: qcsight_core preprocessing, seeded augmentation, samplers, splits, s3:// sources."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from qcsight_core.errors import ConfigError
from qcsight_core.imageio import read_image
from qcsight_core.preprocess import preprocess
from tests.train.synth_data import CLASSES, dataset, make_dataset  # noqa: F401  (dataset is a fixture)

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from qcsight_train.augment import AlbumentationsAugment  # noqa: E402  (after the torch skip)
from qcsight_train.config import AugmentConfig, build_config  # noqa: E402
from qcsight_train.data import (  # noqa: E402
    ImageDataset,
    ShardSampler,
    WeightedShardSampler,
    class_weights,
    defect_classes,
    load_data,
    resolve_source,
)
from qcsight_train.models import preprocess_spec  # noqa: E402


def test_without_augmentation_the_dataset_yields_exactly_qcsight_core_preprocessing(dataset: Path) -> None:  # noqa: F811
    spec = preprocess_spec("efficientnet_lite0", 48)
    paths = sorted(dataset.glob("*/*.png"))[:3]
    from qcsight_data.dataset import Sample

    items = ImageDataset([Sample(str(p), p.parent.name, str(p)) for p in paths], CLASSES, spec)
    for i, path in enumerate(paths):
        tensor, label, index = items[i]
        np.testing.assert_array_equal(tensor.numpy(), preprocess(read_image(path), spec)[0])
        assert (label, index) == (CLASSES.index(path.parent.name), i)


def test_grey_images_become_three_identical_channels(tmp_path: Path) -> None:
    from qcsight_data.dataset import Sample

    path = tmp_path / "grey.png"
    cv2.imwrite(str(path), np.tile(np.arange(80, dtype=np.uint8), (60, 1)))
    assert read_image(path).ndim == 2
    tensor, _, _ = ImageDataset([Sample(str(path), "good", "g")], ("good", "bad"),
                                preprocess_spec("resnet18", 32))[0]
    assert tensor.shape == (3, 32, 32)
    pixels = tensor.numpy() * np.array([0.229, 0.224, 0.225])[:, None, None] + np.array([0.485, 0.456, 0.406])[
        :, None, None]
    np.testing.assert_allclose(pixels[0], pixels[1], atol=1e-5)
    np.testing.assert_allclose(pixels[1], pixels[2], atol=1e-5)


def test_augmentation_is_seeded_by_image_and_epoch_and_changes_between_epochs(dataset: Path) -> None:  # noqa: F811
    from qcsight_data.dataset import Sample

    spec = preprocess_spec("mobilenet_v3_small", 64)
    path = sorted(dataset.glob("scratch/*.png"))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # albumentations 2.x API only: no deprecated arguments
        # Every transform on, the opt-in ones too, so each one's arguments are checked.
        augment = AlbumentationsAugment(AugmentConfig(hflip=True, vflip=True, rot90=True, brightness=0.2, gamma=0.2,
                                                      blur_p=0.5, noise_p=0.5, dropout_p=0.5))
    items = ImageDataset([Sample(str(path), "scratch", "g")] * 2, CLASSES, spec, augment, seed=5)
    first = items[0][0]
    assert torch.equal(first, items[0][0])  # same (seed, epoch, index): same picture
    assert not torch.equal(first, items[1][0])  # another index
    items.set_epoch(1)
    assert not torch.equal(first, items[0][0])  # another epoch
    plain = torch.from_numpy(preprocess(read_image(path), spec)[0])
    assert not torch.equal(first, plain) and first.shape == plain.shape


def test_augmentation_survives_the_trip_to_a_worker_process() -> None:
    import pickle

    augment = pickle.loads(pickle.dumps(AlbumentationsAugment(AugmentConfig(hflip=True))))
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(augment(image, 3), AlbumentationsAugment(AugmentConfig(hflip=True))(image, 3))


def test_weighted_sampler_balances_classes_and_gives_ranks_disjoint_equal_shards() -> None:
    labels = [0] * 90 + [1] * 10
    weights = class_weights(labels, 2, power=1.0)
    shards = [list(WeightedShardSampler(labels, weights, rank=r, world_size=2, seed=0)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 50
    drawn = Counter(labels[i] for shard in shards for i in shard)
    assert 30 <= drawn[1] <= 70  # about half the draws from the 10 % class
    sampler = WeightedShardSampler(labels, weights, rank=0, world_size=2, seed=0)
    sampler.set_epoch(1)
    assert list(sampler) != shards[0]


def test_class_weights_follow_the_power_and_average_one_per_sample() -> None:
    labels = [0] * 80 + [1] * 20
    weights = class_weights(labels, 2, power=0.5)
    assert float(weights[1] / weights[0]) == pytest.approx(2.0)
    assert float((weights[0] * 80 + weights[1] * 20) / 100) == pytest.approx(1.0)
    assert class_weights(labels, 2, power=0.0).tolist() == [1.0, 1.0]


def test_shard_sampler_counts_every_image_once() -> None:
    shards = [list(ShardSampler(7, rank=r, world_size=3)) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(7))


def test_splits_follow_groups_and_a_separate_validation_source(dataset: Path, tmp_path: Path) -> None:  # noqa: F811
    cfg = build_config({"data": str(dataset), "output": str(tmp_path)})
    splits = load_data(cfg, tmp_path)
    assert splits.classes == CLASSES and len(splits.fingerprint) == 64
    parts = [{s.path for s in part} for part in (splits.train, splits.val, splits.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert sum(map(len, parts)) == 24
    assert all(n > 0 for n in splits.counts()["val"].values())

    validation = make_dataset(tmp_path / "val", count=6, seed=9)
    separate = load_data(build_config({"data": str(dataset), "output": str(tmp_path),
                                       "validation": str(validation), "test_fraction": 0.0}), tmp_path)
    assert len(separate.val) == 6 and len(separate.train) == 24 and not separate.test


def test_defect_classes_default_to_everything_but_the_good_one() -> None:
    cfg = build_config({"data": "d", "output": "o"})
    assert defect_classes(cfg, ("blowhole", "crack", "free")) == ("blowhole", "crack")
    assert defect_classes(build_config({"data": "d", "output": "o", "good_classes": "p0"}), ("p0", "p1")) == ("p1",)
    with pytest.raises(ConfigError, match="--good-classes"):
        defect_classes(cfg, ("a", "b"))
    with pytest.raises(ConfigError, match="defect_classes"):
        defect_classes(build_config({"data": "d", "output": "o", "defect_classes": "x"}), ("a", "b"))


@pytest.mark.cloud
def test_an_s3_prefix_is_downloaded_once_and_indexed(dataset: Path, tmp_path: Path,  # noqa: F811
                                                     aws_endpoint: str) -> None:
    boto3 = pytest.importorskip("boto3")
    s3 = boto3.client("s3", endpoint_url=aws_endpoint)
    s3.create_bucket(Bucket="line7")
    files = sorted(p for p in dataset.rglob("*.png") if "masks" not in p.parts)
    for path in files:
        s3.upload_file(str(path), "line7", f"datasets/v1/{path.relative_to(dataset).as_posix()}")
    local, image_root = resolve_source("s3://line7/datasets/v1/", tmp_path / "cache")
    assert image_root is None and local == tmp_path / "cache" / "line7" / "datasets" / "v1"
    assert sorted(p.relative_to(local) for p in local.rglob("*.png")) == [p.relative_to(dataset) for p in files]
    before = {p: p.stat().st_mtime_ns for p in local.rglob("*.png")}
    resolve_source("s3://line7/datasets/v1", tmp_path / "cache")
    assert {p: p.stat().st_mtime_ns for p in local.rglob("*.png")} == before  # cached, not fetched again
    splits = load_data(build_config({"data": "s3://line7/datasets/v1/", "output": str(tmp_path)}), tmp_path / "cache")
    assert len(splits.train) + len(splits.val) + len(splits.test) == len(files)
