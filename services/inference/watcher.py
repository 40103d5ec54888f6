"""Follows the orchestrator's WatchAdapters stream: loads each adapter it
publishes for our base model, and unloads each one deleted. Reconnects with
backoff and resumes after the last change seen, so changes made while
disconnected are caught up."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

import grpc

from tunewire.services.common.auth import DEFAULT_PROJECT
from tunewire.services.common.channels import call_metadata, open_channel
from tunewire.services.common.errors import TunewireError
from tunewire.services.common.settings import Settings
from tunewire.services.inference.core import InferenceManager
from tunewire.v1 import training_pb2, training_pb2_grpc

log = logging.getLogger(__name__)


class AdapterWatcher:
    def __init__(self, manager: InferenceManager, training_address: str, settings: Settings, max_backoff: float = 10.0):
        self.manager = manager
        self.training_address = training_address
        self.settings = settings
        self.max_backoff = max_backoff
        self.last_sequence = 0

    async def run_forever(self) -> None:
        backoff = 0.5
        async with open_channel(self.training_address, self.settings) as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            while True:
                try:
                    request = training_pb2.WatchAdaptersRequest(after_sequence=self.last_sequence)
                    stream = stub.WatchAdapters(request, metadata=call_metadata(self.settings))
                    async for message in stream:
                        backoff = 0.5
                        await self._handle(message.adapter)
                except grpc.aio.AioRpcError as exc:
                    log.info("adapter watch on %s interrupted (%s); retrying in %.1fs", self.training_address, exc.code().name, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)

    async def _handle(self, adapter: training_pb2.Adapter) -> None:
        self.last_sequence = max(self.last_sequence, adapter.sequence)
        if adapter.deleted:
            project = adapter.project or DEFAULT_PROJECT
            if any(loaded.id == adapter.id for loaded in self.manager.loaded(project)):
                await self.manager.unload_adapter(adapter.id, project)
                log.info("adapter %s was deleted: unloaded", adapter.id)
            return
        if adapter.base_model != self.manager.base_model:
            log.debug("adapter %s is for %s, not %s: skipped", adapter.id, adapter.base_model, self.manager.base_model)
            return
        if adapter.held_back:
            # Its job forgot more than its budget allows: served only when asked (LoadAdapter).
            log.info("adapter %s is held back (over its forgetting budget): not hot-loaded", adapter.id)
            return
        try:
            await self.manager.load_adapter(
                adapter.id, adapter.uri, adapter.create_time.ToDatetime(tzinfo=dt.UTC), project=adapter.project or DEFAULT_PROJECT
            )
        except TunewireError as exc:
            log.warning("published adapter %s refused: %s", adapter.id, exc)
