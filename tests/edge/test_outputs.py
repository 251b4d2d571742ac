"""Verdict outputs: a part is finished only once its alert is in the outbox (zero loss); alerts fit IoT Core."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qcsight_core import messages
from qcsight_core.drift import input_statistics
from qcsight_core.errors import ConfigError
from qcsight_core.verdict import Verdict
from qcsight_edge.agent import Agent, build_parts
from qcsight_edge.capture import DONE_DIR, FAILED_DIR, Frame
from qcsight_edge.clock import ManualClock
from qcsight_edge.config import AgentConfig, AlertConfig, LineSignalConfig, ModelConfig
from qcsight_edge.line_signal import NoLineSignal
from qcsight_edge.models import load_model
from qcsight_edge.outbox import Outbox
from qcsight_edge.outputs import MessageSink, VerdictOutputs
from qcsight_edge.pipeline import Judgement
from qcsight_edge.thumbnails import IOT_CORE_MAX_PAYLOAD, fit_thumbnail
from tests.edge.agent_helpers import agent_config, outbox_messages, write_atomically
from tests.helpers.models import make_tiny_bundle
from tests.helpers.wait import eventually

BRIGHT, DARK = 240, 20  # the tiny model calls bright parts defects, dark ones good


class GatedOutbox:
    """The real outbox, with alert commits held at a gate: the moment between queueing an alert and committing it."""

    def __init__(self, inner: Outbox) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def put(self, topic: str, kind: str, build: Callable[[int], tuple[str, bytes]]) -> tuple[int, bool]:
        if kind == "alerts":
            self.waiting.set()
            assert self.gate.wait(10.0)
        return self.inner.put(topic, kind, build)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class HotFolderAgent:
    def __init__(self, tmp_path: Path, wrap: Callable[[Outbox], Any] | None = None) -> None:
        make_tiny_bundle(tmp_path / "bundle")
        self.config = AgentConfig.from_dict(agent_config(tmp_path, tmp_path / "bundle", stop_deadline_s=2))
        self.parts = build_parts(self.config)
        self.outbox: Outbox = self.parts.outbox
        if wrap is not None:
            self.parts.outbox = wrap(self.parts.outbox)
        self.agent = Agent(self.config, self.parts, clock=ManualClock())
        self.inbox = Path(str(self.config.source.uri))

    def drop(self, name: str, value: int, size: tuple[int, int] = (60, 80)) -> None:
        write_atomically(self.inbox / name, value, size)

    def done(self, name: str) -> bool:
        return (self.inbox / DONE_DIR / name).exists()

    def alert_sources(self) -> list[str]:
        return [m["source"] for m in outbox_messages(self.config.outbox.path, "alerts")]


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[tuple[HotFolderAgent, GatedOutbox]]:
    holder: list[GatedOutbox] = []

    def wrap(outbox: Outbox) -> GatedOutbox:
        holder.append(GatedOutbox(outbox))
        return holder[0]

    run = HotFolderAgent(tmp_path, wrap)
    try:
        yield run, holder[0]
    finally:
        holder[0].gate.set()
        run.agent.stop()


def test_a_part_is_not_finished_while_its_alert_waits_for_the_outbox_commit(
        gated: tuple[HotFolderAgent, GatedOutbox]) -> None:
    run, outbox = gated
    run.agent.start()
    run.drop("defect.png", BRIGHT)
    eventually(outbox.waiting.is_set, message="the alert never reached the outbox")
    # The inference thread moves on: a good part judged after it is finished ...
    run.drop("good.png", DARK)
    eventually(lambda: run.done("good.png"), message="the good part was not judged")
    # ... but the defect is not: a kill -9 now must find it in the inbox, to be judged again.
    assert not run.done("defect.png") and (run.inbox / "defect.png").exists()
    assert run.alert_sources() == []

    outbox.gate.set()
    eventually(lambda: run.done("defect.png"), message="the part was not finished after its alert was stored")
    assert run.alert_sources() == ["defect.png"]


def test_a_failed_outbox_write_leaves_the_part_unfinished_reports_it_and_stores_it_later(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = HotFolderAgent(tmp_path)
    agent = run.agent
    try:
        agent.start()
        # The real SQLite refusing to grow, as on a full disk (SQLITE_FULL on the commit).
        pages = run.outbox._db.execute("PRAGMA page_count").fetchone()[0]
        run.outbox._db.execute(f"PRAGMA max_page_count={pages}")
        run.drop("defect.png", BRIGHT, size=(300, 400))  # its thumbnail needs new pages
        eventually(lambda: "not stored" in caplog.text, message="the outbox write never failed")
        assert (run.inbox / "defect.png").exists() and not run.done("defect.png")
        assert agent.outputs is not None
        eventually(lambda: agent.outputs is not None and agent.outputs.stats()["waiting"] == 1,
                   message=lambda: f"the unstored alert is not reported: {agent.outputs and agent.outputs.stats()}")
        detail = agent.status_detail()
        assert detail["alerts"]["waiting"] == 1 and "full" in detail["alerts"]["last_error"]
        assert not (run.inbox / FAILED_DIR / "defect.png").exists()

        run.outbox._db.execute("PRAGMA max_page_count=1073741823")  # space again
        eventually(lambda: run.done("defect.png"), timeout_s=15.0, message="the alert was not stored after recovery")
        assert run.alert_sources() == ["defect.png"]
        assert agent.outputs.stats()["waiting"] == 0
    finally:
        agent.stop()


def _noise(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_an_alert_never_exceeds_iot_cores_payload_limit(tmp_path: Path) -> None:
    make_tiny_bundle(tmp_path / "bundle")
    model = load_model(ModelConfig(bundle=tmp_path / "bundle", warmup_runs=0, intra_op_threads=1))
    outbox = Outbox(tmp_path / "o.db")
    sink = MessageSink(outbox, "line1-cam1", ManualClock())
    # Settings the configuration would refuse, as a caller building AlertConfig itself could pass.
    loud = AlertConfig(thumbnail_max_side=1024, thumbnail_quality=100)
    outputs = VerdictOutputs(sink, NoLineSignal(), None, loud, LineSignalConfig(kind="none"), ManualClock())
    image = _noise(900, 1200)
    judgement = Judgement(Verdict("defect", "spot", 0.99, 0.99, np.array([0.0, 0.01, 0.99])),
                          input_statistics(image[:32, :32], "RGB"), image)
    finished: list[bool] = []
    outputs.on_verdict(Frame("f1", image, "big.png"), judgement, model, lambda _f, ok: finished.append(ok))
    (stored,) = outbox.claim(10)
    outbox.close()
    assert finished == [True]
    assert len(stored.payload) <= IOT_CORE_MAX_PAYLOAD
    thumb = messages.decode(stored.payload)["thumbnail"]
    assert max(thumb["width"], thumb["height"]) < 1024  # shrunk to fit, not dropped
    assert outputs.stats()["thumbnails_shrunk"] == 1


def test_a_thumbnail_that_cannot_fit_is_dropped_and_counted() -> None:
    image = _noise(600, 800)
    assert fit_thumbnail(image, 160, 80, budget=100_000)[0] is not None
    thumb, shrunk = fit_thumbnail(image, 160, 80, budget=300)  # not even 16 px of noise fits in 300 bytes
    assert thumb is None and shrunk


@pytest.mark.parametrize(("side", "quality", "ok"), [(160, 80, True), (256, 95, True), (1024, 100, False),
                                                      (512, 90, False)])
def test_config_refuses_thumbnail_settings_that_cannot_fit_an_iot_core_message(side: int, quality: int,
                                                                                ok: bool) -> None:
    data = {"thing_name": "t", "model": {"bundle": "b"},
            "alerts": {"thumbnail_max_side": side, "thumbnail_quality": quality}}
    if ok:
        assert AgentConfig.from_dict(data).alerts.thumbnail_max_side == side
        return
    with pytest.raises(ConfigError) as caught:
        AgentConfig.from_dict(data)
    assert caught.value.field == "alerts.thumbnail_max_side" and "128 KiB" in str(caught.value)
