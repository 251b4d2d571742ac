"""Waiting for a SageMaker job: done, failed (with SageMaker's reason) or out of time, on an injected clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from qcsight_aws import jobs
from qcsight_aws.errors import AwsError, JobError


class FakeTime:
    """A clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def describing(*statuses: str, reason: str = "") -> Callable[[], dict[str, str]]:
    queue = list(statuses)
    return lambda: {"TrainingJobStatus": queue.pop(0) if len(queue) > 1 else queue[0], "FailureReason": reason}


def test_wait_polls_until_done() -> None:
    time = FakeTime()
    done = jobs.wait_for_job(describing("InProgress", "InProgress", "Completed"), jobs.TRAINING, timeout_s=100,
                             poll_s=10, clock=time.clock, sleep=time.sleep)
    assert done["TrainingJobStatus"] == "Completed" and time.now == 20


def test_a_failed_job_raises_with_its_reason() -> None:
    time = FakeTime()
    with pytest.raises(JobError, match="Failed: CUDA out of memory"):
        jobs.wait_for_job(describing("Failed", reason="CUDA out of memory"), jobs.TRAINING, 100, 10,
                          clock=time.clock, sleep=time.sleep)
    assert issubclass(JobError, AwsError)


def test_the_deadline_is_kept_and_named() -> None:
    time = FakeTime()
    with pytest.raises(JobError, match=r"still InProgress after 60 s of waiting; the job keeps running \(hint\)"):
        jobs.wait_for_job(describing("InProgress"), jobs.TRAINING, 60, 10, clock=time.clock, sleep=time.sleep,
                          hint=" (hint)")
    assert time.now <= 60


@pytest.mark.parametrize(("status", "state"), [(jobs.COMPILATION, "COMPLETED"), (jobs.TUNING, "Completed"),
                                               (jobs.TRANSFORM, "Completed")])
def test_each_kind_of_job_reads_its_own_status_key(status: jobs.JobStatus, state: str) -> None:
    done = jobs.wait_for_job(lambda: {status.key: state}, status, 10, 1, clock=FakeTime().clock, sleep=FakeTime().sleep)
    assert done[status.key] == state
