"""The store interface (one Protocol, SQLite locally and DynamoDB in AWS), inbox queries, and review derivation.

Access patterns both implementations serve (infra/README.md has the key and index design):

- ingestion writes a batch of records idempotently (a message_id already stored is a duplicate)
  and keeps each device's status and sequence tracking current;
- the inbox lists a line's or a device's alerts newest first, one page at a time, resuming from
  an opaque cursor (keyset paging: a page costs the same on page 1 and page 10,000);
- reviews are appended, never changed; an alert's current verdict is derived from them;
- metrics windows are read back as a time series per device or per line;
- the policy records every decision and the runs it asked for.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from qcsight_cloud import timestamps
from qcsight_cloud.errors import StoreError
from qcsight_cloud.records import (
    CONFIRM,
    DEFECT,
    FALSE_ALARM,
    GOOD,
    RELABEL,
    REVIEW_ACTIONS,
    UNDO,
    Alert,
    AlertSummary,
    ClassReviewStats,
    Decision,
    DeviceStatus,
    Record,
    Review,
    ReviewState,
    ReviewStats,
    Run,
    StatusEvent,
    Window,
)
from qcsight_core.errors import ConfigError
from qcsight_core.messages import VERDICT_STATUSES

MAX_PAGE = 500
# Index entries one inbox call may examine before it returns what it has (a short page with a
# cursor): a filter no index serves never turns one page request into a scan of the table.
DEFAULT_SCAN_BUDGET = 5000
# Sort keys are "<canonical time>#<message_id>"; '~' sorts after every character either may hold,
# so "<t>~" bounds every key at time t from above.
_SK = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z#[!-~]{1,200}$")
# Below every sort key (they start with a year); DynamoDB refuses an empty string in a key condition.
LOWEST_KEY = "0"
UNASSIGNED = "unassigned"


def sort_key(time: str, message_id: str) -> str:
    return f"{time}#{message_id}"


@dataclass(frozen=True)
class InboxQuery:
    """One inbox page request: a line or a device, newest first, with filters.

    Attributes:
        line, thing: whose alerts (at least one); with both, the device's alerts on that line.
        label: the model's predicted class.
        status: the device verdict (defect or uncertain).
        score_min, score_max: the model's defect score range, inclusive.
        since, until: alert time range (device clock), inclusive.
        model_version: only alerts of this model version.
        reviewed: True only reviewed, False only not yet reviewed, None both.
        limit: alerts per page (1-500).
        cursor: the ``Page.cursor`` of the previous page, to continue after it.
        scan_budget: index entries this call may examine (see DEFAULT_SCAN_BUDGET).
    """

    line: str | None = None
    thing: str | None = None
    label: str | None = None
    status: str | None = None
    score_min: float | None = None
    score_max: float | None = None
    since: datetime | None = None
    until: datetime | None = None
    model_version: str | None = None
    reviewed: bool | None = None
    limit: int = 50
    cursor: str | None = None
    scan_budget: int = DEFAULT_SCAN_BUDGET

    def __post_init__(self) -> None:
        if self.line is None and self.thing is None:
            raise ConfigError("inbox.line/inbox.thing", None, "a line or a device (thing) to list alerts of")
        if self.status is not None and self.status not in VERDICT_STATUSES:
            raise ConfigError("inbox.status", self.status, f"one of {', '.join(VERDICT_STATUSES)}")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or not 1 <= self.limit <= MAX_PAGE:
            raise ConfigError("inbox.limit", self.limit, f"an integer from 1 to {MAX_PAGE}")
        if isinstance(self.scan_budget, bool) or not isinstance(self.scan_budget, int) or self.scan_budget < self.limit:
            raise ConfigError("inbox.scan_budget", self.scan_budget, f"an integer of at least limit={self.limit}")
        for name in ("score_min", "score_max"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"inbox.{name}", value, "a number")
        if self.score_min is not None and self.score_max is not None and self.score_min > self.score_max:
            raise ConfigError("inbox.score_min", self.score_min, f"at most score_max={self.score_max}")
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, datetime) or value.tzinfo is None):
                raise ConfigError(f"inbox.{name}", value, "a timezone-aware datetime")
        if self.cursor is not None:
            decode_cursor(self.cursor)

    @property
    def index(self) -> str:
        """Which index serves the query; the others' conditions become filters.

        A device's alerts come from the per-device index; a line's unreviewed alerts from the
        sparse unreviewed index (the operators' worklist); a line's alerts of one class from the
        line+class index; anything else of a line from the line index.
        """
        if self.thing is not None:
            return "thing"
        if self.reviewed is False:
            return "unreviewed"
        if self.label is not None:
            return "line_label"
        return "line"

    @property
    def upper(self) -> str:
        """Exclusive upper bound of the sort keys this page may return."""
        bound = "~"
        if self.until is not None:
            bound = timestamps.iso(self.until) + "~"
        if self.cursor is not None:
            bound = min(bound, decode_cursor(self.cursor))
        return bound

    @property
    def lower(self) -> str:
        """Inclusive lower bound of the sort keys."""
        return timestamps.iso(self.since) if self.since is not None else LOWEST_KEY

    def matches(self, alert: AlertSummary) -> bool:
        """Whether an alert passes every filter; both stores apply exactly this."""
        if self.line is not None and alert.origin.line != self.line:
            return False
        if self.thing is not None and alert.origin.thing != self.thing:
            return False
        if self.label is not None and alert.label != self.label:
            return False
        if self.status is not None and alert.status != self.status:
            return False
        if self.score_min is not None and alert.score < self.score_min:
            return False
        if self.score_max is not None and alert.score > self.score_max:
            return False
        if self.model_version is not None and alert.model_version != self.model_version:
            return False
        if self.reviewed is not None and alert.review.reviewed != self.reviewed:
            return False
        key = sort_key(alert.origin.time, alert.message_id)
        return self.lower <= key < self.upper


@dataclass(frozen=True)
class Page:
    """One inbox page: alerts newest first; ``cursor`` continues after it (None: nothing older matches).

    A page may hold fewer than ``limit`` alerts and still carry a cursor when the scan budget ran
    out before the page filled (a filter no index serves); ask again with the cursor.
    """

    items: tuple[AlertSummary, ...]
    cursor: str | None
    scanned: int


def encode_cursor(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode("utf-8")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        key = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        key = ""
    if not _SK.match(key):
        raise ConfigError("inbox.cursor", cursor, "a cursor returned by a previous inbox page")
    return key


# ---------------------------------------------------------------- reviews


def review_stack(reviews: Sequence[Review]) -> list[Review]:
    """The reviews still in effect, oldest first: each undo removes the latest one left."""
    stack: list[Review] = []
    for review in sorted(reviews, key=lambda r: r.n):
        if review.action == UNDO:
            if stack:
                stack.pop()
        else:
            stack.append(review)
    return stack


def current_state(reviews: Sequence[Review]) -> ReviewState:
    """An alert's verdict derived from its reviews (the latest review in effect, or none)."""
    stack = review_stack(reviews)
    top = stack[-1] if stack else None
    return ReviewState(top.verdict if top else None, top.label if top else None, len(reviews))


def next_review(alert: AlertSummary, reviews: Sequence[Review], reviewer: str, action: str, label: str | None,
                review_id: str, time: str) -> Review:
    """The review an action appends, with the verdict before and after it.

    Raises:
        ConfigError: an unknown action, a relabel without a class, or an undo with nothing to undo.
    """
    if not isinstance(reviewer, str) or not reviewer.strip():
        raise ConfigError("review.reviewer", reviewer, "the reviewer's user name")
    if action not in REVIEW_ACTIONS:
        raise ConfigError("review.action", action, f"one of {', '.join(REVIEW_ACTIONS)}")
    before = current_state(reviews)
    undoes: int | None = None
    verdict: str | None
    new_label: str | None
    if action == CONFIRM:
        verdict, new_label = DEFECT, label or alert.label
    elif action == RELABEL:
        if not label:
            raise ConfigError("review.label", label, "the class the operator chose")
        verdict, new_label = DEFECT, label
    elif action == FALSE_ALARM:
        verdict, new_label = GOOD, label  # the app passes the bundle's good class name when it has one
    else:
        stack = review_stack(reviews)
        if not stack:
            raise ConfigError("review.action", action, f"not possible: alert {alert.message_id} has no review to undo")
        undone = stack[-1]
        undoes = undone.n
        verdict, new_label = undone.previous_verdict, undone.previous_label
    return Review(alert_id=alert.message_id, n=len(reviews) + 1, review_id=review_id, reviewer=reviewer.strip(),
                  time=time, action=action, verdict=verdict, label=new_label, previous_verdict=before.verdict,
                  previous_label=before.label, undoes=undoes, line=alert.origin.line, thing=alert.origin.thing,
                  predicted_label=alert.label, model_version=alert.model_version)


def latest_per_alert(reviews: Sequence[Review]) -> dict[str, Review]:
    """The newest review of each alert (its verdict is the alert's current verdict)."""
    latest: dict[str, Review] = {}
    for review in reviews:
        seen = latest.get(review.alert_id)
        if seen is None or review.n > seen.n:
            latest[review.alert_id] = review
    return latest


def stats_from_reviews(since: str, reviews: Iterable[Review], line: str | None = None) -> ReviewStats:
    """Counts per (line, predicted class) over alerts whose newest review since `since` leaves them reviewed.

    An alert reviewed before `since` and again after it counts with its current verdict; an alert
    whose reviews were all undone counts as not reviewed.
    """
    latest = latest_per_alert([r for r in reviews if line is None or r.line == line])
    table: dict[tuple[str, str], list[int]] = {}
    for review in latest.values():
        if review.verdict is None:
            continue
        counts = table.setdefault((review.line, review.predicted_label), [0, 0])
        counts[0] += 1
        counts[1] += review.verdict == GOOD
    rows = tuple(ClassReviewStats(ln, label, c[0], c[1]) for (ln, label), c in sorted(table.items()))
    return ReviewStats(since, rows)


# ---------------------------------------------------------------- the interface


class Store(Protocol):
    """What ingestion, the fleet view, the policy and the review app need from storage."""

    def put(self, records: Sequence[Record]) -> list[bool]:
        """Store records idempotently, in order; True for each one new, False for a duplicate message_id.

        Each new record also updates its device's status and sequence tracking; a duplicate only
        counts as one (counter ``duplicate``) under its thing.
        """
        ...

    def count(self, identity: str, counts: Mapping[str, int]) -> None:
        """Add to ingestion counters (e.g. ``drop.payload_thing_mismatch``) of an identity."""
        ...

    def counters(self) -> dict[str, dict[str, int]]:
        """Ingestion counters by identity, then by counter name."""
        ...

    def device(self, thing: str) -> DeviceStatus | None: ...

    def devices(self) -> list[DeviceStatus]:
        """Every device that ever sent an accepted message, sorted by thing."""
        ...

    def windows(self, *, since: datetime, until: datetime | None = None, thing: str | None = None,
                line: str | None = None, limit: int = 10_000, newest_first: bool = False) -> list[Window]:
        """Metrics windows of a device or a line whose end lies in [since, until], oldest first (or newest first:
        the latest ``limit`` of them)."""
        ...

    def status_events(self, thing: str, *, since: datetime, limit: int = 1000) -> list[StatusEvent]:
        """A device's status messages since a time, oldest first."""
        ...

    def get_alert(self, message_id: str) -> Alert | None: ...

    def get_alerts(self, message_ids: Sequence[str]) -> list[Alert]:
        """The alerts that exist among message_ids, in the order asked."""
        ...

    def inbox(self, query: InboxQuery) -> Page: ...

    def add_review(self, alert_id: str, reviewer: str, action: str, label: str | None = None, *,
                   expected_count: int | None = None, time: datetime | None = None) -> Review:
        """Append a review. Raises NotFoundError for an unknown alert, ReviewConflictError when the
        alert gained a review since the caller saw ``expected_count`` of them (or concurrently)."""
        ...

    def reviews(self, alert_id: str) -> list[Review]:
        """An alert's reviews, oldest first."""
        ...

    def export_reviews(self, since: datetime | None = None, until: datetime | None = None) -> Iterator[Review]:
        """Every review in time order (the audit log)."""
        ...

    def review_stats(self, since: datetime, line: str | None = None) -> ReviewStats:
        """False-alarm counts per line and predicted class over alerts reviewed since a time."""
        ...

    def record_decision(self, decision: Decision) -> None: ...

    def decisions(self, scope: str | None = None, since: datetime | None = None, limit: int = 50) -> list[Decision]:
        """Recorded decisions, newest first."""
        ...

    def put_run(self, run: Run) -> None:
        """Create or update a run (by run_id)."""
        ...

    def runs(self, scope: str, since: datetime | None = None) -> list[Run]:
        """A scope's runs requested since a time, oldest first."""
        ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- opening


@dataclass(frozen=True)
class StoreSettings:
    """Which store to open: ``sqlite:PATH`` (local) or ``dynamodb:PREFIX`` (tables PREFIX-alerts, ...).

    Attributes:
        url: the store URL.
        retention_days: DynamoDB only: metrics windows and status events expire (TTL) after this
            many days. Alerts and reviews never expire; the local SQLite file keeps everything.
        must_exist: SQLite only: refuse a file that is not there instead of creating an empty store
            (commands that only read: a mistyped path would otherwise print an empty fleet).
    """

    url: str
    retention_days: int = 90
    must_exist: bool = False

    def __post_init__(self) -> None:
        scheme = urlsplit(self.url).scheme if isinstance(self.url, str) else ""
        if scheme not in ("sqlite", "dynamodb") or not self.url.split(":", 1)[1].strip("/"):
            raise ConfigError("store", self.url, "sqlite:PATH (a local file) or dynamodb:PREFIX (a table name prefix)")
        if isinstance(self.retention_days, bool) or not isinstance(self.retention_days, int) or \
                not 1 <= self.retention_days <= 3650:
            raise ConfigError("store.retention_days", self.retention_days, "an integer from 1 to 3650")

    @property
    def kind(self) -> str:
        return self.url.split(":", 1)[0]

    @property
    def target(self) -> str:
        """The file path (sqlite; ``sqlite:///abs/path`` and ``sqlite:rel/path`` both work) or the table prefix."""
        rest = self.url.split(":", 1)[1]
        if self.kind == "dynamodb":
            return rest.strip("/")
        return "/" + rest.lstrip("/") if rest.startswith("///") else rest


def open_store(settings: StoreSettings) -> Store:
    """Open the store a URL names; DynamoDB needs boto3 (the cloud extra)."""
    if settings.kind == "sqlite":
        from qcsight_cloud.sqlite_store import SqliteStore

        if settings.must_exist and not Path(settings.target).is_file():
            raise StoreError(f"store {settings.url}: {settings.target} does not exist (nothing was ingested there): "
                             "check the path, or give the --store that 'qcsight cloud ingest' or 'serve' writes")
        return SqliteStore(settings.target)
    try:
        from qcsight_cloud.dynamodb_store import DynamoStore
    except ModuleNotFoundError as exc:
        raise StoreError(f"a DynamoDB store needs boto3: pip install 'qcsight[cloud]' ({exc})") from exc
    return DynamoStore.from_environment(settings.target, retention_days=settings.retention_days)
