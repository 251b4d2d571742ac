"""The SageMaker inference toolkit contract (model_fn, input_fn, predict_fn, output_fn) for Batch Transform.

The same four functions serve qcsight's own container server (server.py) and, unchanged,
the sagemaker-inference toolkit's model server. Requests carry one image (image/jpeg,
image/png, application/x-image), uint8 arrays (application/x-npy: HxW, HxWx3 BGR, NxHxW or
NxHxWx3), or a JSON list of base64-encoded image files (application/json). Responses list
one verdict per image in request order, as application/json (a JSON array) or
application/jsonlines (one object per line).

Errors carry the HTTP status to answer with: 415 for an unknown content type, 406 for an
unknown accept type, 413 for more images than one request may carry, 400 for a body that
does not hold what its content type says. Under the toolkit they are raised as its own
error type, so that its model server answers with that status instead of 500.

What a bad record gets depends on the caller. A real-time caller gets the 400. A Batch
Transform job must not fail on one corrupt image among millions (SageMaker fails the whole
job on an HTTP error), so with QCSIGHT_BAD_RECORDS=error_row, which `qcsight batch submit`
sets on every job and which is the default when SageMaker runs the container for Batch
Transform (SAGEMAKER_BATCH=true), each undecodable record is answered 200 with an error row,
as the local scorer writes one.

Images are decoded and reduced to the model's size one at a time, each within the pixel
budget (QCSIGHT_MAX_PIXELS, checked from its header), so a request's peak memory is one
decoded image plus the model-sized pixels of the others.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import wraps
from http import HTTPStatus
from typing import Any, TypeVar

import cv2
import numpy as np

from qcsight_batch.decode import DecodeSettings
from qcsight_batch.errors import (
    PayloadTooLargeError,
    RequestError,
    UnsupportedAcceptError,
    UnsupportedContentTypeError,
)
from qcsight_batch.writer import ModelInfo, ResultRow
from qcsight_core.bundle import load_bundle
from qcsight_core.errors import ConfigError, ImageError, PreprocessError
from qcsight_core.imageio import DEFAULT_MAX_PIXELS
from qcsight_core.preprocess import normalize, prepare_pixels
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
MAX_PIXELS_ENV = "QCSIGHT_MAX_PIXELS"
MAX_ITEMS_ENV = "QCSIGHT_MAX_ITEMS"
BAD_RECORDS_ENV = "QCSIGHT_BAD_RECORDS"
BAD_RECORDS = ("reject", "error_row")
SAGEMAKER_BATCH_ENV = "SAGEMAKER_BATCH"
# 64 images per request: a MultiRecord batch or a JSON list of part photos; 64 model-sized
# uint8 inputs at 224x224 are 9.6 MB, and one request cannot hold a slot for minutes.
DEFAULT_MAX_ITEMS = 64
_INFERENCE_BATCH = 32

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class RequestPolicy:
    """How requests are bounded and what a bad record gets.

    Attributes:
        error_rows: answer an undecodable record 200 with an error row (Batch Transform)
            instead of 400 (real-time callers).
        max_items: the most images one request may carry.
    """

    error_rows: bool = False
    max_items: int = DEFAULT_MAX_ITEMS

    def __post_init__(self) -> None:
        if not 1 <= self.max_items <= 10_000:
            raise ConfigError("max_items", self.max_items, "an integer from 1 to 10000")


@dataclass(frozen=True)
class ServedModel:
    """What model_fn returns: the runner and decision policy of one bundle, and how requests are served."""

    runner: OnnxRunner
    decider: Decider
    info: ModelInfo
    settings: DecodeSettings
    policy: RequestPolicy = RequestPolicy()


@dataclass(frozen=True)
class BadItem:
    """A request item that cannot be an image (bad base64, an unreadable body), with the reason."""

    reason: str


@dataclass(frozen=True)
class Payload:
    """input_fn's result: encoded image files, decoded uint8 arrays or bad items, in request order."""

    items: tuple[bytes | np.ndarray | BadItem, ...]


def load_model(model_dir: str, precision: str = "fp32", intra_op_threads: int = 0, *,
               max_pixels: int = DEFAULT_MAX_PIXELS, policy: RequestPolicy | None = None) -> ServedModel:
    """Load and verify the bundle in model_dir (SageMaker unpacks model.tar.gz to /opt/ml/model)."""
    bundle = load_bundle(model_dir)
    runner = OnnxRunner(bundle, RunnerOptions(precision=precision, intra_op_threads=intra_op_threads))
    info = ModelInfo.from_manifest(bundle.manifest, runner.precision)
    settings = DecodeSettings.for_spec(bundle.manifest.input, max_pixels=max_pixels)
    return ServedModel(runner, Decider(bundle.manifest), info, settings, policy or RequestPolicy())


