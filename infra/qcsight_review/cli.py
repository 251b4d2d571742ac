"""`qcsight review`: serve the review web app, manage its local users, export labels and the audit log."""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from qcsight_cloud.store import StoreSettings, open_store
from qcsight_core.cli import EXIT_FAILED, EXIT_OK, configure_logging, parse_args
from qcsight_review import settings as cfg
from qcsight_review.errors import UserError
from qcsight_review.users import ROLES, UserStore

log = logging.getLogger(__name__)


def get_args_parser(prog: str) -> argparse.ArgumentParser:
    env = os.environ
    parser = argparse.ArgumentParser(
        prog=prog, description="The operators' review app: inbox, keyboard review, fleet dashboard, label export.",
        epilog="Locally: 'user add' creates a sign-in, 'serve' runs the app on the SQLite store. In AWS the "
               f"container runs 'serve' with ${cfg.ENV_AUTH}=alb-oidc behind the load balancer (infra/stacks).")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def store(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", default=cfg.store_from_environment(env),
                       help=f"alert store: sqlite:PATH or dynamodb:PREFIX (default ${cfg.ENV_STORE}, else the prefix "
                            f"of ${cfg.ENV_ALERTS_TABLE}, else {cfg.DEFAULT_STORE}); default now: %(default)s")
        p.add_argument("--images", default=cfg.images_from_environment(env),
                       help="full images: a folder, or s3://BUCKET (presigned URLs); default: "
                            f"s3://${cfg.ENV_IMAGES_BUCKET} when set, else thumbnails only")
        p.add_argument("--good-label", default="good", help="the class a false alarm is labelled with (default good)")
        p.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")

    def users(p: argparse.ArgumentParser) -> None:
        p.add_argument("--users", type=Path, default=Path(cfg.DEFAULT_USERS),
                       help="local users file (SQLite; default %(default)s)")

    serve = sub.add_parser("serve", help="run the web app", description="Serve the review app (uvicorn).")
    store(serve)
    users(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    serve.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    serve.add_argument("--auth", choices=cfg.AUTH_MODES, default=env.get(cfg.ENV_AUTH, cfg.LOCAL),
                       help=f"local (users file, password) or alb-oidc (the load balancer's signed header); "
                            f"default ${cfg.ENV_AUTH} or local")
    serve.add_argument("--base-url", default=None, help="the app's public URL, for links in notifications")
    serve.add_argument("--burst-max", type=int, default=0,
                       help="notify when a line has more than this many defect alerts within --burst-window "
                            "(0: off)")
    serve.add_argument("--burst-window", type=float, default=600.0, help="seconds (default %(default)s)")
    serve.add_argument("--webhook", default=None, help="POST burst notifications to this URL (JSON)")
    serve.add_argument("--topic-arn", default=env.get(cfg.ENV_ALERT_TOPIC),
                       help=f"publish burst notifications to this SNS topic (default ${cfg.ENV_ALERT_TOPIC})")

    user = sub.add_parser("user", help="manage local users (auth: local)")
    user_sub = user.add_subparsers(dest="user_action", metavar="USER_ACTION", required=True)
    add = user_sub.add_parser("add", help="add a user (the password is asked for, or read from $QCSIGHT_PASSWORD)")
    users(add)
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, required=True, help="operator: review; engineer: also the dashboard, "
                     "exports and users")
    add.add_argument("--replace", action="store_true", help="change an existing user's role and password")
    listing = user_sub.add_parser("list", help="list users and roles")
    users(listing)

    export = sub.add_parser("export", help="write reviewed alerts as a training manifest (qcsight train --data)",
                            description="One Ground Truth line per reviewed alert (image URI, class, reviewer, "
                                        "time); disputed alerts and alerts without a full image are left out.")
    store(export)
    export.add_argument("--output", "-o", type=Path, required=True, help="the manifest to write (.manifest)")
    export.add_argument("--line", help="only this line")
    export.add_argument("--since", help="only alerts reviewed from this time (ISO, UTC)")
    export.add_argument("--until", help="... up to this time")

    audit = sub.add_parser("audit", help="write every review as JSON lines (who, when, what, the previous label)")
    store(audit)
    audit.add_argument("--output", "-o", type=Path, required=True)
    return parser


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from qcsight_review.app import create_app
    from qcsight_review.auth import AlbOidcVerifier
    from qcsight_review.images import open_images
    from qcsight_review.notify import BurstWatcher, notifiers

    oidc = cfg.oidc_from_environment(os.environ) if args.auth == cfg.ALB_OIDC else None
    secret = cfg.load_secret(args.users, os.environ) if args.auth == cfg.LOCAL else b""
    burst = cfg.BurstSettings(max_alerts=args.burst_max, window_s=args.burst_window, webhook=args.webhook,
                              topic_arn=args.topic_arn) if args.burst_max > 0 else None
    settings = cfg.ReviewSettings(store=args.store, auth=args.auth, users=args.users, secret=secret,
                                  images=args.images, oidc=oidc, good_label=args.good_label,
                                  base_url=args.base_url or f"http://{args.host}:{args.port}", burst=burst)
    store = open_store(StoreSettings(settings.store))
    users = UserStore(settings.users) if settings.auth == cfg.LOCAL else None
    if users is not None and not users.list():
        log.warning("no users in %s: add one with 'qcsight review user add NAME --role engineer --users %s'",
                    settings.users, settings.users)
    verifier = AlbOidcVerifier(oidc) if oidc is not None else None
    app = create_app(settings, store, open_images(settings.images), users, verifier)
    watcher = BurstWatcher(store, burst, notifiers(burst), settings.base_url) if burst is not None else None
    if watcher is not None:
        watcher.start()
    log.info("review app on http://%s:%d (auth %s, store %s)", args.host, args.port, settings.auth, settings.store)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", proxy_headers=True,
                    forwarded_allow_ips="*" if settings.auth == cfg.ALB_OIDC else "127.0.0.1")
    finally:
        if watcher is not None:
            watcher.stop()
        store.close()
    return EXIT_OK


