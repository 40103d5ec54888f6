"""A job's phases as a Ray Job, on a Ray cluster of the operator's own.

Ray runs each job's driver (`job_driver`) on the cluster's head, apart from
the orchestrator, so training goes on while the orchestrator restarts or
rolls. The orchestrator submits it through the head's dashboard (Ray's job
submission API, which Ray supports for Ray Train and Tune on a cluster; Ray
Client is not), reads its events from a log the driver fills, stops it to
cancel, and reads how it ended. A restarted orchestrator (or another replica)
finds the job's Ray Job by the job's id and reattaches to it: its event log
kept what the driver said in the meantime.

One Ray Job is one attempt: `tunewire-<job id>-<n>`. Its event log is a
detached actor on the head node, made before the driver starts and ended
once the orchestrator has read how the attempt ended; a log still there is
an attempt whose end was not yet read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from tunewire.services.training.scheduler import EmitEvent, JobCancelled, JobFailed

if TYPE_CHECKING:
    from tunewire.services.training.ray_runner import JobRequest

log = logging.getLogger(__name__)

NAMESPACE = "tunewire"
JOB_METADATA_KEY = "tunewire_job"
# A resource only the head node has: the event logs live where the drivers run.
HEAD_RESOURCE = "node:__internal_head__"
# How often the relay asks Ray whether the driver is still running.
STATUS_CHECK_SECONDS = 2.0
# How long a driver that said how it ended may take to exit.
ENDING_SECONDS = 30.0
# The driver's end, as it puts it last in its event log; LOST: it ended without saying.
SUCCEEDED, FAILED, CANCELLED, LOST = "succeeded", "failed", "cancelled", "lost"
# Attempts whose driver ends without a result before the job fails.
MAX_LOST_ATTEMPTS = 3


def submission_id(job_id: str, attempt: int) -> str:
    return f"tunewire-{job_id}-{attempt}"


def attempt_number(submission: str) -> int:
    return int(submission.rsplit("-", 1)[1])


class _EventLogActor:
    """An attempt's events in order, each kept until the orchestrator says it
    recorded it: one that dies between reading and recording reads it again."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self.first = 0  # the index of items[0]
        self.added = asyncio.Event()

    async def put(self, item: dict) -> None:
        self.items.append(item)
        self.added.set()

    async def read(self, timeout: float) -> tuple[int, list[dict]]:
        """The index of the first event not yet recorded, and those events
        (waiting up to `timeout` seconds for one)."""
        if not self.items:
            self.added.clear()
            try:
                await asyncio.wait_for(self.added.wait(), timeout)
            except TimeoutError:
                pass
        return self.first, list(self.items)

    async def recorded(self, upto: int) -> None:
        """Every event before index `upto` is recorded."""
        del self.items[: max(0, upto - self.first)]
        self.first = max(self.first, upto)


class EventLog:
    """One attempt's event log: a detached actor on the head, made by the
    first to ask (the orchestrator, before it submits), the same actor for
    every later caller (the driver, a reattaching orchestrator)."""

    def __init__(self, submission: str):
        import ray

        self.actor = (
            ray.remote(_EventLogActor)
            .options(
                name=f"tunewire-events-{submission}",
                namespace=NAMESPACE,
                get_if_exists=True,
                lifetime="detached",
                num_cpus=0,
                resources={HEAD_RESOURCE: 0.001},
            )
            .remote()
        )

    @staticmethod
    def exists(submission: str) -> bool:
        import ray

        try:
            ray.get_actor(f"tunewire-events-{submission}", namespace=NAMESPACE)
        except ValueError:
            return False
        return True

    async def put(self, kind: str, data: dict) -> None:
        await self.actor.put.remote({"kind": kind, "data": data})

    async def read(self, timeout: float) -> tuple[int, list[dict]]:
        return await self.actor.read.remote(timeout)

    async def recorded(self, upto: int) -> None:
        await self.actor.recorded.remote(upto)

    def close(self) -> None:
        import ray

        ray.kill(self.actor)


