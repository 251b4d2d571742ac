"""The SageMaker inference toolkit contract (model_fn, input_fn, predict_fn, output_fn) for Batch Transform.

The same four functions serve qcsight's own container server (server.py) and, unchanged,
the sagemaker-inference toolkit's model server. Requests carry one image (image/jpeg,
image/png, application/x-image), uint8 arrays (application/x-npy: HxW, HxWx3 BGR, NxHxW or
NxHxWx3), or a JSON list of base64-encoded image files (application/json). Responses list
one verdict per image in request order, as application/json (a JSON array) or
application/jsonlines (one object per line).

Errors carry the HTTP status to answer with: 415 for an unknown content type, 406 for an
unknown accept type, 400 for a body that does not hold what its content type says.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from qcsight_batch.decode import DecodeSettings
from qcsight_batch.errors import RequestError, UnsupportedAcceptError, UnsupportedContentTypeError
from qcsight_batch.scorer import batched
from qcsight_batch.writer import ModelInfo, ResultRow
from qcsight_core.bundle import load_bundle
from qcsight_core.errors import ConfigError, ImageError, PreprocessError
from qcsight_core.imageio import decode_image
from qcsight_core.preprocess import preprocess_batch
from qcsight_core.runner import OnnxRunner, RunnerOptions
from qcsight_core.verdict import Decider

log = logging.getLogger(__name__)

IMAGE_TYPES = ("image/jpeg", "image/png", "application/x-image")
NPY_TYPE = "application/x-npy"
JSON_TYPE = "application/json"
JSONLINES_TYPE = "application/jsonlines"
CONTENT_TYPES = (*IMAGE_TYPES, NPY_TYPE, JSON_TYPE)
ACCEPT_TYPES = (JSON_TYPE, JSONLINES_TYPE)
PRECISION_ENV = "QCSIGHT_PRECISION"
THREADS_ENV = "QCSIGHT_INTRA_OP_THREADS"
_INFERENCE_BATCH = 32


@dataclass(frozen=True)
class LoadedModel:
    """What model_fn returns: the runner and decision policy of one bundle."""

    runner: OnnxRunner
    decider: Decider
    info: ModelInfo
    settings: DecodeSettings


@dataclass(frozen=True)
class Payload:
    """input_fn's result: encoded image files, or already decoded uint8 arrays, in request order."""

    items: tuple[bytes | np.ndarray, ...]


def load_model(model_dir: str, precision: str = "fp32", intra_op_threads: int = 0) -> LoadedModel:
    """Load and verify the bundle in model_dir (SageMaker unpacks model.tar.gz to /opt/ml/model)."""
    bundle = load_bundle(model_dir)
    runner = OnnxRunner(bundle, RunnerOptions(precision=precision, intra_op_threads=intra_op_threads))
    info = ModelInfo.from_manifest(bundle.manifest, runner.precision)
    return LoadedModel(runner, Decider(bundle.manifest), info, DecodeSettings.for_spec(bundle.manifest.input))


def model_fn(model_dir: str, context: Any = None) -> LoadedModel:
    """Toolkit hook: load the bundle; QCSIGHT_PRECISION (fp32/int8/auto) and QCSIGHT_INTRA_OP_THREADS tune it."""
    precision = os.environ.get(PRECISION_ENV, "fp32")
    raw_threads = os.environ.get(THREADS_ENV, "0")
    try:
        threads = int(raw_threads)
    except ValueError as exc:
        raise ConfigError(THREADS_ENV, raw_threads, "an integer (0 lets ONNX Runtime decide)") from exc
    return load_model(model_dir, precision, threads)


def media_type(header: str | None) -> str:
    """'Image/JPEG; charset=x' -> 'image/jpeg'; empty for a missing header."""
    return (header or "").split(";", 1)[0].strip().lower()


def _as_bytes(data: bytes | bytearray | memoryview | str) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


