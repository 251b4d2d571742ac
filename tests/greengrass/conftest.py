"""Greengrass fixtures: the built component layout and an installed agent, once per session; the loopback broker.

Building the agent's wheelhouse downloads the edge extra's wheels through pip (its cache makes a
second session fast): CI needs the package index reachable for these fixtures, or
QCSIGHT_TEST_WHEELS=DIR pointing at a folder of those wheels (an unzipped wheelhouse), in which
case no index is used at all.
"""

from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from qcsight_gg.build import AGENT, WHEELHOUSE, Built, build_agent, build_model, find_source, project_version
from tests.edge.conftest import broker, cloud, mosquitto_bin, pki
from tests.helpers.models import make_tiny_bundle, make_unloadable_bundle

REPO = Path(__file__).resolve().parents[2]
# Every way out to a package index points at a closed port: an install that tried one would fail.
NO_NETWORK = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
              "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
              "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_FIND_LINKS": ""}


@pytest.fixture(scope="session")
def agent_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Built]:
    """com.qcsight.EdgeAgent built from this source tree into a layout, once per session."""
    out = tmp_path_factory.mktemp("gg-layout")
    wheels = os.environ.get("QCSIGHT_TEST_WHEELS")
    built = build_agent(find_source(REPO), out, "s3://qcsight-test-bucket/qcsight",
                        wheels=Path(wheels) if wheels else None)
    return out, built


@pytest.fixture(scope="session")
def layout(agent_build: tuple[Path, Built], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent and three model versions: 1.0.0, 1.1.0 (bundles 1 and 2) and 1.2.0 (verifies, cannot load)."""
    out, _ = agent_build
    bundles = tmp_path_factory.mktemp("gg-bundles")
    source = find_source(REPO)
    for version, bundle in (("1.0.0", make_tiny_bundle(bundles / "1", version="1")),
                            ("1.1.0", make_tiny_bundle(bundles / "2", version="2")),
                            ("1.2.0", make_unloadable_bundle(bundles / "3", version="3"))):
        build_model(bundle.path, out, source, "s3://qcsight-test-bucket/qcsight", version)
    return out


@pytest.fixture(scope="session")
def nucleus_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One local nucleus root for the session, as one device: what the agent installs there stays installed."""
    return tmp_path_factory.mktemp("gg-root")


@pytest.fixture(scope="session")
def wheelhouse(agent_build: tuple[Path, Built], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent's wheelhouse artifact unpacked, as the nucleus unpacks it."""
    _, built = agent_build
    folder = tmp_path_factory.mktemp("gg-unpacked") / "wheelhouse"
    with zipfile.ZipFile(built.artifacts[0]) as archive:
        archive.extractall(folder)
    return folder


@pytest.fixture(scope="session")
def installed_agent(wheelhouse: Path, nucleus_root: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The wheelhouse installed by its own install.sh, with no index reachable, into a fresh venv.

    The venv is where the agent component's install step puts it on the session's nucleus root, so
    the run-local tests find it installed (the step is idempotent, as on a device the nucleus runs
    install at every start).
    """
    venv = nucleus_root / "work" / AGENT / "venv" / project_version(REPO)
    assert not venv.exists()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_CONFIG_FILE")}
    result = subprocess.run(["sh", str(wheelhouse / "install.sh"), str(venv)], capture_output=True, text=True,
                            env={**env, **NO_NETWORK}, timeout=900, check=False)
    return venv, result


__all__ = ["NO_NETWORK", "WHEELHOUSE", "broker", "cloud", "mosquitto_bin", "pki"]
