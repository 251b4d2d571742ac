"""The command line of `qcsight train --sagemaker`: flags and examples, flags -> a validated plan, main()."""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from qcsight_aws.errors import AwsError
from qcsight_aws.s3 import BUCKET_RULE, S3Uri
from qcsight_aws.session import default_region
from qcsight_core.bundle import Manifest, load_bundle
from qcsight_core.checks import argument, check_int, check_number
from qcsight_core.cli import configure_logging, parse_args
from qcsight_core.errors import ConfigError
from qcsight_train.launch import neo
from qcsight_train.launch.plan import (
    CHECKPOINT_LOCAL_PATH,
    DEFAULT_COMPILE_MAX_RUN_S,
    DEFAULT_INSTANCE_TYPE,
    DEFAULT_MAX_RUN_S,
    DEFAULT_PROG,
    ENTRY_SCRIPT,
    METRIC_NAMES,
    NODE_SCRIPT,
    PYTORCH_IMAGE_PY,
    PYTORCH_IMAGE_VERSION,
    TUNING_STRATEGIES,
    AwsSpec,
    CompilationPlan,
    ComputeSpec,
    TrainingJobSpec,
    TrainingPlan,
    TuningSpec,
)
from qcsight_train.launch.source import default_source_dir
from qcsight_train.launch.submit import submit_compilation, submit_training

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_ROLE_ARN = re.compile(r"arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+")
_BASE_JOB_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,37}")
_HP_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,63}")
# argparse names the flag, the check says what is allowed: "argument --instance-count: an integer at least 1, got '0'"
_positive_int = argument(check_int, 1)
_positive_float = argument(check_number, 0.0, open_low=True)


# --------------------------------------------------------------------------- flags


EXAMPLES = f"""\
examples:
  # one training job, 2 x ml.g5.2xlarge, managed spot with checkpoints, wait for it
  %(prog)s --role arn:aws:iam::123456789012:role/SageMakerQcsight \\
      --data s3://my-bucket/tiles/train/ --validation s3://my-bucket/tiles/val/ \\
      --output-s3 s3://my-bucket/qcsight/models --checkpoint-s3 s3://my-bucket/qcsight/ckpt \\
      --instance-type ml.g5.2xlarge --instance-count 2 --spot --max-run 7200 --max-wait 14400 \\
      --arch resnet18 --epochs 20 --batch-size 64 --lr 0.001 --wait

  # 8-job Bayesian search over the learning rate and batch size, objective validation:macro_f1
  %(prog)s --role ... --data ... --output-s3 ... --tune --max-jobs 8 --max-parallel-jobs 2 \\
      --lr-range 1e-5 1e-2 --batch-sizes 32,64

  # compile an existing TorchScript model.tar.gz with Neo for a Jetson Xavier
  %(prog)s --role ... --neo-target jetson_xavier --model-s3 s3://my-bucket/ts/model.tar.gz \\
      --output-s3 s3://my-bucket/qcsight/neo --bundle runs/latest/bundle

  # print the request that would be sent; needs no credentials and sends nothing
  %(prog)s --role ... --data ... --output-s3 ... --dry-run

The default image is the SageMaker PyTorch training image {PYTORCH_IMAGE_VERSION} ({PYTORCH_IMAGE_PY}),
GPU or CPU build by instance type. Neo accepts PyTorch {', '.join(neo.CLOUD_PYTORCH_VERSIONS)} for cloud
targets and {', '.join(neo.EDGE_PYTORCH_VERSIONS)} for edge devices; the TorchScript file must be traced
with an accepted version (qcsight trains with torch 2.14, which Neo does not accept).
Exit codes: 0 done (or dry run printed), 1 an AWS call failed or no credentials, 2 usage error.
"""


