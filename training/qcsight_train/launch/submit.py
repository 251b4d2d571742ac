"""Send a plan: pack and upload the source, create the job with boto3, optionally wait for it; or, dry, print it."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qcsight_aws import jobs
from qcsight_aws.errors import aws_errors
from qcsight_aws.s3 import S3Uri, download_file, upload_file
from qcsight_aws.session import boto_session
from qcsight_core.bundle import load_bundle
from qcsight_train.launch import neo
from qcsight_train.launch.job_requests import (
    source_location,
    training_job_name,
    training_request,
    tuning_job_name,
    tuning_request,
)
from qcsight_train.launch.plan import AwsSpec, CompilationPlan, TrainingPlan
from qcsight_train.launch.source import package_source

log = logging.getLogger(__name__)

_NO_CREDENTIALS_HINT = "configure them, or use --dry-run to print the request without sending it"


def console_url(region: str, kind: str, name: str) -> str:
    return f"https://{region}.console.aws.amazon.com/sagemaker/home?region={region}#/{kind}/{name}"


def submit_training(plan: TrainingPlan, now: datetime | None = None) -> dict[str, Any]:
    """Create the training (or tuning) job; in a dry run return the request and the planned upload instead."""
    aws, job = plan.aws, plan.job
    now = now or datetime.now(timezone.utc)
    tuning = plan.tuning is not None
    operation = "CreateHyperParameterTuningJob" if tuning else "CreateTrainingJob"
    with tempfile.TemporaryDirectory(prefix="qcsight-sagemaker-") as tmp:
        package = package_source(job.source_dir, Path(tmp))
        source = source_location(job, package.sha256)
        if tuning:
            name = tuning_job_name(job.base_job_name, now)
            request = tuning_request(plan, name, source)
        else:
            name = training_job_name(job.base_job_name, now)
            request = training_request(plan, name, source)
        if aws.dry_run:
            upload = {"what": "source", "s3": source.uri, "files": str(len(package.files)), "sha256": package.sha256}
            return {"dry_run": True, "operation": operation, "request": request, "uploads": [upload]}
        session = boto_session(aws.region, need_credentials=True, hint=_NO_CREDENTIALS_HINT)
        upload_file(session.client("s3"), package.tarball, source)
        log.info("uploaded source to %s", source)
    client = session.client("sagemaker")
    with aws_errors(operation):
        if tuning:
            client.create_hyper_parameter_tuning_job(**request)
        else:
            client.create_training_job(**request)
    log.info("%s: created %s", operation, name)
    if tuning:
        describe = _describer(client.describe_hyper_parameter_tuning_job, HyperParameterTuningJobName=name)
        result = {"operation": operation, "tuning_job_name": name,
                  "console": console_url(aws.region, "hyper-tuning-jobs", name)}
        status = jobs.TUNING
    else:
        describe = _describer(client.describe_training_job, TrainingJobName=name)
        result = {"operation": operation, "training_job_name": name,
                  "model_artifacts": job.output.join(name, "output", "model.tar.gz").uri,
                  "console": console_url(aws.region, "jobs", name)}
        status = jobs.TRAINING
    result["source_s3"] = source.uri
    result["status"] = _final_status(describe, status, aws) if aws.wait else "created"
    return result


def submit_compilation(plan: CompilationPlan) -> dict[str, Any]:
    """Create the Neo compilation job (uploading the bundle's Neo ONNX first); in a dry run return the request."""
    aws, spec = plan.aws, plan.spec
    if plan.onnx is not None:
        request = neo.build_onnx_compilation_request(spec, plan.onnx.input_name)
    else:
        request = neo.build_compilation_request(spec)
        log.warning("Neo loads the model with PyTorch %s: model.pth in %s must be traced with torch <= %s "
                    "(qcsight trains with torch 2.14)", spec.framework_version, spec.model_s3, spec.framework_version)
    if aws.dry_run:
        uploads = [{"what": "model", "s3": spec.model_s3, "file": plan.onnx.entry.file}] if plan.onnx else []
        return {"dry_run": True, "operation": "CreateCompilationJob", "request": request, "uploads": uploads}
    session = boto_session(aws.region, need_credentials=True, hint=_NO_CREDENTIALS_HINT)
    if plan.onnx is not None:
        _upload_neo_onnx(session, plan.onnx, spec.model_s3)
    client = session.client("sagemaker")
    with aws_errors("CreateCompilationJob"):
        arn = client.create_compilation_job(**request)["CompilationJobArn"]
    log.info("CreateCompilationJob: created %s", spec.job_name)
    result = {"operation": "CreateCompilationJob", "compilation_job_name": spec.job_name, "arn": arn,
              "output_s3": spec.output_s3, "console": console_url(aws.region, "compilation-jobs", spec.job_name)}
    describe = _describer(client.describe_compilation_job, CompilationJobName=spec.job_name)
    result["status"] = _final_status(describe, jobs.COMPILATION, aws) if aws.wait else "created"
    if plan.onnx is not None and result["status"] == "COMPLETED" and plan.onnx.bundle.is_dir():
        result["attached"] = _attach_compiled(session, describe(), plan)
    return result


def _upload_neo_onnx(session: Any, source: neo.OnnxSource, model_s3: str) -> None:
    """Pack the bundle's model.neo.onnx alone as the model.tar.gz Neo compiles, and upload it to model_s3."""
    with tempfile.TemporaryDirectory(prefix="qcsight-neo-") as tmp:
        bundle_dir = source.bundle if source.bundle.is_dir() else load_bundle(source.bundle, extract_to=tmp).path
        tarball = neo.pack_neo_onnx(bundle_dir, source.entry, Path(tmp) / "upload" / "model.tar.gz")
        upload_file(session.client("s3"), tarball, S3Uri.parse(model_s3, "--model-s3"))
    log.info("uploaded %s to %s", source.entry.file, model_s3)


def _attach_compiled(session: Any, description: Mapping[str, Any], plan: CompilationPlan) -> str | None:
    """Download the compiled model and add it to the bundle directory (neo/<target>/, a runtimes entry)."""
    artefacts = str(description.get("ModelArtifacts", {}).get("S3ModelArtifacts", ""))
    location = S3Uri.parse(artefacts, "ModelArtifacts.S3ModelArtifacts")
    s3 = session.client("s3")
    with aws_errors(f"listing {artefacts}"):
        listed = s3.list_objects_v2(Bucket=location.bucket, Prefix=location.key).get("Contents", [])
    key = neo.find_compiled([(o["Key"], o["LastModified"].timestamp()) for o in listed],
                            location.key if location.key.endswith(".tar.gz") else "", plan.spec.target)
    if key is None or plan.onnx is None:
        log.warning("no compiled model found under %s; the bundle is left as it was", artefacts)
        return None
    compiled = S3Uri(location.bucket, key)
    with tempfile.TemporaryDirectory(prefix="qcsight-neo-") as tmp:
        local = Path(tmp) / Path(key).name
        download_file(s3, compiled, local)
        neo.attach_compiled(plan.onnx.bundle, plan.spec.target, local, plan.spec.job_name)
    log.info("added the compiled model for %s to %s", plan.spec.target.label, plan.onnx.bundle)
    return compiled.uri


def _describer(call: Callable[..., Mapping[str, Any]], **kwargs: str) -> Callable[[], Mapping[str, Any]]:
    def describe() -> Mapping[str, Any]:
        with aws_errors(call.__name__):
            return call(**kwargs)
    return describe


def _final_status(describe: Callable[[], Mapping[str, Any]], status: jobs.JobStatus, aws: AwsSpec) -> str:
    description = jobs.wait_for_job(describe, status, aws.wait_timeout_s, aws.poll_s,
                                    hint=" (see the console link); raise --wait-timeout to wait longer")
    for metric in description.get("FinalMetricDataList", []):
        log.info("final %s = %s", metric.get("MetricName"), metric.get("Value"))
    return str(description[status.key])
