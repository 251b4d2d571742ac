"""Greengrass fixtures: the built agent wheelhouse (once per session) and built model components."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from qcsight_gg.build import Built, build_agent, find_source

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def agent_layout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Built]]:
    """com.qcsight.EdgeAgent built from this source tree into a layout, once per session.

    The wheels come from the package index through pip (its cache makes a second session fast);
    CI needs the index reachable for this fixture. QCSIGHT_TEST_WHEELS=DIR takes them from a
    folder instead (a previous wheelhouse, unzipped), with no index at all.
    """
    out = tmp_path_factory.mktemp("gg-agent")
    wheels = os.environ.get("QCSIGHT_TEST_WHEELS")
    built = build_agent(find_source(REPO), out, "s3://qcsight-test-bucket/qcsight",
                        wheels=Path(wheels) if wheels else None)
    yield out, built
