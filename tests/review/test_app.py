"""The review app over HTTP (Starlette's TestClient): sign-in, refusals, CSRF, roles, headers, reviews, overlay."""

from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from qcsight_cloud.records import CONFIRM, FALSE_ALARM, RELABEL, UNDO
from qcsight_review.app import routes
from tests.review.conftest import PASSWORD, Env, sign_in
from tests.review.seed import LINE, csrf_of

PUBLIC = {"/healthz", "/login"}


def _every_route(alert_id: str) -> list[tuple[str, str]]:
    result = []
    for route in routes():
        if isinstance(route, Mount):
            continue
        assert isinstance(route, Route)
        if route.path in PUBLIC:
            continue
        for method in sorted(route.methods or {"GET"}):
            if method != "HEAD":
                result.append((method, route.path.replace("{alert_id}", alert_id)))
    return result


def test_a_signed_out_request_to_every_route_is_refused(env: Env) -> None:
    alert_id = env.seeded.anomaly_id
    client = TestClient(env.app)
    checked = _every_route(alert_id)
    assert len(checked) >= 15, checked
    for method, path in checked:
        response = client.request(method, path, follow_redirects=False)
        if method == "GET":
            assert response.status_code == 303 and response.headers["location"].startswith("/login"), (method, path)
        else:
            assert response.status_code == 401, (method, path, response.status_code)
        assert alert_id not in response.text and b"\xff\xd8" not in response.content, (method, path)
    assert env.store.reviews(alert_id) == []
    # A forged session cookie is no better than none.
    client.cookies.set("qcsight_session", "eyJ1IjoiZW5nIiwiciI6ImVuZ2luZWVyIiwiYyI6IngifQ.forged.sig")
    assert client.get("/fleet", follow_redirects=False).status_code == 303


def test_public_routes_and_static_need_no_sign_in(env: Env) -> None:
    client = TestClient(env.app)
    assert client.get("/healthz").text == "ok"
    assert client.get("/login").status_code == 200
    assert client.get("/static/review.js").status_code == 200


def test_security_headers_and_cookie_flags(env: Env) -> None:
    client = TestClient(env.app)
    page = client.get("/login")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy and "unsafe-inline" not in policy
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in page.text and " style=" not in page.text and " on" + "click=" not in page.text
    response = client.post("/login", data={"name": "ana", "password": PASSWORD, "csrf_token": csrf_of(page.text)},
                           follow_redirects=False)
    cookie = response.headers["set-cookie"]
    assert "qcsight_session=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict",
                                                                                                         "strict")
    inbox = client.get("/inbox")
    assert inbox.headers["cache-control"] == "no-store"


def test_wrong_password_is_refused_and_sign_in_is_rate_limited(env: Env) -> None:
    client = TestClient(env.app)
    token = csrf_of(client.get("/login").text)
    for _ in range(3):
        response = client.post("/login", data={"name": "ana", "password": "wrong password!", "csrf_token": token})
        assert response.status_code == 401
    # The limiter (3 attempts in the fixture) now refuses even the right password, and says for how long.
    response = client.post("/login", data={"name": "ana", "password": PASSWORD, "csrf_token": token},
                           follow_redirects=False)
    assert response.status_code == 429 and "try again in" in response.text
    assert "qcsight_session" not in response.headers.get("set-cookie", "")
    # Another user from elsewhere is not locked out by ana's failures... but this client's address is.
    other = TestClient(env.app, client=("10.0.0.9", 5000))
    sign_in(other, "eng")


def test_a_form_without_its_csrf_token_is_refused(env: Env) -> None:
    client = TestClient(env.app)
    token = sign_in(client, "eng")
    alert_id = env.seeded.alert_ids[0]
    posts = [(f"/alerts/{alert_id}/review", {"action": CONFIRM}),
             ("/alerts/bulk", {"action": CONFIRM, "ids": alert_id}),
             ("/users", {"name": "mallory", "role": "engineer", "password": "0123456789ab"}), ("/logout", {})]
    for path, form in posts:
        assert client.post(path, data=form, follow_redirects=False).status_code == 403, path
        assert client.post(path, data={**form, "csrf_token": "x" + token}, follow_redirects=False).status_code == 403
    assert env.store.reviews(alert_id) == [] and env.users.get("mallory") is None
    # Another session's token is refused too (tokens are bound to the session).
    other = TestClient(env.app)
    other_token = sign_in(other, "ana")
    assert client.post(posts[0][0], data={**posts[0][1], "csrf_token": other_token}).status_code == 403
    # A sign-in form without its token is refused before the password is even checked.
    fresh = TestClient(env.app)
    fresh.get("/login")
    assert fresh.post("/login", data={"name": "ana", "password": PASSWORD}, follow_redirects=False).status_code == 403
    # With the token, the same form works.
    assert client.post(posts[0][0], data={**posts[0][1], "csrf_token": token}).status_code == 200
    assert [r.action for r in env.store.reviews(alert_id)] == [CONFIRM]


def test_operators_review_but_only_engineers_see_the_fleet_exports_and_users(env: Env) -> None:
    client = TestClient(env.app)
    sign_in(client, "ana")
    for path in ("/fleet", "/export", "/export/labels", "/export/audit", "/users"):
        assert client.get(path).status_code == 403, path
    assert client.get("/inbox").status_code == 200 and client.get("/review").status_code == 200
    engineer = TestClient(env.app)
    sign_in(engineer, "eng")
    for path in ("/fleet", "/export", "/export/labels", "/export/audit", "/users"):
        assert engineer.get(path).status_code == 200, path


