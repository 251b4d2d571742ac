"""What the image upload costs the agent, against baselines measured in the same run.

1. On the alert path: every alerted part's JPEG is committed to the upload queue
   (``UploadQueue.put``: one synced SQLite commit holding the JPEG) before its alert is stored.
   Measured per image against the commit already on that path (``Outbox.put`` of the alert
   message) and against writing the same JPEG to a file with fsync.
2. Draining: ``ImageUploader`` sending a backlog of N images to S3 (moto's server on loopback,
   signed PUTs) against the bare ``S3Target.put`` loop on the same images (same signing, same
   connection reuse, no queue): the queue's overhead. Throughput is not a target (one image per
   alert; IoT Core caps a device near 100 alerts/s), this shows the queue is not the bottleneck.

Images are 640x640 synthetic surface pictures (``qcsight_core.synth``) encoded as the image store
does (JPEG quality 90). Needs the ``edge`` and ``dev`` extras. Example::

    nice -n 10 .venv/bin/python benchmarks/bench_uploads.py --images 200
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "edge_agent")]

import boto3  # noqa: E402
import numpy as np  # noqa: E402

from qcsight_core import messages, synth  # noqa: E402
from qcsight_core.imageio import encode_jpeg  # noqa: E402
from qcsight_edge.credentials import CachedCredentials, EnvironmentCredentialsSource  # noqa: E402
from qcsight_edge.outbox import Outbox  # noqa: E402
from qcsight_edge.s3 import S3Target  # noqa: E402
from qcsight_edge.uploader import ImageUploader, UploaderSettings  # noqa: E402
from qcsight_edge.uploadqueue import UploadQueue  # noqa: E402
from tests.edge.broker import device_message  # noqa: E402
from tests.helpers.aws import moto_server  # noqa: E402

THING = "bench-1"
BUCKET = "bench-images"
KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="images per measurement (default 200)")
    parser.add_argument("--size", type=int, default=640, help="side of the square pictures in pixels (default 640)")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up draining after this (s)")
    return parser


def make_jpegs(n: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    pictures = [synth.render(rng, "scratch" if i % 2 else "good", size=size).image for i in range(min(n, 16))]
    return [encode_jpeg(pictures[i % len(pictures)], 90) for i in range(n)]


def per_item_ms(run: list[float]) -> tuple[float, float]:
    return statistics.median(run) * 1000, statistics.quantiles(run, n=20)[18] * 1000


def bench_alert_path(folder: Path, jpegs: list[bytes]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"outbox alert commit": [], "upload queue commit": [], "file write + fsync": []}
    with Outbox(folder / "outbox.db", max_messages=10**6, max_bytes=2**40) as outbox, \
            UploadQueue(folder / "uploads.db", max_images=10**6, max_bytes=2**40) as queue:
        for i, jpeg in enumerate(jpegs):
            payload = messages.encode(device_message("alerts", THING, i + 1))
            start = time.perf_counter()
            outbox.put(f"qcsight/{THING}/alerts", "alerts", lambda _seq, p=payload, n=i: (f"m{n}", p))
            times["outbox alert commit"].append(time.perf_counter() - start)
            start = time.perf_counter()
            queue.put(f"a{i}", f"images/{THING}/2024-05-01/a{i}.jpg", f"s3://{BUCKET}/a{i}", jpeg)
            times["upload queue commit"].append(time.perf_counter() - start)
            start = time.perf_counter()
            fd = os.open(folder / f"f{i}.jpg", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, jpeg)
                os.fsync(fd)
            finally:
                os.close(fd)
            times["file write + fsync"].append(time.perf_counter() - start)
    return times


def bench_drain(folder: Path, url: str, jpegs: list[bytes], timeout_s: float) -> tuple[float, float]:
    """(images/s bare S3Target.put loop, images/s ImageUploader draining a stored backlog)."""
    def target() -> S3Target:
        return S3Target(BUCKET, "us-east-1", CachedCredentials(EnvironmentCredentialsSource(KEYS)), endpoint=url,
                        path_style=True, timeout_s=30.0)

    bare = target()
    start = time.perf_counter()
    for i, jpeg in enumerate(jpegs):
        bare.put(f"bare/{i}.jpg", jpeg, hashlib.sha256(jpeg).hexdigest())
    bare_rate = len(jpegs) / (time.perf_counter() - start)
    bare.close()

    queue = UploadQueue(folder / "drain.db", max_images=10**6, max_bytes=2**40)
    uploader = ImageUploader(queue, target(), THING, settings=UploaderSettings(0.01, 0.1, 0.01))
    for i, jpeg in enumerate(jpegs):
        uploader.submit(f"d{i}", 1_714_566_645.0, jpeg)
    start = time.perf_counter()
    uploader.start()
    deadline = start + timeout_s
    while queue.backlog and time.perf_counter() < deadline:
        time.sleep(0.005)
    queued_rate = len(jpegs) / (time.perf_counter() - start)
    uploader.stop(5.0)
    uploader.close()
    if queue.backlog:
        raise SystemExit(f"the uploader did not drain {len(jpegs)} images in {timeout_s:g}s")
    return bare_rate, queued_rate


def main(args: argparse.Namespace) -> int:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    jpegs = make_jpegs(args.images, args.size)
    print(f"{len(jpegs)} JPEGs of {args.size}x{args.size}, median {statistics.median(map(len, jpegs)) / 1024:.0f} KiB")
    with tempfile.TemporaryDirectory() as tmp:
        times = bench_alert_path(Path(tmp), jpegs)
        base, _ = per_item_ms(times["outbox alert commit"])
        print("\nalert path, per alerted part   median ms   p95 ms   vs the alert commit")
        for name, run in times.items():
            median, p95 = per_item_ms(run)
            print(f"  {name:<28} {median:9.2f} {p95:8.2f}   {median / base:6.2f}")
        with moto_server() as url:
            boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bench",
                         aws_secret_access_key="bench").create_bucket(Bucket=BUCKET)
            bare_rate, queued_rate = bench_drain(Path(tmp), url, jpegs, args.timeout)
    print("\ndraining to moto S3 on loopback   images/s   vs bare")
    print(f"  bare S3Target.put loop         {bare_rate:8.1f}   1")
    print(f"  ImageUploader from the queue   {queued_rate:8.1f}   {queued_rate / bare_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
