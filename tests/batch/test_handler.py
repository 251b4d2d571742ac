"""The SageMaker inference toolkit contract, called as the toolkit calls it, with real image bytes and a real model."""

from __future__ import annotations

import base64
import io
import json
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from qcsight_batch.errors import (
    PayloadTooLargeError,
    RequestError,
    UnsupportedAcceptError,
    UnsupportedContentTypeError,
)
from qcsight_batch.handler import (
    RequestPolicy,
    ServedModel,
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
from tests.helpers import bombs


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
def model(bundle: Bundle) -> ServedModel:
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
def test_each_content_type_and_accept(model: ServedModel, content_type: str, accept: str) -> None:
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


def test_single_npy_images_grey_and_colour(model: ServedModel) -> None:
    grey = cv2.cvtColor(_pixels(BRIGHT), cv2.COLOR_BGR2GRAY)
    assert [r["verdict"] for r in predict_fn(input_fn(_npy(grey), "application/x-npy"), model)] == ["defect"]
    colour = _pixels(DARK)
    assert [r["verdict"] for r in predict_fn(input_fn(_npy(colour), "application/x-npy"), model)] == ["good"]


def test_content_type_parameters_and_case_are_ignored(model: ServedModel) -> None:
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
    model: ServedModel, body: bytes, content_type: str, error: type[RequestError], status: int, message: str
) -> None:
    with pytest.raises(error, match=message) as info:
        transform(model, body, content_type, "application/json")
    assert info.value.status == status


def test_truncated_jpeg_is_a_bad_request(model: ServedModel) -> None:
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


# --- hostile and broken records ---


def _json_list(*images: bytes) -> bytes:
    return json.dumps([base64.b64encode(image).decode() for image in images]).encode()


@pytest.mark.parametrize("bomb", [
    lambda: bombs.png_header_claims(40000, 40000),  # OpenCV's own limit raised cv2.error: a 500
    lambda: bombs.png_bomb(12000, 12000),  # 18 KB, under OpenCV's limit: decoded to 144 MB
])
def test_a_pixel_bomb_is_a_bad_request(model: ServedModel, bomb: Callable[[], bytes]) -> None:
    with pytest.raises(RequestError, match="pixel budget") as info:
        transform(model, bomb(), "image/png", None)
    assert info.value.status == 400