class RayJobs:
    """Submits jobs to the cluster's job submission API and relays them."""

    def __init__(self, client):
        self.client = client  # a ray.job_submission.JobSubmissionClient

    @classmethod
    def at(cls, dashboard_url: str) -> RayJobs:
        """Through the head's dashboard (it sends Ray's token where token
        authentication is on, as Ray's own CLI does)."""
        from ray.job_submission import JobSubmissionClient

        return cls(JobSubmissionClient(dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"))

    def _attempts(self, job_id: str) -> list:
        """The job's Ray Jobs, oldest first."""
        mine = [j for j in self.client.list_jobs() if (j.metadata or {}).get(JOB_METADATA_KEY) == job_id and j.submission_id]
        return sorted(mine, key=lambda j: attempt_number(j.submission_id))

    def _unfinished_attempt(self, job_id: str):
        """The job's latest Ray Job where it still runs or its end was not
        read yet, else None; and the number the next attempt takes."""
        attempts = self._attempts(job_id)
        if not attempts:
            return None, 1
        latest = attempts[-1]
        unfinished = not latest.status.is_terminal() or EventLog.exists(latest.submission_id)
        return (latest if unfinished else None), attempt_number(latest.submission_id) + 1

    def _submit(self, request: JobRequest, attempt: int) -> str:
        from tunewire.services.training.ray_runner import STOP_WAIT_SECONDS, job_runtime_env

        submission = submission_id(request.recipe.job_id, attempt)
        EventLog(submission)  # before the driver asks for it
        runtime_env = job_runtime_env()
        # How long a stopped driver has to wind its phase down (which takes up
        # to STOP_WAIT_SECONDS) and say so, before Ray kills it (Ray's default: 3 s).
        runtime_env["env_vars"] |= {"RAY_JOB_STOP_WAIT_TIME_S": str(int(STOP_WAIT_SECONDS + 10))}
        self.client.submit_job(
            entrypoint=f"python -m tunewire.services.training.job_driver {submission} {shlex.quote(request.to_json())}",
            submission_id=submission,
            metadata={JOB_METADATA_KEY: request.recipe.job_id},
            runtime_env=runtime_env,
            # No entrypoint resources: Ray runs the driver on the head, beside its event log.
        )
        return submission

    async def run(
        self, request: JobRequest, emit: EmitEvent, cancel: asyncio.Event, before_submit: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Runs the job's phases as a Ray Job and relays its events until it
        ends, reattaching to the job's unfinished Ray Job where there is one
        (`before_submit`, the job's checks, runs only before a new one).
        Raises JobFailed or JobCancelled as the phases would. A task cancelled
        here (the orchestrator stops) leaves the Ray Job running; any other
        error stops it. An attempt whose driver ended without a result
        (killed, or its node lost) is followed by another, up to
        MAX_LOST_ATTEMPTS in a row, which resumes from the latest checkpoint."""
        for tries_left in reversed(range(MAX_LOST_ATTEMPTS)):
            latest, attempt = await asyncio.to_thread(self._unfinished_attempt, request.recipe.job_id)
            if latest is not None:
                submission = latest.submission_id
                what = f"reattached to its Ray job {submission} ({latest.status.value.lower()})"
            else:
                if before_submit is not None:
                    await before_submit()
                submission = await asyncio.to_thread(self._submit, request, attempt)
                what = f"submitted to the Ray cluster as Ray job {submission}"
            await emit("log", {"message": f"{what} (`ray job logs {submission}` on the cluster shows its driver's log)"})
            events = EventLog(submission)
            try:
                outcome = await self._relay(submission, events, emit, cancel)
                await self._until_ended(submission)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("job %s: following its Ray job %s failed; stopping it", request.recipe.job_id, submission)
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.client.stop_job, submission)
                    events.close()
                raise
            events.close()  # its end is read: the next attempt is a new Ray Job
            if outcome["state"] != LOST or cancel.is_set() or not tries_left:
                break
            await emit("log", {"message": f"{outcome['error']}: starting the job again from its latest checkpoint"})
        state = outcome["state"]
        if state == SUCCEEDED:
            return
        if state == CANCELLED or cancel.is_set():
            raise JobCancelled()
        raise JobFailed(outcome["error"], user_error=outcome.get("user_error", False))

    async def unfinished_job_ids(self) -> set[str]:
        """The tunewire jobs with a Ray Job still running."""
        jobs = await asyncio.to_thread(self.client.list_jobs)
        return {j.metadata[JOB_METADATA_KEY] for j in jobs if JOB_METADATA_KEY in (j.metadata or {}) and not j.status.is_terminal()}

    async def abandon(self, job_id: str) -> None:
        """Stops the job's unfinished Ray Job, its events unread."""
        latest, _ = await asyncio.to_thread(self._unfinished_attempt, job_id)
        if latest is not None:
            await asyncio.to_thread(self.client.stop_job, latest.submission_id)
            EventLog(latest.submission_id).close()

    async def has_unfinished(self, job_id: str) -> bool:
        """Whether the job has a Ray Job still running or whose end was not read."""
        latest, _ = await asyncio.to_thread(self._unfinished_attempt, job_id)
        return latest is not None

    async def _until_ended(self, submission: str) -> None:
        """Waits for the driver to exit once it has said how it ended (what it
        held of the cluster is free when the job ends); stops one that hangs."""
        deadline = time.monotonic() + ENDING_SECONDS
        while not (await asyncio.to_thread(self.client.get_job_status, submission)).is_terminal():
            if time.monotonic() > deadline:
                log.warning("Ray job %s did not exit after its outcome; stopping it", submission)
                await asyncio.to_thread(self.client.stop_job, submission)
                return
            await asyncio.sleep(0.5)

    async def _relay(self, submission: str, events: EventLog, emit: EmitEvent, cancel: asyncio.Event) -> dict:
        """Emits the driver's events until its outcome; where the driver ended
        without one (killed, or its node lost), an outcome that says so. Each
        event is marked recorded once emitted: an orchestrator killed between
        the two emits that one again on reattaching, rather than losing it."""
        from ray.job_submission import JobStatus

        stopping, checked, ended = False, time.monotonic(), None
        while True:
            if cancel.is_set() and not stopping:
                stopping = True
                await asyncio.to_thread(self.client.stop_job, submission)  # SIGTERM: the driver winds its phase down
            first, items = await events.read(timeout=0 if ended else 0.5)
            for index, item in enumerate(items, start=first):
                if item["kind"] == "outcome":
                    return item["data"]
                await emit(item["kind"], item["data"])
                await events.recorded(index + 1)
            if ended is not None and not items:  # it ended, and everything it said is out
                if ended.status == JobStatus.STOPPED:
                    return {"state": CANCELLED if stopping else FAILED, "error": f"its Ray job {submission} was stopped outside tunewire"}
                said = (ended.message or "").strip().splitlines()  # a failed driver's message carries its log's tail
                return {
                    "state": LOST,
                    "error": f"its Ray job {submission} ended {ended.status.value} without a result: {said[0] if said else 'no reason given'} "
                    f"(`ray job logs {submission}` on the cluster shows why)",
                }
            if ended is None and time.monotonic() - checked >= STATUS_CHECK_SECONDS:
                checked = time.monotonic()
                info = await asyncio.to_thread(self.client.get_job_info, submission)
                ended = info if info.status.is_terminal() else None
