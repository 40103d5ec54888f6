"""The inference service's domain: generation requests and adapter loads,
handed to the engine's model thread and awaited from asyncio."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tunewire.services.common.artifacts import ArtifactStore
from tunewire.services.inference.engine import GenerationEngine, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedAdapter:
    id: str
    source_uri: str
    loaded_at: dt.datetime
    # From publication by the orchestrator to servable here; None when loaded by hand.
    publish_to_servable_seconds: float | None


class InferenceManager:
    def __init__(self, engine: GenerationEngine, artifacts: ArtifactStore, adapter_cache: Path):
        self.engine = engine
        self.artifacts = artifacts
        self.adapter_cache = adapter_cache
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._loaded: dict[str, LoadedAdapter] = {}

    async def _on_model_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, fn, *args)

    async def start(self) -> None:
        await self._on_model_thread(self.engine.load)

    def close(self) -> None:
        self._model_thread.shutdown(wait=False, cancel_futures=True)

    @property
    def base_model(self) -> str:
        return self.engine.base_model_name

    def loaded(self) -> list[LoadedAdapter]:
        return list(self._loaded.values())

    def is_loaded(self, adapter_id: str) -> bool:
        return adapter_id in self._loaded

    async def load_adapter(self, adapter_id: str, uri: str, published_at: dt.datetime | None = None) -> LoadedAdapter:
        if adapter_id in self._loaded:
            return self._loaded[adapter_id]
        local = await asyncio.to_thread(self.artifacts.local_copy, uri, self.adapter_cache)
        await self._on_model_thread(self.engine.load_adapter, adapter_id, local)
        now = dt.datetime.now(dt.UTC)
        latency = (now - published_at).total_seconds() if published_at else None
        loaded = LoadedAdapter(adapter_id, uri, now, latency)
        self._loaded[adapter_id] = loaded
        if latency is not None:
            log.info("adapter %s servable %.2fs after publication", adapter_id, latency)
        return loaded

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        cancelled = threading.Event()
        try:
            return await self._on_model_thread(self.engine.generate, request, lambda _text: None, cancelled)
        finally:
            cancelled.set()  # a caller that went away stops the generation

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[str | GenerationResult]:
        """Text deltas as they are decoded, then the GenerationResult."""
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[str] = asyncio.Queue()
        cancelled = threading.Event()

        def on_text(text: str) -> None:
            loop.call_soon_threadsafe(deltas.put_nowait, text)

        task = asyncio.ensure_future(self._on_model_thread(self.engine.generate, request, on_text, cancelled))
        try:
            while not task.done() or not deltas.empty():
                getter = asyncio.ensure_future(deltas.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            # Deltas queued by call_soon_threadsafe just before the end.
            await asyncio.sleep(0)
            while not deltas.empty():
                yield deltas.get_nowait()
            yield task.result()
        finally:
            cancelled.set()
