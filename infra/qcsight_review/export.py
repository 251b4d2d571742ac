"""Reviews back to training: a Ground Truth-style manifest `qcsight train --data` reads, and the audit log.

One manifest line per reviewed alert whose reviews agree::

    {"source-ref": "/images/cam-1/a.jpg", "qcsight-review": 1,
     "qcsight-review-metadata": {"class-name": "scratch", "human-annotated": "yes", "reviewer": "ana",
                                 "creation-date": "2026-11-30T22:00:00.000Z",
                                 "type": "groundtruth/image-classification",
                                 "job-name": "qcsight-review", "alert-id": "...", "line": "line-1", ...}}

A false alarm is labelled with the good class (the part was fine). An alert is *disputed*, and left
out, when the reviews still in effect from different reviewers disagree (one confirmed a crack, another
called it a false alarm); one reviewer correcting themselves is not a dispute.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TextIO

from qcsight_cloud.records import GOOD, Review
from qcsight_cloud.store import Store, review_stack
from qcsight_review.images import ImageSource

LABEL_ATTRIBUTE = "qcsight-review"
JOB_NAME = "qcsight-review"


@dataclass
class ExportSummary:
    """What an export wrote and what it left out (and why)."""

    written: int = 0
    by_class: dict[str, int] = field(default_factory=dict)
    disputed: list[str] = field(default_factory=list)
    no_image: list[str] = field(default_factory=list)
    not_reviewed: list[str] = field(default_factory=list)


def outcome(review: Review, good_label: str) -> str:
    return good_label if review.verdict == GOOD else str(review.label or review.predicted_label)


def disputed(in_effect: Sequence[Review], good_label: str) -> bool:
    """Whether reviewers still in effect disagree (each reviewer counts with their latest review)."""
    latest = {r.reviewer: r for r in in_effect}
    return len({outcome(r, good_label) for r in latest.values()}) > 1


def export_manifest(store: Store, images: ImageSource, out: TextIO, *, since: datetime | None = None,
                    until: datetime | None = None, line: str | None = None, good_label: str = "good") -> ExportSummary:
    """Write one manifest line per alert reviewed in [since, until] (its current label), oldest review first."""
    touched = list(dict.fromkeys(r.alert_id for r in store.export_reviews(since, until)
                                 if line is None or r.line == line))
    summary = ExportSummary()
    rows: list[dict[str, object]] = []
    for start in range(0, len(touched), 100):
        chunk = touched[start:start + 100]
        alerts = {a.message_id: a for a in store.get_alerts(chunk)}
        for alert_id in chunk:
            in_effect = review_stack(store.reviews(alert_id))
            alert = alerts.get(alert_id)
            if not in_effect or alert is None:
                summary.not_reviewed.append(alert_id)
                continue
            if disputed(in_effect, good_label):
                summary.disputed.append(alert_id)
                continue
            located = images.locate(alert.image_ref) if alert.image_ref else None
            if located is None:
                summary.no_image.append(alert_id)
                continue
            top = in_effect[-1]
            label = outcome(top, good_label)
            rows.append({"source-ref": located.uri, "label": label, "metadata": {
                "class-name": label, "human-annotated": "yes", "creation-date": top.time,
                "type": "groundtruth/image-classification", "job-name": JOB_NAME, "reviewer": top.reviewer,
                "alert-id": alert_id, "thing": alert.origin.thing, "line": alert.origin.line,
                "predicted": alert.label, "model-version": alert.model_version, "verdict": top.verdict}})
            summary.by_class[label] = summary.by_class.get(label, 0) + 1
    classes = {name: index for index, name in enumerate(sorted(summary.by_class))}
    for row in rows:
        out.write(json.dumps({"source-ref": row["source-ref"], LABEL_ATTRIBUTE: classes[str(row["label"])],
                              f"{LABEL_ATTRIBUTE}-metadata": row["metadata"]}, sort_keys=True) + "\n")
    summary.written = len(rows)
    return summary


def write_audit_log(reviews: Iterable[Review], out: TextIO) -> int:
    """Every review as one JSON line, in time order: who, when, what, and the label before it."""
    count = 0
    for review in reviews:
        out.write(json.dumps(asdict(review), sort_keys=True) + "\n")
        count += 1
    return count
