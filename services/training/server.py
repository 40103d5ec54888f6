"""The training orchestrator process: `python -m tunewire.services.training`."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

from tunewire.services.common import layout
from tunewire.services.common.artifacts import ArtifactStore, sweep_crash_leftovers
from tunewire.services.common.grpc_server import ServerHandle, ServerSecurity, create_grpc_server, run_service
from tunewire.services.common.settings import Settings
from tunewire.services.training.dataset_lookup import GrpcDatasetLookup
from tunewire.services.training.jobs import DatasetLookup, JobManager
from tunewire.services.training.ray_runner import RayTrainRunner
from tunewire.services.training.scheduler import Scheduler, TrainingRunner
from tunewire.services.training.servicer import TrainingServicer
from tunewire.services.training.store import JobStore
from tunewire.services.training.tracking import Tracking
from tunewire.v1 import training_pb2, training_pb2_grpc

SERVICE_NAME = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name


@dataclass
class TrainingDeps:
    store: JobStore
    artifacts: ArtifactStore
    datasets: DatasetLookup
    runner: TrainingRunner

    @classmethod
    def from_settings(cls, settings: Settings) -> TrainingDeps:
        artifacts = ArtifactStore(settings.artifact_root)
        return cls(
            store=JobStore(settings.training_database_url),
            artifacts=artifacts,
            datasets=GrpcDatasetLookup(settings.dataset_address, settings),
            runner=RayTrainRunner(
                ray_address=settings.ray_address,
                num_cpus=settings.ray_num_cpus,
                artifacts=artifacts,
                model_cache=settings.model_cache,
            ),
        )


def tracking_from(settings: Settings, artifacts: ArtifactStore) -> Tracking:
    """TensorBoard files in the artifact store where it is a local directory
    (else under the service's home), MLflow where MLFLOW_TRACKING_URI says."""
    tensorboard = None
    if settings.tensorboard:
        tensorboard = Path(artifacts.path(layout.TENSORBOARD)) if artifacts.is_local else settings.home / layout.TENSORBOARD
    return Tracking(tensorboard, settings.mlflow_tracking_uri)


async def create_server(settings: Settings, deps: TrainingDeps, port: int | None = None) -> ServerHandle:
    """The server bound to settings.host and `port` (default
    settings.training_port; 0 picks one), once Ray is up. Its start() starts
    the scheduler before health says SERVING."""
    start_ray = getattr(deps.runner, "start", None)
    if start_ray is not None:
        # Before this process runs any gRPC server or channel: Ray starts its
        # processes (GCS, raylet, dashboard) by fork with Python code run
        # before exec, which hangs or aborts while another thread is inside
        # gRPC (Ray's start then times out, or its dashboard dies).
        await asyncio.to_thread(start_ray)
    jobs = JobManager(
        deps.store,
        deps.datasets,
        checkpoints=deps.runner.checkpoints,
        model_cache=settings.model_cache,
        max_active_jobs_per_project=settings.project_max_active_jobs,
        max_adapter_bytes_per_project=settings.project_max_adapter_bytes,
        artifacts=deps.artifacts,
        owner=settings.replica_id,
        model_roots=settings.model_root_list,
        lease_seconds=settings.job_lease_seconds,
    )
    scheduler = Scheduler(jobs, deps.runner, deps.artifacts, settings.max_concurrent_jobs, tracking_from(settings, deps.artifacts))
    address = f"{settings.host}:{settings.training_port if port is None else port}"
    handle = await create_grpc_server(
        address,
        lambda server: training_pb2_grpc.add_TrainingServiceServicer_to_server(TrainingServicer(jobs), server),
        [SERVICE_NAME],
        ServerSecurity.from_settings(settings),
    )
    scheduler_task: asyncio.Task | None = None

    async def ready() -> None:
        nonlocal scheduler_task
        await sweep_crash_leftovers(deps.artifacts)
        scheduler_task = asyncio.create_task(scheduler.run_forever(), name="scheduler")

    async def close() -> None:
        if scheduler_task is not None:
            scheduler_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scheduler_task
        await scheduler.stop()
        shutdown = getattr(deps.runner, "shutdown", None)
        if shutdown is not None:
            await asyncio.to_thread(shutdown)
        close_lookup = getattr(deps.datasets, "close", None)
        if close_lookup is not None:
            await close_lookup()
        deps.store.close()

    handle.on_start.append(ready)
    handle.on_stop.append(close)
    return handle


def serve() -> None:
    run_service("training", create_server, TrainingDeps.from_settings)
