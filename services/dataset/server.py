"""The dataset service process: `python -m tunewire.services.dataset`."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tunewire.services.common.artifacts import ArtifactStore, sweep_crash_leftovers
from tunewire.services.common.grpc_server import ServerHandle, ServerSecurity, create_grpc_server, run_service
from tunewire.services.common.settings import Settings
from tunewire.services.dataset.core import DatasetManager
from tunewire.services.dataset.servicer import DatasetServicer
from tunewire.services.dataset.store import DatasetStore
from tunewire.v1 import dataset_pb2, dataset_pb2_grpc

SERVICE_NAME = dataset_pb2.DESCRIPTOR.services_by_name["DatasetService"].full_name


@dataclass
class DatasetDeps:
    store: DatasetStore
    artifacts: ArtifactStore

    @classmethod
    def from_settings(cls, settings: Settings) -> DatasetDeps:
        return cls(DatasetStore(settings.dataset_database_url), ArtifactStore(settings.artifact_root))


async def create_server(settings: Settings, deps: DatasetDeps, port: int | None = None) -> ServerHandle:
    """The server bound to settings.host and `port` (default settings.dataset_port; 0 picks one)."""
    manager = DatasetManager(
        deps.store,
        deps.artifacts,
        max_upload_bytes=settings.max_upload_bytes,
        max_row_bytes=settings.max_row_bytes,
        import_roots=settings.import_root_list,
        model_cache=settings.model_cache,
        max_project_bytes=settings.project_max_dataset_bytes,
        model_roots=settings.model_root_list,
    )
    address = f"{settings.host}:{settings.dataset_port if port is None else port}"
    handle = await create_grpc_server(
        address,
        lambda server: dataset_pb2_grpc.add_DatasetServiceServicer_to_server(DatasetServicer(manager), server),
        [SERVICE_NAME],
        ServerSecurity.from_settings(settings),
    )

    async def close() -> None:
        deps.store.close()

    handle.on_start.append(functools.partial(sweep_crash_leftovers, deps.artifacts))
    handle.on_stop.append(close)
    return handle


def serve() -> None:
    run_service("dataset", create_server, DatasetDeps.from_settings)
