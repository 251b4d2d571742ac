"""A small line for the review tests: real images (qcsight_data.synth), alerts ingested the way devices send them."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import cv2

from qcsight_cloud import timestamps
from qcsight_cloud.ingest import STORED, Ingestor
from qcsight_cloud.store import Store
from qcsight_data.synth import generate
from tests.cloud import builders

CLASSES = ("good", "scratch", "spot")
LINE = "line-1"
THINGS = ("cam-1", "cam-2")
_HTML_TOKEN = re.compile(r'name="csrf-token" content="([^"]+)"')


@dataclass(frozen=True)
class Seeded:
    images: Path
    alert_ids: tuple[str, ...]  # newest first, as the inbox lists them
    truth: dict[str, str]  # alert id -> the class its image was drawn as
    predicted: dict[str, str]
    anomaly_id: str


def picture(path: Path, fmt: str = "jpeg") -> dict[str, Any]:
    image = cv2.imread(str(path))
    ok, data = cv2.imencode(".jpg" if fmt == "jpeg" else ".png", image)
    assert ok
    return {"format": fmt, "width": image.shape[1], "height": image.shape[0],
            "data": base64.b64encode(data.tobytes()).decode("ascii")}


def seed_line(store: Store, root: Path, count: int = 30, now: datetime | None = None, line: str = LINE,
              things: tuple[str, ...] = THINGS, metrics: bool = True) -> Seeded:
    """count alerts on LINE (one per synthetic image, a minute apart, ending an hour ago), plus one anomaly alert
    with a box and an overlay (the newest), plus metrics windows over the last hours for the dashboard."""
    now = now or timestamps.now()
    images = root / "images"
    generate(images, count, seed=11, size=64, classes=CLASSES, workers=1)
    start = now - timedelta(hours=1, minutes=count)
    messages = []
    truth, predicted = {}, {}
    for i in range(count):
        cls = CLASSES[i % len(CLASSES)]
        path = (images / cls / f"{cls}_{i:06d}.png").resolve()
        label = cls if cls != "good" else ("scratch" if i % 2 else "spot")
        thing = things[i % len(things)]
        message = builders.alert(thing, i + 1, start + timedelta(minutes=i), label=label, score=0.6 + 0.01 * i)
        message["verdict"]["scores"] = {c: (0.6 + 0.01 * i if c == label else 0.2 - 0.005 * i) for c in CLASSES}
        message["thumbnail"] = picture(path)
        message["image_ref"] = path.as_uri()
        messages.append(message)
        truth[message["message_id"]], predicted[message["message_id"]] = cls, label
    anomaly = builders.alert(things[0], count + 1, start + timedelta(minutes=count), label="anomaly", score=1.4)
    anomaly["verdict"]["scores"] = {"anomaly": 1.4}
    anomaly_image = (images / "scratch" / "scratch_000001.png").resolve()
    anomaly["thumbnail"] = picture(anomaly_image)
    anomaly["image_ref"] = anomaly_image.as_uri()
    anomaly["overlay"] = picture(anomaly_image, "png")
    anomaly["box"] = {"x0": 0.25, "y0": 0.25, "x1": 0.75, "y1": 0.5, "peak": 2.1}
    messages.append(anomaly)
    for thing_index, thing in enumerate(things if metrics else ()):
        for k in range(12):
            end = now - timedelta(minutes=20 * (12 - k))
            messages.append(builders.metrics(thing, 1000 + k, end, frames=100, defects=2 + k % 4 + thing_index,
                                             confidence_psi=0.01 * k, model="3" if k < 6 else "4"))
    outcomes = Ingestor(store, lambda thing: line).ingest_batch([builders.incoming(m) for m in messages])
    assert [o.status for o in outcomes] == [STORED] * len(messages), [o for o in outcomes if o.status != STORED]
    ids = tuple(m["message_id"] for m in reversed(messages[:count + 1]))
    return Seeded(images, ids, truth, predicted, anomaly["message_id"])


def csrf_of(html: str) -> str:
    match = _HTML_TOKEN.search(html)
    assert match, "the page carries no CSRF token"
    return match.group(1)
