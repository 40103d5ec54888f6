"""A job's Ray Job on a cluster, without one: how the orchestrator picks the
attempt to follow, relays its driver's events, cancels it and reads how it
ended (fakes of Ray's job client and queue; test_ray_cluster runs it for real)."""

import asyncio
from types import SimpleNamespace

import pytest
from ray.job_submission import JobStatus

from tunewire.services.training import ray_jobs
from tunewire.services.training.config import resolve_config
from tunewire.services.training.ray_jobs import RayJobs
from tunewire.services.training.ray_runner import JobRequest
from tunewire.services.training.recipe import RecipeConfig
from tunewire.services.training.scheduler import JobCancelled, JobFailed


class FakeEventLog:
    """EventLog's interface over a list; `logs` holds each attempt's, by submission id."""

    logs: dict = {}

    def __new__(cls, submission, items=None):
        return cls.logs.setdefault(submission, super().__new__(cls))

    def __init__(self, submission, items=None):
        if not hasattr(self, "items"):
            self.items, self.first, self.closed = list(items or []), 0, False

    @classmethod
    def exists(cls, submission):
        log = cls.logs.get(submission)
        return log is not None and not log.closed

    @classmethod
    def holding(cls, submission, *items):
        cls.logs.pop(submission, None)
        return cls(submission, list(items))

    async def read(self, timeout):
        await asyncio.sleep(0)
        return self.first, list(self.items)

    async def recorded(self, upto):
        del self.items[: upto - self.first]
        self.first = upto

    def close(self):
        self.closed = True


@pytest.fixture(autouse=True)
def fake_event_logs(monkeypatch):
    FakeEventLog.logs = {}
    monkeypatch.setattr(ray_jobs, "EventLog", FakeEventLog)
    monkeypatch.setattr(ray_jobs, "STATUS_CHECK_SECONDS", 0.0)


class FakeClient:
    """Ray's JobSubmissionClient: each get_job_info returns the next status, the last one for good."""

    def __init__(self, statuses=(JobStatus.RUNNING,), jobs=()):
        self.statuses = list(statuses)
        self.jobs = list(jobs)
        self.stopped, self.submitted = [], []

    def _status(self):
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def get_job_info(self, submission):
        return SimpleNamespace(status=self._status(), message="the driver's node died\nlast available logs:\n...")

    def get_job_status(self, submission):
        return self._status()

    def stop_job(self, submission):
        self.stopped.append(submission)
        self.statuses = [JobStatus.STOPPED]

    def list_jobs(self):
        return self.jobs

    def submit_job(self, **kwargs):
        self.submitted.append(kwargs)
        return kwargs["submission_id"]


def request(job_id="job-1") -> JobRequest:
    recipe = RecipeConfig(job_id, "base", "sft", "lora", "file:///data", 8, 2, 1, False, "/models", "/artifacts", resolve_config({}, 8))
    return JobRequest(recipe, {"max_trials": 2}, {"epochs": 3}, 2)


def test_a_request_reaches_the_driver_whole():
    sent = request()
    assert JobRequest.from_json(sent.to_json()) == sent


def run(jobs: RayJobs, cancel: asyncio.Event | None = None) -> list:
    emitted = []

    async def emit(kind, data):
        emitted.append((kind, data))

    asyncio.run(jobs.run(request(), emit, cancel or asyncio.Event()))
    return emitted


def step(n: int) -> dict:
    return {"kind": "step", "data": {"step": n}}


SUCCESS = {"kind": "outcome", "data": {"state": "succeeded"}}


def test_a_new_job_is_submitted_and_its_events_relayed_until_it_succeeds():
    client = FakeClient(statuses=[JobStatus.SUCCEEDED])
    events = FakeEventLog.holding("tunewire-job-1-1", step(1), step(2), SUCCESS)
    emitted = run(RayJobs(client))
    assert [s["submission_id"] for s in client.submitted] == ["tunewire-job-1-1"]
    assert client.submitted[0]["metadata"] == {"tunewire_job": "job-1"}
    assert "python -m tunewire.services.training.job_driver tunewire-job-1-1 " in client.submitted[0]["entrypoint"]
    assert emitted[0][0] == "log" and "submitted to the Ray cluster as Ray job tunewire-job-1-1" in emitted[0][1]["message"]
    assert emitted[1:] == [("step", {"step": 1}), ("step", {"step": 2})]
    assert events.closed  # read to its end: the attempt is over


def attempt(n: int, status: JobStatus, job_id: str = "job-1"):
    return SimpleNamespace(submission_id=f"tunewire-{job_id}-{n}", metadata={"tunewire_job": job_id}, status=status)


def test_a_running_attempt_is_reattached_and_relays_what_was_not_yet_recorded():
    client = FakeClient(
        jobs=[attempt(1, JobStatus.FAILED), attempt(2, JobStatus.RUNNING), attempt(1, JobStatus.RUNNING, "job-2")],
        statuses=[JobStatus.SUCCEEDED],
    )
    events = FakeEventLog.holding("tunewire-job-1-2", step(1), step(2), step(3), SUCCESS)
    asyncio.run(events.recorded(2))  # the orchestrator before this one recorded steps 1 and 2
    emitted = run(RayJobs(client))
    assert client.submitted == []
    assert "reattached to its Ray job tunewire-job-1-2 (running)" in emitted[0][1]["message"]
    assert emitted[1:] == [("step", {"step": 3})]


