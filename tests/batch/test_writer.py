"""The results file: JSON lines and CSV, append-only, torn tails truncated on resume, model mismatches refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qcsight_batch.errors import OutputError
from qcsight_batch.writer import (
    CsvWriter,
    JsonlWriter,
    KeySet,
    ModelInfo,
    ResultRow,
    key_digest,
    open_writer,
    read_rows,
)
from qcsight_core.verdict import Verdict

MODEL = ModelInfo("tiny", "3", "fp32", ("good", "scratch", "spot"))


def _rows(n: int, start: int = 0) -> list[ResultRow]:
    rows = []
    for i in range(start, start + n):
        if i % 5 == 4:
            rows.append(ResultRow.failed(f"/data/img{i}.jpg", "truncated JPEG (no end-of-image marker)", MODEL))
        else:
            probs = (0.7, 0.1, 0.2) if i % 2 else (0.1, 0.2, 0.7)
            status, label = ("good", "good") if i % 2 else ("defect", "spot")
            verdict = Verdict(status, label, probs[1] + probs[2], max(probs), probs)
            rows.append(ResultRow.scored(f"/data/img{i}.jpg", verdict, MODEL))
    return rows


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_rows_round_trip_and_resume_reports_them(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"out{suffix}"
    writer = open_writer(path, MODEL)
    assert writer.open(resume=False).tally.rows == 0
    writer.write(_rows(6))
    writer.write(_rows(4, start=6))
    writer.close()

    rows = read_rows(path)
    assert [r["source"] for r in rows] == [f"/data/img{i}.jpg" for i in range(10)]
    assert rows[0]["verdict"] == "defect" and rows[0]["class"] == "spot"
    assert rows[4]["verdict"] == "error" and "truncated" in rows[4]["error"]
    if suffix == ".csv":
        assert list(rows[0])[:5] == ["source", "verdict", "class", "defect_score", "confidence"]
        assert rows[0]["score_spot"] == "0.700000" and rows[4]["score_spot"] == ""
    else:
        assert rows[0]["scores"] == {"good": 0.1, "scratch": 0.2, "spot": 0.7}
        assert rows[0]["model_version"] == "3" and rows[4]["defect_score"] is None

    again = open_writer(path, MODEL)
    state = again.open(resume=True)
    again.close()
    assert len(state.done) == 10 and "/data/img3.jpg" in state.done and "/data/img10.jpg" not in state.done
    assert state.tally.by_verdict == {"defect": 4, "good": 4, "error": 2}
    assert state.tally.by_class == {"spot": 4, "good": 4}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_torn_last_row_is_truncated_on_resume(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"out{suffix}"
    writer = open_writer(path, MODEL)
    writer.open(resume=False)
    writer.write(_rows(3))
    writer.close()
    whole = path.read_bytes()
    torn_row = JsonlWriter(path, MODEL)._encode(_rows(1, 3)) if suffix == ".jsonl" else \
        CsvWriter(path, MODEL)._encode(_rows(1, 3))
    path.write_bytes(whole + torn_row[: len(torn_row) // 2])  # a write cut short by a kill

    resumed = open_writer(path, MODEL)
    state = resumed.open(resume=True)
    assert state.truncated_bytes == len(torn_row) // 2
    assert path.read_bytes() == whole
    resumed.write(_rows(2, 3))
    resumed.close()
    assert [r["source"] for r in read_rows(path)] == [f"/data/img{i}.jpg" for i in range(5)]


def test_garbage_in_the_middle_is_refused_not_truncated(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    good = JsonlWriter(path, MODEL)._encode(_rows(2))
    path.write_bytes(good + b"\x00\x00garbage\n" + good)
    with pytest.raises(OutputError, match="line 3 is not a result row"):
        JsonlWriter(path, MODEL).open(resume=True)
    assert path.read_bytes().endswith(good)


def test_csv_source_with_newline_and_quotes_survives(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    odd = ResultRow.failed('/data/we"ird\nname.jpg', "not a decodable image", MODEL)
    writer = CsvWriter(path, MODEL)
    writer.open(resume=False)
    writer.write([odd, *_rows(1)])
    writer.close()
    state = CsvWriter(path, MODEL).open(resume=True)
    assert '/data/we"ird\nname.jpg' in state.done and state.tally.rows == 2


def test_existing_output_needs_resume_or_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    writer = JsonlWriter(path, MODEL)
    writer.open(resume=False)
    writer.write(_rows(2))
    writer.close()
    with pytest.raises(OutputError, match="--resume"):
        JsonlWriter(path, MODEL).open(resume=False)
    replaced = JsonlWriter(path, MODEL, overwrite=True)
    replaced.open(resume=False)
    replaced.close()
    assert path.read_bytes() == b""


def test_resume_refuses_rows_from_another_model(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    writer = JsonlWriter(path, MODEL)
    writer.open(resume=False)
    writer.write(_rows(2))
    writer.close()
    newer = ModelInfo("tiny", "4", "fp32", MODEL.classes)
    with pytest.raises(OutputError, match=r"tiny 3 \(fp32\), this run uses tiny 4 \(fp32\)"):
        JsonlWriter(path, newer).open(resume=True)
    csv_path = tmp_path / "out.csv"
    csv_writer = CsvWriter(csv_path, MODEL)
    csv_writer.open(resume=False)
    csv_writer.close()
    with pytest.raises(OutputError, match="columns"):
        CsvWriter(csv_path, ModelInfo("tiny", "3", "fp32", ("ok", "bad"))).open(resume=True)


def test_format_comes_from_the_suffix(tmp_path: Path) -> None:
    assert isinstance(open_writer(tmp_path / "a.csv", MODEL), CsvWriter)
    assert isinstance(open_writer(tmp_path / "a.jsonl", MODEL), JsonlWriter)
    assert isinstance(open_writer(tmp_path / "a.txt", MODEL, "csv"), CsvWriter)
    with pytest.raises(OutputError, match="suffix"):
        open_writer(tmp_path / "a.txt", MODEL)


def test_keyset_lookup_is_exact_and_vectorised() -> None:
    keys = [f"s3://bucket/line/{i:07d}.jpg" for i in range(5000)]
    done = KeySet(key_digest(k) for k in keys[::2])
    found = done.contains_many(keys)
    assert found.dtype == np.bool_ and found.sum() == 2500
    assert all(found[::2]) and not any(found[1::2])
    assert len(KeySet()) == 0 and not KeySet().contains_many(keys[:3]).any()


def test_jsonl_rows_are_one_line_each(tmp_path: Path) -> None:
    row = ResultRow.failed("/data/line\nbreak.jpg", "bad\nreason", MODEL)
    encoded = JsonlWriter(tmp_path / "x.jsonl", MODEL)._encode([row])
    assert encoded.count(b"\n") == 1
    assert json.loads(encoded)["source"] == "/data/line\nbreak.jpg"
