"""The scorer against a real ONNX bundle and real image files: verdicts, error rows, bounded streaming."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

import qcsight_core.imageio as imageio
from qcsight_batch.decode import DecodeSettings, decode_chunk
from qcsight_batch.scorer import WORKER_DIED, Scorer, ScorerConfig, ort_intra_threads, pending_keys
from qcsight_batch.sources import DirSource
from qcsight_batch.writer import JsonlWriter, KeySet, ResultRow, key_digest, read_rows
from qcsight_core.bundle import Bundle
from qcsight_core.errors import ConfigError
from qcsight_core.preprocess import PreprocessSpec, normalize, preprocess_batch
from tests.batch.conftest import ImageSet


def _score(bundle: Bundle, images: ImageSet, tmp_path: Path, workers: int, name: str) -> list[dict[str, object]]:
    scorer = Scorer(bundle, ScorerConfig(workers=workers, batch_size=5))
    writer = JsonlWriter(tmp_path / name, scorer.model)
    writer.open(resume=False)
    try:
        stats = scorer.run(DirSource(str(images.root)), writer)
    finally:
        writer.close()
    assert stats.tally.rows == len(images.expected)
    return read_rows(tmp_path / name)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_file_gets_one_row_and_broken_ones_say_why(
    bundle: Bundle, images: ImageSet, tmp_path: Path, workers: int
) -> None:
    rows = _score(bundle, images, tmp_path, workers, "out.jsonl")
    by_source = {r["source"]: r for r in rows}
    assert len(rows) == len(by_source) == len(images.expected)
    assert {s: r["verdict"] for s, r in by_source.items()} == images.expected
    root = images.root
    assert "truncated JPEG" in str(by_source[str(root / "broken" / "cut.jpg")]["error"])
    assert str(by_source[str(root / "broken" / "fake.jpg")]["error"]).startswith("not a decodable image")
    assert by_source[str(root / "broken" / "empty.png")]["error"] == "empty file"
    assert str(by_source[str(root / "notes.txt")]["error"]).startswith("not a decodable image")
    defect = by_source[images.of("defect")[0]]
    assert defect["class"] == "spot" and float(defect["defect_score"]) > 0.5  # type: ignore[arg-type]
    assert set(defect["scores"]) == {"good", "scratch", "spot"}  # type: ignore[arg-type]
    assert defect["model"] == "tiny" and defect["model_version"] == "1" and defect["precision"] == "fp32"


def test_worker_pool_and_in_process_decoding_agree(bundle: Bundle, images: ImageSet, tmp_path: Path) -> None:
    inline = sorted(_score(bundle, images, tmp_path, 0, "a.jsonl"), key=lambda r: str(r["source"]))
    pooled = sorted(_score(bundle, images, tmp_path, 2, "b.jsonl"), key=lambda r: str(r["source"]))
    assert inline == pooled


def test_large_jpegs_are_decoded_at_reduced_size(tmp_path: Path) -> None:
    spec = PreprocessSpec(height=224, width=224)
    settings = DecodeSettings.for_spec(spec)
    assert settings.min_side == 224
    assert DecodeSettings.for_spec(PreprocessSpec(resize="shorter_side_crop", crop_fraction=0.875)).min_side == 256
    assert DecodeSettings.for_spec(spec, reduced=False).min_side is None
    big = tmp_path / "big.jpg"
    rng = np.random.default_rng(0)
    cv2.imwrite(str(big), rng.integers(0, 255, (1024, 1280, 3), dtype=np.uint8))

    chunk = decode_chunk([str(big)], DirSource(str(tmp_path)), settings)
    assert chunk.pixels is not None and chunk.pixels.shape == (1, 224, 224, 3) and chunk.pixels.dtype == np.uint8
    reduced = imageio.decode_image(big.read_bytes(), min_side=settings.min_side)
    assert reduced.shape[:2] == (256, 320), "1280x1024 should decode at 1/4 size for a 224 input"


def test_worker_output_normalized_is_exactly_preprocess_batch(images: ImageSet, tmp_path: Path) -> None:
    """The workers' half (prepare_pixels) plus the scorer's half (normalize) is qcsight_core's one path."""
    spec = PreprocessSpec(height=40, width=40, resize="shorter_side_crop", crop_fraction=0.875)
    settings = DecodeSettings.for_spec(spec)
    grey = tmp_path / "grey.png"
    cv2.imwrite(str(grey), np.random.default_rng(3).integers(0, 255, (90, 70), dtype=np.uint8))
    keys = [*images.of("good")[:3], *images.of("defect")[:3], str(grey)]
    chunk = decode_chunk(keys, DirSource(str(images.root)), settings)
    assert chunk.keys == tuple(keys) and chunk.pixels is not None
    decoded = [imageio.decode_image(Path(k).read_bytes(), k, min_side=settings.min_side) for k in keys]
    assert np.array_equal(normalize(chunk.pixels, spec), preprocess_batch(decoded, spec))


