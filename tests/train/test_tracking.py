"""Where runs are tracked: --tracking-uri forms, the SageMaker MLflow ARN path, and the no-op without mlflow."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qcsight_core.errors import ConfigError
from qcsight_train import tracking

ARN = "arn:aws:sagemaker:eu-west-1:123456789012:mlflow-tracking-server/qc-line-7"


def test_tracking_uri_forms(tmp_path: Path) -> None:
    local = tracking.resolve("", tmp_path / "mlruns")
    assert local.kind == "local" and local.uri == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert local.artifact_location == (tmp_path / "mlruns" / "artifacts").as_uri()
    assert tracking.resolve("none", tmp_path).kind == "off"
    assert tracking.resolve("http://127.0.0.1:5000", tmp_path) == tracking.TrackingTarget("http://127.0.0.1:5000",
                                                                                            "", "uri")
    assert tracking.resolve(ARN, tmp_path) == tracking.TrackingTarget(ARN, "", "sagemaker")
    with pytest.raises(ConfigError, match="tracking_uri"):
        tracking.resolve("arn:aws:sagemaker:eu-west-1:123:mlflow-tracking-server/x", tmp_path)


def test_a_sagemaker_arn_is_sent_to_the_servers_https_endpoint_signed_with_sigv4() -> None:
    """The sagemaker-mlflow plugin's documented path: the ARN is the tracking URI; requests go to the
    region's experiments endpoint with auth "arn" (SigV4). Only the request's shape: no account."""
    pytest.importorskip("sagemaker_mlflow")
    from sagemaker_mlflow.mlflow_sagemaker_store import MlflowSageMakerStore

    creds = MlflowSageMakerStore(tracking.resolve(ARN, Path(".")).uri, None).get_host_creds()
    assert (creds.host, creds.auth) == ("https://eu-west-1.experiments.sagemaker.aws", "arn")


def test_without_mlflow_tracking_is_a_no_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)
    tracker = tracking.start("", tmp_path / "mlruns", "qcsight", "r1", {})
    assert not tracker.active and not (tmp_path / "mlruns").exists()
    tracker.log_epochs([{"epoch": 1, "val_macro_f1": 0.5}])  # nothing happens, nothing fails
    tracker.finish()
    assert tracking.start("none", tmp_path, "qcsight", "r1", {}).active is False
