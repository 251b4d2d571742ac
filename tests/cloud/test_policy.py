"""The retraining policy as a table of cases, its rate tests against scipy, and the trigger that records decisions."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from qcsight_cloud import cli, timestamps
from qcsight_cloud.fleet import Fleet
from qcsight_cloud.ingest import Ingestor
from qcsight_cloud.policy import FIRE, HOLD, DeviceEvidence, Evidence, PolicySettings, WindowStats, decide, explain
from qcsight_cloud.rates import compare_rates, exceeds_bound, fisher_exact
from qcsight_cloud.records import Run
from qcsight_cloud.sqlite_store import SqliteStore
from qcsight_cloud.trigger import device_evidence, evaluate
from qcsight_core.errors import ConfigError
from tests.cloud import builders
from tests.cloud.builders import T0

SETTINGS = PolicySettings(drift_psi=0.25, drift_windows=3, drift_min_frames=100, rate_recent_windows=3,
                          rate_baseline_windows=10, rate_min_frames=1000, false_alarm_bound=0.3,
                          false_alarm_alpha=0.01, false_alarm_min_reviews=30, new_reviews_to_fire=100,
                          cooldown_hours=24, weekly_cap=2)
NOW = T0 + timedelta(days=30)


def device(thing: str = "cam-1", psi: tuple[float, ...] = (0.01, 0.01, 0.01), frames: int = 1000,
           defects: int = 10, baseline: tuple[int, int] = (10_000, 100), brightness: bool = False) -> DeviceEvidence:
    """Windows with these PSIs (confidence or brightness) and counts each; baseline is (frames, defects)."""
    windows = tuple(WindowStats(frames, defects, None if brightness else p, p if brightness else 0.0) for p in psi)
    return DeviceEvidence(thing, windows, *baseline)


def run(hours_ago: float, status: str = "succeeded") -> Run:
    requested = timestamps.iso(NOW - timedelta(hours=hours_ago))
    return Run(f"run-{hours_ago}", "line-1", requested, status)


def evidence(*devices: DeviceEvidence, reviewed: int = 0, false_alarms: int = 0,
             runs: tuple[Run, ...] = ()) -> Evidence:
    return Evidence("line-1", timestamps.iso(NOW), devices or (device(),), reviewed, false_alarms, runs)


DRIFTING = device(psi=(0.3, 0.4, 0.35))
CASES: list[tuple[str, Evidence, dict[str, Any], str, tuple[str, ...], tuple[str, ...]]] = [
    ("quiet line", evidence(), {}, HOLD, (), ()),
    ("drift held over k windows", evidence(DRIFTING), {}, FIRE, ("drift",), ()),
    ("drift in 2 of the last 3 windows", evidence(device(psi=(0.3, 0.1, 0.35))), {}, HOLD, (), ()),
    ("drift over too few windows", evidence(device(psi=(0.3, 0.4))), {}, HOLD, (), ()),
    ("drift on windows with too few frames", evidence(device(psi=(0.3, 0.4, 0.35), frames=99)), {}, HOLD, (), ()),
    ("brightness drift", evidence(device(psi=(0.3, 0.4, 0.35), brightness=True)), {}, FIRE, ("drift",), ()),
    ("one drifting device of two needed", evidence(DRIFTING, device("cam-2")), {"drift_min_devices": 2}, HOLD, (),
     ()),
    ("defect rate up 1% -> 2%", evidence(device(defects=20)), {}, FIRE, ("defect_rate",), ()),
    ("defect rate down 1% -> 0.3%", evidence(device(defects=3)), {}, FIRE, ("defect_rate",), ()),
    ("defect rate up 1% -> 1.2%: not significant", evidence(device(defects=12)), {}, HOLD, (), ()),
    ("defect rate up on too few frames", evidence(device(frames=300, defects=30)), {}, HOLD, (), ()),
    ("a rare defect appears (exact test)", evidence(device(frames=1000, defects=3, baseline=(20_000, 0))), {}, FIRE,
     ("defect_rate",), ()),
    ("rare defects, not enough to tell", evidence(device(frames=1000, defects=2, baseline=(2000, 0))), {}, HOLD, (),
     ()),
    ("operators reject half the alerts", evidence(reviewed=40, false_alarms=20), {}, FIRE, ("false_alarms",), ()),
    ("false alarms at 35%: not shown above 30%", evidence(reviewed=40, false_alarms=14), {}, HOLD, (), ()),
    ("every alert rejected but too few reviews", evidence(reviewed=20, false_alarms=20), {}, HOLD, (), ()),
    ("enough newly reviewed images", evidence(reviewed=100, false_alarms=10), {}, FIRE, ("new_reviews",), ()),
    ("guard: a run is already going", evidence(DRIFTING, runs=(run(30, "running"),)), {}, HOLD, ("drift",),
     ("one_run",)),
    ("guard: cooldown after the last run", evidence(DRIFTING, runs=(run(10),)), {}, HOLD, ("drift",), ("cooldown",)),
    ("guard: weekly cap reached", evidence(DRIFTING, runs=(run(30), run(100))), {}, HOLD, ("drift",),
     ("weekly_cap",)),
    ("guard: cap counts only the last 7 days", evidence(DRIFTING, runs=(run(30), run(24 * 8))), {}, FIRE, ("drift",),
     ()),
    ("guard: not enough labels to train on", evidence(DRIFTING, reviewed=10), {"min_new_reviews": 50}, HOLD,
     ("drift",), ("new_labels",)),
    ("guards hold nothing when nothing fired", evidence(runs=(run(1, "running"),)), {}, HOLD, (), ()),
    ("several triggers and several guards", evidence(DRIFTING, device("cam-2", defects=25), reviewed=10,
                                                     runs=(run(2, "requested"),)),
     {"min_new_reviews": 50}, HOLD, ("drift", "defect_rate"), ("one_run", "cooldown", "new_labels")),
]


@pytest.mark.parametrize(("case", "ev", "overrides", "action", "triggers", "blocked"), CASES,
                         ids=[c[0] for c in CASES])
def test_policy_cases(case: str, ev: Evidence, overrides: dict[str, Any], action: str, triggers: tuple[str, ...],
                      blocked: tuple[str, ...]) -> None:
    decision = decide(replace(SETTINGS, **overrides), ev, "d-1")
    assert (decision.action, decision.triggers, decision.blocked_by) == (action, triggers, blocked), explain(decision)
    assert [c.name for c in decision.checks] == ["drift", "defect_rate", "false_alarms", "new_reviews", "one_run",
                                                 "cooldown", "weekly_cap", "new_labels"], "every check is recorded"


def test_a_decision_carries_the_numbers_that_drove_it() -> None:
    decision = decide(SETTINGS, evidence(device(defects=20)), "d-2")
    rate = next(c for c in decision.checks if c.name == "defect_rate")
    assert (rate.numbers["baseline_rate"], rate.numbers["recent_rate"], rate.numbers["method"]) == (0.01, 0.02,
                                                                                                    "score")
    assert rate.numbers["p_value"] is not None and rate.numbers["p_value"] < 0.001
    text = explain(decision)
    assert "FIRE" in text and "defect rate 0.0200 over the last 3 windows vs baseline 0.0100" in text
    assert "guard   cooldown" in text


@pytest.mark.parametrize(("overrides", "field"), [
    ({"drift_psi": 0}, "policy.drift_psi"),
    ({"rate_alpha": 0.7}, "policy.rate_alpha"),
    ({"drift_windows": 2.5}, "policy.drift_windows"),
    ({"false_alarm_bound": 1.0}, "policy.false_alarm_bound"),
    ({"weekly_cap": 0}, "policy.weekly_cap"),
    ({"cooldown_hours": True}, "policy.cooldown_hours"),
])
def test_bad_settings_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        PolicySettings(**overrides)
    assert info.value.field == field
    with pytest.raises(ConfigError, match="not a setting"):
        PolicySettings.from_mapping({"alpha": 0.01})


# ---------------------------------------------------------------- the rate tests against scipy


@pytest.mark.parametrize(("x1", "n1", "x2", "n2"), [
    (100, 10_000, 60, 3000), (100, 10_000, 36, 3000), (5, 200, 1, 300), (0, 2000, 3, 1000), (12, 50, 3, 60),
    (0, 10, 0, 10), (499, 1000, 520, 1000),
])
def test_rate_comparison_matches_scipy(x1: int, n1: int, x2: int, n2: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    table = [[x1, n1 - x1], [x2, n2 - x2]]
    result = compare_rates(x1, n1, x2, n2)
    assert fisher_exact(x1, n1, x2, n2) == pytest.approx(stats.fisher_exact(table).pvalue, rel=1e-6)
    if result.method == "score":
        expected = stats.chi2_contingency(table, correction=False).pvalue  # chi-square = z squared
        assert result.p_value == pytest.approx(expected, rel=1e-6)
    else:
        assert result.p_value == pytest.approx(stats.fisher_exact(table).pvalue, rel=1e-6)


def test_the_bound_test_is_the_one_sided_score_test() -> None:
    stats = pytest.importorskip("scipy.stats")
    result = exceeds_bound(20, 40, 0.3)
    z = (20 - 12) / math.sqrt(40 * 0.3 * 0.7)
    assert result.p_value == pytest.approx(stats.norm.sf(z))
    with pytest.raises(ValueError, match="bound"):
        exceeds_bound(1, 2, 1.0)
    with pytest.raises(ValueError, match="baseline"):
        compare_rates(5, 4, 1, 10)


# ---------------------------------------------------------------- the trigger: evidence from the store, recorded


def test_device_evidence_uses_the_current_model_and_keeps_recent_windows_out_of_the_baseline(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.sqlite")
    versions = ["2"] * 3 + ["3"] * 8
    Ingestor(store, lambda t: "line-1").ingest_batch([
        builders.incoming(builders.metrics("cam-1", i + 1, T0 + timedelta(minutes=i), defects=i, model=v))
        for i, v in enumerate(versions)])
    first = store.windows(thing="cam-1", since=T0, limit=SETTINGS.rate_baseline_windows + 3)
    latest = store.windows(thing="cam-1", since=T0, limit=SETTINGS.windows_needed, newest_first=True)[::-1]
    assert [w.origin.seq for w in latest] == [9, 10, 11]
    ev = device_evidence("cam-1", first, latest, SETTINGS)
    assert [w.defects for w in ev.recent] == [8, 9, 10], "the latest windows, oldest first"
    assert (ev.baseline_frames, ev.baseline_defects) == (500, 3 + 4 + 5 + 6 + 7), "model 3's earlier windows only"
    across = store.windows(thing="cam-1", since=T0, limit=10, newest_first=True)[::-1]  # seqs 2-11: models 2, 3
    assert [w.defects for w in device_evidence("cam-1", first, across, SETTINGS).recent] == list(range(3, 11)), \
        "only the current model's windows"


def test_the_trigger_records_every_decision_and_one_run_at_a_time(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "s.sqlite"
    store = SqliteStore(db)
    now = timestamps.now()
    batch = []
    for thing in ("cam-1", "cam-2"):
        for i in range(6):
            psi = 0.5 if thing == "cam-1" and i >= 3 else 0.02
            batch.append(builders.incoming(builders.metrics(thing, i + 1, now - timedelta(minutes=10 - i),
                                                            frames=400, defects=4, confidence_psi=psi)))
    Ingestor(store, lambda t: "line-1").ingest_batch(batch)
    fleet = Fleet({"line-1": ("cam-1", "cam-2"), "line-2": ("cam-3",)})

    first = evaluate(store, fleet, SETTINGS, now=now)
    assert [(d.scope, d.action, d.triggers) for d in first] == [("line-1", FIRE, ("drift",)), ("line-2", HOLD, ())]
    [requested] = store.runs("line-1")
    assert (requested.status, requested.decision_id) == ("requested", first[0].decision_id)

    second = evaluate(store, fleet, SETTINGS, now=now + timedelta(minutes=1), scopes=["line-1"])
    assert (second[0].action, second[0].blocked_by) == (HOLD, ("one_run", "cooldown"))
    assert len(store.runs("line-1")) == 1
    assert [d.decision_id for d in store.decisions("line-1")] == [second[0].decision_id, first[0].decision_id]
    store.close()

    assert cli.main(["decisions", "--store", f"sqlite:{db}", "--line", "line-1", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "line-1: HOLD  (fired: drift; held back by: one_run, cooldown)" in out
    assert "1 device(s) held PSI > 0.25 over their last 3 windows" in out
