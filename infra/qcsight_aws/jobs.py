"""Waiting for a SageMaker job: poll its Describe* call until it finishes, fails, or the deadline passes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from qcsight_aws.errors import JobError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobStatus:
    """How a kind of job reports its state in its Describe* response."""

    key: str
    done: tuple[str, ...]
    failed: tuple[str, ...]


TRAINING = JobStatus("TrainingJobStatus", ("Completed",), ("Failed", "Stopped"))
TUNING = JobStatus("HyperParameterTuningJobStatus", ("Completed",), ("Failed", "Stopped", "DeleteFailed"))
COMPILATION = JobStatus("CompilationJobStatus", ("COMPLETED",), ("FAILED", "STOPPED"))
TRANSFORM = JobStatus("TransformJobStatus", ("Completed",), ("Failed", "Stopped"))

# The training code as one object: `qcsight train launch` uploads it as a training job's code channel,
# and the retraining pipeline's processing steps unpack the same file to evaluate with that code.
SOURCE_TARBALL = "sourcedir.tar.gz"


def wait_for_job(describe: Callable[[], Mapping[str, Any]], status: JobStatus, timeout_s: float, poll_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, hint: str = "") -> Mapping[str, Any]:
    """Poll describe() until the job finishes or timeout_s passes; each change of state is logged once.

    Args:
        hint: appended to the timeout's message: how the caller can wait longer.

    Returns:
        The last description, whose status is one of status.done.

    Raises:
        JobError: the job failed or stopped (with its FailureReason), or the timeout passed (the job keeps running).
    """
    deadline = clock() + timeout_s
    last = None
    while True:
        description = describe()
        state = str(description.get(status.key, "?"))
        detail = str(description.get("SecondaryStatus", ""))
        if (state, detail) != last:
            log.info("status %s%s", state, f" ({detail})" if detail else "")
            last = (state, detail)
        if state in status.done:
            return description
        if state in status.failed:
            reason = description.get("FailureReason") or "no reason given"
            raise JobError(f"job ended {state}: {reason}")
        if clock() + poll_s > deadline:
            raise JobError(f"still {state} after {timeout_s:.0f} s of waiting; the job keeps running{hint}")
        sleep(poll_s)
