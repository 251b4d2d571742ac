"""The review web app (Starlette + Jinja2; htmx and one small script, both served from the package).

Pages: the inbox (filters, keyset paging, bulk actions), the review page (keyboard-first, the next
alert swapped in without a reload), the fleet dashboard and exports (engineers), users (engineers,
local auth). Every route but /healthz, /login and /static answers only a signed-in user; every
POST needs the CSRF token of the page that made it.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from qcsight_cloud import timestamps
from qcsight_cloud.errors import NotFoundError, ReviewConflictError
from qcsight_cloud.fleet import FleetSettings, fleet_view, resolve
from qcsight_cloud.records import CONFIRM, FALSE_ALARM, RELABEL, UNDO, Alert, AlertSummary
from qcsight_cloud.store import InboxQuery, Store, encode_cursor, review_stack, sort_key
from qcsight_core.errors import ConfigError
from qcsight_review import charts
from qcsight_review.auth import (
    CSRF_COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    OIDC_HEADER,
    SESSION_COOKIE,
    AlbOidcVerifier,
    LoginLimiter,
    SessionCodec,
    csrf_matches,
)
from qcsight_review.errors import AuthError, UserError
from qcsight_review.export import export_manifest, write_audit_log
from qcsight_review.images import ImageSource, S3Images
from qcsight_review.settings import ALB_OIDC, ReviewSettings
from qcsight_review.users import ENGINEER, ROLES, User, UserStore

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
ACTIONS = (CONFIRM, FALSE_ALARM, RELABEL, UNDO)
BULK_ACTIONS = (CONFIRM, FALSE_ALARM)
MAX_BULK = 200
MAX_FORM_BYTES = 64 * 1024
_IMAGE_TYPES = {"jpeg": "image/jpeg", "jpg": "image/jpeg", "png": "image/png"}
_FILTERS = ("line", "thing", "label", "status", "score_min", "score_max", "since", "until", "model_version",
            "reviewed")


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Services:
    """What the handlers use, built once by ``create_app``."""

    settings: ReviewSettings
    store: Store
    images: ImageSource
    users: UserStore | None
    sessions: SessionCodec | None
    verifier: AlbOidcVerifier | None
    limiter: LoginLimiter
    templates: Environment
    lines: KnownLines


# ---------------------------------------------------------------- identity and CSRF


def current_user(request: Request) -> User | None:
    services: Services = request.app.state.services
    try:
        if services.verifier is not None:
            header = request.headers.get(OIDC_HEADER)
            return services.verifier.verify(header) if header else None
        value = request.cookies.get(SESSION_COOKIE)
        if not value or services.sessions is None:
            return None
        return services.sessions.read(value).user
    except AuthError as exc:
        log.info("refused %s %s from %s: %s", request.method, request.url.path,
                 request.client.host if request.client else "?", exc)
        return None


def expected_csrf(request: Request) -> str | None:
    """The token a form must echo: the session's (local users), else the CSRF cookie's (double submit)."""
    services: Services = request.app.state.services
    if services.sessions is not None and request.url.path != "/login":
        value = request.cookies.get(SESSION_COOKIE)
        if value:
            try:
                return services.sessions.read(value).csrf
            except AuthError:
                return None
    return request.cookies.get(CSRF_COOKIE)


async def read_form(request: Request) -> dict[str, list[str]]:
    """An urlencoded form body (no multipart: the app has no upload)."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise HttpError(413, f"form larger than {MAX_FORM_BYTES} bytes")
    form: dict[str, list[str]] = {}
    for key, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
        form.setdefault(key, []).append(value)
    return form


def first(form: Mapping[str, list[str]], key: str, default: str = "") -> str:
    values = form.get(key)
    return values[0] if values else default


def check_csrf(request: Request, form: Mapping[str, list[str]]) -> None:
    given = request.headers.get(CSRF_HEADER) or first(form, CSRF_FIELD)
    if not csrf_matches(expected_csrf(request), given):
        raise HttpError(403, "missing or wrong CSRF token: reload the page and try again")


Handler = Callable[[Request, User], Awaitable[Response]]


