"""The image_upload section: defaults, and every malformed setting refused by name; the image key layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qcsight_core import messages
from qcsight_core.errors import ConfigError, MessageError
from qcsight_edge.config import AgentConfig
from qcsight_edge.errors import CredentialsError
from qcsight_edge.uploader import make_credentials


def base(**upload: Any) -> dict[str, Any]:
    return {"thing_name": "line1-cam1", "model": {"bundle": "/models/bundle"}, "state_dir": "/var/lib/qcsight",
            "image_upload": upload}


def test_defaults_keep_images_local_and_the_queue_beside_the_outbox() -> None:
    config = AgentConfig.from_dict(base())
    assert config.image_upload is not None and config.image_upload.kind == "none"
    assert config.image_upload.queue == Path("/var/lib/qcsight/uploads.db")
    s3 = AgentConfig.from_dict(base(kind="s3", bucket="qc-images", region="eu-west-1", prefix="plant-7",
                                    max_bytes="2GiB")).image_upload
    assert s3 is not None
    assert (s3.prefix, s3.max_bytes, s3.path_style, s3.credentials.kind) == ("plant-7/", 2 * 1024**3, False, "auto")
    local = AgentConfig.from_dict(base(kind="s3", bucket="qc-images", region="us-east-1",
                                       endpoint="http://127.0.0.1:5000")).image_upload
    assert local is not None and local.path_style  # a custom endpoint is addressed path-style unless told


@pytest.mark.parametrize(("upload", "field"), [
    ({"kind": "ftp"}, "image_upload.kind"),
    ({"kind": "s3", "region": "eu-west-1"}, "image_upload.bucket"),
    ({"kind": "s3", "bucket": "Bad_Bucket", "region": "eu-west-1"}, "image_upload.bucket"),
    ({"kind": "s3", "bucket": "qc-images"}, "image_upload.region"),
    ({"kind": "s3", "bucket": "qc-images", "region": "europe"}, "image_upload.region"),
    ({"kind": "s3", "bucket": "qc-images", "region": "eu-west-1", "endpoint": "s3.local"}, "image_upload.endpoint"),
    ({"kind": "folder"}, "image_upload.path"),
    ({"prefix": "/abs"}, "image_upload.prefix"),
    ({"prefix": "a/../b"}, "image_upload.prefix"),
    ({"max_images": 0}, "image_upload.max_images"),
    ({"max_bytes": "lots"}, "image_upload.max_bytes"),
    ({"retry_initial_s": 10, "retry_max_s": 5}, "image_upload.retry_max_s"),
    ({"credentials": {"kind": "password"}}, "image_upload.credentials.kind"),
    ({"credentials": {"kind": "iot", "role_alias": "a"}}, "image_upload.credentials.endpoint"),
    ({"credentials": {"kind": "iot", "endpoint": "x.credentials.iot.eu-west-1.amazonaws.com"}},
     "image_upload.credentials.role_alias"),
    ({"credentials": {"role_alias": "has space"}}, "image_upload.credentials.role_alias"),
    ({"credentials": {"refresh_before_s": -1}}, "image_upload.credentials.refresh_before_s"),
    ({"credentials": {"cert": "/no/such.pem"}}, "image_upload.credentials.cert"),
    ({"bucket_name": "x"}, "image_upload.bucket_name"),
])
def test_bad_settings_are_refused_by_name(upload: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        AgentConfig.from_dict(base(**upload))
    assert caught.value.field == field, caught.value


def test_credentials_kind_auto_follows_the_token_exchange_service_and_iot_needs_its_settings() -> None:
    config = AgentConfig.from_dict(base(kind="s3", bucket="qc-images", region="eu-west-1"))
    tes = make_credentials(config, {"AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://localhost:1/c",
                                    "AWS_CONTAINER_AUTHORIZATION_TOKEN": "t"})
    assert tes.source.name == "greengrass"
    with pytest.raises(ConfigError, match=r"image_upload\.credentials\.endpoint"):
        make_credentials(config, {})  # not under Greengrass: iot, which needs its endpoint
    explicit = AgentConfig.from_dict(base(kind="s3", bucket="qc-images", region="eu-west-1",
                                          credentials={"kind": "greengrass"}))
    with pytest.raises(CredentialsError, match=r"must depend on aws\.greengrass\.TokenExchangeService"):
        make_credentials(explicit, {})
    iot = AgentConfig.from_dict(base(kind="s3", bucket="qc-images", region="eu-west-1", credentials={
        "kind": "iot", "endpoint": "x.credentials.iot.eu-west-1.amazonaws.com", "role_alias": "qcsight-images"}))
    with pytest.raises(ConfigError, match=r"image_upload\.credentials\.cert"):
        make_credentials(iot, {})  # no certificate of its own and no transport certificate


def test_image_keys_are_built_and_parsed_in_one_place() -> None:
    key = messages.image_key("plant-7/", "line1-cam1", 1_714_566_645.0, "0123abcd")
    assert key == "plant-7/images/line1-cam1/2024-05-01/0123abcd.jpg"
    assert messages.parse_image_key(key) == ("plant-7/", "line1-cam1", "2024-05-01", "0123abcd")
    assert messages.parse_image_key("images/t/2024-05-01/a.jpg") == ("", "t", "2024-05-01", "a")
    with pytest.raises(MessageError):
        messages.parse_image_key("images/t/today/a.jpg")
    with pytest.raises(MessageError):
        messages.image_key("", "line 1", 0.0, "a")
