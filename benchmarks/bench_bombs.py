"""Peak memory of `qcsight batch serve` under requests of pixel bombs, against its own idle RSS.

Starts the real server (`python -m qcsight_core.cli batch serve`) on loopback with a tiny
ONNX bundle, warms it with one real image, records its resident set (the baseline), then
sends each scenario as one JSON request and reads the server's peak RSS for it from
/proc/PID/status (VmHWM, reset between scenarios through /proc/PID/clear_refs):

1. bombs, defaults: 90 PNGs of 20000x20000 (48 KB each, 400 MB each decoded), a 5.8 MB
   body under the 6 MB Batch Transform default: refused whole, 413 (more than 64 items);
2. bombs, error rows: the same with --max-items 128 --bad-records error_row: every header is
   read and every image refused by the pixel budget (200, 90 error rows);
3. big but allowed: 90 PNGs of 7000x7000 (49 MP, under the 67 MP budget, 6 KB each) are
   decoded one at a time (200, 90 verdicts): the peak should be one decoded image over idle,
   not ninety (4.4 GB held at once before this change).

Prints, per scenario, the status, the seconds it took, the peak RSS and its ratio and
difference to the idle baseline. Needs the batch and dev extras (onnx for the tiny model).
Example::

    nice -n 10 .venv/bin/python benchmarks/bench_bombs.py
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "edge_agent"), str(REPO / "batch")]

from tests.helpers import bombs  # noqa: E402
from tests.helpers.models import make_tiny_bundle  # noqa: E402

MB = 1 << 20


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=90, help="images per request (default 90)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def _reset_peak(pid: int) -> None:
    # Writing 5 resets the peak RSS (VmHWM) to the current RSS (Linux 4.0+).
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _post(port: int, body: bytes, content_type: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        connection.request("POST", "/invocations", body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class Server:
    """`qcsight batch serve` as a child process."""

    def __init__(self, bundle: Path, *extra: str) -> None:
        self.port = _free_port()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "edge_agent"), str(REPO / "batch"),
                                                            os.environ.get("PYTHONPATH", "")]))
        for name in ("SAGEMAKER_BATCH", "QCSIGHT_BAD_RECORDS", "QCSIGHT_MAX_ITEMS", "QCSIGHT_MAX_PIXELS"):
            env.pop(name, None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qcsight_core.cli", "batch", "serve", "--model-dir", str(bundle),
             "--port", str(self.port), "--max-payload-mb", "6", "--max-concurrent", "1", *extra],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                connection.request("GET", "/ping")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError("qcsight batch serve exited") from None
                time.sleep(0.1)
        raise RuntimeError("qcsight batch serve did not answer /ping within 60 s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def _scenario(server: Server, name: str, body: bytes, idle_kb: int) -> dict[str, object]:
    _reset_peak(server.process.pid)
    started = time.perf_counter()
    status, answer = _post(server.port, body, "application/json")
    elapsed = time.perf_counter() - started
    peak_kb = _status_kb(server.process.pid, "VmHWM")
    verdicts: dict[str, int] = {}
    if status == 200:
        for row in json.loads(answer):
            verdicts[row["verdict"]] = verdicts.get(row["verdict"], 0) + 1
    result = {"scenario": name, "status": status, "seconds": round(elapsed, 3), "peak_rss_mb": round(peak_kb / 1024, 1),
              "idle_rss_mb": round(idle_kb / 1024, 1), "peak_over_idle": round(peak_kb / idle_kb, 3),
              "peak_minus_idle_mb": round((peak_kb - idle_kb) / 1024, 1), "verdicts": verdicts}
    print(f"{name:<34} {status:>4} {elapsed:7.2f} s  peak {peak_kb / 1024:7.1f} MB  "
          f"x{peak_kb / idle_kb:.3f} idle  (+{(peak_kb - idle_kb) / 1024:.1f} MB)  {verdicts or answer[:80]!r}",
          flush=True)
    return result


def main(args: argparse.Namespace) -> int:
    count = args.images
    bomb = base64.b64encode(bombs.png_bomb(20000, 20000)).decode()
    big = base64.b64encode(bombs.png_bomb(7000, 7000)).decode()
    warm = base64.b64encode(bombs.encoded(".jpg", 640, 480)).decode()
    bomb_body = json.dumps([bomb] * count).encode()
    big_body = json.dumps([big] * count).encode()
    print(f"bodies: {count} bomb PNGs {len(bomb_body) / MB:.1f} MB ({count} x 20000x20000 = "
          f"{count * 400 / 1024:.1f} GB if decoded), {count} x 7000x7000 PNGs {len(big_body) / MB:.2f} MB "
          f"({count * 49 / 1024:.1f} GB if held decoded together)", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="qcsight-bench-bombs-") as tmp:
        bundle = make_tiny_bundle(Path(tmp) / "bundle").path
        for label, extra in (("defaults", ()), ("error rows", ("--max-items", "128", "--bad-records", "error_row"))):
            server = Server(bundle, *extra)
            try:
                status, _ = _post(server.port, json.dumps([warm]).encode(), "application/json")
                assert status == 200, status
                idle_kb = _status_kb(server.process.pid, "VmRSS")
                print(f"server ({label}): idle RSS after one warm-up request {idle_kb / 1024:.1f} MB", flush=True)
                results.append(_scenario(server, f"{count} bombs, {label}", bomb_body, idle_kb))
                if label == "error rows":
                    results.append(_scenario(server, f"{count} x 49 MP allowed, {label}", big_body, idle_kb))
            finally:
                server.stop()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
