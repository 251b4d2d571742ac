"""Reviews back to training: the reviewed-image manifest (qcsight_core.review_manifest) and the audit log.

One manifest line per reviewed alert whose reviews agree and whose full image is found (the
selection and labelling rule is qcsight_cloud.reviewed's, shared with the policy function and the
local loop). ``qcsight train --reviewed`` adds the images to the training split; being a Ground
Truth manifest, ``qcsight train --data`` reads it as well.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TextIO

from qcsight_cloud.records import Review
from qcsight_cloud.reviewed import reviewed_alerts
from qcsight_cloud.store import Store
from qcsight_core.review_manifest import LABEL_ATTRIBUTE, ReviewedImage, write_manifest
from qcsight_review.images import ImageSource

__all__ = ["LABEL_ATTRIBUTE", "ExportSummary", "export_manifest", "write_audit_log"]


@dataclass
class ExportSummary:
    """What an export wrote and what it left out (and why)."""

    written: int = 0
    by_class: dict[str, int] = field(default_factory=dict)
    disputed: list[str] = field(default_factory=list)
    no_image: list[str] = field(default_factory=list)
    not_reviewed: list[str] = field(default_factory=list)


def export_manifest(store: Store, images: ImageSource, out: TextIO, *, since: datetime | None = None,
                    until: datetime | None = None, line: str | None = None, good_label: str = "good") -> ExportSummary:
    """Write one manifest line per alert reviewed in [since, until] (its current label), oldest review first."""
    selection = reviewed_alerts(store, since=since, until=until, line=line, good_label=good_label)
    summary = ExportSummary(disputed=selection.disputed, not_reviewed=selection.not_reviewed)
    rows: list[ReviewedImage] = []
    for labelled in selection.labelled:
        ref = labelled.alert.image_ref
        located = images.locate(ref) if ref else None
        if located is None:
            summary.no_image.append(labelled.alert.message_id)
            continue
        rows.append(labelled.image(located.uri))
        summary.by_class[labelled.label] = summary.by_class.get(labelled.label, 0) + 1
    summary.written = write_manifest(out, rows)
    return summary


def write_audit_log(reviews: Iterable[Review], out: TextIO) -> int:
    """Every review as one JSON line, in time order: who, when, what, and the label before it."""
    count = 0
    for review in reviews:
        out.write(json.dumps(asdict(review), sort_keys=True) + "\n")
        count += 1
    return count
