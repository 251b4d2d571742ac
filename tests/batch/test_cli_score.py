"""`qcsight batch score` end to end: formats, input kinds, bundle locations, summary, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qcsight_batch.cli import main as batch_main
from qcsight_batch.sources import s3_client
from qcsight_batch.writer import read_rows
from qcsight_core.bundle import Bundle, ModelFile, pack_bundle, write_bundle
from qcsight_core.cli import main as qcsight_main
from qcsight_core.signing import generate_ed25519
from tests.batch.conftest import ImageSet, make_images
from tests.helpers.models import make_tiny_bundle
from tests.helpers.wait import eventually

ROW_FIELDS = ("source", "verdict", "class", "defect_score", "confidence", "scores", "model_version", "error")


def _score(*args: str) -> int:
    return batch_main(["score", *args], prog="qcsight batch")


def _verdicts(path: Path) -> dict[str, str]:
    return {str(r["source"]): str(r["verdict"]) for r in read_rows(path)}


def test_jsonl_output_and_summary(bundle: Bundle, images: ImageSet, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results.jsonl"
    assert _score("--bundle", str(bundle.path), "--input", str(images.root), "--output", str(out),
                  "--workers", "1", "--batch-size", "4") == 0
    assert _verdicts(out) == images.expected
    summary = json.loads((tmp_path / "results.jsonl.summary.json").read_text())
    n_defect, n_good, n_error = (len(images.of(v)) for v in ("defect", "good", "error"))
    assert summary["by_verdict"] == {"defect": n_defect, "error": n_error, "good": n_good}
    assert summary["by_class"] == {"good": n_good, "spot": n_defect}
    assert summary["errors"] == n_error and summary["rows"] == len(images.expected)
    assert summary["defect_rate"] == round(n_defect / (n_defect + n_good), 6)
    assert summary["this_run"]["images_per_s"] > 0 and summary["model"]["version"] == "1"
    printed = capsys.readouterr().out
    assert "errors" in printed and "images/s" in printed and "defect rate" in printed


def test_csv_output(bundle: Bundle, images: ImageSet, tmp_path: Path) -> None:
    out = tmp_path / "results.csv"
    assert _score("--bundle", str(bundle.path), "--input", str(images.root), "--output", str(out),
                  "--workers", "0") == 0
    rows = read_rows(out)
    assert {r["source"]: r["verdict"] for r in rows} == images.expected
    defect = next(r for r in rows if r["verdict"] == "defect")
    assert defect["class"] == "spot" and float(defect["score_spot"]) > 0.5 and defect["model_version"] == "1"
    assert next(r for r in rows if r["verdict"] == "error")["error"]


def test_glob_and_manifest_inputs(bundle: Bundle, images: ImageSet, tmp_path: Path) -> None:
    out = tmp_path / "glob.jsonl"
    assert _score("--bundle", str(bundle.path), "--input", f"{images.root}/part*/*.png", "--output", str(out),
                  "--workers", "0") == 0
    assert _verdicts(out) == {k: v for k, v in images.expected.items() if "/part" in k and k.endswith(".png")}

    manifest = tmp_path / "todo.jsonl"
    chosen = images.of("good")[:3] + images.of("error")[:1]
    manifest.write_text("".join(json.dumps({"source-ref": p}) + "\n" for p in chosen))
    out = tmp_path / "manifest.jsonl"
    assert _score("--bundle", str(bundle.path), "--input", str(manifest), "--output", str(out), "--workers", "0") == 0
    assert _verdicts(out) == {p: images.expected[p] for p in chosen}


def test_s3_prefix_input_and_s3_bundle(bundle: Bundle, images: ImageSet, tmp_path: Path, aws_endpoint: str) -> None:
    client = s3_client()
    client.create_bucket(Bucket="line-7")
    expected = {}
    for path, verdict in images.expected.items():
        key = "incoming/" + Path(path).relative_to(images.root).as_posix()
        client.put_object(Bucket="line-7", Key=key, Body=Path(path).read_bytes())
        expected[f"s3://line-7/{key}"] = verdict
    client.create_bucket(Bucket="models")
    client.upload_file(str(pack_bundle(bundle.path, tmp_path / "model.tar.gz")), "models", "tiny/model.tar.gz")

    out = tmp_path / "s3.jsonl"
    assert _score("--bundle", "s3://models/tiny/model.tar.gz", "--cache-dir", str(tmp_path / "cache"),
                  "--input", "s3://line-7/incoming/", "--output", str(out), "--workers", "1") == 0
    assert _verdicts(out) == expected
    assert list((tmp_path / "cache" / "bundles").glob("*/model.tar.gz"))


def test_tarball_bundle(bundle: Bundle, images: ImageSet, tmp_path: Path) -> None:
    tar = pack_bundle(bundle.path, tmp_path / "model.tar.gz")
    out = tmp_path / "tar.jsonl"
    assert _score("--bundle", str(tar), "--input", str(images.root), "--output", str(out), "--workers", "0") == 0
    assert _verdicts(out) == images.expected


def test_verify_key_refuses_an_unsigned_bundle_and_scores_a_signed_one(
    bundle: Bundle, images: ImageSet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("cryptography", reason="the batch extra installs cryptography")
    private, public = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    generate_ed25519(private, public)
    tar = pack_bundle(bundle.path, tmp_path / "model.tar.gz")
    args = ["score", "--bundle", str(tar), "--input", str(images.root), "--workers", "0", "--verify-key", str(public)]
    assert qcsight_main(["batch", *args, "--output", str(tmp_path / "a.jsonl")]) == 1
    assert "unsigned bundle" in capsys.readouterr().err and not (tmp_path / "a.jsonl").exists()
    assert qcsight_main(["bundle", "sign", str(tar), "--key", str(private)]) == 0
    assert qcsight_main(["batch", *args, "--output", str(tmp_path / "b.jsonl")]) == 0
    assert _verdicts(tmp_path / "b.jsonl") == images.expected


def _add_int8(bundle: Bundle) -> Bundle:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Brightness(CalibrationDataReader):
        def __init__(self) -> None:
            levels = np.linspace(-2.2, 2.7, 8)
            self._feeds = iter([{"input": np.full((1, 3, 32, 32), v, np.float32)} for v in levels])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    quantize_static(str(bundle.path / "model.onnx"), str(bundle.path / "model.int8.onnx"), Brightness(),
                    quant_format=QuantFormat.QDQ, op_types_to_quantize=["Gemm"])
    from dataclasses import replace

    models = (*bundle.manifest.models, ModelFile("model.int8.onnx", precision="int8"))
    return write_bundle(bundle.path, replace(bundle.manifest, models=models))


def test_int8_runs_the_quantized_model(bundle: Bundle, images: ImageSet, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fp32-only.jsonl"
    code = qcsight_main(["batch", "score", "--bundle", str(bundle.path), "--input", str(images.root),
                         "--output", str(out), "--int8", "--workers", "0"])
    assert code == 1 and "no int8 ONNX model" in capsys.readouterr().err

    _add_int8(bundle)
    out = tmp_path / "int8.jsonl"
    assert _score("--bundle", str(bundle.path), "--input", str(images.root), "--output", str(out),
                  "--int8", "--workers", "0") == 0
    rows = read_rows(out)
    assert {r["precision"] for r in rows} == {"int8"}
    assert {str(r["source"]): r["verdict"] for r in rows} == images.expected


def test_existing_output_is_not_overwritten_by_accident(bundle: Bundle, images: ImageSet, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.jsonl"
    args = ["batch", "score", "--bundle", str(bundle.path), "--input", str(images.root), "--output", str(out),
            "--workers", "0"]
    assert qcsight_main(args) == 0
    assert qcsight_main(args) == 1
    assert "--resume" in capsys.readouterr().err
    assert qcsight_main([*args, "--resume"]) == 0
    assert len(read_rows(out)) == len(images.expected), "a finished run resumed adds nothing"
    assert qcsight_main([*args, "--input", str(tmp_path / "nowhere")]) == 1
    assert "nowhere: no such folder" in capsys.readouterr().err


def test_help_answers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        batch_main(["score", "--help"], prog="qcsight batch")
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("--resume", "--workers", "s3://BUCKET/PREFIX", "source-ref", "--int8"):
        assert needle in text


def _descendants(pid: int) -> set[int]:
    """Child processes of pid, recursively, read from /proc (Linux)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def _row_set(path: Path) -> list[tuple[object, ...]]:
    return sorted(tuple(json.dumps(r.get(f), sort_keys=True) for f in ROW_FIELDS) for r in read_rows(path))


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc")
def test_resume_after_sigkill_equals_an_uninterrupted_run(bundle: Bundle, tmp_path: Path) -> None:
    images = make_images(tmp_path / "images", count=400, broken=True, size=(24, 32))
    reference = tmp_path / "reference.jsonl"
    assert _score("--bundle", str(bundle.path), "--input", str(images.root), "--output", str(reference),
                  "--workers", "0") == 0

    out = tmp_path / "killed.jsonl"
    command = [sys.executable, "-m", "qcsight_core.cli", "batch", "score", "--bundle", str(bundle.path),
               "--input", str(images.root), "--output", str(out), "--workers", "2", "--batch-size", "2",
               "--no-count"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    workers: set[int] = set()
    try:
        while time.monotonic() < deadline and process.poll() is None:
            workers |= _descendants(process.pid)
            if out.exists() and out.stat().st_size > 0:
                break
            time.sleep(0.005)
        workers |= _descendants(process.pid)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
        assert process.stderr is not None
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    written = len(read_rows(out)) if out.read_bytes().endswith(b"\n") else -1
    assert written < len(images.expected), "the run finished before it was killed; the test proved nothing"
    # A kill can also land mid-write: leave half a row at the end, as a torn write would.
    with out.open("ab") as handle:
        handle.write(b'{"source": "' + str(images.root).encode() + b'/part0/img0001.jpg", "verdict": "go')

    assert workers, "the scorer should have started decode workers"
    eventually(lambda: not any(_alive(pid) for pid in workers), 10.0, 0.1,
               "decode workers must exit when the scorer is killed")

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "dropping a torn last row" in resumed.stderr
    assert _row_set(out) == _row_set(reference)
    summary = json.loads((tmp_path / "killed.jsonl.summary.json").read_text())
    reference_summary = json.loads((tmp_path / "reference.jsonl.summary.json").read_text())
    for key in ("rows", "errors", "by_verdict", "by_class", "defect_rate"):
        assert summary[key] == reference_summary[key]
    assert summary["resumed_rows"] > 0


def test_a_defect_type_bundle_scores_every_image_as_a_defect_named_by_class(tmp_path: Path) -> None:
    """No good class (a line sorting defects already found): every row is a defect, named by its top class."""
    from qcsight_core.bundle import DecisionPolicy

    types = ("crack", "pit", "scale")
    sorter = make_tiny_bundle(tmp_path / "sorter", classes=types, defect_classes=types,
                              decision=DecisionPolicy(defect_threshold=0.0, uncertain_threshold=0.0))
    images = make_images(tmp_path / "images", count=6, broken=False)
    out = tmp_path / "rows.jsonl"
    assert _score("--bundle", str(sorter.path), "--input", str(images.root), "--output", str(out),
                  "--workers", "1") == 0
    rows = read_rows(out)
    assert len(rows) == 6 and {r["verdict"] for r in rows} == {"defect"}
    # The tiny model names dark images the first class and bright ones the last.
    assert {r["class"] for r in rows} == {"crack", "scale"}
    summary = json.loads((tmp_path / "rows.jsonl.summary.json").read_text())
    assert summary["defect_rate"] == 1.0 and set(summary["by_class"]) == {"crack", "scale"}
