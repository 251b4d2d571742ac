"""`qcsight batch`: score bulk imagery with a bundle, serve the Batch Transform container, submit jobs."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qcsight_batch.errors import BatchError
from qcsight_batch.handler import (
    BAD_RECORDS,
    BAD_RECORDS_ENV,
    DEFAULT_MAX_ITEMS,
    MAX_ITEMS_ENV,
    MAX_PIXELS_ENV,
    bad_records_mode,
)
from qcsight_batch.progress import KeyCounter, make_progress
from qcsight_batch.scorer import Scorer, ScorerConfig, available_cores, summarize
from qcsight_batch.server import default_host
from qcsight_batch.sources import default_cache_dir, fetch_bundle, open_source
from qcsight_batch.writer import FORMATS, open_writer
from qcsight_core.bundle import Bundle, load_bundle
from qcsight_core.cli import EXIT_OK, configure_logging
from qcsight_core.imageio import DEFAULT_MAX_PIXELS
from qcsight_core.signing import VerifyKey

SCORE_EPILOG = """\
inputs (--input):
  DIR                      every visible file under DIR, recursively (non-images give error rows)
  'GLOB'                   e.g. 'images/**/*.jpg' (quote it so the shell does not expand it)
  MANIFEST.jsonl           one JSON object per line with "source-ref" (a path or s3:// URI)
  s3://BUCKET/PREFIX       every object under the prefix (ListObjectsV2, page by page)
  s3://BUCKET/x.manifest   a manifest stored in S3
bundles (--bundle): a bundle folder, a model.tar.gz, or an s3:// object or prefix (cached in --cache-dir).

Rows are appended in fsynced chunks; after an interruption run the same command with --resume
and the output ends up as an uninterrupted run's (row order aside). A summary is printed and
written as JSON next to the output (--summary).

example:
  qcsight batch score --bundle model.tar.gz --input 's3://line-7/2024-06/' --output results.jsonl --workers 2
"""


def _score_parser(sub: Any) -> None:
    p = sub.add_parser(
        "score", help="score images from a folder, glob, manifest or S3 prefix into JSON lines or CSV",
        description="Score bulk imagery with a model bundle: one row per image (verdict, class, scores, "
        "model version, or the error that stopped it).",
        epilog=SCORE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bundle", required=True, help="bundle folder, model.tar.gz, or s3:// URI")
    p.add_argument("--input", required=True, help="folder, glob, manifest (.jsonl/.manifest) or s3://bucket/prefix")
    p.add_argument("--output", required=True, type=Path, help="results file: .jsonl or .csv")
    p.add_argument("--format", choices=FORMATS, help="output format when the suffix does not say")
    cores = available_cores()
    p.add_argument("--workers", type=int, default=min(2, cores),
                   help=f"decode processes (0 decodes in this process; default {min(2, cores)} on {cores} cores)")
    p.add_argument("--batch-size", type=int, default=32, help="images per ONNX Runtime call (default 32)")
    p.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads (default: cores minus workers, at least 1)")
    p.add_argument("--int8", action="store_true", help="run the bundle's INT8 model (model.int8.onnx)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run: skip rows already written")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--images-only", action="store_true",
                   help="for folders and S3 prefixes, skip files without an image suffix instead of error rows")
    p.add_argument("--full-decode", action="store_true",
                   help="decode JPEGs at full size (default: 1/2, 1/4 or 1/8 size when far larger than the input)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"pixel budget per image, read from its header before decoding; larger images get an "
                   f"error row (default {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--summary", type=Path, help="where to write the summary JSON (default OUTPUT.summary.json)")
    p.add_argument("--cache-dir", type=Path, help="where S3 bundles are cached (default ~/.cache/qcsight)")
    p.add_argument("--verify-key", type=Path, metavar="PUBLIC.pem",
                   help="refuse the bundle unless it is signed with this public key (qcsight bundle sign)")
    p.add_argument("--chunk-timeout", type=float, default=300.0, help="seconds to wait for one decoded chunk")
    p.add_argument("--no-count", action="store_true", help="do not count the input in the background (no ETA)")
    p.add_argument("-v", "--verbose", action="count", default=0)


SERVE_EPILOG = """\
binding: 127.0.0.1 unless SageMaker started the container, which the platform's own variables
say (SAGEMAKER_BATCH for Batch Transform, SAGEMAKER_BIND_TO_PORT / SAGEMAKER_SAFE_PORT_RANGE for
pipelines and multi-container endpoints); then 0.0.0.0. --host overrides (a single-container
real-time endpoint's image should pass --host 0.0.0.0).
bad records: reject answers 400; error_row answers 200 with a verdict "error" row, so that one
corrupt image does not fail a Batch Transform job (default inside one, and set by batch submit).
"""


def _serve_parser(sub: Any) -> None:
    env = os.environ
    p = sub.add_parser(
        "serve", help="serve /ping and /invocations (the SageMaker container contract)",
        description="Run the Batch Transform / endpoint container server around the inference handler. "
        "Defaults come from the variables SageMaker sets.",
        epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-dir", default=env.get("SM_MODEL_DIR", "/opt/ml/model"),
                   help="the unpacked bundle (default $SM_MODEL_DIR or /opt/ml/model)")
    p.add_argument("--host", default=default_host(env),
                   help=f"address to bind (here: {default_host(env)}; see below)")
    p.add_argument("--port", type=int, default=int(env.get("SAGEMAKER_BIND_TO_PORT", "8080")),
                   help="port (default $SAGEMAKER_BIND_TO_PORT or 8080)")
    p.add_argument("--max-payload-mb", type=float, default=float(env.get("SAGEMAKER_MAX_PAYLOAD_IN_MB", "6")),
                   help="largest request body (default $SAGEMAKER_MAX_PAYLOAD_IN_MB or 6)")
    p.add_argument("--max-concurrent", type=int,
                   default=int(env.get("SAGEMAKER_MAX_CONCURRENT_TRANSFORMS", str(available_cores()))),
                   help="inferences at once (default $SAGEMAKER_MAX_CONCURRENT_TRANSFORMS or the core count)")
    p.add_argument("--max-pixels", type=int, default=int(env.get(MAX_PIXELS_ENV, str(DEFAULT_MAX_PIXELS))),
                   help=f"pixel budget per image, checked from its header (default ${MAX_PIXELS_ENV} or "
                   f"{DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--max-items", type=int, default=int(env.get(MAX_ITEMS_ENV, str(DEFAULT_MAX_ITEMS))),
                   help=f"images per request (default ${MAX_ITEMS_ENV} or {DEFAULT_MAX_ITEMS})")
    p.add_argument("--bad-records", choices=BAD_RECORDS,
                   help=f"what an undecodable record gets (default ${BAD_RECORDS_ENV}, else error_row inside a "
                   "Batch Transform job and reject elsewhere; see below)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send its request line and headers (default 10)")
    p.add_argument("--body-timeout", type=float, default=60.0,
                   help="seconds a client has to send its body (default 60)")
    p.add_argument("--int8", action="store_true", help="run the INT8 model (or set QCSIGHT_PRECISION=int8)")
    p.add_argument("--threads", type=int, default=int(env.get("QCSIGHT_INTRA_OP_THREADS", "0")),
                   help="ONNX Runtime intra-op threads (0 lets it decide)")
    p.add_argument("-v", "--verbose", action="count", default=0)


SUBMIT_EPILOG = """\
example (start a job now):
  qcsight batch submit --model-data s3://models/line-7/model.tar.gz \\
      --image-uri 123456789012.dkr.ecr.eu-west-1.amazonaws.com/qcsight-batch:0.1 \\
      --role-arn arn:aws:iam::123456789012:role/qcsight-sagemaker \\
      --input s3://line-7/incoming/ --output s3://line-7/scores/ --instance-type ml.c6i.xlarge --dry-run
every night at 02:00 UTC instead: add --schedule 'cron(0 2 * * ? *)' --schedule-role-arn ARN
"""


def _submit_parser(sub: Any) -> None:
    p = sub.add_parser(
        "submit", help="create a SageMaker Batch Transform job (now, or on an EventBridge schedule)",
        description="Create the SageMaker model for a bundle and a Batch Transform job, or a schedule that "
        "starts one per run. Needs boto3 and AWS credentials unless --dry-run.",
        epilog=SUBMIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-data", required=True, help="s3:// URI of the bundle's model.tar.gz")
    p.add_argument("--image-uri", required=True, help="the qcsight batch container image (ECR URI)")
    p.add_argument("--role-arn", required=True, help="SageMaker execution role ARN")
    p.add_argument("--input", required=True, help="s3:// prefix of the images (or a manifest with --manifest)")
    p.add_argument("--output", required=True, help="s3:// prefix for the results")
    p.add_argument("--manifest", action="store_true", help="--input is a SageMaker manifest file (ManifestFile)")
    p.add_argument("--model-name", help="SageMaker model name (default derived from image and model data)")
    p.add_argument("--job-name", help="transform job name, or the prefix of each scheduled run's name")
    p.add_argument("--instance-type", default="ml.m5.xlarge")
    p.add_argument("--instance-count", type=int, default=1)
    p.add_argument("--max-concurrent", type=int, default=0,
                   help="MaxConcurrentTransforms per instance (0 lets SageMaker ask the container)")
    p.add_argument("--max-payload-mb", type=int, default=6, help="MaxPayloadInMB (1-100)")
    p.add_argument("--content-type", default="application/x-image", help="type each record is sent as")
    p.add_argument("--accept", default="application/jsonlines", choices=("application/json", "application/jsonlines"))
    p.add_argument("--split-type", default="None", help="None (whole files: images), Line, RecordIO or TFRecord")
    p.add_argument("--assemble-with", default="Line", help="None or Line")
    p.add_argument("--batch-strategy", default="SingleRecord", help="SingleRecord or MultiRecord")
    p.add_argument("--int8", action="store_true", help="the container runs the INT8 model")
    p.add_argument("--bad-records", choices=("error_row", "reject"), default="error_row",
                   help="error_row (default): an undecodable image gets a row with verdict error and the job goes "
                   "on; reject: it is answered 400, which fails the whole job")
    p.add_argument("--schedule", help="EventBridge Scheduler expression, e.g. 'cron(0 2 * * ? *)' or 'rate(1 day)'")
    p.add_argument("--schedule-name", help="schedule name (default: the job name)")
    p.add_argument("--schedule-role-arn", help="role EventBridge Scheduler assumes to start the job")
    p.add_argument("--timezone", default="UTC", help="time zone of the schedule expression")
    p.add_argument("--region", help="AWS region (default from the environment/profile)")
    p.add_argument("--dry-run", action="store_true", help="print the requests as JSON; send nothing")
    p.add_argument("-v", "--verbose", action="count", default=0)


def get_args_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Bulk scoring with a model bundle, locally or as SageMaker Batch Transform.",
        epilog="Exit codes: 0 done, 1 failed, 2 usage error.",
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    _score_parser(sub)
    _serve_parser(sub)
    _submit_parser(sub)
    return parser


def _load_bundle(location: str, cache_dir: Path, stack: ExitStack, verify_key: Path | None = None) -> Bundle:
    key = VerifyKey.from_file(verify_key) if verify_key is not None else None
    local = fetch_bundle(location, cache_dir)
    if local.is_file():
        extract = stack.enter_context(tempfile.TemporaryDirectory(prefix="qcsight-bundle-"))
        return load_bundle(local, extract_to=extract, verify_key=key)
    return load_bundle(local, verify_key=key)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _print_summary(summary: dict[str, Any], output: Path, summary_path: Path) -> None:
    run = summary["this_run"]
    lines = [
        f"scored {run['rows']} images this run ({run['errors']} errors) in {run['elapsed_s']:.1f} s, "
        f"{run['images_per_s']:.1f} images/s",
        f"output: {summary['rows']} rows ({summary['resumed_rows']} from before), {summary['errors']} errors",
        "verdicts: " + ", ".join(f"{k} {v}" for k, v in summary["by_verdict"].items()),
        "classes: " + ", ".join(f"{k} {v}" for k, v in summary["by_class"].items()),
        "defect rate: " + ("n/a" if summary["defect_rate"] is None else f"{summary['defect_rate']:.4f}"),
        f"results: {output}",
        f"summary: {summary_path}",
    ]
    print("\n".join(lines))


def run_score(args: argparse.Namespace) -> int:
    config = ScorerConfig(
        workers=args.workers, batch_size=args.batch_size, precision="int8" if args.int8 else "fp32",
        intra_op_threads=args.threads, chunk_timeout_s=args.chunk_timeout, reduced_decode=not args.full_decode,
        max_pixels=args.max_pixels,
    )
    source = open_source(args.input, images_only=args.images_only)
    summary_path = args.summary or args.output.with_name(args.output.name + ".summary.json")
    with ExitStack() as stack:
        bundle = _load_bundle(args.bundle, args.cache_dir or default_cache_dir(), stack, args.verify_key)
        scorer = Scorer(bundle, config)
        writer = open_writer(args.output, scorer.model, args.format, overwrite=args.overwrite)
        state = writer.open(resume=args.resume)
        stack.callback(writer.close)
        progress = make_progress(initial=state.tally.rows)
        stack.callback(progress.close)
        if not args.no_count:
            stack.callback(KeyCounter(source, progress).start().stop)
        stats = scorer.run(source, writer, state.done, progress)
    summary = summarize(stats, state.tally, scorer.model, {
        "input": args.input,
        "output": str(args.output),
        "bundle": args.bundle,
        "workers": config.workers,
        "batch_size": config.batch_size,
        "intra_op_threads": scorer.intra_op_threads,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    _write_json(summary_path, summary)
    _print_summary(summary, args.output, summary_path)
    return EXIT_OK


def run_serve(args: argparse.Namespace) -> int:
    from qcsight_batch.handler import PRECISION_ENV, RequestPolicy, load_model
    from qcsight_batch.server import InferenceServer, ServerConfig

    precision = "int8" if args.int8 else os.environ.get(PRECISION_ENV, "fp32")
    config = ServerConfig(host=args.host, port=args.port, max_payload_mb=args.max_payload_mb,
                          max_concurrent=args.max_concurrent, max_connections=max(256, args.max_concurrent),
                          header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout)
    bad_records = args.bad_records or bad_records_mode(os.environ)
    policy = RequestPolicy(error_rows=bad_records == "error_row", max_items=args.max_items)
    model = load_model(args.model_dir, precision, args.threads, max_pixels=args.max_pixels, policy=policy)
    server = InferenceServer(model, config)

    def stop(signum: int, frame: object) -> None:
        # stop() waits for the serving loop to end, so it cannot run on serve_forever's own thread.
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    finally:
        server.stop()
    return EXIT_OK


def run_submit(args: argparse.Namespace) -> int:
    from qcsight_batch.submit import ScheduleSpec, TransformJobSpec, default_model_name, plan, submit

    job_name = args.job_name or "qcsight-batch-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    spec = TransformJobSpec(
        job_name=job_name,
        model_name=args.model_name or default_model_name(args.image_uri, args.model_data),
        image_uri=args.image_uri, model_data=args.model_data, role_arn=args.role_arn,
        input_uri=args.input, output_uri=args.output, input_kind="ManifestFile" if args.manifest else "S3Prefix",
        content_type=args.content_type, accept=args.accept, split_type=args.split_type,
        assemble_with=args.assemble_with, batch_strategy=args.batch_strategy, instance_type=args.instance_type,
        instance_count=args.instance_count, max_concurrent=args.max_concurrent, max_payload_mb=args.max_payload_mb,
        precision="int8" if args.int8 else "fp32", bad_records=args.bad_records,
    )
    schedule = None
    if args.schedule:
        if not args.schedule_role_arn:
            raise BatchError("--schedule needs --schedule-role-arn (the role EventBridge Scheduler assumes)")
        schedule = ScheduleSpec(args.schedule_name or job_name, args.schedule, args.schedule_role_arn, args.timezone)
    if args.dry_run:
        print(json.dumps(plan(spec, schedule), indent=2))
        return EXIT_OK
    try:
        import boto3
    except ModuleNotFoundError as exc:
        raise BatchError("qcsight batch submit needs boto3: pip install 'qcsight[cloud]'") from exc
    session = boto3.session.Session(region_name=args.region)
    scheduler = session.client("scheduler") if schedule else None
    result = submit(spec, session.client("sagemaker"), schedule, scheduler)
    print(json.dumps(result, indent=2))
    return EXIT_OK


def main(argv: Sequence[str], prog: str = "qcsight batch") -> int:
    parser = get_args_parser(prog)
    args = parser.parse_args(list(argv))
    configure_logging(args.verbose)
    actions = {"score": run_score, "serve": run_serve, "submit": run_submit}
    return actions[args.action](args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