def signed_in(handler: Handler, *, role: str | None = None) -> Callable[[Request], Awaitable[Response]]:
    """Refuse a request without a verified identity (GET: to the login page; others: 401) or without the role."""

    async def endpoint(request: Request) -> Response:
        user = current_user(request)
        if user is None:
            if request.method == "GET" and request.app.state.services.sessions is not None:
                return RedirectResponse(f"/login?{urlencode({'next': request.url.path})}", status_code=303)
            return PlainTextResponse("sign in first", status_code=401)
        if role is not None and user.role != role:
            return PlainTextResponse(f"this page is for the {role} role", status_code=403)
        try:
            response = await handler(request, user)
        except HttpError as exc:
            return PlainTextResponse(exc.message, status_code=exc.status)
        except (ConfigError, UserError) as exc:
            return PlainTextResponse(str(exc), status_code=400)
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    return endpoint


def _secure(request: Request) -> bool:
    """Secure cookies behind the load balancer, and whenever the request came over HTTPS."""
    return bool(request.app.state.services.settings.secure_cookies or request.url.scheme == "https")


def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    services: Services = request.app.state.services
    token = expected_csrf(request)
    new_cookie = token is None
    if token is None:
        token = secrets.token_urlsafe(32)
    template = services.templates.get_template(name)
    html = template.render(csrf=token, settings=services.settings, request=request, **context)
    response = HTMLResponse(html, status_code=status)
    if new_cookie:
        response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="strict", secure=_secure(request), path="/")
    return response


# ---------------------------------------------------------------- filters


