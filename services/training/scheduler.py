"""Runs queued jobs, oldest first, a few at a time, and publishes what they train."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Protocol

from tunewire.services.common import layout
from tunewire.services.common.artifacts import ArtifactStore
from tunewire.services.training.jobs import JobManager
from tunewire.services.training.store import CANCELLED, FAILED, QUEUED, RUNNING, Job
from tunewire.services.training.tracking import Tracking

log = logging.getLogger(__name__)

EmitEvent = Callable[[str, dict], Awaitable[object]]


class JobFailed(Exception):
    """A job that cannot succeed. user_error: the job's own inputs are at
    fault (fix and resubmit) rather than the system (retry later)."""

    def __init__(self, message: str, user_error: bool = False):
        super().__init__(message)
        self.user_error = user_error


class JobCancelled(Exception):
    """The job stopped because it was cancelled."""


class TrainingRunner(Protocol):
    def run(self, job: Job, emit: EmitEvent, cancel: asyncio.Event) -> AbstractAsyncContextManager[Path]:
        """Trains the job; yields a local directory holding the finished
        adapter (PEFT files) or model. Raises JobFailed, or JobCancelled once
        `cancel` is set."""

    def checkpoints(self, job_id: str) -> list[dict]:
        """The job's checkpoints: step, validation_loss, uri, oldest first."""

    # A runner whose work outlives its orchestrator (Ray Jobs on a cluster)
    # also has `async unfinished_job_ids() -> set[str]` and `async abandon(job_id)`.


