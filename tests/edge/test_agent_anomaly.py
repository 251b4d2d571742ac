"""The agent running an anomaly bundle unchanged: verdicts on the normalised score, alerts with box and overlay."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from qcsight_core import messages
from tests.edge.agent_helpers import agent_config, by_schema
from tests.edge.test_agent import RunningAgent
from tests.helpers.models import make_tiny_anomaly_bundle


@pytest.fixture
def running(tmp_path: Path) -> Iterator[RunningAgent]:
    make_tiny_anomaly_bundle(tmp_path / "bundle")
    run = RunningAgent(tmp_path, agent_config(tmp_path, tmp_path / "bundle"))
    yield run
    run.agent.stop()


def _drop(run: RunningAgent, name: str, patch: bool) -> None:
    image = np.full((60, 80, 3), 60, np.uint8)  # dark: normalised score about 0.5
    if patch:
        image[6:18, 52:72] = 255  # a bright spot top right: about 1.4 there
    run.inbox.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(run.inbox / name), image)


def test_anomaly_alert_carries_the_box_and_an_overlay_thumbnail(running: RunningAgent) -> None:
    running.agent.start()
    _drop(running, "001-plain.png", patch=False)
    _drop(running, "002-spot.png", patch=True)
    running.wait_judged(2)
    running.clock.advance(60)
    running.agent.tick()
    stored = running.stored()
    (alert,) = by_schema(stored, messages.ALERT)
    assert alert["source"] == "002-spot.png" and alert["verdict"]["label"] == "anomaly"
    assert alert["verdict"]["score"] > 1.0 and set(alert["verdict"]["scores"]) == {"anomaly"}
    box = alert["box"]
    assert 52 / 80 - 0.1 <= box["x0"] < box["x1"] <= 72 / 80 + 0.1 and box["y0"] < 18 / 60 + 0.1
    overlay = alert["overlay"]
    picture = cv2.imdecode(np.frombuffer(base64.b64decode(overlay["data"]), np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape == (overlay["height"], overlay["width"], 3) and max(picture.shape[:2]) <= 160
    # The colour scale runs blue (cold) to red (hot): redder over the spot than in the far corner.
    height, width = picture.shape[:2]
    hot = picture[int(12 / 60 * height), int(62 / 80 * width)].astype(int)
    cold = picture[int(50 / 60 * height), int(8 / 80 * width)].astype(int)
    assert hot[2] - hot[0] > cold[2] - cold[0]
    (metrics,) = by_schema(stored, messages.METRICS)
    assert metrics["counts"]["good"] == 1 and metrics["by_class"] == {"good": 1, "anomaly": 1}
    assert metrics["drift"]["confidence_psi"] is not None  # the score's reference histogram is in the bundle
