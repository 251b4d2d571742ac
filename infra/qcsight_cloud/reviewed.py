"""Which reviewed alerts become training labels, and as what class: one rule for every reviewed-image manifest.

The review export (``qcsight review export``), the policy function (the pipeline's ``reviewed``
channel) and the local loop all select with :func:`reviewed_alerts` and write
:mod:`qcsight_core.review_manifest` lines with :meth:`Labelled.image`; they differ only in where the
image is (an S3 object, a checked location, a local copy).

- An alert counts when reviews touched it in the period asked for; its label is decided by the
  reviews still in effect (undos taken out), whenever they were made.
- A confirmed or relabelled alert is trained as the defect class the operator gave; a false alarm
  as the good class (the one the review app passed, else ``good_label``).
- An alert is *disputed*, and left out, when reviewers still in effect disagree (one confirmed a
  crack, another called it a false alarm); one reviewer correcting themselves is not a dispute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from qcsight_cloud.records import GOOD, Alert, Review
from qcsight_cloud.store import Store, review_stack
from qcsight_core.review_manifest import ReviewedImage

_CHUNK = 100  # alerts fetched per BatchGetItem-sized call


def training_label(review: Review, good_label: str) -> str:
    """The class a review in effect gives the image."""
    if review.verdict == GOOD:
        return review.label or good_label
    return str(review.label or review.predicted_label)


def disputed(in_effect: Sequence[Review], good_label: str) -> bool:
    """Whether reviewers still in effect disagree (each reviewer counts with their latest review)."""
    latest = {r.reviewer: r for r in in_effect}
    return len({training_label(r, good_label) for r in latest.values()}) > 1


@dataclass(frozen=True)
class Labelled:
    """A reviewed alert, the review in effect that decides its label, and the label."""

    alert: Alert
    review: Review
    label: str

    def image(self, source_ref: str) -> ReviewedImage:
        """Its reviewed-image manifest line, with the image where the writer found (or put) it."""
        a, r = self.alert, self.review
        return ReviewedImage(source_ref, self.label, str(r.verdict), alert_id=a.message_id, thing=a.origin.thing,
                             line=a.origin.line, reviewer=r.reviewer, time=r.time, predicted=a.label,
                             model_version=a.model_version)


@dataclass
class Selection:
    """The labelled alerts (oldest review first) and the alerts left out, by reason."""

    labelled: list[Labelled] = field(default_factory=list)
    disputed: list[str] = field(default_factory=list)
    not_reviewed: list[str] = field(default_factory=list)


def reviewed_alerts(store: Store, *, since: datetime | None = None, until: datetime | None = None,
                    line: str | None = None, good_label: str = "good") -> Selection:
    """The alerts reviewed in [since, until] (on one line, or all) with their current training labels."""
    touched = list(dict.fromkeys(r.alert_id for r in store.export_reviews(since, until)
                                 if line is None or r.line == line))
    selection = Selection()
    for start in range(0, len(touched), _CHUNK):
        chunk = touched[start:start + _CHUNK]
        alerts = {a.message_id: a for a in store.get_alerts(chunk)}
        for alert_id in chunk:
            in_effect = review_stack(store.reviews(alert_id))
            alert = alerts.get(alert_id)
            if not in_effect or alert is None:
                selection.not_reviewed.append(alert_id)
            elif disputed(in_effect, good_label):
                selection.disputed.append(alert_id)
            else:
                top = in_effect[-1]
                selection.labelled.append(Labelled(alert, top, training_label(top, good_label)))
    return selection
