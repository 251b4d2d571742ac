"""Defect bursts: more defect alerts on a line within a window than a bound notifies, with a link to that inbox.

Locally a log line (and a webhook POST when configured); in AWS an SNS message to the alert topic.
A line notifies once per window: a burst that goes on does not repeat every check.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol
from urllib.parse import urlencode

from qcsight_cloud import timestamps
from qcsight_cloud.store import InboxQuery, Store
from qcsight_review.settings import BurstSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Burst:
    line: str
    alerts: int  # at least; counting stops one past the bound
    window_s: float
    since: str
    link: str

    def text(self) -> str:
        return (f"qcsight: defect burst on {self.line}: more than {self.alerts - 1} defect alerts in the last "
                f"{self.window_s / 60:g} min; review them: {self.link}")


class Notifier(Protocol):
    def notify(self, burst: Burst) -> None: ...


class LogNotifier:
    def notify(self, burst: Burst) -> None:
        log.warning("%s", burst.text())


class WebhookNotifier:
    """POSTs the burst as JSON; a failure is logged, never raised (the next burst tries again)."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.url, self.timeout_s = url, timeout_s

    def notify(self, burst: Burst) -> None:
        body = json.dumps({"text": burst.text(), "line": burst.line, "alerts": burst.alerts,
                           "window_s": burst.window_s, "since": burst.since, "link": burst.link}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read(1024)
        except (urllib.error.URLError, OSError) as exc:
            log.warning("burst webhook %s failed: %s", self.url, exc)


class SnsNotifier:
    def __init__(self, client: Any, topic_arn: str) -> None:
        self.client, self.topic_arn = client, topic_arn

    def notify(self, burst: Burst) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.publish(TopicArn=self.topic_arn, Subject=f"qcsight defect burst on {burst.line}"[:100],
                                Message=burst.text())
        except (BotoCoreError, ClientError) as exc:
            log.warning("burst SNS publish to %s failed: %s", self.topic_arn, exc)


def notifiers(settings: BurstSettings) -> list[Notifier]:
    chosen: list[Notifier] = [LogNotifier()]
    if settings.webhook:
        chosen.append(WebhookNotifier(settings.webhook))
    if settings.topic_arn:
        import boto3

        chosen.append(SnsNotifier(boto3.client("sns"), settings.topic_arn))
    return chosen


def find_bursts(store: Store, settings: BurstSettings, base_url: str, now: datetime) -> list[Burst]:
    """Lines with more than max_alerts defect alerts whose time lies in the last window."""
    since = now - timedelta(seconds=settings.window_s)
    bursts = []
    for line in sorted({device.line for device in store.devices()}):
        query = InboxQuery(line=line, status="defect", since=since, limit=settings.max_alerts + 1,
                           scan_budget=max(5000, settings.max_alerts + 1))
        page = store.inbox(query)
        if len(page.items) > settings.max_alerts:
            link = f"{base_url.rstrip('/')}/inbox?" + urlencode({"line": line, "status": "defect",
                                                                 "since": timestamps.iso(since)})
            bursts.append(Burst(line, len(page.items), settings.window_s, timestamps.iso(since), link))
    return bursts


class BurstWatcher:
    """Checks for bursts every check_every_s on its own thread; stop() ends it within one check."""

    def __init__(self, store: Store, settings: BurstSettings, targets: Sequence[Notifier], base_url: str,
                 clock: Callable[[], datetime] = timestamps.now) -> None:
        self.store, self.settings, self.targets, self.base_url, self.clock = store, settings, targets, base_url, clock
        self._last: dict[str, datetime] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="burst-watcher", daemon=True)

    def check(self) -> list[Burst]:
        now = self.clock()
        sent = []
        for burst in find_bursts(self.store, self.settings, self.base_url, now):
            last = self._last.get(burst.line)
            if last is not None and (now - last).total_seconds() < self.settings.window_s:
                continue
            self._last[burst.line] = now
            for target in self.targets:
                target.notify(burst)
            sent.append(burst)
        return sent

    def _run(self) -> None:
        while not self._stop.wait(self.settings.check_every_s):
            try:
                self.check()
            except Exception:  # a program boundary: the watcher must outlive one failed read
                log.exception("burst check failed")

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
