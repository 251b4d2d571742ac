"""The store contract: every test runs against SQLite and against DynamoDB (moto server on loopback).

Records go in through the real Ingestor (check + put), the way both ingestion paths write them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from qcsight_cloud import timestamps
from qcsight_cloud.errors import NotFoundError, ReviewConflictError
from qcsight_cloud.ingest import DUPLICATE, STORED, Ingestor
from qcsight_cloud.records import Check, Decision, Run
from qcsight_cloud.sqlite_store import SqliteStore
from qcsight_cloud.store import InboxQuery, Store
from qcsight_core.errors import ConfigError
from tests.cloud import builders
from tests.cloud.builders import T0
from tests.cloud.conftest import ensure_tables


def ingest(store: Store, *messages: dict[str, Any], line: str = "line-1") -> list[str]:
    outcomes = Ingestor(store, lambda thing: line).ingest_batch([builders.incoming(m) for m in messages])
    return [o.status for o in outcomes]


def at(minutes: float) -> Any:
    return T0 + timedelta(minutes=minutes)


def test_messages_are_stored_once_and_keep_their_device_current(store: Store, ns: str) -> None:
    thing = f"{ns}-cam"
    first = [builders.metrics(thing, 1, at(1), frames=50, defects=5), builders.alert(thing, 2, at(1.5)),
             builders.status(thing, 3, at(2), outbox_depth=7)]
    assert ingest(store, *first) == [STORED] * 3
    assert ingest(store, first[1], first[0]) == [DUPLICATE, DUPLICATE], "at-least-once delivery: stored once"

    device = store.device(thing)
    assert device is not None
    assert (device.received, device.min_seq, device.max_seq, device.gaps, device.reordered) == (3, 1, 3, 0, 0)
    assert device.by_kind == {"metrics": 1, "alerts": 1, "status": 1}
    assert (device.state, device.last_event, device.outbox_depth, device.model_version) == ("running", "heartbeat",
                                                                                          7, "3")
    assert device.last_window_end == timestamps.iso(at(1))
    assert store.counters()[thing] == {"duplicate": 2}

    stored = store.get_alert(first[1]["message_id"])
    assert stored is not None
    assert (stored.label, stored.score, stored.origin.seq, stored.origin.line) == ("crack", 0.9, 2, "line-1")
    assert stored.thumbnail == first[1]["thumbnail"]
    assert not stored.review.reviewed
    assert store.get_alerts([first[1]["message_id"], "missing"]) == [stored]
    assert store.get_alert("missing") is None


def test_an_anomaly_alert_keeps_its_box_and_overlay(store: Store, ns: str) -> None:
    thing = f"{ns}-cam"
    message = builders.alert(thing, 1, at(1))
    message["box"] = {"x0": 0.1, "y0": 0.2, "x1": 0.5, "y1": 0.6, "peak": 1.7}
    message["overlay"] = {"format": "png", "width": 64, "height": 48, "data": "AAEC"}
    plain = builders.alert(thing, 2, at(2))
    assert ingest(store, message, plain) == [STORED, STORED]
    stored = store.get_alert(message["message_id"])
    assert stored is not None and stored.box == message["box"] and stored.overlay == message["overlay"]
    classifier = store.get_alert(plain["message_id"])
    assert classifier is not None and classifier.box is None and classifier.overlay is None


def test_sequence_gaps_are_counted_and_reordering_tolerated(store: Store, ns: str) -> None:
    thing = f"{ns}-cam"
    ingest(store, builders.status(thing, 1, at(1)), builders.status(thing, 2, at(2)),
           builders.status(thing, 6, at(6), state="paused"), builders.status(thing, 4, at(4), state="stale"))
    device = store.device(thing)
    assert device is not None
    assert (device.gaps, device.reordered) == (2, 1), "seqs 3 and 5 missing; 4 arrived after 6"
    assert device.state == "paused", "a late message never overwrites what a newer one said"
    assert device.last_time == timestamps.iso(at(6))

    ingest(store, builders.status(thing, 3, at(3)), builders.status(thing, 5, at(5)))
    device = store.device(thing)
    assert device is not None
    assert (device.gaps, device.reordered, device.received) == (0, 3, 6), "late messages fill their gaps"


def test_errors_are_counted_and_the_newest_kept(store: Store, ns: str) -> None:
    thing = f"{ns}-cam"
    ingest(store, builders.status(thing, 2, at(2), event="error", error="camera unplugged"),
           builders.status(thing, 1, at(1), event="error", error="older error"))
    device = store.device(thing)
    assert device is not None
    assert (device.error_count, device.last_error) == (2, "camera unplugged")


def test_metrics_windows_are_a_time_series_by_device_and_by_line(store: Store, ns: str) -> None:
    a, b, line = f"{ns}-a", f"{ns}-b", f"{ns}-line"
    ingest(store, *(builders.metrics(a, i, at(i)) for i in (3, 1, 2)), builders.metrics(b, 1, at(2)), line=line)
    series = store.windows(since=at(1), until=at(3), thing=a)
    assert [w.end for w in series] == [timestamps.iso(at(i)) for i in (1, 2, 3)], "oldest first, both ends inclusive"
    assert sorted(w.origin.thing for w in store.windows(since=at(2), until=at(2), line=line)) == [a, b]
    assert len(store.windows(since=at(0), line=line)) == 4
    assert store.windows(since=at(2.5), thing=a)[0].frames == 100
    assert store.windows(since=at(0), thing=a, line="elsewhere") == []
    assert store.status_events(a, since=at(0)) == []


def test_status_events_come_back_in_time_order(store: Store, ns: str) -> None:
    thing = f"{ns}-cam"
    ingest(store, builders.status(thing, 2, at(2), event="model_change"), builders.status(thing, 1, at(1)))
    events = store.status_events(thing, since=at(0))
    assert [(e.origin.seq, e.event) for e in events] == [(1, "heartbeat"), (2, "model_change")]
    assert store.status_events(thing, since=at(1.5))[0].origin.seq == 2


def _alerts(ns: str, count: int, line: str) -> list[dict[str, Any]]:
    """Alerts of two devices one minute apart; every third a 'spot', scores spread over 0.5-0.99."""
    found = []
    for i in range(count):
        thing = f"{ns}-{'a' if i % 2 else 'b'}"
        found.append(builders.alert(thing, i + 1, at(i), label="spot" if i % 3 == 0 else "crack",
                                    status="uncertain" if i % 5 == 0 else "defect", score=0.5 + 0.49 * i / count,
                                    model="2" if i < count // 2 else "3"))
    return found


def _pages(store: Store, query: InboxQuery) -> list[str]:
    ids: list[str] = []
    cursor = query.cursor
    for _ in range(100):
        page = store.inbox(InboxQuery(**{**query.__dict__, "cursor": cursor}))
        ids.extend(a.message_id for a in page.items)
        cursor = page.cursor
        if cursor is None:
            return ids
    raise AssertionError("paging never ended")


def test_inbox_pages_newest_first_and_a_new_alert_does_not_shift_the_next_page(store: Store, ns: str) -> None:
    line = f"{ns}-line"
    alerts = _alerts(ns, 11, line)
    ingest(store, *alerts, line=line)
    newest_first = [m["message_id"] for m in reversed(alerts)]

    first = store.inbox(InboxQuery(line=line, limit=3))
    assert [a.message_id for a in first.items] == newest_first[:3]
    assert first.cursor is not None
    ingest(store, builders.alert(f"{ns}-a", 100, at(60)), line=line)  # arrives while the operator reads page 1
    second = store.inbox(InboxQuery(line=line, limit=3, cursor=first.cursor))
    assert [a.message_id for a in second.items] == newest_first[3:6], "keyset paging: page 2 is not shifted"

    assert _pages(store, InboxQuery(line=line, limit=3, cursor=second.cursor)) == newest_first[6:]
    ranged = store.inbox(InboxQuery(line=line, limit=2, cursor=second.cursor, since=at(0), until=at(3)))
    assert [a.message_id for a in ranged.items] == newest_first[7:9], "a time range and a cursor together"


@pytest.fixture(scope="module", params=["sqlite", pytest.param("dynamodb", marks=pytest.mark.cloud)])
def inbox_data(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[Store, str, list[dict[str, Any]]]]:
    """One line of 20 alerts (every fourth reviewed), ingested once for all the filter cases."""
    if request.param == "dynamodb":
        store: Store = ensure_tables(request.getfixturevalue("dynamo_session"))
    else:
        store = SqliteStore(tmp_path_factory.mktemp("inbox") / "store.sqlite")
    ns = "f" + uuid.uuid4().hex[:8]
    line = f"{ns}-line"
    alerts = _alerts(ns, 20, line)
    ingest(store, *alerts, line=line)
    for message in alerts[::4]:
        store.add_review(message["message_id"], "ann", "confirm")
    yield store, ns, alerts
    if request.param == "sqlite":
        store.close()


@pytest.mark.parametrize("filters", [
    {"label": "spot"},
    {"status": "uncertain"},
    {"score_min": 0.6, "score_max": 0.8},
    {"since_min": 5, "until_min": 14},
    {"model_version": "2"},
    {"thing_suffix": "a"},
    {"thing_suffix": "b", "label": "crack", "status": "defect"},
    {"reviewed": True},
    {"reviewed": False, "label": "spot"},
    {"reviewed": False, "thing_suffix": "a", "score_min": 0.7},
], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_inbox_filters_return_exactly_the_matching_alerts(inbox_data: tuple[Store, str, list[dict[str, Any]]],
                                                         filters: dict[str, Any]) -> None:
    store, ns, alerts = inbox_data
    params = dict(filters)
    if "thing_suffix" in params:
        params["thing"] = f"{ns}-{params.pop('thing_suffix')}"
    if "since_min" in params:
        params["since"], params["until"] = at(params.pop("since_min")), at(params.pop("until_min"))
    query = InboxQuery(line=f"{ns}-line", limit=3, **params)
    everything = store.get_alerts([m["message_id"] for m in alerts])
    expected = [a.message_id for a in sorted(everything, key=lambda a: a.origin.time, reverse=True)
                if query.matches(a)]
    assert expected, "the case must select something"
    assert len(expected) < len(alerts), "the case must leave something out"
    assert _pages(store, query) == expected


def test_a_scan_budget_ends_a_page_early_with_a_cursor(inbox_data: tuple[Store, str, list[dict[str, Any]]]) -> None:
    store, ns, alerts = inbox_data
    query = InboxQuery(line=f"{ns}-line", limit=1, scan_budget=6, score_max=0.5)  # only the oldest alert
    page = store.inbox(query)
    assert page.items == () and page.cursor is not None, "budget spent before a match: a short page, not a scan"
    assert page.scanned <= 6
    assert _pages(store, query) == [alerts[0]["message_id"]]


def test_inbox_refuses_a_bad_query() -> None:
    with pytest.raises(ConfigError, match=r"inbox\.line/inbox\.thing"):
        InboxQuery()
    with pytest.raises(ConfigError, match=r"inbox\.cursor"):
        InboxQuery(line="x", cursor="not-a-cursor")
    with pytest.raises(ConfigError, match=r"inbox\.limit"):
        InboxQuery(line="x", limit=0)
    with pytest.raises(ConfigError, match=r"inbox\.score_min"):
        InboxQuery(line="x", score_min=0.9, score_max=0.1)


def test_reviews_are_appended_and_the_verdict_derived_from_them(store: Store, ns: str) -> None:
    line = f"{ns}-line"
    message = builders.alert(f"{ns}-cam", 1, at(1), label="crack")
    ingest(store, message, line=line)
    alert_id = message["message_id"]

    store.add_review(alert_id, "ann", "confirm", time=at(2))
    store.add_review(alert_id, "bob", "relabel", "spot", time=at(3))
    assert store.get_alert(alert_id).review.label == "spot"  # type: ignore[union-attr]
    undo = store.add_review(alert_id, "bob", "undo", time=at(4))
    assert (undo.undoes, undo.verdict, undo.label) == (2, "defect", "crack"), "undo restores the verdict before it"
    store.add_review(alert_id, "ann", "undo", time=at(5))
    state = store.get_alert(alert_id).review  # type: ignore[union-attr]
    assert (state.reviewed, state.count) == (False, 4), "both undone: unreviewed again, four reviews kept"
    assert [a.message_id for a in store.inbox(InboxQuery(line=line, reviewed=False)).items] == [alert_id]

    store.add_review(alert_id, "cid", "false_alarm", "good", time=at(6))
    history = store.reviews(alert_id)
    assert [(r.n, r.reviewer, r.action, r.previous_label, r.label) for r in history] == [
        (1, "ann", "confirm", None, "crack"), (2, "bob", "relabel", "crack", "spot"),
        (3, "bob", "undo", "spot", "crack"), (4, "ann", "undo", "crack", None), (5, "cid", "false_alarm", None, "good"),
    ]
    state = store.get_alert(alert_id).review  # type: ignore[union-attr]
    assert (state.verdict, state.label, state.count) == ("false_alarm", "good", 5)
    assert store.inbox(InboxQuery(line=line, reviewed=False)).items == ()
    audit = [r for r in store.export_reviews(since=at(0)) if r.alert_id == alert_id]
    assert [r.n for r in audit] == [1, 2, 3, 4, 5], "the audit log is in time order"
    assert [r.n for r in store.export_reviews(since=at(3), until=at(4)) if r.alert_id == alert_id] == [2, 3]
    assert [r.n for r in store.export_reviews() if r.alert_id == alert_id] == [1, 2, 3, 4, 5]


def test_a_stale_or_impossible_review_is_refused(store: Store, ns: str) -> None:
    message = builders.alert(f"{ns}-cam", 1, at(1))
    ingest(store, message)
    alert_id = message["message_id"]
    with pytest.raises(ConfigError, match="no review to undo"):
        store.add_review(alert_id, "ann", "undo")
    store.add_review(alert_id, "ann", "confirm", expected_count=0)
    with pytest.raises(ReviewConflictError):
        store.add_review(alert_id, "bob", "false_alarm", expected_count=0)  # bob saw it unreviewed
    with pytest.raises(NotFoundError):
        store.add_review("no-such-alert", "ann", "confirm")
    with pytest.raises(ConfigError, match=r"review\.label"):
        store.add_review(alert_id, "ann", "relabel")
    assert len(store.reviews(alert_id)) == 1


def test_review_statistics_give_false_alarm_rates_per_line_and_class(store: Store, ns: str) -> None:
    line_a, line_b = f"{ns}-la", f"{ns}-lb"
    a = [builders.alert(f"{ns}-a", i, at(i), label="crack" if i <= 3 else "spot") for i in range(1, 7)]
    b = [builders.alert(f"{ns}-b", i, at(i)) for i in range(1, 3)]
    ingest(store, *a, line=line_a)
    ingest(store, *b, line=line_b)
    for i, message in enumerate(a):
        store.add_review(message["message_id"], "ann", "false_alarm" if i % 2 else "confirm", time=at(10 + i))
    store.add_review(a[0]["message_id"], "ann", "undo", time=at(20))  # a[0] back to unreviewed
    store.add_review(b[0]["message_id"], "bob", "false_alarm", time=at(20))
    store.add_review(b[1]["message_id"], "bob", "confirm", time=at(5))  # before 'since'

    stats = store.review_stats(since=at(10), line=line_a)
    rows = {(r.line, r.label): (r.reviewed, r.false_alarms) for r in stats.by_class}
    assert rows == {(line_a, "crack"): (2, 1), (line_a, "spot"): (3, 2)}
    assert (stats.reviewed(line_a), stats.false_alarms(line_a)) == (5, 3)
    everyone = store.review_stats(since=at(10))
    assert (everyone.reviewed(line_b), everyone.false_alarms(line_b)) == (1, 1), "b[1] was reviewed before since"


def test_decisions_and_runs_round_trip(store: Store, ns: str) -> None:
    scope = f"{ns}-line"
    checks = (Check("drift", True, "2 devices drifting", {"devices_drifting": 2, "psi": 0.31, "method": None}),
              Check("cooldown", False, "no run yet", {}))
    older = Decision(uuid.uuid4().hex, scope, timestamps.iso(at(1)), "hold", (), (), checks)
    newer = Decision(uuid.uuid4().hex, scope, timestamps.iso(at(2)), "fire", ("drift",), (), checks)
    store.record_decision(older)
    store.record_decision(newer)
    assert store.decisions(scope) == [newer, older]
    assert store.decisions(scope, limit=1) == [newer]
    assert store.decisions(scope, since=at(1.5)) == [newer]
    assert [d for d in store.decisions(since=at(0), limit=1000) if d.scope == scope] == [newer, older]

    run = Run(uuid.uuid4().hex, scope, timestamps.iso(at(2)), "requested", newer.decision_id, detail={"k": 1})
    store.put_run(run)
    finished = Run(run.run_id, scope, run.requested, "succeeded", run.decision_id, timestamps.iso(at(30)), "4")
    store.put_run(finished)
    assert store.runs(scope) == [finished], "a run is updated in place, by id"
    assert store.runs(scope, since=at(3)) == []


def test_counters_add_up_per_identity(store: Store, ns: str) -> None:
    identity = f"{ns}-cam"
    store.count(identity, {"drop.invalid_payload": 2, "drop.bad_topic": 1})
    store.count(identity, {"drop.invalid_payload": 3})
    assert store.counters()[identity] == {"drop.bad_topic": 1, "drop.invalid_payload": 5}