class Scheduler:
    def __init__(
        self, jobs: JobManager, runner: TrainingRunner, artifacts: ArtifactStore, max_concurrent: int = 1, tracking: Tracking | None = None
    ):
        self.tracking = tracking
        self.jobs = jobs
        self.runner = runner
        self.artifacts = artifacts
        self.max_concurrent = max_concurrent
        self._running: dict[str, asyncio.Task] = {}
        self._leased: set[str] = set()  # the running jobs whose lease this replica took
        self._job_ended = True  # what jobs that ended before a restart hold is released at start

    async def run_forever(self) -> None:
        # The database work runs in threads: the loop also serves the RPCs.
        for job_id in await asyncio.to_thread(self.jobs.requeue_lapsed, restarted=True):
            log.warning("requeued job %s, left running when this orchestrator stopped", job_id)
        leases_kept_at = time.monotonic()
        while True:
            if time.monotonic() - leases_kept_at > self.jobs.lease_seconds / 3:
                await self._keep_leases()
                leases_kept_at = time.monotonic()
                self._job_ended = True  # also retries pins the dataset service missed, and jobs cancelled while queued
            if self._job_ended:
                self._job_ended = False
                try:
                    await self._stop_abandoned_runs()
                    await self.jobs.tidy_ended_jobs()
                except Exception:  # housekeeping: it must not stop the scheduler
                    log.exception("tidying ended jobs (dataset pins, checkpoints, runs left going) failed; retrying later")
            for job in await asyncio.to_thread(self.jobs.queued):
                if len(self._running) >= self.max_concurrent:
                    break
                if job.id not in self._running:
                    task = asyncio.create_task(self._run(job), name=f"job {job.id}")
                    self._running[job.id] = task
                    task.add_done_callback(lambda _t, job_id=job.id: self._ended(job_id))
            await self.jobs.notifier.wait(self.jobs.poll_seconds)

    def _ended(self, job_id: str) -> None:
        self._running.pop(job_id, None)
        self._leased.discard(job_id)
        self._job_ended = True  # its dataset's pin and its files are released on the next round

    async def _keep_leases(self) -> None:
        """Renews the leases of the jobs running here, stops those another
        replica took over and those cancelled through another replica, and
        requeues the jobs of replicas that died."""
        lost, cancelled = await asyncio.to_thread(self.jobs.renew_leases, list(self._leased))
        for job_id in lost:
            log.warning("job %s: lease lost (another orchestrator took it over); stopping it here", job_id)
            if task := self._running.get(job_id):  # it may have ended while the leases were renewed
                task.cancel()
        for job_id in cancelled:
            self.jobs.cancel_event(job_id).set()
        for job_id in await asyncio.to_thread(self.jobs.requeue_lapsed):
            log.warning("requeued job %s: the orchestrator running it stopped renewing its lease", job_id)

    async def _stop_abandoned_runs(self) -> None:
        """Stops what a runner left going for a job that ended without it
        running here: on a Ray cluster, the Ray Job of a job cancelled while
        it waited in the queue after an orchestrator restart trained on."""
        going = getattr(self.runner, "unfinished_job_ids", None)
        if going is None:  # a runner whose work ends with its orchestrator
            return
        for job_id in await going():
            if job_id in self._running:
                continue
            job = await asyncio.to_thread(self.jobs.store.get, job_id)
            if job is None or job.is_final:
                log.warning("job %s ended, but its run on Ray went on; stopping it", job_id)
                await self.runner.abandon(job_id)

    async def stop(self) -> None:
        for task in list(self._running.values()):
            task.cancel()
        for task in list(self._running.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, job: Job) -> None:
        if not await asyncio.to_thread(self.jobs.transition, job.id, RUNNING, from_states=(QUEUED,)):
            return
        self._leased.add(job.id)
        log.info("job %s running", job.id)
        cancel = self.jobs.cancel_event(job.id)
        tracker = self.tracking.start(job.id, job.project, job.config) if self.tracking else None
        ended = "RUNNING"  # until it ends here: a job left to resume elsewhere stays so

        async def record(kind: str, data: dict) -> None:
            await self._record(job.id, kind, data)
            if tracker is not None:
                tracker.record(kind, data)  # queued: the tracker's thread writes it

        try:
            async with self.runner.run(job, record, cancel) as adapter_dir:
                adapter_id = "ad-" + uuid.uuid4().hex[:16]
                held_back = not _within_forgetting_budget(adapter_dir)
                size = await asyncio.to_thread(_bytes_under, adapter_dir)
                uri = await asyncio.to_thread(self.artifacts.publish_dir, adapter_dir, layout.ADAPTERS, adapter_id)
            if held_back:
                await self._record(
                    job.id,
                    "log",
                    {
                        "message": f"adapter {adapter_id} is published but not hot-loaded: no checkpoint stayed within the forgetting "
                        f"budget. To serve it anyway: tunewire adapters load {adapter_id} {uri}"
                    },
                )
            if tracker is not None:  # the job's curves are written before it shows as succeeded
                await asyncio.to_thread(tracker.flush)
            published = await asyncio.to_thread(self.jobs.publish_adapter, job, adapter_id, uri, held_back=held_back, size_bytes=size)
            if published is None:
                log.info("job %s left RUNNING before its adapter was published; adapter %s not published", job.id, adapter_id)
                return
            ended = "SUCCEEDED"
            log.info("job %s succeeded: adapter %s at %s", job.id, adapter_id, uri)
        except JobCancelled:
            await asyncio.to_thread(self.jobs.transition, job.id, CANCELLED, from_states=(RUNNING,))
            ended = "CANCELLED"
            log.info("job %s cancelled", job.id)
        except JobFailed as exc:
            kind = "user error" if exc.user_error else "system error"
            ended = "FAILED"
            await self._fail(job, f"{kind}: {exc}")
        except asyncio.CancelledError:
            # The orchestrator is stopping (or lost the lease): the job stays
            # RUNNING in the database until its lease lapses, then another
            # replica (or this one, restarted) runs it again.
            raise
        except Exception as exc:  # noqa: BLE001 - any failure must end the job, not the scheduler
            log.exception("job %s failed", job.id)
            ended = "FAILED"
            await self._fail(job, f"system error: {type(exc).__name__}: {exc}")
        finally:
            self.jobs.forget_cancel_event(job.id)
            if tracker is not None:
                await asyncio.to_thread(tracker.close, ended)

    async def _fail(self, job: Job, error: str) -> None:
        log.warning("job %s failed: %s", job.id, error)
        await asyncio.to_thread(self.jobs.transition, job.id, FAILED, from_states=(QUEUED, RUNNING), error=error)

    async def _record(self, job_id: str, kind: str, data: dict) -> None:
        await asyncio.to_thread(self.jobs.record, job_id, kind, data)


def _bytes_under(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def _within_forgetting_budget(adapter_dir: Path) -> bool:
    """What the evaluation report says; true where it does not say (no probe
    for the task, or an adapter made before forgetting was measured)."""
    report = adapter_dir / layout.EVALUATION_FILE
    if not report.exists():
        return True
    return bool(json.loads(report.read_text()).get("within_forgetting_budget", True))
