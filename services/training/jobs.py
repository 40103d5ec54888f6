"""Jobs as the orchestrator's domain: create, read, follow events, publish.

Nothing here knows about gRPC or Ray: the dataset lookup and the notifier are
passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from tunewire.services.common import layout, paging, telemetry
from tunewire.services.common.artifacts import ArtifactStore
from tunewire.services.common.auth import DEFAULT_PROJECT
from tunewire.services.common.db import exclusive
from tunewire.services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, TunewireError
from tunewire.services.common.models import check_requested_model
from tunewire.services.training import config as training_config
from tunewire.services.training.config import SearchPlan, TrainingConfig
from tunewire.services.training.store import (
    CANCELLED,
    FINAL_STATES,
    IDEMPOTENCY_KEY_LENGTH,
    MODEL_NAME_LENGTH,
    QUEUED,
    SUCCEEDED,
    Adapter,
    Job,
    JobEvent,
    JobStore,
)

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 500


@dataclass(frozen=True)
class DatasetRef:
    """What a job needs to know of its dataset, copied into the job at create
    time so the job can run without the dataset service."""

    id: str
    format: str
    uri: str
    train_rows: int
    validation_rows: int
    test_rows: int = 0
    labels: tuple[str, ...] = ()


class DatasetLookup(Protocol):
    async def get(self, project: str, dataset_id: str) -> DatasetRef:
        """Raises NotFound for an id unknown in the project, Unavailable if the service is down."""

    async def acquire(self, project: str, dataset_id: str, holder: str) -> DatasetRef:
        """The dataset, pinned for `holder` so it is not deleted under it."""

    async def release(self, project: str, dataset_id: str, holder: str) -> None:
        """Drops holder's pin (a dataset already gone counts as released);
        Unavailable if the service is down."""


@dataclass(frozen=True)
class JobSpec:
    base_model: str
    dataset_id: str
    method: str = training_config.LORA
    hyperparameters: dict = field(default_factory=dict)  # only the fields the caller set
    search: dict = field(default_factory=dict)  # the SearchConfig fields the caller set
    num_workers: int = 1
    use_gpu: bool = False
    idempotency_key: str = ""
    project: str = DEFAULT_PROJECT


class ChangeNotifier:
    """Wakes every waiter when jobs, events or adapters change. Streams also
    re-read on a timeout, so a missed wake-up only delays them."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None  # the waiters'

    def notify(self) -> None:
        """Safe from any thread: the store's work runs in threads, off the loop."""
        loop = self._loop
        if loop is None or _running_loop() is loop:
            self._wake()
        else:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
        # cancellation that arrives as the event is set, and a stopping
        # orchestrator then waited forever for its scheduler.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._event.wait()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class JobManager:
    def __init__(
        self,
        store: JobStore,
        datasets: DatasetLookup,
        notifier: ChangeNotifier | None = None,
        poll_seconds: float = 1.0,
        checkpoints: Callable[[str], list[dict]] | None = None,
        model_cache: Path | None = None,
        max_active_jobs_per_project: int = 0,
        max_adapter_bytes_per_project: int = 0,
        artifacts: ArtifactStore | None = None,
        owner: str = "orchestrator",
        lease_seconds: float = 30.0,
        model_roots: tuple[str, ...] = (),
    ):
        self.store = store
        self.model_roots = model_roots
        # This replica's name in job leases; replicas sharing a database need distinct ones.
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.max_active_jobs_per_project = max_active_jobs_per_project
        self.max_adapter_bytes_per_project = max_adapter_bytes_per_project
        self.artifacts = artifacts
        self.datasets = datasets
        self.notifier = notifier or ChangeNotifier()
        self.poll_seconds = poll_seconds
        self._checkpoints = checkpoints or (lambda job_id: [])
        self._cancel_events: dict[str, asyncio.Event] = {}
        self.model_cache = model_cache

    async def _checked(self, spec: JobSpec, dataset: DatasetRef | None = None) -> tuple[int, TrainingConfig, SearchPlan | None]:
        """Workers, resolved config and search plan of a valid spec;
        InvalidArgument or FailedPrecondition naming what is wrong otherwise."""
        check_requested_model(spec.base_model, "spec.base_model", self.model_roots)
        if len(spec.base_model) > MODEL_NAME_LENGTH:
            raise InvalidArgument.field("spec.base_model", f"at most {MODEL_NAME_LENGTH} characters, got {len(spec.base_model)}")
        longest_key = IDEMPOTENCY_KEY_LENGTH - len(spec.project) - 1
        if len(spec.idempotency_key) > longest_key:
            raise InvalidArgument.field("idempotency_key", f"at most {longest_key} characters, got {len(spec.idempotency_key)}")
        if spec.method not in training_config.METHODS:
            raise InvalidArgument.field("spec.method", f"unsupported method {spec.method!r}: use one of {training_config.METHODS}")
        if spec.method == training_config.QLORA and not spec.use_gpu:
            raise FailedPrecondition(
                "QLoRA quantises the base model to 4 bits on CUDA GPUs: set compute.use_gpu, or use method lora on CPUs"
            )
        workers = training_config.check_compute(spec.num_workers, spec.use_gpu)
        if not spec.dataset_id:
            raise InvalidArgument.field("spec.dataset_id", "required: the id UploadDataset returned")
        dataset = dataset or await self.datasets.get(spec.project, spec.dataset_id)
        if dataset.train_rows < workers:
            raise FailedPrecondition(
                f"dataset {dataset.id} has {dataset.train_rows} training rows, fewer than the {workers} workers: add rows or use fewer workers"
            )
        config = training_config.resolve_config(spec.hyperparameters, dataset.train_rows, spec.method)
        return workers, config, training_config.resolve_search(spec.search, spec.hyperparameters, spec.method, dataset.train_rows)

    async def create(self, spec: JobSpec) -> Job:
        # Keys are the project's own: another project's key never finds this job.
        idempotency_key = f"{spec.project}/{spec.idempotency_key}" if spec.idempotency_key else ""
        existing = await asyncio.to_thread(self.store.by_idempotency_key, idempotency_key)
        if existing is not None:
            return self._same_request(existing, spec)
        await self._checked(spec)
        await asyncio.to_thread(self._check_quotas, spec.project)  # early, before the dataset is pinned
        job_id = "job-" + uuid.uuid4().hex[:16]
        dataset = await self.datasets.acquire(spec.project, spec.dataset_id, job_id)
        created = False
        try:
            workers, resolved, _ = await self._checked(spec, dataset)
            job, created = await asyncio.to_thread(self._insert, job_id, spec, workers, resolved, dataset, idempotency_key)
        finally:
            if not created:  # no job holds the pin: checks failed, or a concurrent retry won the race
                with contextlib.suppress(TunewireError):
                    await self.datasets.release(spec.project, spec.dataset_id, job_id)
        if job.id != job_id:
            return self._same_request(job, spec)
        await asyncio.to_thread(self.notify)
        return job

    def _insert(
        self, job_id: str, spec: JobSpec, workers: int, resolved: TrainingConfig, dataset: DatasetRef, idempotency_key: str
    ) -> tuple[Job, bool]:
        # The count and the insert together: creates at once cannot pass the quota together.
        with exclusive(self.store.engine, f"jobs of {spec.project}"):
            self._check_quotas(spec.project)
            return self.store.create(
                job_id=job_id,
                spec={**asdict(spec), "num_workers": workers},
                config=resolved.to_dict(),
                dataset={**asdict(dataset), "labels": list(dataset.labels)},
                idempotency_key=idempotency_key,
                project=spec.project,
            )

    async def tidy_ended_jobs(self) -> int:
        """What jobs that ended hold no longer: their dataset pins (so the
        datasets can be deleted, and stop counting as used) and their files
        (checkpoints, a search's state: the adapter holds what they made).
        Whatever fails is tried again next time. Returns how many jobs were
        tidied."""
        tidied = 0
        for job in await asyncio.to_thread(self.store.unreleased_datasets):
            try:
                await self.datasets.release(job.project, job.dataset["id"], job.id)
            except TunewireError as exc:
                log.info("job %s: its dataset's pin is not released yet (%s); retrying later", job.id, exc)
                continue
            await asyncio.to_thread(self.store.mark_dataset_released, job.id)
            tidied += 1
        if self.artifacts is None:
            return tidied
        for job_id in await asyncio.to_thread(self.store.files_kept):
            try:
                await asyncio.to_thread(self.artifacts.delete, *layout.job_parts(job_id))
            except OSError as exc:
                log.info("job %s: its files are not removed yet (%s); retrying later", job_id, exc)
                continue
            await asyncio.to_thread(self.store.mark_files_removed, job_id)
            tidied += 1
        return tidied

    def _check_quotas(self, project: str) -> None:
        active = self.store.count_active(project)
        if self.max_active_jobs_per_project and active >= self.max_active_jobs_per_project:
            raise ResourceExhausted(
                f"project {project} has {active} queued or running jobs, its quota: wait for one to finish or cancel one "
                "(operators set TUNEWIRE_PROJECT_MAX_ACTIVE_JOBS)"
            )
        stored = self.store.adapter_bytes(project)
        if self.max_adapter_bytes_per_project and stored >= self.max_adapter_bytes_per_project:
            raise ResourceExhausted(
                f"project {project}'s adapters take {stored} bytes, its quota of {self.max_adapter_bytes_per_project}: "
                "delete the adapters it no longer needs (tunewire adapters delete ID) before training more "
                "(operators set TUNEWIRE_PROJECT_MAX_ADAPTER_BYTES)"
            )

    @staticmethod
    def _same_request(job: Job, spec: JobSpec) -> Job:
        if {k: v for k, v in job.spec.items() if k != "num_workers"} != {k: v for k, v in asdict(spec).items() if k != "num_workers"}:
            raise FailedPrecondition(f"idempotency key {spec.idempotency_key!r} was used for job {job.id} with another spec: use a new key")
        return job

    async def estimate(self, spec: JobSpec) -> tuple[dict, TrainingConfig]:
        """The estimate, and the hyperparameters it assumed."""
        from tunewire.services.training.estimate import estimate_job

        dataset = await self.datasets.get(spec.project, spec.dataset_id) if spec.dataset_id else None
        workers, config, plan = await self._checked(spec, dataset)
        throughput = await asyncio.to_thread(self.measured_throughput, spec, workers)
        return await asyncio.to_thread(estimate_job, spec, dataset, workers, config, throughput, self.model_cache, plan), config

    def measured_throughput(self, spec: JobSpec, workers: int) -> float:
        """Mean tokens/s of earlier succeeded jobs on the same model, method and workers."""
        rates = [
            j.latest_step.get("tokens_per_second", 0.0)
            for j in self.store.list(SUCCEEDED, limit=50)
            if (j.spec["base_model"], j.spec["method"], j.spec["num_workers"]) == (spec.base_model, spec.method, workers)
        ]
        rates = [r for r in rates if r > 0]
        return sum(rates) / len(rates) if rates else 0.0

    async def cancel(self, project: str, job_id: str) -> Job:
        if await asyncio.to_thread(self._request_cancel, project, job_id):
            self.cancel_event(job_id).set()
        return await asyncio.to_thread(self.get, project, job_id)

    def _request_cancel(self, project: str, job_id: str) -> bool:
        """Cancels a queued job at once; for a running one, records the
        request and returns True (its runner is told)."""
        job = self.get(project, job_id)
        if job.is_final:
            raise FailedPrecondition(f"job {job_id} is already {job.state}: only queued or running jobs can be cancelled")
        running = not self.store.transition(job_id, CANCELLED, from_states=(QUEUED,))
        if running:
            # Here or on another replica: the replica running it sees the
            # request (at once here, at its next lease renewal elsewhere)
            # and its runner stops the workers at their next step.
            self.store.request_cancel(job_id)
            self.record(job_id, "log", {"message": "cancellation requested: the workers stop at their next step"})
        self.notify()
        return running

    def cancel_event(self, job_id: str) -> asyncio.Event:
        return self._cancel_events.setdefault(job_id, asyncio.Event())

    def forget_cancel_event(self, job_id: str) -> None:
        self._cancel_events.pop(job_id, None)

    def checkpoints(self, project: str, job_id: str) -> list[dict]:
        self.get(project, job_id)
        return self._checkpoints(job_id)

    def get(self, project: str, job_id: str) -> Job:
        job = self.store.get(job_id)
        # Another project's job is as unknown as one that never existed.
        if job is None or job.project != project:
            raise NotFound(f"job {job_id!r} not found: list jobs to see the ids")
        return job

    def list(self, project: str, state: str = "", page_size: int = 0, page_token: str = "") -> tuple[list[Job], str]:
        """A page of jobs, newest first, and the next page's token ('' at the end)."""
        if not 0 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument.field("page_size", f"must be in [0, {MAX_PAGE_SIZE}], got {page_size}")
        size = page_size or 50
        offset = paging.page_position(page_token, default=0)
        jobs = self.store.list(state, limit=size + 1, offset=offset, project=project)
        return jobs[:size], (paging.page_token(offset + size) if len(jobs) > size else "")

    def queued(self) -> list[Job]:
        return sorted(self.store.list(QUEUED), key=lambda j: j.created_at)

    def record(self, job_id: str, kind: str, data: dict) -> JobEvent:
        event = self.store.append_event(job_id, kind, data)
        if kind == "step":
            telemetry.TRAINING_TOKENS.inc(data.get("tokens", 0))
            telemetry.TRAINING_TOKENS_PER_SECOND.set(data.get("tokens_per_second", 0.0))
            telemetry.TRAINING_STEP_SECONDS.observe(data.get("step_seconds", 0.0))
        self.notifier.notify()
        return event

    def transition(self, job_id: str, state: str, *, from_states: tuple[str, ...], error: str = "") -> bool:
        """Moves the job if it is in from_states and, when running, this replica holds it."""
        changed = self.store.transition(
            job_id, state, from_states=from_states, error=error, owner=self.owner, lease_seconds=self.lease_seconds
        )
        self.notify()
        return changed

    def renew_leases(self, job_ids: list[str]) -> tuple[set[str], set[str]]:
        """Renews this replica's leases: the jobs it no longer holds (another
        replica took them over), and those whose cancellation was asked for."""
        lost = self.store.renew_leases(self.owner, job_ids, self.lease_seconds)
        return lost, self.store.cancel_requested([job_id for job_id in job_ids if job_id not in lost])

    def notify(self) -> None:
        """Wakes the streams and the scheduler, and counts jobs by state for /metrics."""
        for state, count in self.store.count_by_state().items():
            telemetry.TRAINING_JOBS.labels(state).set(count)
        self.notifier.notify()

    def publish_adapter(self, job: Job, adapter_id: str, uri: str, held_back: bool = False, size_bytes: int = 0) -> Adapter | None:
        adapter = self.store.publish_adapter(
            job.id, adapter_id, job.spec["base_model"], uri, owner=self.owner, held_back=held_back, size_bytes=size_bytes
        )
        self.notify()
        return adapter

    def delete_adapter(self, project: str, adapter_id: str) -> Adapter:
        """Deletes the project's adapter: its record first (the inference
        services unload it when WatchAdapters sends the deletion), then its
        files. NotFound for an id the project does not have."""
        adapter = self.store.delete_adapter(project, adapter_id)
        if adapter is None:
            raise NotFound(f"adapter {adapter_id} not found in project {project}: tunewire adapters list shows the project's adapters")
        if self.artifacts is not None:
            try:
                self.artifacts.delete(layout.ADAPTERS, adapter_id)
            except OSError:  # the record is gone: the files only take space now
                log.exception("adapter %s is deleted, but its files at %s could not be removed", adapter_id, adapter.uri)
        self.notify()
        return adapter

    def requeue_lapsed(self, restarted: bool = False) -> list[str]:
        """Jobs whose replica died (its lease lapsed; or, just after a
        restart, it was this replica) are queued again: they resume from their
        latest checkpoint, or, on a Ray cluster, their Ray Job is reattached."""
        requeued = self.store.requeue_lapsed(
            "the orchestrator running this job stopped; another takes it over: on a local Ray, its training resumes from the "
            "latest checkpoint; on a Ray cluster, its Ray Job trains on and is reattached",
            owner=self.owner if restarted else None,
        )
        if requeued:
            self.notify()
        return requeued

    async def events(self, project: str, job_id: str, after_sequence: int = 0) -> AsyncIterator[JobEvent]:
        """The job's events after `after_sequence`: its history, then live
        events, until the job's final state has been sent."""
        await asyncio.to_thread(self.get, project, job_id)
        while True:
            # State first, then events: the final state's event is written
            # with the state, so it is in `events` if `final` is seen.
            final = (await asyncio.to_thread(self.get, project, job_id)).state in FINAL_STATES
            events = await asyncio.to_thread(self.store.events_after, job_id, after_sequence)
            for event in events:
                yield event
                after_sequence = event.sequence
            if final and not events:
                return
            if not events:
                await self.notifier.wait(self.poll_seconds)

    async def adapters(self, after_sequence: int = 0) -> AsyncIterator[Adapter]:
        """Every project's adapters published after `after_sequence`, then
        each new one (for the inference service). Never ends."""
        while True:
            adapters = await asyncio.to_thread(self.store.adapters_after, after_sequence)
            for adapter in adapters:
                yield adapter
                after_sequence = adapter.sequence
            if not adapters:
                await self.notifier.wait(self.poll_seconds)

    def list_adapters(self, project: str) -> list[Adapter]:
        return self.store.adapters_after(0, project=project, deleted=False)

    def adapter_chunks(self, project: str, adapter_id: str) -> Iterator[tuple[str, int, bytes]]:
        """The project's adapter's files as (path in the adapter's directory,
        the file's bytes, a chunk of it), each file's chunks in order: what
        DownloadAdapter streams. NotFound for an id the project does not have."""
        if not any(a.id == adapter_id for a in self.list_adapters(project)):
            raise NotFound(f"adapter {adapter_id} not found in project {project}: tunewire adapters published shows the project's adapters")
        for name, size in self.artifacts.files(layout.ADAPTERS, adapter_id):
            for chunk in self.artifacts.read_chunks(layout.ADAPTERS, adapter_id, name):
                yield name, size, chunk
