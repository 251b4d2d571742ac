"""CreateTrainingJob and CreateHyperParameterTuningJob requests as plain dicts, and the job names they carry.

A training job starts each node with our own command (NODE_COMMAND): unpack the source tarball
from the `code` channel and run training/sagemaker_node.py, which installs the requirements,
fills in the SM_* environment and starts torchrun. A tuning job cannot set a container entry
point, so its jobs start through the PyTorch image's own launcher (the SageMaker training
toolkit), which reads `sagemaker_program` and `sagemaker_submit_directory` from the
hyperparameters and, with `sagemaker_torch_distributed_enabled`, runs the program under torchrun.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from qcsight_aws.jobs import SOURCE_TARBALL
from qcsight_aws.s3 import S3Uri
from qcsight_train.launch.plan import (
    CHECKPOINT_LOCAL_PATH,
    ENTRY_SCRIPT,
    METRIC_DEFINITIONS,
    NODE_SCRIPT,
    ComputeSpec,
    TrainingJobSpec,
    TrainingPlan,
    TuningSpec,
)

log = logging.getLogger(__name__)

CODE_CHANNEL = "code"
# The working directory of every node; the code channel holds the tarball at /opt/ml/input/data/code/.
NODE_COMMAND = ("set -e; mkdir -p /opt/ml/code; cd /opt/ml/code; "
                f"tar -xzf /opt/ml/input/data/{CODE_CHANNEL}/{SOURCE_TARBALL}; exec python3 {NODE_SCRIPT}")
# CreateHyperParameterTuningJob's limit on the job name, which SageMaker extends per training job.
_TUNING_NAME_MAX = 32


def training_job_name(base: str, now: datetime) -> str:
    """base-YYYYmmddHHMMSS: at most 53 characters for a base of up to 38 (the API allows 63)."""
    return f"{base}-{now:%Y%m%d%H%M%S}"


def tuning_job_name(base: str, now: datetime) -> str:
    """base-yymmdd-HHMMSS within the tuning API's 32 characters (the base is cut short to fit)."""
    stamp = f"{now:%y%m%d-%H%M%S}"
    return f"{base[:_TUNING_NAME_MAX - len(stamp) - 1].rstrip('-')}-{stamp}"


def source_location(job: TrainingJobSpec, sha256: str) -> S3Uri:
    """Content-addressed: the same code gives the same key, so a job launched again uploads nothing new."""
    return job.output.join(job.base_job_name, "source", sha256[:16], SOURCE_TARBALL)


def _channel(name: str, uri: str) -> dict[str, Any]:
    return {
        "ChannelName": name,
        "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uri,
                                        "S3DataDistributionType": "FullyReplicated"}},
        "InputMode": "File",
    }


def _data_channels(job: TrainingJobSpec) -> list[dict[str, Any]]:
    channels = [_channel("train", job.train_s3)]
    if job.validation_s3:
        channels.append(_channel("validation", job.validation_s3))
    return channels


def _resources(compute: ComputeSpec) -> dict[str, Any]:
    return {"InstanceType": compute.instance_type, "InstanceCount": compute.instance_count,
            "VolumeSizeInGB": compute.volume_gb}


def _stopping(compute: ComputeSpec) -> dict[str, Any]:
    stopping: dict[str, Any] = {"MaxRuntimeInSeconds": compute.max_run_s}
    if compute.max_wait_s is not None:
        stopping["MaxWaitTimeInSeconds"] = compute.max_wait_s
    return stopping


def _common(plan: TrainingPlan, checkpoint_s3: str | None) -> dict[str, Any]:
    """The members a training job and a tuning job's training definition share."""
    job = plan.job
    common: dict[str, Any] = {
        "RoleArn": plan.aws.role_arn,
        "OutputDataConfig": {"S3OutputPath": job.output.uri, "CompressionType": "GZIP"},
        "ResourceConfig": _resources(job.compute),
        "StoppingCondition": _stopping(job.compute),
    }
    if job.compute.spot:
        common["EnableManagedSpotTraining"] = True
    if checkpoint_s3:
        common["CheckpointConfig"] = {"S3Uri": checkpoint_s3, "LocalPath": CHECKPOINT_LOCAL_PATH}
    return common


