"""Greengrass figures: the agent's wheelhouse (size, offline install time) and model hot swap under run-local.

1. build: ``qcsight gg build`` of com.qcsight.EdgeAgent from this source tree (``--layout`` reuses
   one); the wheelhouse's size and wheel count.
2. install: the wheelhouse's own install.sh into a fresh venv with no index reachable. Baseline,
   measured in the same run: the same wheels installed the usual way (``python -m venv`` with
   ensurepip, then ``pip install --no-index --require-hashes``).
3. swap: a local nucleus (``--flavor``) runs the agent component (its venv from step 2, where its
   install step puts it) on a hot folder fed ``--fps`` defect parts a second; ``run-local deploy``
   (over the nucleus's IPC, as the CLI does) alternates com.qcsight.Model between 1.1.0 and 1.0.0
   ``--swaps`` times. Measured: seconds from the deploy call to the first verdict of the new model,
   and frames lost (parts written minus verdicts received: every part is a defect, so every verdict
   is an alert). Baseline, same run: the agent's cold start (its deployment to its first verdict),
   what a model change costs when it restarts the agent (a HARD dependency).

Needs the ``edge``, ``gg`` and ``dev`` extras and the package index (or ``--wheels DIR``) for the
build. On a shared VM run it under ``nice -n 10`` and quote the load. Example::

    nice -n 10 .venv/bin/python benchmarks/bench_greengrass.py --swaps 5 --fps 20
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "edge_agent"), str(REPO / "greengrass")]

from qcsight_core import messages  # noqa: E402
from qcsight_gg.build import AGENT, MODEL, build_agent, build_model, find_source, project_version  # noqa: E402
from qcsight_gg.nucleus import LocalDeployment, LocalNucleus, NucleusConfig, deploy_to_running  # noqa: E402
from tests.helpers.images import write_image  # noqa: E402
from tests.helpers.models import make_tiny_bundle  # noqa: E402

THING = "bench-line-1"
NO_NETWORK = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
              "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", type=Path, help="reuse a layout holding com.qcsight.EdgeAgent (skip the build)")
    parser.add_argument("--wheels", type=Path, help="build from these wheels only (no index)")
    parser.add_argument("--swaps", type=int, default=5, help="model deployments while parts flow (default 5)")
    parser.add_argument("--fps", type=float, default=20.0, help="parts per second into the hot folder (default 20)")
    parser.add_argument("--flavor", choices=("classic", "lite"), default="classic")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed)")
    return parser


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_CONFIG_FILE")}
    return {**env, **NO_NETWORK}


def install_times(wheelhouse: Path, venv: Path, baseline: Path) -> tuple[float, float]:
    """(install.sh into venv, the usual venv + pip into baseline), seconds."""
    started = time.monotonic()
    subprocess.run(["sh", str(wheelhouse / "install.sh"), str(venv)], check=True, env=_clean_env(),
                   capture_output=True, timeout=1800)
    ours = time.monotonic() - started
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(baseline)], check=True, env=_clean_env(), timeout=1800)
    subprocess.run([str(baseline / "bin" / "python"), "-m", "pip", "install", "--isolated", "--quiet", "--no-index",
                    "--find-links", str(wheelhouse), "--require-hashes", "-r", str(wheelhouse / "requirements.lock")],
                   check=True, env={**_clean_env(), "PIP_CONFIG_FILE": os.devnull}, capture_output=True, timeout=1800)
    return ours, time.monotonic() - started


class Line:
    """Parts into the hot folder at a steady rate; every part is a bright (defect) image."""

    def __init__(self, inbox: Path, fps: float) -> None:
        self.inbox = inbox
        self.interval = 1.0 / fps
        self.written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        staging = inbox.parent / "staging"
        self._template = write_image(staging / "template.png", value=240, size=(40, 40))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            staged = self._template.with_name(f"part-{self.written:06d}.png")
            shutil.copyfile(self._template, staged)
            os.replace(staged, self.inbox / staged.name)
            self.written += 1
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))


def verdicts(nucleus: LocalNucleus) -> list[dict[str, Any]]:
    return [m for m in (messages.decode(p.payload) for p in nucleus.server.published) if m["schema"] == messages.ALERT]


def first_verdict_after(nucleus: LocalNucleus, version: str, since: float, timeout_s: float = 120.0) -> float:
    """Seconds from `since` (monotonic) to the first alert judged by the model `version`."""
    seen = len(verdicts(nucleus))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for alert in verdicts(nucleus)[seen:]:
            if alert["model"]["version"] == version:
                return time.monotonic() - since
        time.sleep(0.01)
    raise TimeoutError(f"no verdict from model {version} within {timeout_s}s")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="qcsight-bench-gg-"))
    try:
        source = find_source(REPO)
        layout = args.layout or work / "layout"
        if args.layout is None:
            started = time.monotonic()
            build_agent(source, layout, "s3://bench-bucket/qcsight", wheels=args.wheels)
            print(f"build: {time.monotonic() - started:.1f} s")
        for version, bundle_version in (("1.0.0", "1"), ("1.1.0", "2")):
            build_model(make_tiny_bundle(work / "bundles" / version, version=bundle_version).path, layout, source,
                        "s3://bench-bucket/qcsight", version)
        version = project_version(source)
        archive = layout / "artifacts" / AGENT / version / "wheelhouse.zip"
        wheelhouse = work / "wheelhouse"
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(wheelhouse)
        wheels = list(wheelhouse.glob("*.whl"))
        root = work / "root"
        ours, usual = install_times(wheelhouse, root / "work" / AGENT / "venv" / version, work / "baseline-venv")
        print(f"wheelhouse: {archive.stat().st_size / 1e6:.1f} MB, {len(wheels) - 1} locked wheels + pip "
              f"({sum(w.stat().st_size for w in wheels) / 1e6:.1f} MB of wheels)")
        print(f"install into a fresh venv, no index: {ours:.1f} s; usual venv (ensurepip) + pip: {usual:.1f} s "
              f"(ratio {ours / usual:.2f})")

        inbox = work / "inbox"
        inbox.mkdir()
        merge = {"source": {"kind": "hotfolder", "mode": "trigger", "uri": str(inbox), "settle_s": 0, "poll_s": 0.02},
                 "line_signal": {"kind": "none"}, "metrics": {"window_s": 3600}}
        config = NucleusConfig(root=root, store=layout, thing_name=THING, flavor=args.flavor, extra_env=NO_NETWORK)
        line = Line(inbox, args.fps)
        with LocalNucleus(config) as nucleus:
            line.start()
            started = time.monotonic()
            first = nucleus.deploy(LocalDeployment({AGENT: version, MODEL: "1.0.0"}, merges={AGENT: merge}))
            cold = first_verdict_after(nucleus, "1", started, timeout_s=600)
            assert first.wait(600).succeeded
            swaps: list[float] = []
            for i in range(args.swaps):
                target, bundle_version = (("1.1.0", "2"), ("1.0.0", "1"))[i % 2]
                time.sleep(1.0)  # a steady line between swaps
                started = time.monotonic()
                result = deploy_to_running(root, LocalDeployment({MODEL: target}), timeout_s=300)
                if not result.succeeded:
                    raise RuntimeError(f"swap to {target} failed: {result}")
                swaps.append(first_verdict_after(nucleus, bundle_version, started))
            line.stop()
            deadline = time.monotonic() + 60
            while len({a["source"] for a in verdicts(nucleus)}) < line.written and time.monotonic() < deadline:
                time.sleep(0.05)
            judged = {a["source"] for a in verdicts(nucleus)}
        lost = line.written - len(judged)
        print(f"swap ({args.swaps}x, {args.flavor}, {args.fps:g} parts/s): deploy -> first verdict of the new model "
              f"median {statistics.median(swaps):.2f} s, max {max(swaps):.2f} s; agent cold start to first verdict "
              f"{cold:.2f} s (ratio {statistics.median(swaps) / cold:.2f}); frames lost {lost} of {line.written}")
        return 0 if lost == 0 else 1
    finally:
        if args.keep:
            print(f"work folder: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