def build_parser(prog: str = DEFAULT_PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Submit a SageMaker training job (torchrun on every node), a hyperparameter tuning job, "
                    "or a SageMaker Neo compilation job for qcsight.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sagemaker", action="store_true", help="run on SageMaker (what this command does)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging")

    aws = parser.add_argument_group("AWS")
    aws.add_argument("--role", metavar="ARN", help="IAM role SageMaker assumes (required)")
    aws.add_argument("--region", help="AWS region (default: AWS_DEFAULT_REGION / the profile's region)")
    aws.add_argument("--dry-run", action="store_true",
                     help="print the request JSON that would be sent and exit 0; uploads and sends nothing")
    aws.add_argument("--wait", action=argparse.BooleanOptionalAction, default=False,
                     help="poll until the job finishes (default: return once it is created)")
    aws.add_argument("--wait-timeout", type=_positive_int, metavar="SECONDS",
                     help="give up waiting after this long (default: the job's own time limits plus 30 min)")

    job = parser.add_argument_group("training job")
    job.add_argument("--data", metavar="S3_URI", help="training data prefix, the 'train' channel (s3://...)")
    job.add_argument("--validation", metavar="S3_URI", help="validation data prefix, the 'validation' channel")
    job.add_argument("--output-s3", metavar="S3_URI",
                     help="where model.tar.gz (or the Neo output) goes; source and drivers are staged here too")
    job.add_argument("--checkpoint-s3", metavar="S3_URI",
                     help=f"checkpoint prefix synced with {CHECKPOINT_LOCAL_PATH} (default with --spot: under "
                          "--output-s3, per job)")
    job.add_argument("--instance-type", default=DEFAULT_INSTANCE_TYPE,
                     help="training instance type (default: %(default)s)")
    job.add_argument("--instance-count", type=_positive_int, default=1, help="number of instances (default: 1)")
    job.add_argument("--processes-per-node", type=_positive_int,
                     help="torchrun processes per instance (default: one per GPU)")
    job.add_argument("--volume-size", type=_positive_int, default=30, metavar="GB", help="EBS volume per instance")
    job.add_argument("--spot", action="store_true", help="managed spot training (needs --max-wait >= --max-run)")
    job.add_argument("--max-run", type=_positive_int, metavar="SECONDS",
                     help=f"job time limit (default: {DEFAULT_MAX_RUN_S} for training, "
                          f"{DEFAULT_COMPILE_MAX_RUN_S} for Neo)")
    job.add_argument("--max-wait", type=_positive_int, metavar="SECONDS",
                     help="spot only: limit including time waiting for capacity (default: 2 x --max-run)")
    job.add_argument("--image-uri", help=f"training image (default: SageMaker PyTorch {PYTORCH_IMAGE_VERSION} "
                                         f"{PYTORCH_IMAGE_PY}, GPU or CPU by instance type)")
    job.add_argument("--source-dir", type=Path,
                     help=f"qcsight checkout to ship (default: this checkout); must hold {ENTRY_SCRIPT}")
    job.add_argument("--job-name", default=None, help="base job name (default: qcsight-train / qcsight-tune / "
                                                      "qcsight-neo)")

    hp = parser.add_argument_group("hyperparameters (passed to `qcsight train` inside the job; see its --help)")
    hp.add_argument("--arch", help="backbone, e.g. efficientnet_lite0, resnet18")
    hp.add_argument("--epochs", type=_positive_int, help="total epochs")
    hp.add_argument("--batch-size", type=_positive_int, help="images per process per step")
    hp.add_argument("--lr", type=_positive_float, help="peak learning rate")
    hp.add_argument("--img-size", type=_positive_int, help="model input size (also Neo's input shape)")
    hp.add_argument("--weights", help="auto, imagenet, none, package, or a state-dict path")
    hp.add_argument("--freeze-epochs", type=int, help="leading head-only epochs")
    hp.add_argument("--seed", type=int, help="random seed")
    hp.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                    help="any other `qcsight train` setting, e.g. --hp warmup_epochs=2 (repeatable)")

    tune = parser.add_argument_group("hyperparameter tuning")
    tune.add_argument("--tune", action="store_true", help="start a tuning job instead of one training job")
    tune.add_argument("--max-jobs", type=_positive_int, default=8, help="training jobs in all (default: 8)")
    tune.add_argument("--max-parallel-jobs", type=_positive_int, default=2, help="at once (default: 2)")
    tune.add_argument("--lr-range", type=_positive_float, nargs=2, metavar=("MIN", "MAX"), default=(1e-5, 1e-2),
                      help="learning rate searched on a log scale (default: 1e-5 1e-2)")
    tune.add_argument("--batch-sizes", metavar="N,N,...", help="also search these batch sizes, e.g. 32,64")
    tune.add_argument("--objective", choices=METRIC_NAMES, default="validation:macro_f1",
                      help="metric to optimise (default: %(default)s; *loss is minimised, others maximised)")
    tune.add_argument("--strategy", choices=TUNING_STRATEGIES, default="Bayesian")

    comp = parser.add_argument_group("SageMaker Neo compilation")
    comp.add_argument("--neo-target", metavar="DEVICE",
                      help=f"compile for a device: {', '.join(neo.CLOUD_TARGETS)}, or an edge device such as "
                           "jetson_xavier, rasp4b, x86_win64")
    comp.add_argument("--neo-platform", metavar="OS:ARCH[:ACCEL]",
                      help="compile for a platform instead, e.g. LINUX:ARM64:NVIDIA")
    comp.add_argument("--model-s3", metavar="S3_URI",
                      help="model.tar.gz holding a TorchScript model.pth (PyTorch path); without it, --bundle's "
                           "model.neo.onnx is compiled (ONNX 1.7: IR 7, opset 12), uploaded under --output-s3")
    comp.add_argument("--bundle", type=Path,
                      help="the qcsight bundle (dir or .tar.gz): its ONNX for Neo, input size, traced torch; with "
                           "--wait, the compiled model is added to a bundle directory (neo/<target>/)")
    comp.add_argument("--neo-framework-version", metavar="X.Y",
                      help="PyTorch version Neo loads the model with (default: the highest Neo accepts)")
    return parser