def test_an_ended_attempt_whose_end_was_not_read_is_read_not_run_again():
    client = FakeClient(jobs=[attempt(1, JobStatus.FAILED)], statuses=[JobStatus.FAILED])
    FakeEventLog.holding("tunewire-job-1-1", {"kind": "outcome", "data": {"state": "failed", "error": "out of memory"}})
    with pytest.raises(JobFailed, match="out of memory"):
        run(RayJobs(client))
    assert client.submitted == []


def test_an_ended_attempt_whose_end_was_read_is_followed_by_a_new_one_numbered_after_the_last():
    # Attempt 1 was deleted from Ray's list (`ray job delete`): the next is numbered after the last one listed.
    client = FakeClient(jobs=[attempt(2, JobStatus.STOPPED)], statuses=[JobStatus.SUCCEEDED])
    FakeEventLog.holding("tunewire-job-1-3", SUCCESS)
    run(RayJobs(client))
    assert [s["submission_id"] for s in client.submitted] == ["tunewire-job-1-3"]


def test_an_unexpected_error_while_following_stops_the_ray_job():
    client = FakeClient(statuses=[JobStatus.RUNNING])

    def dashboard_gone(submission):
        raise ConnectionError("dashboard unreachable")

    client.get_job_info = dashboard_gone
    events = FakeEventLog.holding("tunewire-job-1-1", step(1))
    with pytest.raises(ConnectionError):
        run(RayJobs(client))
    assert client.stopped == ["tunewire-job-1-1"] and events.closed


def test_the_jobs_checks_run_before_a_new_attempt_not_on_reattaching():
    checked = []

    async def check():
        checked.append(True)
        raise JobFailed("the job can never start", user_error=True)

    client = FakeClient(jobs=[attempt(1, JobStatus.RUNNING)], statuses=[JobStatus.SUCCEEDED])
    FakeEventLog.holding("tunewire-job-1-1", SUCCESS)
    asyncio.run(RayJobs(client).run(request(), _ignore, asyncio.Event(), before_submit=check))
    assert checked == [] and client.submitted == []
    client = FakeClient()
    with pytest.raises(JobFailed, match="can never start"):
        asyncio.run(RayJobs(client).run(request(), _ignore, asyncio.Event(), before_submit=check))
    assert checked == [True] and client.submitted == []


async def _ignore(kind, data):
    pass


def test_the_drivers_failure_is_the_jobs_with_its_kind():
    client = FakeClient(statuses=[JobStatus.FAILED])
    FakeEventLog.holding("tunewire-job-1-1", {"kind": "outcome", "data": {"state": "failed", "error": "no train rows", "user_error": True}})
    with pytest.raises(JobFailed, match="no train rows") as failed:
        run(RayJobs(client))
    assert failed.value.user_error


def test_a_driver_that_ended_without_an_outcome_is_started_again_then_fails_the_job_naming_its_ray_job():
    client = FakeClient(statuses=[JobStatus.RUNNING, JobStatus.FAILED])
    # Each attempt submitted ended FAILED, as Ray lists it.
    client.list_jobs = lambda: [attempt(n + 1, JobStatus.FAILED) for n in range(len(client.submitted))]
    FakeEventLog.holding("tunewire-job-1-1", step(1))
    with pytest.raises(
        JobFailed, match=r"its Ray job tunewire-job-1-3 ended FAILED without a result: the driver's node died \(`ray"
    ) as failed:
        run(RayJobs(client))
    assert not failed.value.user_error
    assert [s["submission_id"] for s in client.submitted] == [f"tunewire-job-1-{n}" for n in (1, 2, 3)]


def test_a_second_attempt_after_a_lost_driver_can_succeed():
    client = FakeClient(statuses=[JobStatus.FAILED])
    client.list_jobs = lambda: [attempt(n + 1, JobStatus.FAILED) for n in range(len(client.submitted))]
    FakeEventLog.holding("tunewire-job-1-2", SUCCESS)
    emitted = run(RayJobs(client))
    assert [s["submission_id"] for s in client.submitted] == ["tunewire-job-1-1", "tunewire-job-1-2"]
    messages = [data.get("message", "") for _, data in emitted]
    assert any(
        "tunewire-job-1-1 ended FAILED without a result" in m and "starting the job again from its latest checkpoint" in m for m in messages
    )


def test_a_cancel_stops_the_ray_job_and_ends_the_job_cancelled():
    client = FakeClient(statuses=[JobStatus.RUNNING])
    cancel = asyncio.Event()
    cancel.set()
    with pytest.raises(JobCancelled):
        run(RayJobs(client), cancel=cancel)
    assert client.stopped == ["tunewire-job-1-1"]
