"""Shared pytest fixtures; area-specific ones live in each tests/<area>/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from qcsight_core.bundle import Bundle
from tests.helpers.aws import aws_endpoint  # noqa: F401  (fixture re-exported for every test)
from tests.helpers.models import make_tiny_bundle


@pytest.fixture
def tiny_bundle(tmp_path: Path) -> Bundle:
    """A real, verified three-class ONNX bundle (good, scratch, spot) built without torch."""
    return make_tiny_bundle(tmp_path / "bundle")
