"""`qcsight data ...` through the real dispatcher: output, files written, exit codes."""

from __future__ import annotations

import csv
import importlib.util
import io
from collections import defaultdict
from pathlib import Path

import pytest

from qcsight_core.cli import main
from qcsight_data.cli import ProgressReporter, elpv_class
from tests.helpers.images import truncate, write_image


def make_dataset(root: Path) -> Path:
    for i in range(8):
        write_image(root / "good" / f"g{i}.png", value=90, seed=i)
        write_image(root / "dent" / f"d{i}.jpg", value=150, seed=50 + i)
    truncate(write_image(root / "dent" / "broken.jpg", seed=99))
    return root


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_index_prints_counts_and_skipped_and_writes_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_dataset(tmp_path / "ds")
    out = tmp_path / "index.csv"

    assert main(["data", "index", str(root), "--output", str(out)]) == 0

    printed = capsys.readouterr().out
    assert "16 samples, 2 classes" in printed and "1 skipped" in printed
    assert f"{root / 'dent' / 'broken.jpg'}: truncated JPEG" in printed
    assert "dent" in printed and "good" in printed
    rows = read_rows(out)
    assert len(rows) == 16 and {r["label"] for r in rows} == {"good", "dent"}


def test_split_with_groups_writes_a_group_aware_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_dataset(tmp_path / "ds")
    groups = tmp_path / "groups.csv"
    groups.write_text("file,class,group\n" + "".join(f"good/g{i}.png,good,pair{i // 2}\n" for i in range(8)))
    out = tmp_path / "split" / "index.csv"

    code = main(["data", "split", str(root), "--groups", str(groups), "--val", "0.25", "--test", "0.25",
                 "--seed", "3", "--output", str(out)])

    assert code == 0
    printed = capsys.readouterr().out
    assert "train" in printed and "val" in printed and "test" in printed and f"wrote {out}" in printed
    rows = read_rows(out)
    sides: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        sides[row["group"] or row["path"]].add(row["split"])
    assert all(len(s) == 1 for s in sides.values())
    assert {r["split"] for r in rows} == {"train", "val", "test"}

    assert main(["data", "stats", str(out), "--no-check"]) == 0
    stats = capsys.readouterr().out
    assert "16 samples" in stats and "train" in stats


def test_fingerprint_is_the_same_for_a_folder_and_its_index(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = make_dataset(tmp_path / "ds")
    assert main(["data", "fingerprint", str(root)]) == 0
    from_folder = capsys.readouterr().out.strip()
    assert len(from_folder) == 64 and int(from_folder, 16) >= 0
    assert main(["data", "index", str(root), "-o", str(root / "index.csv")]) == 0
    capsys.readouterr()
    assert main(["data", "fingerprint", str(root / "index.csv")]) == 0
    assert capsys.readouterr().out.strip() == from_folder


def test_synth_writes_dataset_and_refuses_a_used_directory(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth"
    # --count is per class, as `qcsight data synth --help` says: 2 of each of the 6 classes.
    assert main(["data", "synth", "--output", str(out), "--count", "2", "--seed", "4", "--size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "12 samples, 6 classes" in printed and "wrote 12 images" in printed
    assert all(len(list((out / c).glob("*.png"))) == 2 for c in ("good", "scratch", "crack", "spot", "dent", "missing"))
    assert len(list((out / "scratch").glob("*.png"))) == 2 and len(list((out / "masks" / "scratch").glob("*"))) == 2

    assert main(["data", "synth", "--output", str(out), "--count", "12"]) == 1
    assert "not an empty directory" in capsys.readouterr().err
    assert main(["data", "synth", "--output", str(tmp_path / "x"), "--count", "3", "--classes", "good,rust"]) == 1
    assert "rust" in capsys.readouterr().err


def test_wrong_path_is_a_clear_error_with_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    for action in ("index", "stats", "fingerprint"):
        assert main(["data", action, str(missing)]) == 1
        assert f"qcsight data: error: {missing}: no such dataset directory or file" in capsys.readouterr().err
    assert main(["data", "split", str(missing), "-o", str(tmp_path / "i.csv")]) == 1
    assert not (tmp_path / "i.csv").exists()


def test_usage_errors_exit_2_and_help_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "split", str(tmp_path)]) == 2  # --output is required
    assert "--output" in capsys.readouterr().err
    assert main(["data"]) == 2
    assert main(["data", "import-elpv", "--help"]) == 0
    assert "no solar-module ids" in capsys.readouterr().out.replace("\n", " ")


def test_import_elpv_from_a_data_folder_maps_probabilities(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "elpv"
    lines = []
    for i, probability in enumerate([0.0, 0.0, 1.0, 0.3333333333333333, 0.6666666666666666, 1.0]):
        write_image(data / "images" / f"cell{i:04d}.png", color=False, seed=i)
        lines.append(f"images/cell{i:04d}.png  {probability}  {'mono' if i % 2 else 'poly'}")
    (data / "labels.csv").write_text("\n".join(lines) + "\n")

    assert main(["data", "import-elpv", "--source", str(data), "--output", str(tmp_path / "strict")]) == 0
    assert "wrote 2 good and 2 defect cells" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "strict" / "defect").iterdir()) == ["cell0002.png", "cell0005.png"]
    assert main(["data", "import-elpv", "--source", str(data), "--output", str(tmp_path / "all"),
                 "--include-uncertain"]) == 0
    assert "wrote 2 good and 4 defect cells" in capsys.readouterr().out
    assert (tmp_path / "all" / "defect" / "cell0003.png").read_bytes() == (data / "images/cell0003.png").read_bytes()
    rows = read_rows(tmp_path / "all" / "elpv_labels.csv")
    assert rows[3] == {"file": "defect/cell0003.png", "class": "defect", "probability": "0.3333", "type": "mono"}
    assert main(["data", "index", str(tmp_path / "all")]) == 0
    assert "6 samples, 2 classes" in capsys.readouterr().out

    assert elpv_class(0.0, False) == "good" and elpv_class(2 / 3, False) is None and elpv_class(2 / 3, True) == "defect"


@pytest.mark.skipif(importlib.util.find_spec("elpv_dataset") is None, reason="elpv-dataset (dev extra) not installed")
def test_import_elpv_from_the_installed_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "import-elpv", "--output", str(tmp_path / "elpv")]) == 0
    printed = capsys.readouterr().out
    assert "wrote 1508 good and 715 defect cells" in printed and "left out 401 uncertain" in printed
    assert len(list((tmp_path / "elpv" / "good").iterdir())) == 1508


def test_progress_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    report = ProgressReporter("checking", stream=stream, every=4)
    for done in range(1, 11):
        report(done, 10)
    assert stream.getvalue().splitlines() == ["checking: 4/10", "checking: 8/10", "checking: 10/10"]


def test_stats_reports_aspect_ratios_defect_sizes_and_an_input_size(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from qcsight_data.synth import generate

    generate(tmp_path / "data", 6, seed=2, size=64, classes=("good", "scratch"))
    assert main(["data", "stats", str(tmp_path / "data")]) == 0
    printed = capsys.readouterr().out
    assert "aspect w/h  p0 1.00" in printed
    # synth writes masks/<class>/<name>.png for every defect image: their sizes after the resize are reported.
    assert "defects (3 masks)" in printed and "defect px" in printed
    assert "recommended input: --img-size 96x96 --resize stretch" in printed