def run_user(args: argparse.Namespace) -> int:
    users = UserStore(args.users)
    try:
        if args.user_action == "list":
            for user in users.list():
                print(f"{user.name}\t{user.role}")
            return EXIT_OK
        password = os.environ.get("QCSIGHT_PASSWORD") or getpass.getpass(f"password for {args.name}: ")
        try:
            user = users.add(args.name, args.role, password, replace=args.replace)
        except UserError as exc:
            print(f"qcsight review user add: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(f"{user.name} ({user.role}) saved in {args.users}")
        return EXIT_OK
    finally:
        users.close()


def _time(text: str | None, name: str) -> datetime | None:
    from qcsight_review.app import parse_time

    return parse_time(text or "", f"export.{name}")


def run_export(args: argparse.Namespace) -> int:
    from qcsight_review.export import export_manifest, write_audit_log
    from qcsight_review.images import open_images

    store = open_store(StoreSettings(args.store, must_exist=True))
    tmp = args.output.with_name(args.output.name + ".partial")
    try:
        with tmp.open("w") as out:
            if args.action == "audit":
                count = write_audit_log(store.export_reviews(), out)
                summary_line = f"{count} reviews"
            else:
                summary = export_manifest(store, open_images(args.images), out, since=_time(args.since, "since"),
                                          until=_time(args.until, "until"), line=args.line,
                                          good_label=args.good_label)
                classes = ", ".join(f"{k}={v}" for k, v in sorted(summary.by_class.items()))
                summary_line = (f"{summary.written} labels ({classes}); left out: {len(summary.disputed)} disputed, "
                                f"{len(summary.no_image)} without a full image")
        tmp.replace(args.output)  # a crash never leaves a half manifest under the real name
    finally:
        store.close()
        tmp.unlink(missing_ok=True)
    print(f"{args.output}: {summary_line}")
    return EXIT_OK


def main(argv: Sequence[str], prog: str = "qcsight review") -> int:
    args = parse_args(get_args_parser(prog), argv)
    if isinstance(args, int):
        return args
    configure_logging(getattr(args, "verbose", 0))
    if args.action == "serve":
        return run_serve(args)
    if args.action == "user":
        return run_user(args)
    return run_export(args)