def _env_int(environ: Mapping[str, str], name: str, default: int, allowed: str) -> int:
    raw = environ.get(name, str(default))
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(name, raw, allowed) from exc


def bad_records_mode(environ: Mapping[str, str]) -> str:
    """QCSIGHT_BAD_RECORDS, else error_row inside a Batch Transform job (SAGEMAKER_BATCH=true), else reject."""
    default = "error_row" if environ.get(SAGEMAKER_BATCH_ENV, "").lower() == "true" else "reject"
    mode = environ.get(BAD_RECORDS_ENV, default)
    if mode not in BAD_RECORDS:
        raise ConfigError(BAD_RECORDS_ENV, mode, f"one of {', '.join(BAD_RECORDS)}")
    return mode


def policy_from_env(environ: Mapping[str, str]) -> RequestPolicy:
    """The request policy the container's environment asks for."""
    return RequestPolicy(
        error_rows=bad_records_mode(environ) == "error_row",
        max_items=_env_int(environ, MAX_ITEMS_ENV, DEFAULT_MAX_ITEMS, "an integer from 1 to 10000"),
    )


def model_fn(model_dir: str, context: Any = None) -> ServedModel:
    """Toolkit hook: load the bundle, tuned by the QCSIGHT_* variables of the container environment.

    QCSIGHT_PRECISION (fp32/int8/auto), QCSIGHT_INTRA_OP_THREADS, QCSIGHT_MAX_PIXELS (pixel
    budget per image), QCSIGHT_MAX_ITEMS (images per request), QCSIGHT_BAD_RECORDS
    (reject: 400; error_row: 200 with an error row).
    """
    environ = os.environ
    threads = _env_int(environ, THREADS_ENV, 0, "an integer (0 lets ONNX Runtime decide)")
    max_pixels = _env_int(environ, MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS, "a positive number of pixels")
    return load_model(model_dir, environ.get(PRECISION_ENV, "fp32"), threads, max_pixels=max_pixels,
                      policy=policy_from_env(environ))


def _toolkit_errors(hook: F) -> F:
    """Raise a RequestError as the inference toolkit's own error type when the toolkit is installed.

    The toolkit's Transformer answers 500 to anything that is not a BaseInferenceToolkitError;
    its GenericInferenceToolkitError carries our status (415, 406, 413, 400) to its model server.
    """

    @wraps(hook)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return hook(*args, **kwargs)
        except RequestError as exc:
            try:
                from sagemaker_inference.errors import GenericInferenceToolkitError
            except ModuleNotFoundError:
                raise exc from None
            raise GenericInferenceToolkitError(exc.status, str(exc), HTTPStatus(exc.status).phrase) from exc

    return wrapper  # type: ignore[return-value]


def media_type(header: str | None) -> str:
    """'Image/JPEG; charset=x' -> 'image/jpeg'; empty for a missing header."""
    return (header or "").split(";", 1)[0].strip().lower()


def _as_bytes(data: bytes | bytearray | memoryview | str) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


def _npy_images(body: bytes) -> tuple[np.ndarray, ...] | BadItem:
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        return BadItem(f"{NPY_TYPE} body is not a .npy array: {exc}")
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8:
        kind = getattr(array, "dtype", type(array).__name__)
        return BadItem(f"{NPY_TYPE} body must hold uint8 pixels, got {kind}")
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4)):
        return (array,)
    if array.ndim in (3, 4) and array.shape[0] > 0:
        return tuple(array)
    return BadItem(f"{NPY_TYPE} array of shape {array.shape} is not HxW, HxWx3, NxHxW or NxHxWx3")


def _json_images(body: bytes) -> tuple[bytes | BadItem, ...] | BadItem:
    try:
        items = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return BadItem(f"{JSON_TYPE} body is not valid JSON: {exc}")
    if not isinstance(items, list) or not items:
        return BadItem(f"{JSON_TYPE} body must be a non-empty JSON list of base64-encoded images")
    images: list[bytes | BadItem] = []
    for index, item in enumerate(items):
        if not isinstance(item, str):
            images.append(BadItem(f"item {index} of the JSON list is {type(item).__name__}, not a base64 string"))
            continue
        try:
            images.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as exc:
            images.append(BadItem(f"item {index} of the JSON list is not valid base64: {exc}"))
    return tuple(images)


