"""Alert images to the cloud through the real agent: hot-folder parts, the tiny model, the upload queue, S3 in moto
with IAM authentication (signatures and policies checked), credentials from the IoT credentials provider or the
Greengrass Token Exchange Service stand-ins; and the real `qcsight agent` process killed -9 mid-upload.

Each alert's ``image_ref`` must name an object that exists once the upload finished, holding exactly the
JPEG whose sha256 the alert carries; nothing secret in a log line or a stored message.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

from qcsight_edge.agent import Agent, build_parts
from qcsight_edge.clock import ManualClock
from qcsight_edge.config import AgentConfig
from tests.edge.agent_helpers import AgentProcess, agent_config, outbox_messages, write_atomically
from tests.edge.aws_peers import (
    BUCKET,
    REGION,
    CredentialsIssuer,
    IotCredentialsServer,
    MotoAws,
    ThrottledProxy,
    TokenExchangeServer,
    moto_with_iam,
)
from tests.edge.broker import Pki, free_port
from tests.helpers.aws import moto_server
from tests.helpers.images import write_image
from tests.helpers.models import make_tiny_bundle
from tests.helpers.wait import eventually

THING = "line1-cam1"
ALIAS = "qcsight-images"


@pytest.fixture(scope="module")
def aws() -> Iterator[MotoAws]:
    with moto_server() as url, moto_with_iam(url, THING) as aws:
        yield aws


def iot_credentials(pki: Pki, server: IotCredentialsServer) -> dict[str, Any]:
    ident = pki.identity(THING)
    return {"kind": "iot", "endpoint": "localhost", "port": server.port, "role_alias": ALIAS,
            "cert": str(ident.cert), "key": str(ident.key), "ca": str(pki.ca)}


def s3_upload(endpoint: str, credentials: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"kind": "s3", "bucket": BUCKET, "region": REGION, "endpoint": endpoint, "credentials": credentials,
            "retry_initial_s": 0.05, "retry_max_s": 0.5, "timeout_s": 10, **extra}


class InProcessAgent:
    """build_parts + Agent on a ManualClock, as `qcsight agent` wires them."""

    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        make_tiny_bundle(tmp_path / "bundle")
        self.config = AgentConfig.from_dict(agent_config(tmp_path, tmp_path / "bundle", **overrides))
        self.parts = build_parts(self.config)
        self.clock = ManualClock()
        self.agent = Agent(self.config, self.parts, clock=self.clock)
        self.inbox = Path(str(self.config.source.uri))

    def drop(self, *names: str, size: tuple[int, int] = (60, 80)) -> None:
        for index, name in enumerate(names):
            write_atomically(self.inbox / name, 240, size=size, seed=index)  # bright: a defect to the tiny model

    def uploads(self) -> dict[str, Any]:
        assert self.parts.uploader is not None
        return self.parts.uploader.stats()

    def alerts(self) -> list[dict[str, Any]]:
        return outbox_messages(self.config.outbox.path, "alerts")


def check_images_arrived(aws: MotoAws, alerts: list[dict[str, Any]], day: str) -> None:
    """Every alert's image_ref names an object in the bucket, under its thing, day and alert id, holding the JPEG
    whose sha256 the alert carries."""
    objects = aws.objects()
    for alert in alerts:
        key = f"images/{THING}/{day}/{alert['alert_id']}.jpg"
        assert alert["image_ref"] == f"s3://{BUCKET}/{key}", alert["image_ref"]
        assert key in objects, (key, sorted(objects))
        assert hashlib.sha256(objects[key]).hexdigest() == alert["image_sha256"]
        picture = cv2.imdecode(np.frombuffer(objects[key], np.uint8), cv2.IMREAD_COLOR)
        assert picture is not None and picture.mean() > 200  # the bright part, whole


def test_alert_images_reach_s3_where_the_alerts_say_and_an_expired_session_is_replaced(
        tmp_path: Path, aws: MotoAws, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    issuer = CredentialsIssuer(aws)
    with IotCredentialsServer(pki, issuer, ALIAS) as iot, caplog.at_level(logging.DEBUG):
        run = InProcessAgent(tmp_path, image_upload=s3_upload(aws.url, iot_credentials(pki, iot)))
        run.agent.start()
        try:
            run.drop("p1.png", "p2.png", "p3.png")
            eventually(lambda: run.uploads()["uploaded"] == 3, 20.0, message=lambda: str(run.uploads()))
            issuer.expire_all()  # the session ends early: S3 refuses it, the agent fetches new credentials
            run.drop("p4.png")
            eventually(lambda: run.uploads()["uploaded"] == 4, 20.0, message=lambda: str(run.uploads()))
        finally:
            run.agent.stop()
    alerts = run.alerts()
    assert sorted(a["source"] for a in alerts) == ["p1.png", "p2.png", "p3.png", "p4.png"]
    check_images_arrived(aws, alerts, "2023-11-14")  # the ManualClock's day
    assert len(iot.requests) == 2
    stop = [m for m in outbox_messages(run.config.outbox.path, "status") if m["event"] == "stop"][-1]
    uploads = stop["detail"]["uploads"]
    assert (uploads["backlog"], uploads["uploaded"], uploads["evicted"], uploads["dead_letters"]) == (0, 4, 0, 0)
    assert uploads["credentials"]["source"] == "iot" and uploads["credentials"]["expires"]
    # No secret anywhere the agent writes text: its log lines (not moto's and botocore's, on the test's side),
    # stored messages.
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("qcsight"))
    assert "AWS credentials from iot" in logged
    stored = run.config.outbox.path.read_bytes()
    for secret in issuer.secrets():
        assert secret not in logged and secret.encode() not in stored


def test_under_greengrass_credentials_come_from_the_token_exchange_service(
        tmp_path: Path, aws: MotoAws, monkeypatch: pytest.MonkeyPatch) -> None:
    issuer = CredentialsIssuer(aws)
    with TokenExchangeServer(issuer, token="component-token") as tes:
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", tes.uri)
        monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "component-token")
        run = InProcessAgent(tmp_path, image_upload=s3_upload(aws.url, {"kind": "auto"}, prefix="plant-7/"))
        run.agent.start()
        try:
            run.drop("p1.png")
            eventually(lambda: run.uploads()["uploaded"] == 1, 20.0, message=lambda: str(run.uploads()))
        finally:
            run.agent.stop()
    (alert,) = run.alerts()
    assert alert["image_ref"] == f"s3://{BUCKET}/plant-7/images/{THING}/2023-11-14/{alert['alert_id']}.jpg"
    body = aws.objects()[alert["image_ref"].removeprefix(f"s3://{BUCKET}/")]
    assert hashlib.sha256(body).hexdigest() == alert["image_sha256"]
    assert [r["authorized"] for r in tes.requests] == [True]
    stop = [m for m in outbox_messages(run.config.outbox.path, "status") if m["event"] == "stop"][-1]
    assert stop["detail"]["uploads"]["credentials"]["source"] == "greengrass"


def test_a_full_backlog_evicts_the_oldest_images_counts_them_and_names_them_in_status(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-used")
    nobody = f"http://127.0.0.1:{free_port()}"  # the link is down for the whole test
    # After its first failed attempt the uploader waits a minute, so no image is in flight (never evicted)
    # while the later ones arrive.
    run = InProcessAgent(tmp_path, image_upload=s3_upload(nobody, {"kind": "environment"}, max_images=2,
                                                          retry_initial_s=60, retry_max_s=60))
    run.agent.start()
    try:
        run.drop("p0.png")
        eventually(lambda: run.uploads()["failed_attempts"] == 1, 20.0, message=lambda: str(run.uploads()))
        for index in range(1, 4):  # one at a time, so the eviction order is the judging order
            run.drop(f"p{index}.png")
            eventually(lambda n=index: len(run.alerts()) == n + 1, 20.0)
        run.agent.tick()
    finally:
        run.agent.stop()
    alerts = {a["source"]: a for a in run.alerts()}
    statuses = outbox_messages(run.config.outbox.path, "status")
    (lost_status,) = [m for m in statuses if "images_lost" in m.get("detail", {})]
    assert lost_status["event"] == "error" and "2 image(s) will not be uploaded (evicted)" in lost_status["error"]
    assert [item["image_ref"] for item in lost_status["detail"]["images_lost"]] == [
        alerts["p0.png"]["image_ref"], alerts["p1.png"]["image_ref"]]
    final = statuses[-1]["detail"]["uploads"]
    assert (final["backlog"], final["evicted"], final["uploaded"]) == (2, 2, 0)
    assert "Connection refused" in final["last_error"] or "ConnectionRefused" in final["last_error"]


@pytest.mark.slow
def test_kill_9_mid_upload_then_restart_every_image_arrives_where_its_alert_says(
        tmp_path: Path, aws: MotoAws, pki: Pki) -> None:
    issuer = CredentialsIssuer(aws)
    proxy = ThrottledProxy(int(aws.url.rsplit(":", 1)[1]), rate=40_000)
    make_tiny_bundle(tmp_path / "bundle")
    with IotCredentialsServer(pki, issuer, ALIAS) as iot:
        data = agent_config(tmp_path, tmp_path / "bundle", stop_deadline_s=5,
                            image_upload=s3_upload(f"http://127.0.0.1:{proxy.port}", iot_credentials(pki, iot)))
        (tmp_path / "agent.yaml").write_text(yaml.safe_dump(data))
        agent = AgentProcess(tmp_path / "agent.yaml", tmp_path / "agent.log")
        inbox = tmp_path / "inbox"
        try:
            proxy.slow.set()  # a slow uplink: each 100 KB image takes seconds on the wire
            agent.start()
            for index in range(4):
                write_image(inbox / f".p{index}.png", value=240, size=(240, 320), seed=index)
                (inbox / f".p{index}.png").rename(inbox / f"p{index}.png")
            eventually(lambda: len(list((inbox / "done").glob("*.png"))) == 4, 30.0, message=agent.log)
            eventually(lambda: proxy.bytes_up > 30_000, 30.0, message=agent.log)  # an image is on the wire
            agent.kill()
            eventually(lambda: proxy.cut_mid_request >= 1, 10.0, message="the kill did not cut an upload")
            alerts = outbox_messages(tmp_path / "state" / "outbox.db", "alerts")
            assert len(alerts) == 4
            # Whatever arrived before the kill is whole; the upload cut short left no object behind.
            hashes = {a["image_ref"].removeprefix(f"s3://{BUCKET}/"): a["image_sha256"] for a in alerts}
            before = {key: body for key, body in aws.objects().items() if key in hashes}
            assert len(before) < 4
            assert all(hashlib.sha256(body).hexdigest() == hashes[key] for key, body in before.items())

            proxy.slow.clear()
            agent.start()
            eventually(lambda: set(aws.objects()) >= set(hashes), 30.0, message=agent.log)
            assert agent.signal_stop() == 0, agent.log()
        finally:
            agent.kill()
            proxy.close()
    day = alerts[0]["image_ref"].split("/")[-2]
    check_images_arrived(aws, alerts, day)
    stop = [m for m in outbox_messages(tmp_path / "state" / "outbox.db", "status") if m["event"] == "stop"][-1]
    assert stop["detail"]["uploads"]["backlog"] == 0
    log = agent.log()
    for secret in issuer.secrets():
        assert secret not in log