def _float(params: Mapping[str, str], name: str) -> float | None:
    text = params.get(name, "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"inbox.{name}", text, "a number") from None


def _time(params: Mapping[str, str], name: str) -> datetime | None:
    return parse_time(params.get(name, ""), f"inbox.{name}")


def parse_time(text: str, field: str) -> datetime | None:
    """A date or time from a form or flag (UTC unless it says otherwise); empty: None."""
    text = text.strip()
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(field, text, "a date or time like 2026-11-30T14:00 (UTC)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def filters_of(params: Mapping[str, str]) -> dict[str, str]:
    """The non-empty filter parameters of a request, as strings (for links and forms)."""
    return {name: params[name].strip() for name in _FILTERS if params.get(name, "").strip()}


def query_of(services: Services, filters: Mapping[str, str], *, limit: int, cursor: str | None = None,
             scan_budget: int | None = None) -> InboxQuery:
    line, thing = filters.get("line"), filters.get("thing")
    if line is None and thing is None:
        raise ConfigError("inbox.line", None, "a line or a device to list the alerts of")
    reviewed = {"yes": True, "no": False, "": None}.get(filters.get("reviewed", ""))
    if filters.get("reviewed", "") not in ("yes", "no", ""):
        raise ConfigError("inbox.reviewed", filters["reviewed"], "yes, no or empty")
    extra = {} if scan_budget is None else {"scan_budget": max(scan_budget, limit)}
    return InboxQuery(line=line, thing=thing, label=filters.get("label"), status=filters.get("status"),
                      score_min=_float(filters, "score_min"), score_max=_float(filters, "score_max"),
                      since=_time(filters, "since"), until=_time(filters, "until"),
                      model_version=filters.get("model_version"), reviewed=reviewed, limit=limit, cursor=cursor,
                      **extra)


class KnownLines:
    """The lines devices reported, re-read at most every ``ttl_s``: on DynamoDB listing devices is a Scan, which
    every inbox page would otherwise pay."""

    def __init__(self, store: Store, ttl_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.store, self.ttl_s, self.clock = store, ttl_s, clock
        self._lines: list[str] = []
        self._read_at: float | None = None
        self._lock = threading.Lock()

    def get(self) -> list[str]:
        with self._lock:
            now = self.clock()
            if self._read_at is None or now - self._read_at >= self.ttl_s or not self._lines:
                self._lines = sorted({device.line for device in self.store.devices()})
                self._read_at = now
            return list(self._lines)


def known_lines(services: Services) -> list[str]:
    return services.lines.get()


def default_filters(services: Services, params: Mapping[str, str]) -> dict[str, str]:
    filters = filters_of(params)
    if "line" not in filters and "thing" not in filters:
        lines = known_lines(services)
        if lines:
            filters["line"] = lines[0]
    return filters


# ---------------------------------------------------------------- inbox


async def inbox(request: Request, user: User) -> Response:
    services: Services = request.app.state.services
    params = dict(request.query_params)
    filters = default_filters(services, params)
    page = None
    if "line" in filters or "thing" in filters:
        page = services.store.inbox(query_of(services, filters, limit=services.settings.page_size,
                                             cursor=params.get("cursor") or None))
    context: dict[str, Any] = {"user": user, "filters": filters, "page": page, "lines": known_lines(services),
               "query": urlencode(filters), "done": params.get("done"), "skipped": params.get("skipped")}
    if request.headers.get("hx-request") == "true" and params.get("cursor"):
        return render(request, "rows.html", **context)
    return render(request, "inbox.html", **context)


async def bulk(request: Request, user: User) -> Response:
    services: Services = request.app.state.services
    form = await read_form(request)
    check_csrf(request, form)
    action = first(form, "action")
    if action not in BULK_ACTIONS:
        raise HttpError(400, f"bulk action {action!r}: one of {', '.join(BULK_ACTIONS)}")
    ids = form.get("ids", [])
    if not ids or len(ids) > MAX_BULK:
        raise HttpError(400, f"select 1 to {MAX_BULK} alerts (got {len(ids)})")
    label = services.settings.good_label if action == FALSE_ALARM else None
    done = skipped = 0
    for alert in services.store.get_alerts(ids):
        if alert.review.reviewed:
            skipped += 1  # bulk never overrides a verdict someone gave; open the alert to change it
            continue
        try:
            services.store.add_review(alert.message_id, user.name, action, label,
                                      expected_count=alert.review.count)
            done += 1
        except ReviewConflictError:
            skipped += 1
    filters = filters_of({k: first(form, k) for k in _FILTERS})
    return RedirectResponse(f"/inbox?{urlencode({**filters, 'done': done, 'skipped': skipped})}", status_code=303)


# ---------------------------------------------------------------- review


def classes_of(alert: AlertSummary, good_label: str) -> list[str]:
    """The classes an operator can relabel to (number keys 1..9): the model's classes but the good one."""
    return [name for name in sorted(alert.scores) if name != good_label][:9]


def next_alert(services: Services, filters: Mapping[str, str], after: AlertSummary | None) -> Alert | None:
    cursor = None if after is None else encode_cursor(sort_key(after.origin.time, after.message_id))
    page = services.store.inbox(query_of(services, filters, limit=1, cursor=cursor))
    while not page.items and page.cursor is not None:  # the scan budget ran out before a match: go on
        page = services.store.inbox(query_of(services, filters, limit=1, cursor=page.cursor))
    return services.store.get_alert(page.items[0].message_id) if page.items else None


def panel_context(services: Services, alert: Alert | None, filters: Mapping[str, str]) -> dict[str, Any]:
    if alert is None:
        return {"alert": None, "query": urlencode(filters)}
    reviews = services.store.reviews(alert.message_id)
    history = services.store.inbox(InboxQuery(thing=alert.origin.thing, reviewed=True, limit=8, scan_budget=400))
    scores = sorted(alert.scores.items(), key=lambda item: -item[1])
    located = services.images.locate(alert.image_ref) if alert.image_ref else None
    return {"alert": alert, "reviews": reviews, "in_effect": {r.n for r in review_stack(reviews)},
            "history": [a for a in history.items if a.message_id != alert.message_id], "scores": scores,
            "classes": classes_of(alert, services.settings.good_label), "has_image": located is not None,
            "query": urlencode(filters)}


async def review_page(request: Request, user: User) -> Response:
    services: Services = request.app.state.services
    filters = default_filters(services, dict(request.query_params))
    filters.setdefault("reviewed", "no")
    alert_id = request.path_params.get("alert_id")
    if alert_id is not None:
        alert = services.store.get_alert(alert_id)
        if alert is None:
            raise HttpError(404, f"no alert {alert_id}")
    elif "line" in filters or "thing" in filters:
        alert = next_alert(services, filters, None)
    else:
        alert = None
    return render(request, "review.html", user=user, filters=filters, **panel_context(services, alert, filters))


async def review_panel(request: Request, user: User) -> Response:
    """The panel of the next alert after ``after`` (skip), as a fragment for the review page's script."""
    services: Services = request.app.state.services
    params = dict(request.query_params)
    filters = default_filters(services, params)
    after = services.store.get_alert(params["after"]) if params.get("after") else None
    return render(request, "panel.html", user=user, **panel_context(services, next_alert(services, filters, after),
                                                                    filters))


async def review_action(request: Request, user: User) -> Response:
    """Append one review; answer with the panel of the next alert (an undo answers with the alert again)."""
    services: Services = request.app.state.services
    form = await read_form(request)
    check_csrf(request, form)
    alert_id = request.path_params["alert_id"]
    # "new_label", not "label": the form also carries the inbox filters, and "label" is the class filter.
    action, label = first(form, "action"), first(form, "new_label") or None
    if action not in ACTIONS:
        raise HttpError(400, f"action {action!r}: one of {', '.join(ACTIONS)}")
    if action == FALSE_ALARM:
        label = services.settings.good_label
    expected = first(form, "expected_count")
    try:
        services.store.add_review(alert_id, user.name, action, label,
                                  expected_count=int(expected) if expected.isdigit() else None)
    except NotFoundError as exc:
        raise HttpError(404, str(exc)) from exc
    except ReviewConflictError as exc:
        raise HttpError(409, f"{exc}") from exc
    filters = default_filters(services, {k: first(form, k) for k in _FILTERS})
    alert = services.store.get_alert(alert_id)
    if action != UNDO:
        alert = next_alert(services, filters, alert)
    response = render(request, "panel.html", user=user, **panel_context(services, alert, filters))
    return response


# ---------------------------------------------------------------- images


async def _stored_image(request: Request, kind: str) -> Response:
    services: Services = request.app.state.services
    alert = services.store.get_alert(request.path_params["alert_id"])
    picture = None if alert is None else (alert.thumbnail if kind == "thumbnail" else alert.overlay)
    if not picture:
        raise HttpError(404, f"no {kind}")
    try:
        data = base64.b64decode(str(picture.get("data", "")), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HttpError(404, f"the {kind} is not valid base64") from exc
    media = _IMAGE_TYPES.get(str(picture.get("format", "")).lower(), "application/octet-stream")
    return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=3600"})


async def thumbnail(request: Request, user: User) -> Response:
    return await _stored_image(request, "thumbnail")


async def overlay(request: Request, user: User) -> Response:
    return await _stored_image(request, "overlay")


async def full_image(request: Request, user: User) -> Response:
    services: Services = request.app.state.services
    alert = services.store.get_alert(request.path_params["alert_id"])
    located = services.images.locate(alert.image_ref) if alert is not None and alert.image_ref else None
    if located is None:
        raise HttpError(404, "the full image is not uploaded (yet)")
    if located.path is not None:
        return FileResponse(located.path, headers={"Cache-Control": "private, max-age=3600"})
    return RedirectResponse(str(located.url), status_code=303)


# ---------------------------------------------------------------- fleet dashboard


PERIODS = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7)}


def _epoch(text: str) -> float:
    return timestamps.parse(text).timestamp()


def line_charts(services: Services, line: str, since: datetime, now: datetime) -> dict[str, Any]:
    windows = services.store.windows(since=since, until=now, line=line, limit=20_000)
    by_thing: dict[str, list[Any]] = {}
    for window in windows:
        by_thing.setdefault(window.origin.thing, []).append(window)
    timeline: list[tuple[str, str, str]] = []  # (time, thing, version) where a device's model changed
    marks: dict[float, str] = {}
    for thing, rows in sorted(by_thing.items()):
        previous = None
        for window in rows:
            if window.model_version != previous:
                timeline.append((window.end, thing, window.model_version))
                marks[_epoch(window.end)] = f"v{window.model_version}"
                previous = window.model_version

    def series(value: Callable[[Any], float | None]) -> list[charts.Series]:
        result = []
        for thing, rows in sorted(by_thing.items()):
            points = [(_epoch(w.end), v) for w in rows if (v := value(w)) is not None]
            result.append(charts.Series(thing, points))
        return result

    psi = [charts.Series(f"{s.name} conf", s.points) for s in series(lambda w: w.confidence_psi)] + \
          [charts.Series(f"{s.name} bright", s.points) for s in series(lambda w: w.brightness_psi)]
    return {
        "defect_rate": charts.line_chart(f"{line}: defect rate", series(lambda w: w.defect_rate), y_label="rate",
                                         marks=marks),
        "psi": charts.line_chart(f"{line}: drift (PSI)", psi, y_label="PSI", marks=marks),
        "latency": charts.line_chart(f"{line}: latency p95", series(lambda w: w.latency_p95), y_label="ms",
                                     marks=marks),
        "false_alarms": charts.line_chart(f"{line}: false-alarm rate of reviews",
                                          false_alarm_series(services, line, since), y_label="rate"),
        "timeline": sorted(timeline),
    }


def false_alarm_series(services: Services, line: str, since: datetime) -> list[charts.Series]:
    """The false-alarm rate of reviews per hour (each alert counted with its verdict at that review)."""
    buckets: dict[float, list[int]] = {}
    for review in services.store.export_reviews(since):
        if review.line != line or review.verdict is None:
            continue
        hour = _epoch(review.time) // 3600 * 3600
        counts = buckets.setdefault(hour, [0, 0])
        counts[0] += 1
        counts[1] += review.verdict == FALSE_ALARM
    return [charts.Series("all classes", [(h + 1800, c[1] / c[0]) for h, c in sorted(buckets.items())])]


async def fleet(request: Request, user: User) -> Response:
    services: Services = request.app.state.services
    period_name = request.query_params.get("period", "24h")
    period = PERIODS.get(period_name)
    if period is None:
        raise HttpError(400, f"period {period_name!r}: one of {', '.join(PERIODS)}")
    now = timestamps.now()
    view = fleet_view(services.store, resolve(FleetSettings()), now=now, period=period)
    stats = services.store.review_stats(now - period)
    plots = {row.line: line_charts(services, row.line, now - period, now) for row in view.lines}
    return render(request, "fleet.html", user=user, view=view, stats=stats, plots=plots, period=period_name,
                  periods=list(PERIODS))


# ---------------------------------------------------------------- exports and users


async def export_labels(request: Request, user: User) -> Response:
    services: Services = request.app.state.services
    params = dict(request.query_params)
    buffer = io.StringIO()
    summary = export_manifest(services.store, services.images, buffer, since=_time(params, "since"),
                              until=_time(params, "until"), line=params.get("line") or None,
                              good_label=services.settings.good_label)
    log.info("%s exported %d labels (%d disputed, %d without image)", user.name, summary.written,
             len(summary.disputed), len(summary.no_image))
    return Response(buffer.getvalue(), media_type="application/x-ndjson", headers={
        "Content-Disposition": 'attachment; filename="qcsight-review.manifest"',
        "X-Qcsight-Written": str(summary.written), "X-Qcsight-Disputed": str(len(summary.disputed)),
        "X-Qcsight-No-Image": str(len(summary.no_image))})


async def export_audit(request: Request, user: User) -> Response:
    services: Services = request.app.state.services
    params = dict(request.query_params)

    def lines() -> Any:
        for review in services.store.export_reviews(_time(params, "since"), _time(params, "until")):
            buffer = io.StringIO()
            write_audit_log([review], buffer)
            yield buffer.getvalue()

    return StreamingResponse(lines(), media_type="application/x-ndjson",
                             headers={"Content-Disposition": 'attachment; filename="qcsight-review-audit.jsonl"'})


async def export_page(request: Request, user: User) -> Response:
    return render(request, "export.html", user=user, lines=known_lines(request.app.state.services))


async def users_page(request: Request, user: User) -> Response:
    services: Services = request.app.state.services
    if services.users is None:
        raise HttpError(404, "users are managed in Cognito when the app runs behind the load balancer")
    message = None
    if request.method == "POST":
        form = await read_form(request)
        check_csrf(request, form)
        added = services.users.add(first(form, "name"), first(form, "role"), first(form, "password"),
                                   replace=first(form, "replace") == "yes")
        log.info("%s added user %s (%s)", user.name, added.name, added.role)
        message = f"user {added.name} ({added.role}) saved"
    return render(request, "users.html", user=user, users=services.users.list(), roles=ROLES, message=message)


# ---------------------------------------------------------------- login


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def login_page(request: Request) -> Response:
    services: Services = request.app.state.services
    if services.sessions is None:
        return RedirectResponse("/inbox", status_code=303)
    return render(request, "login.html", error=None, next=_safe_next(request.query_params.get("next")))


def _safe_next(target: str | None) -> str:
    """Only a path of this app (never //host or a scheme): the login page must not redirect elsewhere."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/inbox"


async def login(request: Request) -> Response:
    services: Services = request.app.state.services
    if services.sessions is None or services.users is None:
        return PlainTextResponse("sign in through the load balancer", status_code=404)
    try:
        form = await read_form(request)
        check_csrf(request, form)
    except HttpError as exc:
        return PlainTextResponse(exc.message, status_code=exc.status)
    name, password = first(form, "name").strip(), first(form, "password")
    keys = (f"user:{name.lower()}", f"ip:{_client(request)}")
    wait = services.limiter.retry_after(*keys)
    if wait > 0:
        return render(request, "login.html", status=429, error=f"too many failed sign-ins: try again in "
                      f"{int(wait) + 1} s", next=_safe_next(first(form, "next")))
    user = services.users.verify(name, password)
    if user is None:
        services.limiter.failed(*keys)
        log.info("failed sign-in for %r from %s", name, _client(request))
        return render(request, "login.html", status=401, error="wrong user name or password",
                      next=_safe_next(first(form, "next")))
    services.limiter.succeeded(keys[0])
    value, _ = services.sessions.issue(user)
    response = RedirectResponse(_safe_next(first(form, "next")), status_code=303)
    response.set_cookie(SESSION_COOKIE, value, max_age=services.settings.session_hours * 3600, httponly=True,
                        samesite="strict", secure=_secure(request), path="/")
    log.info("%s signed in from %s", user.name, _client(request))
    return response


async def logout(request: Request, user: User) -> Response:
    form = await read_form(request)
    check_csrf(request, form)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    response.delete_cookie(CSRF_COOKIE, path="/")
    return response


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


async def home(request: Request, user: User) -> Response:
    return RedirectResponse("/inbox", status_code=303)


# ---------------------------------------------------------------- security headers


def content_security_policy(images: ImageSource) -> str:
    img = "'self' https://*.amazonaws.com" if isinstance(images, S3Images) else "'self'"
    return ("default-src 'self'; script-src 'self'; style-src 'self'; img-src " + img + "; connect-src 'self'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")


class SecurityHeaders:
    """Adds the security headers to every response (pure ASGI: streaming responses pass through)."""

    def __init__(self, app: Any, csp: str, hsts: bool) -> None:
        self.app = app
        self.headers = [(b"content-security-policy", csp.encode()), (b"x-content-type-options", b"nosniff"),
                        (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"),
                        (b"cross-origin-opener-policy", b"same-origin")]
        if hsts:
            self.headers.append((b"strict-transport-security", b"max-age=31536000"))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + self.headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


# ---------------------------------------------------------------- the app


def routes() -> list[Route | Mount]:
    """Every route; tests/review checks that each one but the public ones refuses a signed-out request."""
    engineer = {"role": ENGINEER}
    return [
        Route("/healthz", healthz),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", signed_in(logout), methods=["POST"]),
        Route("/", signed_in(home)),
        Route("/inbox", signed_in(inbox)),
        Route("/alerts/bulk", signed_in(bulk), methods=["POST"]),
        Route("/review", signed_in(review_page)),
        Route("/review/panel", signed_in(review_panel)),
        Route("/alerts/{alert_id}", signed_in(review_page)),
        Route("/alerts/{alert_id}/review", signed_in(review_action), methods=["POST"]),
        Route("/alerts/{alert_id}/thumbnail", signed_in(thumbnail)),
        Route("/alerts/{alert_id}/overlay", signed_in(overlay)),
        Route("/alerts/{alert_id}/image", signed_in(full_image)),
        Route("/fleet", signed_in(fleet, **engineer)),
        Route("/export", signed_in(export_page, **engineer)),
        Route("/export/labels", signed_in(export_labels, **engineer)),
        Route("/export/audit", signed_in(export_audit, **engineer)),
        Route("/users", signed_in(users_page, **engineer), methods=["GET", "POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]


def templates() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.1f} %"
    env.filters["num"] = lambda v, d=3: "–" if v is None else f"{v:.{d}g}"
    return env


def create_app(settings: ReviewSettings, store: Store, images: ImageSource, users: UserStore | None = None,
               verifier: AlbOidcVerifier | None = None, limiter: LoginLimiter | None = None) -> Any:
    """The ASGI app; every collaborator injected (the CLI opens them, tests pass their own)."""
    if settings.auth == ALB_OIDC and verifier is None:
        raise ConfigError("review.auth", settings.auth, "alb-oidc needs a verifier of the load balancer's header")
    sessions = None if settings.auth == ALB_OIDC else SessionCodec(settings.secret, settings.session_hours * 3600)
    if sessions is not None and users is None:
        raise ConfigError("review.users", None, "a users file for local auth")
    services = Services(settings, store, images, users if sessions is not None else None, sessions,
                        verifier if settings.auth == ALB_OIDC else None, limiter or LoginLimiter(), templates(),
                        KnownLines(store))
    app = Starlette(routes=routes())
    app.state.services = services
    return SecurityHeaders(app, content_security_policy(images), hsts=settings.secure_cookies)
