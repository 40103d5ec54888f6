"""The inference service's domain: adapter loads and generation requests,
handed to the batching engine and awaited from asyncio (each with a
LoopReply: boundary.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import json
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

from tunewire.services.common import layout, telemetry
from tunewire.services.common.artifacts import ArtifactStore
from tunewire.services.common.auth import DEFAULT_PROJECT
from tunewire.services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from tunewire.services.common.sources import Source, check_source, parse_source, roots_for
from tunewire.services.inference.adapters import AdapterRegistry, AdapterView, not_loaded
from tunewire.services.inference.boundary import LoopReply
from tunewire.services.inference.engine import ClassificationResult, GenerationRequest, GenerationResult
from tunewire.services.inference.lora import AdapterWeights

log = logging.getLogger(__name__)

ADAPTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _adapter_project(source: Source) -> str | None:
    """The project a published adapter directory belongs to, from the
    metadata tunewire wrote beside its weights (adapters published before
    projects were recorded there belong to the default project); None when
    the directory holds no readable metadata."""
    try:
        metadata = json.loads(source.filesystem().cat_file(f"{source.path}/{layout.ADAPTER_METADATA}"))
    except (OSError, ValueError):
        return None
    return str(metadata.get("project", DEFAULT_PROJECT)) if isinstance(metadata, dict) else None


class ServingEngine(Protocol):
    """What InferenceManager needs of an engine: the built-in one
    (engine.BatchEngine) or vLLM's (vllm_engine.VllmEngine). Each answers
    through the Reply it is given (boundary.py)."""

    base_model_name: str
    registry: AdapterRegistry

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def read_adapter(self, local_dir: Path) -> AdapterWeights: ...
    def add_adapter(self, adapter_id, source_uri, local_dir, weights, project, published_at, load_started, reply): ...
    def remove_adapter(self, adapter_id: str, project: str | None = None, reply=None) -> None: ...
    def adapters(self, project: str | None = None) -> list[AdapterView]: ...
    def submit(self, request: GenerationRequest, reply, deadline: float | None = None, project: str | None = None, stream: bool = True): ...
    def classify(self, adapter_id: str, text: str, reply, project: str | None = None): ...
    def cancel(self, handle) -> None: ...


class InferenceManager:
    def __init__(
        self,
        engine: ServingEngine,
        artifacts: ArtifactStore,
        adapter_cache: Path,
        import_roots: tuple[str, ...] = (),
        max_requests_per_project: int = 0,
    ):
        self.engine = engine
        self.max_requests_per_project = max_requests_per_project
        self._requests: Counter[str] = Counter()  # queued or running, per project
        self.artifacts = artifacts
        self.adapter_cache = adapter_cache
        # Adapters load from a project's own published adapters or its import roots, nowhere else.
        self.import_roots = import_roots
        self._loading: dict[str, asyncio.Future] = {}

    async def start(self) -> None:
        await asyncio.to_thread(self.engine.start)  # loads the base model on the model thread

    def close(self) -> None:
        self.engine.stop()

    @property
    def base_model(self) -> str:
        return self.engine.base_model_name

    # Adapters

    def loaded(self, project: str | None = None) -> list[AdapterView]:
        """The adapters served: a project's, or all (None)."""
        return self.engine.adapters(project)

    async def load_adapter(
        self, adapter_id: str, uri: str, published_at: dt.datetime | None = None, project: str = DEFAULT_PROJECT
    ) -> AdapterView:
        """Validates the adapter at `uri` and makes it servable as `adapter_id`
        to `project`. Concurrent loads of one id share the work."""
        if not ADAPTER_ID.match(adapter_id):
            raise InvalidArgument.field(
                "id", f"{adapter_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        if not uri:
            raise InvalidArgument.field("source_uri", "required: the adapter's directory, as a path or URL")
        existing = self.engine.registry.get(adapter_id)
        # Another project's id is never replaced (its callers would be served these weights).
        if existing is not None and existing.project != project:
            raise FailedPrecondition(f"adapter id {adapter_id!r} is taken: load the adapter under another id")
        if existing is not None and existing.source_uri == uri:
            return self._view(adapter_id)
        if adapter_id in self._loading:
            return await asyncio.shield(self._loading[adapter_id])
        future = asyncio.get_running_loop().create_future()
        self._loading[adapter_id] = future
        try:
            loaded = await self._load(adapter_id, uri, published_at, project)
            future.set_result(loaded)
            return loaded
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters, if any, get it from their own await
            raise
        finally:
            del self._loading[adapter_id]

    async def _load(self, adapter_id: str, uri: str, published_at: dt.datetime | None, project: str) -> AdapterView:
        started = time.perf_counter()
        source = await asyncio.to_thread(self._check_adapter_source, project, uri)
        try:
            local = await asyncio.to_thread(self.artifacts.local_copy, source.uri, self.adapter_cache)
        except FileNotFoundError:
            raise NotFound(f"source_uri {uri!r}: no such adapter directory") from None
        if not local.exists():
            raise NotFound(f"source_uri {uri!r}: no such adapter directory")
        if not local.is_dir():
            raise InvalidArgument.field("source_uri", f"{uri!r} is not a directory: give the adapter's directory")
        weights = await _in_own_thread(self.engine.read_adapter, local)
        reply = LoopReply()
        self.engine.add_adapter(adapter_id, uri, local, weights, project, published_at, started, reply=reply)
        adapter = await reply.result()
        telemetry.INFERENCE_ADAPTERS_LOADED.set(len(self.engine.registry))
        telemetry.INFERENCE_ADAPTER_LOAD_SECONDS.observe(adapter.load_seconds)
        latency = adapter.publish_to_servable_seconds
        log.info(
            "adapter %s (%s, rank %d) servable in %.2fs%s",
            adapter_id,
            weights.task_type,
            weights.rank,
            adapter.load_seconds,
            f", {latency:.2f}s after publication" if latency is not None else "",
        )
        return self._view(adapter_id)

    def _view(self, adapter_id: str) -> AdapterView:
        view = self.engine.registry.view(adapter_id)
        if view is None:  # unloaded meanwhile
            raise not_loaded(adapter_id)
        return view

    def _check_adapter_source(self, project: str, uri: str) -> Source:
        """The adapter directory if the project may load it: one of its own
        adapters published in the artifact store (their metadata names the
        project), or a directory under its import roots. Anything else, other
        projects' adapters included, is answered alike, so a request learns
        nothing of what exists elsewhere."""
        source = parse_source(uri)
        published = parse_source(self.artifacts.uri(layout.ADAPTERS))
        if source.within(published) and source != published:
            if _adapter_project(source) == project:
                return source
        elif self.import_roots:
            with contextlib.suppress(InvalidArgument):
                return check_source(uri, roots_for(self.import_roots, project), outside=(self.artifacts.root,))
        raise InvalidArgument.field(
            "source_uri",
            f"{uri!r} is neither one of project {project!r}'s published adapters nor under its import roots {list(self.import_roots)}",
        )

    async def unload_adapter(self, adapter_id: str, project: str | None = None) -> None:
        """Stops serving the adapter: a project's own (another project's is
        as unknown as one never loaded), or any (project None: operators)."""
        reply = LoopReply()
        self.engine.remove_adapter(adapter_id, project, reply=reply)
        await reply.result()
        telemetry.INFERENCE_ADAPTERS_LOADED.set(len(self.engine.registry))

    # Requests

    async def generate(self, project: str, request: GenerationRequest, deadline: float | None = None) -> GenerationResult:
        async for item in self._run(project, request, deadline, stream=False):
            if isinstance(item, GenerationResult):
                return item
        raise AssertionError("generation ended without a result")

    def generate_stream(
        self, project: str, request: GenerationRequest, deadline: float | None = None
    ) -> AsyncIterator[str | GenerationResult]:
        """Text deltas as they are decoded, then the GenerationResult."""
        return self._run(project, request, deadline, stream=True)

    @contextlib.contextmanager
    def _project_request(self, project: str):
        """Counts a request against the project's quota while it is queued or running."""
        if self.max_requests_per_project and self._requests[project] >= self.max_requests_per_project:
            raise ResourceExhausted(
                f"project {project} has {self._requests[project]} generation requests queued or running, its quota: "
                "retry after some finish (operators set TUNEWIRE_PROJECT_MAX_GENERATION_REQUESTS)"
            )
        self._requests[project] += 1
        try:
            yield
        finally:
            self._requests[project] -= 1

    async def _run(
        self, project: str, request: GenerationRequest, deadline: float | None, stream: bool
    ) -> AsyncIterator[str | GenerationResult]:
        reply = LoopReply()
        with self._project_request(project):
            # Tokenising a long prompt takes a while: not on the event loop.
            handle = await self._submitted(self.engine.submit, request, reply, deadline, project, stream)
            ended = False
            try:
                async for item in reply.items():
                    ended = isinstance(item, GenerationResult)
                    yield item
            except Exception:
                ended = True  # the engine's error for this request: it has ended there
                raise
            finally:
                if not ended:
                    self.engine.cancel(handle)  # a caller that went away frees its batch row

    async def _submitted(self, submit: Callable, *args):
        """submit(*args) in a worker thread (it tokenises), returning its handle.
        A caller that goes away meanwhile still gets its request cancelled,
        once the thread has posted it."""
        submitting = asyncio.ensure_future(asyncio.to_thread(submit, *args))
        try:
            return await asyncio.shield(submitting)
        except asyncio.CancelledError:
            submitting.add_done_callback(lambda done: done.cancelled() or done.exception() or self.engine.cancel(done.result()))
            raise

    async def classify(self, project: str, adapter_id: str, text: str) -> ClassificationResult:
        reply = LoopReply()
        with self._project_request(project):
            handle = await self._submitted(self.engine.classify, adapter_id, text, reply, project)
            try:
                return await reply.result()
            except asyncio.CancelledError:
                self.engine.cancel(handle)  # still queued: not run
                raise


async def _in_own_thread(fn: Callable, *args):
    """Runs fn in a thread that ends with it. A torch op that runs in parallel
    leaves an OpenMP thread pool on its thread for good, and a second pool
    slows the model thread (BatchEngine.start); a short-lived thread takes
    its pool with it."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="adapter-read") as pool:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