def test_reviews_are_appended_with_the_label_before_and_the_audit_log_shows_them(env: Env) -> None:
    client = TestClient(env.app)
    token = sign_in(client, "ana")
    alert_id = env.seeded.alert_ids[1]
    query = {"line": LINE, "reviewed": "no"}

    def act(action: str, label: str = "", count: int | None = None) -> str:
        form = {**query, "action": action, "new_label": label, "csrf_token": token}
        if count is not None:
            form["expected_count"] = str(count)
        response = client.post(f"/alerts/{alert_id}/review", data=form)
        assert response.status_code == 200, response.text
        return response.text

    after_confirm = act(CONFIRM, count=0)
    assert f'data-alert="{alert_id}"' not in after_confirm, "the answer is the next alert's panel"
    relabelled = act(RELABEL, "spot", count=1)
    assert "label=spot" not in relabelled, "the new label is not taken for the class filter of the next alert"
    assert client.post(f"/alerts/{alert_id}/review", data={"action": CONFIRM, "expected_count": "1",
                                                            "csrf_token": token}).status_code == 409
    act(UNDO)
    reviews = env.store.reviews(alert_id)
    assert [(r.action, r.label, r.previous_label, r.reviewer) for r in reviews] == [
        (CONFIRM, env.seeded.predicted[alert_id], None, "ana"),
        (RELABEL, "spot", env.seeded.predicted[alert_id], "ana"),
        (UNDO, env.seeded.predicted[alert_id], "spot", "ana")]
    alert = env.store.get_alert(alert_id)
    assert alert is not None and alert.review.label == env.seeded.predicted[alert_id]
    engineer = TestClient(env.app)
    sign_in(engineer, "eng")
    audit = [json.loads(line) for line in engineer.get("/export/audit").text.splitlines()]
    assert [(r["alert_id"], r["n"], r["action"]) for r in audit] == [(alert_id, 1, CONFIRM), (alert_id, 2, RELABEL),
                                                                     (alert_id, 3, UNDO)]


def test_the_review_page_shows_the_anomaly_overlay_and_box(env: Env) -> None:
    client = TestClient(env.app)
    sign_in(client, "ana")
    page = client.get(f"/alerts/{env.seeded.anomaly_id}").text
    assert f'src="/alerts/{env.seeded.anomaly_id}/overlay"' in page
    assert 'x="0.25" y="0.25" width="0.5" height="0.25"' in page
    overlay = client.get(f"/alerts/{env.seeded.anomaly_id}/overlay")
    assert overlay.headers["content-type"] == "image/png" and overlay.content.startswith(b"\x89PNG")
    plain = client.get(f"/alerts/{env.seeded.alert_ids[3]}").text
    assert "/overlay" not in plain and "<rect" not in plain
    # The full image is served from the folder; the page prefers it to the thumbnail.
    assert f'/alerts/{env.seeded.alert_ids[3]}/image"' in plain
    assert client.get(f"/alerts/{env.seeded.alert_ids[3]}/image").content.startswith(b"\x89PNG")


def test_inbox_filters_and_pages_newest_first(env: Env) -> None:
    client = TestClient(env.app)
    sign_in(client, "ana")
    ids = env.seeded.alert_ids
    first = client.get("/inbox?" + urlencode({"line": LINE})).text
    assert first.index(ids[0]) < first.index(ids[9]) and ids[10] not in first
    cursor = first.split("cursor=")[1].split('"')[0]
    older = client.get(f"/inbox?line={LINE}&cursor={cursor}", headers={"HX-Request": "true"}).text
    assert "<html" not in older and ids[10] in older and ids[0] not in older
    spots = client.get("/inbox?" + urlencode({"line": LINE, "label": "spot"})).text
    listed = [i for i in ids if f'data-alert="{i}"' in spots]
    assert listed and all(env.seeded.predicted[i] == "spot" for i in listed)
    assert client.get("/inbox?" + urlencode({"line": LINE, "score_min": "abc"})).status_code == 400


def test_bulk_actions_review_the_selection_but_never_override_a_verdict(env: Env) -> None:
    client = TestClient(env.app)
    token = sign_in(client, "ana")
    chosen = list(env.seeded.alert_ids[2:5])
    env.store.add_review(chosen[0], "bob", CONFIRM)
    response = client.post("/alerts/bulk", data={"action": FALSE_ALARM, "ids": chosen, "csrf_token": token,
                                                 "line": LINE}, follow_redirects=False)
    assert response.status_code == 303 and "done=2" in response.headers["location"]
    assert [r.reviewer for r in env.store.reviews(chosen[0])] == ["bob"]
    for alert_id in chosen[1:]:
        alert = env.store.get_alert(alert_id)
        assert alert is not None and alert.review.verdict == "false_alarm" and alert.review.label == "good"


@pytest.mark.parametrize("period", ["1h", "24h"])
def test_fleet_dashboard_draws_its_plots(env: Env, period: str) -> None:
    client = TestClient(env.app)
    sign_in(client, "eng")
    env.store.add_review(env.seeded.alert_ids[0], "ana", FALSE_ALARM, "good")
    page = client.get(f"/fleet?period={period}").text
    for title in ("defect rate", "drift (PSI)", "latency p95", "false-alarm rate of reviews"):
        assert f"{LINE}: {title}" in page
    assert page.count("<polyline") >= (4 if period == "24h" else 1)
    if period == "24h":
        assert "v4" in page, "the model change is marked on the plots"