def _npy_images(body: bytes) -> tuple[np.ndarray, ...]:
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise RequestError(f"{NPY_TYPE} body is not a .npy array: {exc}") from exc
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
        kind = getattr(array, "dtype", type(array).__name__)
        raise RequestError(f"{NPY_TYPE} body must hold uint8 pixels, got {kind}")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4)):
        return (array,)
    if array.ndim in (3, 4) and array.shape[0] > 0:
        return tuple(array)
    raise RequestError(f"{NPY_TYPE} array of shape {array.shape} is not HxW, HxWx3, NxHxW or NxHxWx3")


def _json_images(body: bytes) -> tuple[bytes, ...]:
    try:
        items = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"{JSON_TYPE} body is not valid JSON: {exc}") from exc
    if not isinstance(items, list) or not items:
        raise RequestError(f"{JSON_TYPE} body must be a non-empty JSON list of base64-encoded images")
    images: list[bytes] = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise RequestError(f"item {index} of the JSON list is {type(item).__name__}, not a base64 string")
        try:
            images.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise RequestError(f"item {index} of the JSON list is not valid base64: {exc}") from exc
    return tuple(images)


def input_fn(input_data: bytes | bytearray | memoryview | str, content_type: str, context: Any = None) -> Payload:
    """Toolkit hook: split the request body into images by its content type."""
    kind = media_type(content_type)
    body = _as_bytes(input_data)
    if kind not in CONTENT_TYPES:
        raise UnsupportedContentTypeError(
            f"content type {content_type!r} is not supported; send one of {', '.join(CONTENT_TYPES)}"
        )
    if not body:
        raise RequestError("empty request body")
    if kind in IMAGE_TYPES:
        return Payload((body,))
    if kind == NPY_TYPE:
        return Payload(_npy_images(body))
    return Payload(_json_images(body))


def _decode(items: Sequence[bytes | np.ndarray], settings: DecodeSettings) -> list[np.ndarray]:
    images = []
    for index, item in enumerate(items):
        if isinstance(item, np.ndarray):
            images.append(item)
            continue
        try:
            images.append(decode_image(item, f"image {index}", min_side=settings.min_side,
                                       grayscale=settings.grayscale))
        except ImageError as exc:
            raise RequestError(str(exc)) from exc
    return images


def predict_fn(data: Payload, model: LoadedModel, context: Any = None) -> list[dict[str, Any]]:
    """Toolkit hook: decode, preprocess and score each image; one result dict per image, in order."""
    images = _decode(data.items, model.settings)
    results: list[dict[str, Any]] = []
    for group in batched(images, _INFERENCE_BATCH):
        try:
            batch = preprocess_batch(group, model.settings.spec)
        except (PreprocessError, cv2.error) as exc:
            raise RequestError(f"cannot preprocess the request's images: {exc}") from exc
        for verdict in model.decider.decide_outputs(model.runner.infer(batch), [image.shape for image in group]):
            results.append(ResultRow.scored("", verdict, model.info).to_dict(with_source=False))
    return results


def negotiate(accept: str | None) -> str:
    """The response type for an Accept header: the first supported entry; JSON for none or */*."""
    entries = [media_type(part) for part in (accept or "").split(",") if part.strip()]
    if not entries:
        return JSON_TYPE
    for entry in entries:
        if entry in ACCEPT_TYPES:
            return entry
        if entry in ("*/*", "application/*"):
            return JSON_TYPE
    raise UnsupportedAcceptError(f"accept type {accept!r} is not supported; ask for one of {', '.join(ACCEPT_TYPES)}")


def output_fn(prediction: list[dict[str, Any]], accept: str, context: Any = None) -> bytes:
    """Toolkit hook: serialise the results as a JSON array or as JSON lines."""
    kind = negotiate(accept)
    if kind == JSONLINES_TYPE:
        return "".join(json.dumps(item) + "\n" for item in prediction).encode("utf-8")
    return json.dumps(prediction).encode("utf-8")


def transform(model: LoadedModel, body: bytes, content_type: str | None, accept: str | None) -> tuple[bytes, str]:
    """The whole request, as the toolkit chains it: (response body, response content type)."""
    response_type = negotiate(accept)  # refuse an unknown accept type before doing the work
    prediction = predict_fn(input_fn(body, content_type or ""), model)
    return output_fn(prediction, response_type), response_type
