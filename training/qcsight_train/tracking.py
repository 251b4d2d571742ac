"""Experiment tracking: every `qcsight train` run logged to MLflow, or to nothing when mlflow is not installed.

Where runs go (`--tracking-uri`):

- empty (default): a local store `mlruns/` in the working directory (on SageMaker, in
  SM_OUTPUT_DATA_DIR, which the job uploads): `mlruns/mlflow.db` (SQLite: MLflow 3.x refuses
  its old file store unless told otherwise) and the artefacts under `mlruns/artifacts/`;
- a directory path: the same layout there;
- `sqlite:///...`, `http(s)://...`: used as given;
- `arn:aws:sagemaker:REGION:ACCOUNT:mlflow-tracking-server/NAME` (or `mlflow-app/...`): a SageMaker
  managed MLflow tracking server, the way the `sagemaker-mlflow` plugin documents it: the ARN is
  the tracking URI, and the plugin turns it into the server's HTTPS endpoint with SigV4-signed
  requests made with the caller's AWS credentials;
- `none`: no tracking.

A run logs its resolved settings as params (with which defaults were adapted), one metric
step per epoch, the bundle, evaluation report and plots, config and history as artefacts,
and registers the bundle as a new version of the model named by `--name`. Tracking never
fails a training run: an unreachable server or a missing package is logged and the run goes on.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcsight_core.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_DIR = "mlruns"
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
OFF = "none"
_ARN = re.compile(r"arn:aws[a-z-]*:sagemaker:[a-z0-9-]+:\d{12}:(mlflow-tracking-server|mlflow-app)/[A-Za-z0-9-]+")
_MAX_PARAM = 500  # MLflow's limit on a param value's length in its SQL stores


@dataclass(frozen=True)
class TrackingTarget:
    """A resolved --tracking-uri.

    Attributes:
        uri: what MLflow is given as tracking (and registry) URI.
        artifact_location: where a new experiment keeps artefacts (local stores), else "" (server's default).
        kind: local, uri, sagemaker or off.
    """

    uri: str
    artifact_location: str = ""
    kind: str = "local"


def resolve(value: str, default_dir: Path) -> TrackingTarget:
    """--tracking-uri to a TrackingTarget (default_dir: where the local store goes when value is empty)."""
    text = value.strip()
    if text.lower() == OFF:
        return TrackingTarget("", "", "off")
    if text.startswith("arn:"):
        if not _ARN.fullmatch(text):
            raise ConfigError("tracking_uri", text, "a SageMaker MLflow tracking server ARN, arn:aws:sagemaker:REGION:"
                              "ACCOUNT:mlflow-tracking-server/NAME")
        return TrackingTarget(text, "", "sagemaker")
    if "://" in text:
        return TrackingTarget(text, "", "uri")
    root = Path(text) if text else default_dir
    root = root.resolve()
    return TrackingTarget(f"sqlite:///{root / DB_NAME}", (root / ARTIFACTS_DIR).as_uri(), "local")


def mlflow_available() -> bool:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return False
    return True


class Tracker:
    """One tracked run (MlflowClient with an explicit run id: no global MLflow state), or a no-op."""

    def __init__(self, client: Any = None, run_id: str = "", target: TrackingTarget | None = None) -> None:
        self._client = client
        self.run_id = run_id
        self.target = target

    @property
    def active(self) -> bool:
        return self._client is not None

    def _call(self, what: str, *args: Any, **kwargs: Any) -> Any:
        if self._client is None:
            return None
        try:
            return getattr(self._client, what)(*args, **kwargs)
        except Exception as exc:  # tracking must never fail a training run; MLflow raises many types
            log.warning("MLflow %s failed (%s); tracking stops for this run", what, exc)
            self._client = None
            return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self._client is None:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MAX_PARAM]) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self._call("log_batch", self.run_id, params=items[start:start + 100])

    def log_epochs(self, history: Iterable[Mapping[str, Any]], prefix: str = "") -> None:
        if self._client is None:
            return
        from mlflow.entities import Metric

        metrics = []
        for record in history:
            step = int(record["epoch"])
            for key in ("train_loss", "val_loss", "val_acc", "val_macro_f1", "lr", "images_per_s", "seconds"):
                value = record.get(key)
                if isinstance(value, (int, float)) and value == value:
                    metrics.append(Metric(f"{prefix}{key}", float(value), 0, step))
        for start in range(0, len(metrics), 1000):
            self._call("log_batch", self.run_id, metrics=metrics[start:start + 1000])

    def log_metrics(self, values: Mapping[str, float | None]) -> None:
        if self._client is None:
            return
        from mlflow.entities import Metric

        metrics = [Metric(k, float(v), 0, 0) for k, v in values.items() if isinstance(v, (int, float))]
        self._call("log_batch", self.run_id, metrics=metrics)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self._call("set_tag", self.run_id, key, str(value)[:5000])

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self._call("log_artifacts", self.run_id, os.fspath(path), artifact_path)
        elif path.is_file():
            self._call("log_artifact", self.run_id, os.fspath(path), artifact_path)

    def register(self, name: str, artifact_path: str, description: str) -> str | None:
        """A new version of registered model `name` whose source is this run's artefact: returns the version."""
        if self._client is None:
            return None
        from mlflow.exceptions import MlflowException

        try:
            self._client.get_registered_model(name)
        except MlflowException:
            self._call("create_registered_model", name)
        run = self._call("get_run", self.run_id)
        if run is None:
            return None
        source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
        version = self._call("create_model_version", name, source, run_id=self.run_id, description=description)
        return None if version is None else str(version.version)

    def finish(self, status: str = "FINISHED") -> None:
        self._call("set_terminated", self.run_id, status)


def start(uri: str, default_dir: Path, experiment: str, run_name: str, tags: Mapping[str, str]) -> Tracker:
    """Open a tracked run, or a no-op Tracker (mlflow not installed, --tracking-uri none, or the store fails)."""
    target = resolve(uri, default_dir)
    if target.kind == "off":
        log.info("experiment tracking off (--tracking-uri none)")
        return Tracker()
    if not mlflow_available():
        log.info("experiment tracking skipped: mlflow is not installed (pip install 'qcsight[tracking]')")
        return Tracker()
    if target.kind == "sagemaker":
        try:
            import sagemaker_mlflow  # noqa: F401  (registers the arn:// tracking store and SigV4 auth)
        except ImportError:
            log.warning("experiment tracking skipped: --tracking-uri is a SageMaker MLflow ARN, which needs the "
                        "sagemaker-mlflow plugin (pip install 'qcsight[tracking]')")
            return Tracker()
    if target.kind == "local":
        Path(target.uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        logging.getLogger("alembic").setLevel(logging.WARNING)  # the store's schema migrations log every step
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=target.uri, registry_uri=target.uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = (found.experiment_id if found is not None else
                         client.create_experiment(experiment, artifact_location=target.artifact_location or None))
        run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    except Exception as exc:  # a store that cannot be reached or written must not stop training
        log.warning("experiment tracking skipped: cannot open MLflow at %s (%s)", target.uri, exc)
        return Tracker()
    log.info("tracking run %s in experiment %r at %s", run.info.run_id, experiment, target.uri)
    return Tracker(client, run.info.run_id, target)