def test_threads_leave_the_decoders_their_cores() -> None:
    assert ort_intra_threads(workers=2, cores=2) == 1
    assert ort_intra_threads(workers=2, cores=8) == 6
    assert ort_intra_threads(workers=0, cores=4) == 4
    assert ScorerConfig(workers=1, intra_op_threads=3).threads(cores=2) == 3
    with pytest.raises(ConfigError, match="batch_size"):
        ScorerConfig(batch_size=0)


@dataclass
class CountingSource:
    """A real folder source that records how many keys the scorer has pulled."""

    inner: DirSource
    pulled: int = 0

    def iter_keys(self) -> Iterator[str]:
        for key in self.inner.iter_keys():
            self.pulled += 1
            yield key

    def read(self, key: str) -> bytes:
        return self.inner.read(key)

    def describe(self) -> str:
        return "counting " + self.inner.describe()


class LeadCheckingWriter(JsonlWriter):
    """Records, at each chunk written, how far the source iteration has run ahead of the output."""

    def __init__(self, path: Path, scorer: Scorer, source: CountingSource) -> None:
        super().__init__(path, scorer.model)
        self.source = source
        self.written = 0
        self.leads: list[int] = []

    def write(self, rows: Sequence[ResultRow]) -> None:
        self.leads.append(self.source.pulled - self.written)
        super().write(rows)
        self.written += len(rows)


def test_input_is_pulled_only_a_bounded_distance_ahead(bundle: Bundle, tmp_path: Path) -> None:
    from tests.batch.conftest import make_images

    images = make_images(tmp_path / "many", count=120, broken=False, size=(16, 16))
    config = ScorerConfig(workers=1, batch_size=4, chunks_in_flight=2)
    scorer = Scorer(bundle, config)
    source = CountingSource(DirSource(str(images.root)))
    writer = LeadCheckingWriter(tmp_path / "out.jsonl", scorer, source)
    writer.open(resume=False)
    scorer.run(source, writer)
    writer.close()
    assert writer.written == 120
    # Queued chunks plus the one being formed: never the whole input.
    assert max(writer.leads) <= (config.in_flight + 1) * config.batch_size


def test_pending_keys_skips_what_is_done() -> None:
    keys = [f"k{i}" for i in range(3000)]
    done = KeySet(key_digest(k) for k in keys if int(k[1:]) % 3 == 0)
    left = list(pending_keys(iter(keys), done))
    assert left == [k for k in keys if int(k[1:]) % 3]


@dataclass(frozen=True)
class KillingSource(DirSource):
    """A folder whose files named *poison* SIGKILL the worker reading them, as the OOM killer would."""

    def read(self, key: str) -> bytes:
        if "poison" in Path(key).name:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().read(key)


def test_a_worker_killed_mid_chunk_costs_one_error_row_and_the_run_goes_on(
    bundle: Bundle, images: ImageSet, tmp_path: Path
) -> None:
    poison = images.root / "part1" / "poison.jpg"
    poison.write_bytes(Path(images.of("defect")[0]).read_bytes())
    scorer = Scorer(bundle, ScorerConfig(workers=2, batch_size=4, chunks_in_flight=3))
    writer = JsonlWriter(tmp_path / "out.jsonl", scorer.model)
    writer.open(resume=False)
    try:
        scorer.run(KillingSource(str(images.root)), writer)
    finally:
        writer.close()
    by_source = {r["source"]: r for r in read_rows(tmp_path / "out.jsonl")}
    assert by_source.pop(str(poison))["error"] == WORKER_DIED
    assert {s: r["verdict"] for s, r in by_source.items()} == images.expected


@pytest.mark.parametrize("name", ["out.jsonl", "out.csv"])
def test_anomaly_rows_carry_the_box(tmp_path: Path, name: str) -> None:
    from qcsight_batch.writer import open_writer
    from tests.helpers.models import make_tiny_anomaly_bundle

    bundle = make_tiny_anomaly_bundle(tmp_path / "bundle")
    (tmp_path / "in").mkdir()
    plain = np.full((60, 80, 3), 60, np.uint8)
    spot = plain.copy()
    spot[40:56, 4:24] = 255  # bottom left
    cv2.imwrite(str(tmp_path / "in" / "plain.png"), plain)
    cv2.imwrite(str(tmp_path / "in" / "spot.png"), spot)
    scorer = Scorer(bundle, ScorerConfig(workers=0, batch_size=2))
    writer = open_writer(tmp_path / name, scorer.model)
    writer.open(resume=False)
    try:
        scorer.run(DirSource(str(tmp_path / "in")), writer)
    finally:
        writer.close()
    rows = {Path(str(r["source"])).name: r for r in read_rows(tmp_path / name)}
    assert rows["spot.png"]["verdict"] == "defect" and rows["plain.png"]["verdict"] == "good"
    box = rows["spot.png"]["box"] if name.endswith(".jsonl") else {
        k: rows["spot.png"][f"box_{k}"] for k in ("x0", "y0", "x1", "y1")}
    x0, y0, x1, y1 = (float(box[k]) for k in ("x0", "y0", "x1", "y1"))  # type: ignore[index]
    assert x0 < 24 / 80 < x1 and y0 < 48 / 60 < y1 and x1 < 0.5 and y0 > 0.4