def parse_request(input_data: bytes | bytearray | memoryview | str, content_type: str) -> Payload:
    """Split the request body into images by its content type; what cannot be an image becomes a BadItem.

    Only an unknown content type raises here (415): whether a bad body is a 400 or an error
    row is the model's policy, applied by score_payload.
    """
    kind = media_type(content_type)
    if kind not in CONTENT_TYPES:
        raise UnsupportedContentTypeError(
            f"content type {content_type!r} is not supported; send one of {', '.join(CONTENT_TYPES)}"
        )
    body = _as_bytes(input_data)
    if not body:
        return Payload((BadItem("empty request body"),))
    if kind in IMAGE_TYPES:
        return Payload((body,))
    parsed = _npy_images(body) if kind == NPY_TYPE else _json_images(body)
    return Payload((parsed,) if isinstance(parsed, BadItem) else parsed)


def _prepare(item: bytes | np.ndarray | BadItem, index: int,
             settings: DecodeSettings) -> tuple[np.ndarray, tuple[int, ...]]:
    """One item at the model's size (uint8) and the decoded image's shape (an anomaly box maps back to it):
    decoded within the pixel budget, then resized; raises ImageError."""
    name = f"image {index}"
    if isinstance(item, BadItem):
        raise ImageError(name, item.reason)
    image = item if isinstance(item, np.ndarray) else settings.decode(item, name)
    try:
        return prepare_pixels(image, settings.spec), image.shape
    except (PreprocessError, cv2.error) as exc:
        raise ImageError(name, f"cannot preprocess: {getattr(exc, 'err', None) or exc}") from exc


def score_payload(data: Payload, model: ServedModel) -> list[dict[str, Any]]:
    """Decode, preprocess and score each item, one decode at a time; one result dict per item, in order."""
    if len(data.items) > model.policy.max_items:
        raise PayloadTooLargeError(
            f"{len(data.items)} images in one request; at most {model.policy.max_items} (QCSIGHT_MAX_ITEMS)"
        )
    results: list[dict[str, Any] | None] = [None] * len(data.items)
    ready: list[tuple[int, tuple[np.ndarray, tuple[int, ...]]]] = []
    for index, item in enumerate(data.items):
        try:
            ready.append((index, _prepare(item, index, model.settings)))
        except ImageError as exc:
            if not model.policy.error_rows:
                raise RequestError(str(exc)) from exc
            results[index] = ResultRow.failed("", str(exc), model.info).to_dict(with_source=False)
    for start in range(0, len(ready), _INFERENCE_BATCH):
        group = ready[start : start + _INFERENCE_BATCH]
        batch = normalize(np.stack([pixels for _, (pixels, _) in group]), model.settings.spec)
        shapes = [shape for _, (_, shape) in group]
        verdicts = model.decider.decide_outputs(model.runner.infer(batch), shapes)
        for (index, _), verdict in zip(group, verdicts, strict=True):
            results[index] = ResultRow.scored("", verdict, model.info).to_dict(with_source=False)
    return [r for r in results if r is not None]


@_toolkit_errors
def input_fn(input_data: bytes | bytearray | memoryview | str, content_type: str, context: Any = None) -> Payload:
    """Toolkit hook: split the request body into images by its content type."""
    return parse_request(input_data, content_type)


@_toolkit_errors
def predict_fn(data: Payload, model: ServedModel, context: Any = None) -> list[dict[str, Any]]:
    """Toolkit hook: decode, preprocess and score each image; one result dict per image, in order."""
    return score_payload(data, model)


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


def render(prediction: list[dict[str, Any]], accept: str) -> bytes:
    """The results as a JSON array or as JSON lines."""
    if negotiate(accept) == JSONLINES_TYPE:
        return "".join(json.dumps(item) + "\n" for item in prediction).encode("utf-8")
    return json.dumps(prediction).encode("utf-8")


@_toolkit_errors
def output_fn(prediction: list[dict[str, Any]], accept: str, context: Any = None) -> bytes:
    """Toolkit hook: serialise the results as a JSON array or as JSON lines."""
    return render(prediction, accept)


def transform(model: ServedModel, body: bytes, content_type: str | None, accept: str | None) -> tuple[bytes, str]:
    """The whole request, as the toolkit chains it: (response body, response content type)."""
    response_type = negotiate(accept)  # refuse an unknown accept type before doing the work
    prediction = score_payload(parse_request(body, content_type or ""), model)
    return render(prediction, response_type), response_type