# --------------------------------------------------------------------------- flags -> plan


def _s3(flag: str, value: str | None, required: bool = True) -> str | None:
    if value is None:
        if required:
            raise ConfigError(flag, None, "required: an s3://bucket/prefix URI")
        return None
    S3Uri.parse(value, flag, allowed=f"an s3://bucket/prefix URI ({BUCKET_RULE})")
    return value


def _s3_folder(flag: str, value: str | None) -> S3Uri:
    """An S3 prefix used as a folder: s3://b/p/ and s3://b/p are the same place."""
    if value is None:
        raise ConfigError(flag, None, "required: an s3://bucket/prefix URI")
    return S3Uri.parse(value, flag, allowed=f"an s3://bucket/prefix URI ({BUCKET_RULE})").join()


def _role(value: str | None) -> str:
    if not value:
        raise ConfigError("--role", None, "required: the IAM role ARN SageMaker assumes, "
                                          "e.g. arn:aws:iam::123456789012:role/SageMakerQcsight")
    if not _ROLE_ARN.fullmatch(value):
        raise ConfigError("--role", value, "an IAM role ARN like arn:aws:iam::123456789012:role/NAME")
    return value


def _region(value: str | None) -> str:
    region = value or default_region()
    if not region:
        raise ConfigError("--region", None, "an AWS region: pass --region or set AWS_DEFAULT_REGION")
    return region


