"""Review app fixtures: a seeded SQLite store, local users, the app, and a signed-in test client."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qcsight_cloud.sqlite_store import SqliteStore
from qcsight_review.app import create_app
from qcsight_review.auth import LoginLimiter
from qcsight_review.images import FolderImages
from qcsight_review.settings import ReviewSettings
from qcsight_review.users import ENGINEER, OPERATOR, UserStore
from tests.review.seed import Seeded, csrf_of, seed_line

PASSWORD = "correct horse battery"


@dataclass
class Env:
    store: SqliteStore
    users: UserStore
    seeded: Seeded
    settings: ReviewSettings
    app: Any


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    store = SqliteStore(tmp_path / "cloud.sqlite")
    users = UserStore(tmp_path / "users.sqlite", rounds=4)  # the lowest cost bcrypt takes: tests stay fast
    users.add("ana", OPERATOR, PASSWORD)
    users.add("eng", ENGINEER, PASSWORD)
    seeded = seed_line(store, tmp_path)
    settings = ReviewSettings(store="sqlite:" + str(tmp_path / "cloud.sqlite"), users=tmp_path / "users.sqlite",
                              secret=b"s" * 32, images=str(seeded.images), page_size=10)
    app = create_app(settings, store, FolderImages(seeded.images), users, limiter=LoginLimiter(attempts=3))
    yield Env(store, users, seeded, settings, app)
    users.close()
    store.close()


def sign_in(client: Any, name: str, password: str = PASSWORD) -> str:
    """Sign in through the login form; returns the CSRF token of the session."""
    page = client.get("/login")
    response = client.post("/login", data={"name": name, "password": password, "csrf_token": csrf_of(page.text)},
                           follow_redirects=False)
    assert response.status_code == 303, response.text
    return csrf_of(client.get("/inbox").text)
