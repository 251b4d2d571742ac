"""A device-only install (`pip install .[edge]`, no torch) imports and runs the device side."""

from __future__ import annotations

import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_CHECK = """
import importlib, pkgutil, sys
import qcsight_core, qcsight_edge
for package in (qcsight_core, qcsight_edge):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
heavy = sorted(m for m in ("torch", "torchvision", "albumentations", "sagemaker", "boto3") if m in sys.modules)
assert not heavy, heavy
for missing in ("torch", "boto3"):
    try:
        importlib.import_module(missing)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{missing} is installed in the device venv")
print("device-ok")
"""


@pytest.mark.slow
def test_edge_extra_installs_and_imports_without_torch(tmp_path: Path) -> None:
    # Copy the source so the build does not write into the working tree.
    src = tmp_path / "src"
    # node_modules and cdk.out: the CDK app's git-ignored tooling and output, large (or a dangling link) and no Python.
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".venv-edge", ".git", "*.egg-info", "build",
                                                             "__pycache__", "demo_out", "runs", ".*cache",
                                                             "node_modules", "cdk.out"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"{src}[edge]"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    check = subprocess.run([str(python), "-c", _CHECK], capture_output=True, text=True, timeout=120, env=env,
                           cwd=tmp_path)
    assert check.returncode == 0, check.stderr[-3000:]
    assert "device-ok" in check.stdout
    # The one command tells a device user which extra training needs.
    train = subprocess.run([str(env_dir / "bin" / "qcsight"), "train", "--help"], capture_output=True, text=True,
                           timeout=120, env=env, cwd=tmp_path)
    assert train.returncode == 2
    assert "pip install 'qcsight[train]'" in train.stderr
