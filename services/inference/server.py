"""The inference service process: `python -m tunewire.services.inference`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from aiohttp import web

from tunewire.services.common.artifacts import ArtifactStore
from tunewire.services.common.grpc_server import ServerHandle, ServerSecurity, create_grpc_server, run_service
from tunewire.services.common.settings import Settings, SettingsError
from tunewire.services.inference.core import InferenceManager
from tunewire.services.inference.engine import BatchEngine, EngineLimits
from tunewire.services.inference.openai_api import OpenAIApi, start_http
from tunewire.services.inference.servicer import InferenceServicer
from tunewire.services.inference.vllm_engine import INSTALL_HINT, VllmEngine, vllm_available
from tunewire.services.inference.watcher import AdapterWatcher
from tunewire.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


@dataclass
class InferenceDeps:
    manager: InferenceManager
    # Address of the orchestrator to subscribe to; empty: no subscription.
    training_address: str

    @classmethod
    def from_settings(cls, settings: Settings) -> InferenceDeps:
        limits = EngineLimits(
            max_batch_size=settings.max_batch_size,
            max_queued_requests=settings.max_queued_requests,
            max_resident_adapters=settings.max_resident_adapters,
            max_evicted_adapter_bytes=settings.max_evicted_adapter_bytes,
            max_adapter_rank=settings.max_adapter_rank,
            prefill_chunk_tokens=settings.prefill_chunk_tokens,
            prefill_share=settings.prefill_share,
        )
        if settings.inference_engine == "vllm":
            if not vllm_available():
                raise SettingsError(f"invalid settings: {INSTALL_HINT}")
            try:
                engine = VllmEngine(
                    settings.base_model,
                    settings.model_cache,
                    limits,
                    settings.inference_dtype,
                    settings.vllm_tensor_parallel_size,
                    settings.vllm_gpu_memory_utilization,
                )
            except ValueError as error:
                raise SettingsError(f"invalid settings: TUNEWIRE_INFERENCE_DTYPE={settings.inference_dtype!r}: {error}") from None
        else:
            try:
                engine = BatchEngine(settings.base_model, settings.model_cache, limits, settings.inference_dtype, settings.inference_device)
            except ValueError as error:  # a device this machine does not have
                raise SettingsError(f"invalid settings: TUNEWIRE_INFERENCE_DEVICE={settings.inference_device!r}: {error}") from None
        manager = InferenceManager(
            engine,
            ArtifactStore(settings.artifact_root),
            settings.home / "adapter-cache",
            settings.import_root_list,
            max_requests_per_project=settings.project_max_generation_requests,
        )
        return cls(manager, settings.training_address)


async def create_server(settings: Settings, deps: InferenceDeps, port: int | None = None) -> ServerHandle:
    """The server bound to settings.host and `port` (default
    settings.inference_port; 0 picks one). Its start() loads the base model
    and subscribes to published adapters before health says SERVING."""
    manager = deps.manager
    address = f"{settings.host}:{settings.inference_port if port is None else port}"
    security = ServerSecurity.from_settings(settings)
    handle = await create_grpc_server(
        address,
        lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(manager), server),
        [SERVICE_NAME],
        security,
    )
    watch_task: asyncio.Task | None = None
    http: web.AppRunner | None = None

    async def ready() -> None:
        nonlocal watch_task, http
        await manager.start()
        if settings.inference_http_port:  # after the model loads: every request it takes can be answered
            http, http_port = await start_http(OpenAIApi(manager, security.keys), settings, settings.inference_http_port)
            log.info(
                "OpenAI-compatible API on port %d: http%s://%s:%d/v1",
                http_port,
                "s" * bool(settings.tls_cert_file),
                settings.host,
                http_port,
            )
        if deps.training_address:
            watch_task = asyncio.create_task(AdapterWatcher(manager, deps.training_address, settings).run_forever(), name="adapter watcher")

    async def stop_http(grace: float) -> None:
        if http is not None:
            await http.cleanup()  # waits up to the grace period for requests in flight

    async def close() -> None:
        if watch_task is not None:
            watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch_task
        manager.close()

    handle.on_start.append(ready)
    handle.on_stopping.append(stop_http)
    handle.on_stop.append(close)
    return handle


def serve() -> None:
    run_service("inference", create_server, InferenceDeps.from_settings)
