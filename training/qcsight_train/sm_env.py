"""The SageMaker training-container contract: channels, model/output dirs, hyperparameters, hosts.

Read once from an environment mapping at the edge of the program; locally every field is
empty and training behaves as a plain process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qcsight_core.errors import ConfigError

SM_CHECKPOINT_DIR = "/opt/ml/checkpoints"
# SageMaker's own keys that may show up among hyperparameters and are not ours to validate.
_SAGEMAKER_INTERNAL_PREFIXES = ("sagemaker_", "_tuning_objective_metric")


@dataclass(frozen=True)
class SageMakerEnv:
    """What the training container tells the entry point.

    Attributes:
        channels: channel name (lower case) -> local directory (SM_CHANNEL_<NAME>).
        model_dir: SM_MODEL_DIR; SageMaker uploads it as model.tar.gz.
        output_data_dir: SM_OUTPUT_DATA_DIR; uploaded as output.tar.gz (reports, config).
        hyperparameters: SM_HPS decoded (values as SageMaker stored them, strings or JSON).
        hosts: SM_HOSTS.
        current_host: SM_CURRENT_HOST.
        job_name: TRAINING_JOB_NAME.
        checkpoint_dir: QCSIGHT_CHECKPOINT_DIR (set by our launcher), else /opt/ml/checkpoints, the
            local path SageMaker syncs with the job's checkpoint S3 prefix.
    """

    channels: Mapping[str, str] = field(default_factory=dict)
    model_dir: str = ""
    output_data_dir: str = ""
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    hosts: tuple[str, ...] = ()
    current_host: str = ""
    job_name: str = ""
    checkpoint_dir: str = SM_CHECKPOINT_DIR

    @property
    def active(self) -> bool:
        """True inside a SageMaker training container (or a local run with its environment filled in)."""
        return bool(self.model_dir or self.channels)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SageMakerEnv:
        """Parse the SM_* variables.

        Raises:
            ConfigError: SM_HPS or SM_HOSTS is present but not the JSON SageMaker writes.
        """
        env = os.environ if environ is None else environ
        channels = {key[len("SM_CHANNEL_"):].lower(): value for key, value in env.items()
                    if key.startswith("SM_CHANNEL_") and value}
        hps = _json(env, "SM_HPS", {})
        if not isinstance(hps, dict):
            raise ConfigError("SM_HPS", env.get("SM_HPS"), "a JSON object of hyperparameters")
        hosts = _json(env, "SM_HOSTS", [])
        if not isinstance(hosts, list):
            raise ConfigError("SM_HOSTS", env.get("SM_HOSTS"), "a JSON list of host names")
        return cls(
            channels=channels,
            model_dir=env.get("SM_MODEL_DIR", ""),
            output_data_dir=env.get("SM_OUTPUT_DATA_DIR", ""),
            hyperparameters={k: v for k, v in hps.items() if not str(k).startswith(_SAGEMAKER_INTERNAL_PREFIXES)},
            hosts=tuple(str(h) for h in hosts),
            current_host=env.get("SM_CURRENT_HOST", ""),
            job_name=env.get("TRAINING_JOB_NAME", ""),
            checkpoint_dir=env.get("QCSIGHT_CHECKPOINT_DIR", "") or SM_CHECKPOINT_DIR,
        )

    def settings(self) -> dict[str, Any]:
        """The training settings the environment implies (data, validation, output, checkpoint dir, run id)."""
        if not self.active:
            return {}
        result: dict[str, Any] = {"checkpoint_dir": self.checkpoint_dir}
        train = self.channels.get("train") or self.channels.get("training")
        if train:
            result["data"] = train
        if self.channels.get("validation"):
            result["validation"] = self.channels["validation"]
        if self.channels.get("test"):
            result["test"] = self.channels["test"]
        if self.channels.get("reviewed"):  # the retraining pipeline's reviewed-image manifest
            result["reviewed"] = self.channels["reviewed"]
        if self.model_dir:
            result["output"] = self.model_dir
        if self.job_name:
            result["run_id"] = self.job_name
        return result


def _json(env: Mapping[str, str], key: str, default: Any) -> Any:
    text = env.get(key, "")
    if not text:
        return default
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(key, text[:200], f"JSON as SageMaker writes it ({exc.msg})") from exc