def _algorithm(job: TrainingJobSpec) -> dict[str, Any]:
    return {"TrainingImage": job.image_uri, "TrainingInputMode": "File",
            "MetricDefinitions": [dict(m) for m in METRIC_DEFINITIONS]}


def node_command(compute: ComputeSpec) -> str:
    """The shell command every node runs (at most 256 characters: one ContainerArguments item)."""
    if compute.processes_per_node is None:
        return NODE_COMMAND
    return f"{NODE_COMMAND} --processes-per-node {compute.processes_per_node}"


def training_request(plan: TrainingPlan, name: str, source: S3Uri) -> dict[str, Any]:
    """CreateTrainingJob: torchrun on every node through our node script, metrics, checkpoints, spot."""
    job = plan.job
    # A spot job must checkpoint to survive an interruption; without --checkpoint-s3, one prefix per job.
    checkpoint = job.checkpoint_s3 or (job.output.join(job.base_job_name, name, "checkpoints").uri
                                       if job.compute.spot else None)
    return {
        "TrainingJobName": name,
        "AlgorithmSpecification": {**_algorithm(job), "ContainerEntrypoint": ["/bin/bash"],
                                   "ContainerArguments": ["-c", node_command(job.compute)]},
        "HyperParameters": dict(job.hyperparameters),
        "InputDataConfig": [*_data_channels(job), _channel(CODE_CHANNEL, source.uri)],
        **_common(plan, checkpoint),
    }


def _parameter_ranges(tuning: TuningSpec) -> dict[str, Any]:
    ranges: dict[str, Any] = {"ContinuousParameterRanges": [
        {"Name": "lr", "MinValue": str(tuning.lr_range[0]), "MaxValue": str(tuning.lr_range[1]),
         "ScalingType": "Logarithmic"}]}
    if tuning.batch_sizes:
        ranges["CategoricalParameterRanges"] = [{"Name": "batch-size", "Values": [str(b) for b in tuning.batch_sizes]}]
    return ranges


def _static_hyperparameters(plan: TrainingPlan, tuning: TuningSpec, source: S3Uri) -> dict[str, str]:
    tuned = {"lr", "batch-size"} if tuning.batch_sizes else {"lr"}
    static = {k: v for k, v in plan.job.hyperparameters.items() if k.replace("_", "-") not in tuned}
    if plan.job.compute.gpu:
        # The toolkit's flag for torchrun (one process per GPU); CPU jobs run one process per instance.
        static["sagemaker_torch_distributed_enabled"] = "true"
    elif plan.job.compute.instance_count > 1:
        log.warning("tuning on CPU instances: each training job runs one process per instance (no torchrun)")
    return {**static, "sagemaker_program": ENTRY_SCRIPT, "sagemaker_submit_directory": source.uri}


def tuning_request(plan: TrainingPlan, name: str, source: S3Uri) -> dict[str, Any]:
    """CreateHyperParameterTuningJob: lr on a log scale (and batch sizes), the rest static."""
    tuning = plan.tuning
    if tuning is None:
        raise ValueError("tuning_request needs a plan with tuning")
    config: Mapping[str, Any] = {
        "Strategy": tuning.strategy,
        "ResourceLimits": {"MaxNumberOfTrainingJobs": tuning.max_jobs,
                           "MaxParallelTrainingJobs": tuning.max_parallel_jobs},
        "HyperParameterTuningJobObjective": {"Type": tuning.objective_type, "MetricName": tuning.objective},
        "ParameterRanges": _parameter_ranges(tuning),
        "TrainingJobEarlyStoppingType": "Off",
    }
    definition = {
        "AlgorithmSpecification": _algorithm(plan.job),
        "StaticHyperParameters": _static_hyperparameters(plan, tuning, source),
        "InputDataConfig": _data_channels(plan.job),
        **_common(plan, plan.job.checkpoint_s3),
    }
    return {"HyperParameterTuningJobName": name, "HyperParameterTuningJobConfig": dict(config),
            "TrainingJobDefinition": definition}
