"""Jobs as the orchestrator's domain: create, read, follow events, publish.

Nothing here knows about gRPC or Ray: the dataset lookup and the notifier are
passed in.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Protocol

from tunewire.services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from tunewire.services.common.models import check_model_name
from tunewire.services.training import config as training_config
from tunewire.services.training.store import (
    FINAL_STATES,
    QUEUED,
    Adapter,
    Job,
    JobEvent,
    JobStore,
)

TRAINABLE_FORMATS = ("prompt_completion", "chat")


@dataclass(frozen=True)
class DatasetRef:
    """What a job needs to know of its dataset, copied into the job at create
    time so the job can run without the dataset service."""

    id: str
    format: str
    uri: str
    train_rows: int
    validation_rows: int


class DatasetLookup(Protocol):
    async def acquire(self, dataset_id: str, holder: str) -> DatasetRef:
        """The dataset, pinned for `holder` so it is not deleted under it.
        Raises NotFound for an unknown id, Unavailable if the service is down."""


@dataclass(frozen=True)
class JobSpec:
    base_model: str
    dataset_id: str
    method: str = training_config.LORA
    hyperparameters: dict = field(default_factory=dict)  # only the fields the caller set
    num_workers: int = 1
    use_gpu: bool = False


class ChangeNotifier:
    """Wakes every waiter when jobs, events or adapters change. Streams also
    re-read on a timeout, so a missed wake-up only delays them."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            pass


class JobManager:
    def __init__(self, store: JobStore, datasets: DatasetLookup, notifier: ChangeNotifier | None = None, poll_seconds: float = 1.0):
        self.store = store
        self.datasets = datasets
        self.notifier = notifier or ChangeNotifier()
        self.poll_seconds = poll_seconds

    async def create(self, spec: JobSpec) -> Job:
        check_model_name(spec.base_model, "spec.base_model")
        if spec.method not in training_config.METHODS:
            raise InvalidArgument.field("spec.method", f"unsupported method {spec.method!r}: use one of {training_config.METHODS}")
        workers = training_config.check_compute(spec.num_workers, spec.use_gpu)
        if not spec.dataset_id:
            raise InvalidArgument.field("spec.dataset_id", "required: the id UploadDataset returned")
        job_id = "job-" + uuid.uuid4().hex[:16]
        dataset = await self.datasets.acquire(spec.dataset_id, job_id)
        if dataset.format not in TRAINABLE_FORMATS:
            raise FailedPrecondition(
                f"dataset {dataset.id} is {dataset.format} data; LoRA jobs train on {', '.join(TRAINABLE_FORMATS)} datasets"
            )
        if dataset.train_rows < workers:
            raise FailedPrecondition(
                f"dataset {dataset.id} has {dataset.train_rows} training rows, fewer than the {workers} workers: add rows or use fewer workers"
            )
        resolved = training_config.resolve_config(spec.hyperparameters, dataset.train_rows)
        job = self.store.create(
            job_id=job_id,
            spec={**asdict(spec), "num_workers": workers},
            config=resolved.to_dict(),
            dataset=asdict(dataset),
        )
        self.notifier.notify()
        return job

    def get(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} not found: list jobs to see the ids")
        return job

    def list(self, state: str = "") -> list[Job]:
        return self.store.list(state)

    def queued(self) -> list[Job]:
        return sorted(self.store.list(QUEUED), key=lambda j: j.created_at)

    def record(self, job_id: str, kind: str, data: dict) -> JobEvent:
        event = self.store.append_event(job_id, kind, data)
        self.notifier.notify()
        return event

    def transition(self, job_id: str, state: str, *, from_states: tuple[str, ...], error: str = "") -> bool:
        changed = self.store.transition(job_id, state, from_states=from_states, error=error)
        self.notifier.notify()
        return changed

    def publish_adapter(self, job: Job, adapter_id: str, uri: str) -> Adapter | None:
        adapter = self.store.publish_adapter(job.id, adapter_id, job.spec["base_model"], uri)
        self.notifier.notify()
        return adapter

    def recover(self) -> list[str]:
        """Called at start-up: jobs a previous process left RUNNING are queued again."""
        return self.store.requeue_interrupted("the orchestrator restarted during this job; it runs again from the start")

    async def events(self, job_id: str, after_sequence: int = 0) -> AsyncIterator[JobEvent]:
        """The job's events after `after_sequence`: its history, then live
        events, until the job's final state has been sent."""
        self.get(job_id)
        while True:
            # State first, then events: the final state's event is written
            # with the state, so it is in `events` if `final` is seen.
            final = self.get(job_id).state in FINAL_STATES
            events = self.store.events_after(job_id, after_sequence)
            for event in events:
                yield event
                after_sequence = event.sequence
            if final and not events:
                return
            if not events:
                await self.notifier.wait(self.poll_seconds)

    async def adapters(self, after_sequence: int = 0) -> AsyncIterator[Adapter]:
        """Every adapter published after `after_sequence`, then each new one. Never ends."""
        while True:
            adapters = self.store.adapters_after(after_sequence)
            for adapter in adapters:
                yield adapter
                after_sequence = adapter.sequence
            if not adapters:
                await self.notifier.wait(self.poll_seconds)

    def list_adapters(self) -> list[Adapter]:
        return self.store.adapters_after(0)
