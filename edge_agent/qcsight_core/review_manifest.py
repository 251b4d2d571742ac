"""The reviewed-image manifest: the one format that carries operators' verdicts to training.

Written by ``qcsight review export``, by the policy function for every retraining run it starts
(the SageMaker pipeline's ``reviewed`` channel) and by the local loop; read by training
(``qcsight train --reviewed``, or the ``reviewed`` channel on SageMaker), which adds the images to
its training split only. It is a SageMaker Ground Truth image-classification manifest, so any
Ground Truth reader (``qcsight train --data``, ``qcsight data``) takes it as well.

JSON Lines, UTF-8, one reviewed image a line (keys sorted)::

    {"source-ref": "s3://qcsight-images/cam-1/2026/11/30/a.jpg",
     "qcsight-review": 1,
     "qcsight-review-metadata": {
         "schema": "qcsight.reviewed/1", "class-name": "scratch", "verdict": "defect",
         "type": "groundtruth/image-classification", "job-name": "qcsight-review", "human-annotated": "yes",
         "creation-date": "2026-11-30T22:00:00.000Z", "reviewer": "ana", "alert-id": "...",
         "thing": "cam-1", "line": "line-1", "predicted": "crack", "model-version": "7"}}

- ``source-ref``: the image: ``s3://bucket/key``, an absolute path, or a path relative to the
  manifest's folder.
- ``class-name``: the class to train the image as: the defect class the operator confirmed (or
  relabelled it to), or the good class when the operator called the alert a false alarm
  (``verdict`` ``false_alarm``; ``defect`` otherwise).
- ``qcsight-review``: Ground Truth's class index, the position of ``class-name`` among the
  manifest's sorted class names. Ground Truth readers want it; qcsight reads ``class-name``.
- ``schema``: the format's version; a reader refuses an unknown major version.
- the rest say where the label came from (the audit trail); empty when the writer does not know.

An empty file is a valid manifest with no images (a run with nothing reviewed yet).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from qcsight_core.errors import DataError

SCHEMA = "qcsight.reviewed/1"
LABEL_ATTRIBUTE = "qcsight-review"
METADATA = f"{LABEL_ATTRIBUTE}-metadata"
JOB_NAME = "qcsight-review"
GT_TYPE = "groundtruth/image-classification"
SUFFIX = ".manifest"
# The verdicts a line carries (qcsight_cloud.records.DEFECT and GOOD).
DEFECT, FALSE_ALARM = "defect", "false_alarm"
VERDICTS = (DEFECT, FALSE_ALARM)
# metadata key -> ReviewedImage field, for the provenance fields.
_PROVENANCE = {"alert-id": "alert_id", "thing": "thing", "line": "line", "reviewer": "reviewer",
               "creation-date": "time", "predicted": "predicted", "model-version": "model_version"}


class ManifestError(DataError):
    """A reviewed-image manifest line cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class ReviewedImage:
    """One reviewed image and the class it is trained as.

    Attributes:
        source_ref: s3://bucket/key, an absolute path, or a path relative to the manifest's folder.
        label: the class to train on (the confirmed defect class, or the good class for a false alarm).
        verdict: ``defect`` or ``false_alarm``.
        alert_id, thing, line, reviewer, time, predicted, model_version: where the label came from:
            the alert, its device and line, who reviewed it and when (ISO UTC), the model's class and
            the model version that raised the alert.
    """

    source_ref: str
    label: str
    verdict: str
    alert_id: str = ""
    thing: str = ""
    line: str = ""
    reviewer: str = ""
    time: str = ""
    predicted: str = ""
    model_version: str = ""

    def __post_init__(self) -> None:
        if not self.source_ref:
            raise ManifestError("a reviewed image needs a source-ref (its image)")
        if not self.label:
            raise ManifestError(f"{self.source_ref}: a reviewed image needs a class-name")
        if self.verdict not in VERDICTS:
            raise ManifestError(f"{self.source_ref}: verdict {self.verdict!r} is not one of {', '.join(VERDICTS)}")

    def to_line(self, class_index: int) -> dict[str, Any]:
        """The manifest line (a Ground Truth record) with the given class index."""
        metadata: dict[str, Any] = {"schema": SCHEMA, "class-name": self.label, "verdict": self.verdict,
                                    "type": GT_TYPE, "job-name": JOB_NAME, "human-annotated": "yes"}
        metadata.update({key: getattr(self, name) for key, name in _PROVENANCE.items() if getattr(self, name)})
        return {"source-ref": self.source_ref, LABEL_ATTRIBUTE: class_index, METADATA: metadata}


def write_manifest(out: TextIO, images: Iterable[ReviewedImage]) -> int:
    """Write one line per image, in the order given; returns how many were written."""
    chosen = list(images)
    classes = {name: i for i, name in enumerate(sorted({image.label for image in chosen}))}
    for image in chosen:
        out.write(json.dumps(image.to_line(classes[image.label]), sort_keys=True) + "\n")
    return len(chosen)


def manifest_bytes(images: Iterable[ReviewedImage]) -> bytes:
    """The manifest as the bytes of a file (what an S3 object holds); empty for no images."""
    buffer = io.StringIO()
    write_manifest(buffer, images)
    return buffer.getvalue().encode("utf-8")


def parse_line(text: str, where: str) -> ReviewedImage:
    """One manifest line; ``where`` (file:line) heads the error.

    Raises:
        ManifestError: not a JSON object, or a field missing or not allowed (named).
    """
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ManifestError(f"{where}: not a JSON object (one reviewed image a line)")
    ref = record.get("source-ref")
    if not isinstance(ref, str) or not ref:
        raise ManifestError(f"{where}: no source-ref (the image's s3:// URI or path)")
    metadata = record.get(METADATA)
    if not isinstance(metadata, dict):
        raise ManifestError(f"{where}: no {METADATA!r} object; a reviewed-image manifest line carries the "
                            f"operator's label there ({SCHEMA})")
    schema = str(metadata.get("schema", ""))
    name, _, version = schema.partition("/")
    if f"{name}/{version.split('.')[0]}" != SCHEMA:  # a minor version (1.1) only adds fields
        raise ManifestError(f"{where}: schema {schema!r} is not {SCHEMA}")
    label = metadata.get("class-name")
    if not isinstance(label, str) or not label.strip():
        raise ManifestError(f"{where}: {METADATA}.class-name is missing or empty")
    verdict = metadata.get("verdict")
    if verdict not in VERDICTS:
        raise ManifestError(f"{where}: {METADATA}.verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
    provenance = {name: str(metadata.get(key) or "") for key, name in _PROVENANCE.items()}
    return ReviewedImage(ref, label.strip(), str(verdict), **provenance)


def read_numbered(path: str | Path) -> list[tuple[str, ReviewedImage]]:
    """Every image of a manifest file with where it is (``file:line``), for messages about one image.

    Raises:
        ManifestError: the file cannot be read, or a line is malformed (the first such line is named).
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ManifestError(f"{file}: cannot read the reviewed-image manifest: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{file}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            where = f"{file}:{number}"
            found.append((where, parse_line(line, where)))
    return found


def read_manifest(path: str | Path) -> list[ReviewedImage]:
    """Every image of a manifest file, in file order (see read_numbered)."""
    return [image for _, image in read_numbered(path)]
