"""The SageMaker inference toolkit contract, called as the toolkit calls it, with real image bytes and a real model."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from qcsight_batch.errors import RequestError, UnsupportedAcceptError, UnsupportedContentTypeError
from qcsight_batch.handler import (
    LoadedModel,
    input_fn,
    load_model,
    model_fn,
    negotiate,
    output_fn,
    predict_fn,
    transform,
)
from qcsight_core.bundle import Bundle
from qcsight_core.errors import BundleFileMissingError, BundleIntegrityError, ConfigError
from tests.batch.conftest import BRIGHT, DARK


def _pixels(value: int, size: tuple[int, int] = (60, 80)) -> np.ndarray:
    rng = np.random.default_rng(value)
    return np.clip(value + rng.integers(-8, 9, (*size, 3)), 0, 255).astype(np.uint8)


def _encoded(value: int, ext: str) -> bytes:
    ok, data = cv2.imencode(ext, _pixels(value))
    assert ok
    return data.tobytes()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@pytest.fixture
def model(bundle: Bundle) -> LoadedModel:
    return load_model(str(bundle.path))


REQUESTS = {
    "image/jpeg": (lambda: _encoded(BRIGHT, ".jpg"), ["defect"]),
    "image/png": (lambda: _encoded(DARK, ".png"), ["good"]),
    "application/x-image": (lambda: _encoded(BRIGHT, ".png"), ["defect"]),
    "application/x-npy": (lambda: _npy(np.stack([_pixels(DARK), _pixels(BRIGHT)])), ["good", "defect"]),
    "application/json": (
        lambda: json.dumps([base64.b64encode(_encoded(v, e)).decode() for v, e in
                            ((BRIGHT, ".jpg"), (DARK, ".png"), (DARK, ".jpg"))]).encode(),
        ["defect", "good", "good"],
    ),
}


@pytest.mark.parametrize("accept", ["application/json", "application/jsonlines"])
@pytest.mark.parametrize("content_type", sorted(REQUESTS))
def test_each_content_type_and_accept(model: LoadedModel, content_type: str, accept: str) -> None:
    make_body, expected = REQUESTS[content_type]
    data = input_fn(make_body(), content_type)
    prediction = predict_fn(data, model)
    body = output_fn(prediction, accept)
    if accept == "application/json":
        results = json.loads(body)
    else:
        assert body.endswith(b"\n") and body.count(b"\n") == len(expected)
        results = [json.loads(line) for line in body.splitlines()]
    assert [r["verdict"] for r in results] == expected
    for result in results:
        assert set(result["scores"]) == {"good", "scratch", "spot"}
        assert result["model"] == "tiny" and result["model_version"] == "1" and "source" not in result
        assert result["class"] == ("spot" if result["verdict"] == "defect" else "good")


def test_single_npy_images_grey_and_colour(model: LoadedModel) -> None:
    grey = cv2.cvtColor(_pixels(BRIGHT), cv2.COLOR_BGR2GRAY)
    assert [r["verdict"] for r in predict_fn(input_fn(_npy(grey), "application/x-npy"), model)] == ["defect"]
    colour = _pixels(DARK)
    assert [r["verdict"] for r in predict_fn(input_fn(_npy(colour), "application/x-npy"), model)] == ["good"]


def test_content_type_parameters_and_case_are_ignored(model: LoadedModel) -> None:
    body, response_type = transform(model, _encoded(BRIGHT, ".jpg"), "Image/JPEG; q=0.9", "*/*")
    assert response_type == "application/json" and json.loads(body)[0]["verdict"] == "defect"


@pytest.mark.parametrize(
    ("body", "content_type", "error", "status", "message"),
    [
        (b"a,b\n1,2\n", "text/csv", UnsupportedContentTypeError, 415, "text/csv"),
        (b"", "image/jpeg", RequestError, 400, "empty request body"),
        (b"GIF89a not really", "image/jpeg", RequestError, 400, "not a decodable image"),
        (b"{not json", "application/json", RequestError, 400, "not valid JSON"),
        (b'{"image": "abc"}', "application/json", RequestError, 400, "JSON list"),
        (b'["@@@not base64@@@"]', "application/json", RequestError, 400, "item 0 .* not valid base64"),
        (b"\x93NUMPY garbage", "application/x-npy", RequestError, 400, "not a .npy array"),
        (_npy(np.zeros((4, 4, 3), np.float32)), "application/x-npy", RequestError, 400, "uint8"),
    ],
)
def test_bad_requests_carry_their_status(
    model: LoadedModel, body: bytes, content_type: str, error: type[RequestError], status: int, message: str
) -> None:
    with pytest.raises(error, match=message) as info:
        transform(model, body, content_type, "application/json")
    assert info.value.status == status


def test_truncated_jpeg_is_a_bad_request(model: LoadedModel) -> None:
    data = _encoded(BRIGHT, ".jpg")
    with pytest.raises(RequestError, match="truncated JPEG") as info:
        transform(model, data[: len(data) // 2], "image/jpeg", None)
    assert info.value.status == 400


def test_accept_negotiation() -> None:
    assert negotiate(None) == "application/json"
    assert negotiate("text/html, application/jsonlines") == "application/jsonlines"
    with pytest.raises(UnsupportedAcceptError) as info:
        negotiate("text/csv")
    assert info.value.status == 406


def test_model_fn_reads_the_container_environment(bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QCSIGHT_INTRA_OP_THREADS", "1")
    loaded = model_fn(str(bundle.path))
    assert loaded.info.precision == "fp32" and loaded.runner.options.intra_op_threads == 1
    monkeypatch.setenv("QCSIGHT_PRECISION", "int8")
    with pytest.raises(BundleFileMissingError, match="no int8 ONNX model"):
        model_fn(str(bundle.path))
    monkeypatch.setenv("QCSIGHT_PRECISION", "fp32")
    monkeypatch.setenv("QCSIGHT_INTRA_OP_THREADS", "two")
    with pytest.raises(ConfigError, match="QCSIGHT_INTRA_OP_THREADS"):
        model_fn(str(bundle.path))


def test_model_fn_refuses_a_tampered_bundle(bundle: Bundle) -> None:
    model_file = Path(bundle.path) / "model.onnx"
    model_file.write_bytes(model_file.read_bytes() + b"\x00")
    with pytest.raises(BundleIntegrityError, match="sha256"):
        model_fn(str(bundle.path))
