"""Training tests never write an MLflow store into the working directory: tracking is off unless a test asks."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_default_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "none")
