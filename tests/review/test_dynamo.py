"""The review app on the DynamoDB store (moto server on loopback): the inbox, a review and the export."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from qcsight_review.app import create_app
from qcsight_review.images import FolderImages
from qcsight_review.settings import ReviewSettings
from qcsight_review.users import ENGINEER, UserStore
from tests.cloud.conftest import dynamo_session, dynamo_store, moto_endpoint  # noqa: F401  (fixtures)
from tests.review.conftest import PASSWORD, sign_in
from tests.review.seed import seed_line

pytestmark = pytest.mark.cloud


def test_review_and_export_on_dynamodb(dynamo_store: Any, tmp_path: Path) -> None:  # noqa: F811
    ns = uuid.uuid4().hex[:8]
    line = f"line-{ns}"
    seeded = seed_line(dynamo_store, tmp_path, count=6, line=line, things=(f"{ns}-cam-1", f"{ns}-cam-2"),
                       metrics=False)
    users = UserStore(tmp_path / "users.sqlite", rounds=4)
    users.add("eng", ENGINEER, PASSWORD)
    settings = ReviewSettings(store=f"dynamodb:{dynamo_store.prefix}", users=tmp_path / "users.sqlite",
                              secret=b"d" * 32, images=str(seeded.images))
    client = TestClient(create_app(settings, dynamo_store, FolderImages(seeded.images), users))
    token = sign_in(client, "eng")
    inbox = client.get(f"/inbox?line={line}").text
    assert all(f'data-alert="{a}"' in inbox for a in seeded.alert_ids)
    first, second = seeded.alert_ids[1], seeded.alert_ids[2]
    panel = client.post(f"/alerts/{first}/review", data={"action": "confirm", "expected_count": "0",
                                                          "csrf_token": token, "line": line, "reviewed": "no"})
    assert panel.status_code == 200 and f'data-alert="{second}"' in panel.text
    labels = [json.loads(row) for row in client.get(f"/export/labels?line={line}").text.splitlines()]
    assert [row["qcsight-review-metadata"]["alert-id"] for row in labels] == [first]
    users.close()
