"""Group-aware, stratified, seeded train/val/test splits (split_index works on the index alone, no files)."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest

from qcsight_core.errors import ConfigError
from qcsight_data.dataset import SPLITS, DatasetIndex, Sample, split_index


def random_index(seed: int) -> DatasetIndex:
    """Classes of very different sizes, groups of 1-6 near-duplicates, a few groups mixing classes."""
    rng = np.random.default_rng(seed)
    samples = []
    n_classes = int(rng.integers(2, 6))
    for c in range(n_classes):
        label = f"class{c}"
        for g in range(int(rng.integers(1, 40 if c == 0 else 15))):
            group = f"{label}-g{g}"
            for i in range(int(rng.integers(1, 7))):
                samples.append(Sample(f"/data/{label}/{g}_{i}.png", label, group))
    for m in range(int(rng.integers(0, 4))):  # mixed groups, as in the magnetic-tile set
        for c in rng.choice(n_classes, size=2, replace=False):
            samples.append(Sample(f"/data/mixed/{m}_{c}.png", f"class{c}", f"mixed-{m}"))
    order = rng.permutation(len(samples))
    return DatasetIndex(tuple(samples[i] for i in order), tuple(sorted({s.label for s in samples})))


def splits_of_groups(index: DatasetIndex) -> dict[str, set[str]]:
    result: dict[str, set[str]] = defaultdict(set)
    for sample in index.samples:
        result[sample.group].add(sample.split)
    return result


@pytest.mark.parametrize("structure", range(12))
def test_no_group_straddles_two_splits_and_every_sample_is_assigned(structure: int) -> None:
    index = random_index(structure)
    for seed in range(4):
        result = split_index(index, val=0.2, test=0.15, seed=seed)
        assert len(result.samples) == len(index.samples)
        assert [s.path for s in result.samples] == [s.path for s in index.samples]
        assert all(s.split in SPLITS for s in result.samples)
        straddling = {g: s for g, s in splits_of_groups(result).items() if len(s) > 1}
        assert straddling == {}


@pytest.mark.parametrize("structure", range(12))
def test_classes_with_enough_single_class_groups_appear_in_every_split(structure: int) -> None:
    index = random_index(structure)
    own_groups = Counter(s.label for s in {(s.group, s.label): s for s in index.samples if "mixed" not in s.group}
                         .values())
    for seed in range(3):
        counts = split_index(index, seed=seed).counts()
        for label, n_groups in own_groups.items():
            if n_groups >= 3:
                assert all(counts[split][label] > 0 for split in SPLITS), (label, n_groups, counts)


def test_stratified_fractions_per_class() -> None:
    samples = [Sample(f"/d/big/{i}.png", "big", f"b{i // 2}") for i in range(400)]
    samples += [Sample(f"/d/rare/{i}.png", "rare", f"r{i}") for i in range(20)]
    index = DatasetIndex(tuple(samples), ("big", "rare"))

    counts = split_index(index, val=0.15, test=0.15, seed=3).counts()

    assert abs(counts["test"]["big"] - 60) <= 2 and abs(counts["val"]["big"] - 60) <= 2
    assert counts["test"]["rare"] == 3 and counts["val"]["rare"] == 3 and counts["train"]["rare"] == 14


def test_same_seed_same_split_other_seed_other_split_listing_order_irrelevant() -> None:
    index = random_index(99)
    first = split_index(index, seed=5)
    assert split_index(index, seed=5) == first
    other = split_index(index, seed=6)
    assert [s.split for s in other.samples] != [s.split for s in first.samples]

    reordered = DatasetIndex(tuple(reversed(index.samples)), index.classes)
    by_path = {s.path: s.split for s in split_index(reordered, seed=5).samples}
    assert {s.path: s.split for s in first.samples} == by_path


def test_adding_a_class_does_not_reshuffle_the_others() -> None:
    base = [Sample(f"/d/a/{i}.png", "a", f"a{i}") for i in range(50)]
    extra = [Sample(f"/d/z/{i}.png", "z", f"z{i}") for i in range(10)]
    before = {s.path: s.split for s in split_index(DatasetIndex(tuple(base), ("a",)), seed=1).samples}
    after = {s.path: s.split for s in split_index(DatasetIndex(tuple(base + extra), ("a", "z")), seed=1).samples}
    assert all(after[path] == split for path, split in before.items())


def test_preset_splits_are_kept_and_their_groups_follow() -> None:
    samples = [
        Sample("/d/1.png", "good", "g1", "test"),
        Sample("/d/2.png", "good", "g1"),
        Sample("/d/3.png", "good", "g2", "val"),
        *(Sample(f"/d/x{i}.png", "good", f"x{i}") for i in range(30)),
        *(Sample(f"/d/y{i}.png", "bad", f"y{i}") for i in range(10)),
    ]
    result = {s.path: s.split for s in split_index(DatasetIndex(tuple(samples), ("bad", "good")), seed=0).samples}
    assert result["/d/1.png"] == "test" and result["/d/2.png"] == "test" and result["/d/3.png"] == "val"
    # Presets count towards the targets: 33 good samples -> about 5 each in val and test.
    good = Counter(split for path, split in result.items() if "/x" in path or path in ("/d/1.png", "/d/2.png",
                                                                                      "/d/3.png"))
    assert 4 <= good["test"] <= 6 and 4 <= good["val"] <= 6


def test_few_groups_fill_train_first_and_zero_fraction_means_no_split() -> None:
    two = DatasetIndex((Sample("/d/a.png", "solo", "a"), Sample("/d/b.png", "solo", "b")), ("solo",))
    assert sorted(s.split for s in split_index(two).samples) == ["train", "val"]
    one = DatasetIndex((Sample("/d/a.png", "solo", "a"),), ("solo",))
    assert split_index(one).samples[0].split == "train"

    many = DatasetIndex(tuple(Sample(f"/d/{i}.png", "c", str(i)) for i in range(20)), ("c",))
    assert "val" not in split_index(many, val=0.0, test=0.25).counts()


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.1), (0.1, 1.0), (0.5, 0.5), (0.7, 0.4)])
def test_bad_fractions_are_refused(val: float, test: float) -> None:
    index = DatasetIndex((Sample("/d/a.png", "c", "a"),), ("c",))
    with pytest.raises(ConfigError):
        split_index(index, val=val, test=test)


def test_a_mixed_group_does_not_fill_the_rare_class_quota() -> None:
    samples = [Sample(f"/d/rare/{i}.png", "rare", f"r{i}") for i in range(19)]
    samples += [Sample("/d/mix/rare.png", "rare", "mixed")]
    samples += [Sample(f"/d/mix/{i}.png", "common", "mixed") for i in range(40)]
    samples += [Sample(f"/d/common/{i}.png", "common", f"c{i}") for i in range(200)]
    index = DatasetIndex(tuple(samples), ("common", "rare"))
    for seed in range(10):
        counts = split_index(index, seed=seed).counts()
        assert 2 <= counts["test"]["rare"] <= 4 and 2 <= counts["val"]["rare"] <= 4, (seed, counts)