def training_instance_types() -> tuple[str, ...]:
    """Instance types CreateTrainingJob accepts, from botocore's SageMaker service model."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("sagemaker")
    shape = model.operation_model("CreateTrainingJob").input_shape.members["ResourceConfig"]
    return tuple(shape.members["InstanceType"].enum)


def _instance_type(value: str) -> str:
    allowed = training_instance_types()
    if value not in allowed:
        family = value.rsplit(".", 1)[0]
        near = [t for t in allowed if t.startswith(family + ".")] or [t for t in allowed if t.startswith("ml.g5.")]
        raise ConfigError("--instance-type", value, f"a SageMaker training instance type, e.g. {', '.join(near[:6])}")
    return value


def _hyperparameters(args: argparse.Namespace) -> dict[str, str]:
    """Training settings given on the command line, keyed as `qcsight train` spells its flags."""
    names = ("arch", "epochs", "batch_size", "lr", "img_size", "weights", "freeze_epochs", "seed")
    values = {name.replace("_", "-"): str(getattr(args, name)) for name in names if getattr(args, name) is not None}
    for item in args.hp:
        key, sep, value = item.partition("=")
        if not sep or not _HP_KEY.fullmatch(key) or key.startswith("sagemaker"):
            raise ConfigError("--hp", item, "KEY=VALUE with a `qcsight train` setting name, e.g. warmup_epochs=2")
        if {key, key.replace("_", "-"), key.replace("-", "_")} & values.keys():
            raise ConfigError("--hp", item, f"a setting not given twice ({key} is already set)")
        values[key] = value
    return values


def _compute(args: argparse.Namespace) -> ComputeSpec:
    max_run = args.max_run or DEFAULT_MAX_RUN_S
    if args.max_wait is not None and not args.spot:
        raise ConfigError("--max-wait", args.max_wait, "only with --spot (it bounds the wait for spot capacity)")
    max_wait = None
    if args.spot:
        max_wait = args.max_wait or 2 * max_run
        if max_wait < max_run:
            raise ConfigError("--max-wait", max_wait, f"at least --max-run ({max_run} s): it includes the run time")
    return ComputeSpec(
        instance_type=_instance_type(args.instance_type),
        instance_count=args.instance_count,
        processes_per_node=args.processes_per_node,
        volume_gb=args.volume_size,
        spot=args.spot,
        max_run_s=max_run,
        max_wait_s=max_wait,
    )


def _source_dir(value: Path | None) -> Path:
    source = (value or default_source_dir()).resolve()
    if not all((source / name).is_file() for name in ("pyproject.toml", ENTRY_SCRIPT, NODE_SCRIPT)):
        raise ConfigError("--source-dir", str(source), f"a qcsight checkout holding pyproject.toml, {ENTRY_SCRIPT} "
                                                       f"(the job's entry script) and {NODE_SCRIPT}")
    return source


def _base_name(value: str | None, default: str) -> str:
    name = value or default
    if not _BASE_JOB_NAME.fullmatch(name):
        raise ConfigError("--job-name", name, "1-38 letters, digits and hyphens, starting alphanumeric "
                                              "(SageMaker appends a timestamp)")
    return name


def _tuning(args: argparse.Namespace) -> TuningSpec:
    if args.max_parallel_jobs > args.max_jobs:
        raise ConfigError("--max-parallel-jobs", args.max_parallel_jobs, f"at most --max-jobs ({args.max_jobs})")
    low, high = args.lr_range
    if not low < high:
        raise ConfigError("--lr-range", f"{low} {high}", "MIN MAX with 0 < MIN < MAX")
    sizes: tuple[int, ...] = ()
    if args.batch_sizes:
        try:
            sizes = tuple(int(s) for s in args.batch_sizes.split(",") if s.strip())
        except ValueError:
            raise ConfigError("--batch-sizes", args.batch_sizes, "comma-separated whole numbers, e.g. 32,64") from None
        if not sizes or min(sizes) < 1:
            raise ConfigError("--batch-sizes", args.batch_sizes, "comma-separated whole numbers >= 1, e.g. 32,64")
    return TuningSpec(args.max_jobs, args.max_parallel_jobs, (low, high), sizes, args.objective, args.strategy)


def _aws(args: argparse.Namespace, role_arn: str, default_timeout_s: int) -> AwsSpec:
    return AwsSpec(
        region=_region(args.region),
        role_arn=role_arn,
        dry_run=args.dry_run,
        wait=args.wait,
        wait_timeout_s=args.wait_timeout or default_timeout_s,
    )


def plan_from_args(args: argparse.Namespace) -> TrainingPlan | CompilationPlan:
    """Validate the parsed flags into one plan; ConfigError names the flag at fault."""
    if args.neo_target or args.neo_platform:
        return _compilation_plan(args)
    for flag in ("model_s3", "bundle", "neo_framework_version"):
        if getattr(args, flag) is not None:
            raise ConfigError("--" + flag.replace("_", "-"), getattr(args, flag),
                              "only with --neo-target/--neo-platform")
    role = _role(args.role)  # checked first: the flag users most often forget
    job = TrainingJobSpec(
        base_job_name=_base_name(args.job_name, "qcsight-tune" if args.tune else "qcsight-train"),
        source_dir=_source_dir(args.source_dir),
        output=_s3_folder("--output-s3", args.output_s3),
        train_s3=str(_s3("--data", args.data)),
        validation_s3=_s3("--validation", args.validation, required=False),
        checkpoint_s3=_s3("--checkpoint-s3", args.checkpoint_s3, required=False),
        image_uri="",  # resolved below, once the region is known
        hyperparameters=_hyperparameters(args),
        compute=_compute(args),
    )
    tuning = _tuning(args) if args.tune else None
    if tuning is not None and job.compute.spot and job.checkpoint_s3 is None:
        # A training job picks a checkpoint prefix per job by itself; a tuning job's definition
        # is shared by all its jobs and must name one.
        raise ConfigError("--checkpoint-s3", None, "required with --tune --spot: the prefix the tuning job's "
                                                   "training jobs checkpoint to")
    limit = job.compute.max_wait_s or job.compute.max_run_s
    if tuning is not None:
        limit *= -(-tuning.max_jobs // tuning.max_parallel_jobs)  # rounds of parallel jobs
    aws = _aws(args, role, limit + 1800)
    job = replace(job, image_uri=args.image_uri or default_image_uri(aws.region, job.compute.instance_type))
    return TrainingPlan(aws=aws, job=job, tuning=tuning)


def default_image_uri(region: str, instance_type: str) -> str:
    """The SageMaker PyTorch training image for the region, GPU or CPU build by instance type.

    The SDK's public image_uris.retrieve knows the ECR account of every region (they differ),
    which is what it adds over writing the URI out here.
    """
    from sagemaker.core import image_uris

    try:
        return str(image_uris.retrieve(framework="pytorch", region=region, version=PYTORCH_IMAGE_VERSION,
                                       py_version=PYTORCH_IMAGE_PY, instance_type=instance_type,
                                       image_scope="training"))
    except ValueError as exc:
        raise ConfigError("--image-uri", None, f"given explicitly: the SDK knows no PyTorch {PYTORCH_IMAGE_VERSION} "
                                               f"training image for {region} / {instance_type} ({exc})") from exc


def _bundle_manifest(path: Path) -> Manifest:
    with tempfile.TemporaryDirectory(prefix="qcsight-neo-bundle-") as tmp:
        return load_bundle(path, extract_to=tmp if path.is_file() else None).manifest


def _compilation_plan(args: argparse.Namespace) -> CompilationPlan:
    if args.neo_target and args.neo_platform:
        raise ConfigError("--neo-platform", args.neo_platform, "either --neo-target or --neo-platform, not both")
    if args.tune:
        raise ConfigError("--tune", True, "not with --neo-target: compile a model after its tuning job picked it")
    target = neo.parse_device(args.neo_target) if args.neo_target else neo.parse_platform(args.neo_platform)
    role = _role(args.role)
    if args.model_s3 is None and args.bundle is not None:
        return _onnx_compilation_plan(args, target, role)
    if args.model_s3 is None:
        raise ConfigError("--model-s3", None, "required with --neo-target: the s3://.../model.tar.gz to compile")
    framework_version = neo.resolve_framework_version(target, args.neo_framework_version)
    manifest = None
    if args.bundle is not None:
        if not args.bundle.exists():
            raise ConfigError("--bundle", str(args.bundle), "an existing bundle directory or .tar.gz")
        manifest = _bundle_manifest(args.bundle)
        traced = neo.traced_torch_version(manifest)
        if traced:
            neo.check_traced_version(traced, framework_version)
    if manifest is None and args.img_size is None:
        raise ConfigError("--bundle", None, "--bundle (to read the input size) or --img-size: Neo needs the "
                                            "model's input shape")
    output = _s3_folder("--output-s3", args.output_s3)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    spec = neo.CompilationSpec(
        job_name=neo.compilation_job_name(_base_name(args.job_name, "qcsight-neo"), target, stamp),
        role_arn=role,
        model_s3=args.model_s3,
        output_s3=output.uri,
        target=target,
        framework_version=framework_version,
        input_shape=neo.input_shape(manifest, args.img_size),
        max_runtime_s=args.max_run or DEFAULT_COMPILE_MAX_RUN_S,
    )
    return CompilationPlan(aws=_aws(args, role, spec.max_runtime_s + 600), spec=spec)


def _onnx_compilation_plan(args: argparse.Namespace, target: neo.NeoTarget, role: str) -> CompilationPlan:
    """--bundle without --model-s3: compile the bundle's model.neo.onnx (policy and request in launch.neo)."""
    neo.check_onnx_target(target)
    if args.neo_framework_version is not None:
        raise ConfigError("--neo-framework-version", args.neo_framework_version,
                          "only with --model-s3 (PyTorch): Neo takes no framework version for ONNX")
    if not args.bundle.exists():
        raise ConfigError("--bundle", str(args.bundle), "an existing bundle directory or .tar.gz")
    manifest = _bundle_manifest(args.bundle)
    entry = neo.neo_onnx_entry(manifest, str(args.bundle))
    output = _s3_folder("--output-s3", args.output_s3)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    job_name = neo.compilation_job_name(_base_name(args.job_name, "qcsight-neo"), target, stamp)
    spec = neo.CompilationSpec(job_name=job_name, role_arn=role, model_s3=output.join(job_name, "model.tar.gz").uri,
                               output_s3=output.uri, target=target, framework_version="",
                               input_shape=neo.input_shape(manifest, None),
                               max_runtime_s=args.max_run or DEFAULT_COMPILE_MAX_RUN_S, framework="ONNX")
    return CompilationPlan(aws=_aws(args, role, spec.max_runtime_s + 600), spec=spec,
                           onnx=neo.OnnxSource(args.bundle, entry))



# --------------------------------------------------------------------------- entry point


def main(argv: list[str], prog: str = DEFAULT_PROG) -> int:
    """Parse, validate, submit (or print with --dry-run); exit 0 done, 1 AWS failure, 2 usage."""
    parser = build_parser(prog)
    args = parse_args(parser, argv)
    if isinstance(args, int):
        return args
    configure_logging(args.verbose)
    try:
        plan = plan_from_args(args)
    except ConfigError as exc:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        return _missing_cloud_extra(prog, exc)
    try:
        result = submit_compilation(plan) if isinstance(plan, CompilationPlan) else submit_training(plan)
    except AwsError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ModuleNotFoundError as exc:  # boto3, when --region and --image-uri needed neither it nor the SDK
        return _missing_cloud_extra(prog, exc)
    print(json.dumps(result, indent=2, default=str))
    return EXIT_OK


def _missing_cloud_extra(prog: str, exc: ModuleNotFoundError) -> int:
    print(f"{prog}: needs the 'cloud' extra (module {exc.name!r} is missing): pip install 'qcsight[cloud]'",
          file=sys.stderr)
    return EXIT_USAGE