def test_batch_transform_answers_bad_records_with_error_rows(bundle: Bundle) -> None:
    model = load_model(str(bundle.path), policy=RequestPolicy(error_rows=True))
    good = _encoded(BRIGHT, ".jpg")
    body = json.dumps([base64.b64encode(good).decode(), base64.b64encode(bombs.png_bomb(9000, 9000)).decode(),
                       "@@not base64@@", base64.b64encode(good[: len(good) // 2]).decode()]).encode()
    rows = json.loads(transform(model, body, "application/json", None)[0])
    assert [r["verdict"] for r in rows] == ["defect", "error", "error", "error"]
    assert "pixel budget" in rows[1]["error"] and "base64" in rows[2]["error"] and "truncated" in rows[3]["error"]
    for raw, content_type in ((b"", "image/jpeg"), (b"not an image", "image/jpeg"), (b"{", "application/json")):
        (row,) = json.loads(transform(model, raw, content_type, None)[0])
        assert row["verdict"] == "error" and row["model_version"] == "1"
    with pytest.raises(UnsupportedContentTypeError):  # a job set up wrongly still fails loudly
        transform(model, good, "text/csv", None)


def test_items_per_request_are_capped(bundle: Bundle) -> None:
    model = load_model(str(bundle.path), policy=RequestPolicy(error_rows=True, max_items=4))
    with pytest.raises(PayloadTooLargeError, match="5 images in one request; at most 4") as info:
        transform(model, _json_list(*[_encoded(DARK, ".png")] * 5), "application/json", None)
    assert info.value.status == 413


def test_items_are_decoded_one_at_a_time(model: ServedModel) -> None:
    image = bombs.encoded(".png", 2000, 1500, DARK)  # 9 MB decoded
    tracemalloc.start()
    try:
        rows = transform(model, _json_list(*[image] * 8), "application/json", None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r["verdict"] for r in json.loads(rows[0])] == ["good"] * 8
    assert peak < 3 * 2000 * 1500 * 3, f"peak {peak / 1e6:.0f} MB: the 8 images were held decoded together"


def test_bad_records_mode_comes_from_the_environment(bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QCSIGHT_BAD_RECORDS", raising=False)
    monkeypatch.delenv("SAGEMAKER_BATCH", raising=False)
    assert model_fn(str(bundle.path)).policy == RequestPolicy(error_rows=False)
    monkeypatch.setenv("SAGEMAKER_BATCH", "true")  # what SageMaker sets inside a Batch Transform job
    assert model_fn(str(bundle.path)).policy.error_rows
    monkeypatch.setenv("QCSIGHT_BAD_RECORDS", "reject")
    assert not model_fn(str(bundle.path)).policy.error_rows
    monkeypatch.setenv("QCSIGHT_BAD_RECORDS", "skip")
    with pytest.raises(ConfigError, match="QCSIGHT_BAD_RECORDS='skip': one of reject, error_row"):
        model_fn(str(bundle.path))
    monkeypatch.setenv("QCSIGHT_BAD_RECORDS", "error_row")
    monkeypatch.setenv("QCSIGHT_MAX_PIXELS", "1000")
    loaded = model_fn(str(bundle.path))
    (row,) = json.loads(transform(loaded, _encoded(DARK, ".png"), "image/png", None)[0])
    assert row["verdict"] == "error" and "pixel budget of 1,000" in row["error"]


# --- the SageMaker inference toolkit's own code path (sagemaker-inference + the MMS worker's Service) ---


def _mms_predict(bundle: Bundle, requests: list[tuple[bytes, str]]) -> list[tuple[int, str, bytes]]:
    """Run each request through mms.service.Service -> the toolkit's DefaultHandlerService -> our hooks.

    Each batch is what the MMS worker builds from its frontend's frame (decode_input_request=false,
    as the toolkit's default-mms.properties sets; batch size 1, as the toolkit's Transformer reads
    request 0's headers), and each answer is parsed from the frame the worker sends back:
    (status, content type, body).
    """
    from mms.service import Service
    from sagemaker_inference.default_handler_service import DefaultHandlerService

    handler = DefaultHandlerService()
    service = Service("model", str(bundle.path), None, handler.handle, None, 1)
    handler.initialize(service.context)
    answers = []
    for index, (body, content_type) in enumerate(requests):
        batch = [{"requestId": f"r{index}".encode(),
                  "headers": [{"name": b"Content-Type", "value": content_type.encode()},
                              {"name": b"Accept", "value": b"application/json"}],
                  "parameters": [{"name": "body", "contentType": content_type, "value": body}]}]
        answers.extend(_parse_predict_frame(bytes(service.predict(batch)), 1))
    return answers


def _parse_predict_frame(frame: bytes, count: int) -> list[tuple[int, str, bytes]]:
    pos = 0

    def take(size: int) -> bytes:
        nonlocal pos
        pos += size
        return frame[pos - size : pos]

    def integer() -> int:
        return int(struct.unpack("!i", take(4))[0])

    integer()  # batch code
    take(integer())  # batch message
    answers = []
    for _ in range(count):
        take(integer())  # request id
        content_type = take(max(0, integer())).decode()
        status = integer()
        take(integer())  # reason phrase
        for _ in range(integer()):  # response headers
            take(integer())
            take(integer())
        answers.append((status, content_type, take(integer())))
    return answers


@pytest.fixture
def toolkit_env(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sagemaker_inference", reason="the dev extra installs sagemaker-inference")
    monkeypatch.setenv("SAGEMAKER_PROGRAM", "qcsight_batch.handler")
    monkeypatch.delenv("SAGEMAKER_BATCH", raising=False)
    monkeypatch.delenv("QCSIGHT_BAD_RECORDS", raising=False)


@pytest.mark.usefixtures("toolkit_env")
def test_under_the_toolkit_client_errors_keep_their_4xx(bundle: Bundle) -> None:
    answers = _mms_predict(bundle, [
        (_encoded(BRIGHT, ".jpg"), "image/jpeg"),
        (b"a,b\n1,2\n", "text/csv"),
        (b"plain text, not a picture", "image/jpeg"),
        (bombs.png_header_claims(40000, 40000), "image/png"),
    ])
    statuses = [status for status, _, _ in answers]
    assert statuses == [200, 415, 400, 400]
    assert json.loads(answers[0][2])[0]["verdict"] == "defect" and answers[0][1] == "application/json"
    assert b"pixel budget" in answers[3][2]


@pytest.mark.usefixtures("toolkit_env")
def test_under_the_toolkit_a_batch_job_gets_error_rows(bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGEMAKER_BATCH", "true")
    ((status, _, body),) = _mms_predict(bundle, [(bombs.png_bomb(9000, 9000), "application/x-image")])
    assert status == 200 and json.loads(body)[0]["verdict"] == "error"
