"""The vLLM backend: the engine interface of `BatchEngine` (engine.py) over
vLLM's `AsyncLLM`, with LoRA enabled, for serving on GPUs.

Chosen with TUNEWIRE_INFERENCE_ENGINE=vllm (and the `vllm` extra). vLLM
brings what a GPU fleet wants: multi-LoRA batches on its punica kernels,
paged attention, tensor parallelism across GPUs. tunewire keeps what is its
own, unchanged for callers: adapter hot-loads from the artifact store, each
project served its own adapters only, the request limits, and both APIs
(gRPC and the OpenAI-compatible one) over InferenceManager.

Here vLLM owns residency (`max_loras` on the GPU, `max_cpu_loras` in host
memory); the registry (adapters.py) keeps who may use each adapter and the
requests that hold it, so an adapter unloaded mid-request leaves vLLM only
once they finish. An adapter's `slot` is its LoRA id inside vLLM.

vLLM runs on its own thread, in its own asyncio event loop: every call from
callers crosses to it with `asyncio.run_coroutine_threadsafe` (the one
mechanism), and what comes back goes through the caller's Reply
(boundary.py), as with the built-in engine. Classification stays on the
built-in engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import importlib.util
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunewire.services.common.auth import DEFAULT_PROJECT
from tunewire.services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from tunewire.services.common.models import base_model_aliases, resolve_model
from tunewire.services.inference.adapters import AdapterRegistry, AdapterView, ServedAdapter
from tunewire.services.inference.boundary import Reply, WaitingReply, shutting_down
from tunewire.services.inference.engine import EngineLimits, GenerationRequest, GenerationResult, prepare_prompt
from tunewire.services.inference.lora import CAUSAL_LM, AdapterWeights, read_adapter
from tunewire.services.inference.output import CANCELLED, LENGTH, STOP

log = logging.getLogger(__name__)

INSTALL_HINT = "TUNEWIRE_INFERENCE_ENGINE=vllm needs vLLM on a CUDA machine: pip install 'tunewire[vllm]'"
# vLLM's finish reasons, as tunewire's ("error" is raised instead).
FINISH_REASONS = {"stop": STOP, "length": LENGTH, "abort": CANCELLED, "repetition": STOP}
# The LoRA ranks vLLM can be configured for (its max_lora_rank).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The served dtypes vLLM's LoRA kernels run in.
VLLM_DTYPES = ("auto", "bfloat16", "float16")


def vllm_available() -> bool:
    """Whether vLLM is installed (found, not imported: importing it is slow)."""
    return importlib.util.find_spec("vllm") is not None


def create_vllm_engine(model_path: str, limits: EngineLimits, dtype: str, tensor_parallel_size: int, gpu_memory_utilization: float):
    """vLLM's AsyncLLM for the base model, LoRA enabled within tunewire's limits."""
    # vLLM starts its engine processes by forking unless told otherwise; this
    # process already runs gRPC's threads, which a fork does not take along.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    from vllm import AsyncEngineArgs, AsyncLLMEngine

    args = AsyncEngineArgs(
        model=model_path,
        dtype=dtype,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        max_num_seqs=limits.max_batch_size,
        enable_lora=True,
        max_loras=limits.max_resident_adapters,
        # tunewire checks each adapter against max_adapter_rank itself.
        max_lora_rank=next((r for r in VLLM_LORA_RANKS if r >= limits.max_adapter_rank), VLLM_LORA_RANKS[-1]),
        # Adapters evicted from the GPU stay in host memory for this many more.
        max_cpu_loras=4 * limits.max_resident_adapters,
    )
    return AsyncLLMEngine.from_engine_args(args)


def _as_tunewire_error(exc: Exception) -> Exception:
    """vLLM's errors, as the status callers should see (by class name: vLLM
    moves its exception classes between versions)."""
    name = type(exc).__name__
    if name == "EngineDeadError":
        return Unavailable("the vLLM engine has stopped: retry on another replica (the service needs a restart)")
    if name == "VLLMValidationError":
        return InvalidArgument(f"vLLM refused the request: {exc}")
    return exc


@dataclass
class VllmRequest:
    """A generation inside the backend (its caller's handle, to cancel it)."""

    id: str
    reply: Reply
    adapter: ServedAdapter | None
    task: asyncio.Task | None = None
    cancelled: bool = False
    text: list[str] = field(default_factory=list)


class VllmEngine:
    """The serving engine over vLLM; the same methods InferenceManager calls
    on BatchEngine. `engine_factory(model_path)` makes the AsyncLLM (tests
    give a fake one)."""

    def __init__(
        self,
        base_model_name: str,
        model_cache: Path,
        limits: EngineLimits | None = None,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        engine_factory: Callable[[str], Any] | None = None,
    ):
        if dtype not in VLLM_DTYPES:
            raise ValueError(f"{dtype!r}: vLLM's LoRA kernels run in {', '.join(VLLM_DTYPES)}")
        self.base_model_name = base_model_name
        self.model_cache = model_cache
        self.limits = limits or EngineLimits()
        self.registry = AdapterRegistry()
        self._engine_factory = engine_factory or (
            lambda path: create_vllm_engine(path, self.limits, dtype, tensor_parallel_size, gpu_memory_utilization)
        )
        self._engine = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lora_ids = itertools.count(1)
        self._requests: dict[str, VllmRequest] = {}  # running or waiting in vLLM (its thread only)
        # What was handed to vLLM's loop and has not finished: answered
        # UNAVAILABLE if the loop stops first.
        self._pending: set[concurrent.futures.Future] = set()
        self._lock = threading.Lock()
        self._closing = False
        self.tokenizer = None
        self.max_positions = 0
        self._linears: dict = {}
        self._base_names: set[str] = set()

    # Life cycle

    def start(self) -> None:
        """Loads the base model into vLLM on the backend's thread; returns once
        it serves, or raises why it cannot."""
        from transformers import AutoConfig, AutoTokenizer

        path = resolve_model(self.base_model_name, self.model_cache)
        config = AutoConfig.from_pretrained(path)
        if not any(a.endswith("ForCausalLM") for a in (config.architectures or [])):
            raise FailedPrecondition(f"{self.base_model_name} is not a causal LM: classification models are served by the built-in engine")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self._linears = _linear_layers(config)
        self._base_names = base_model_aliases(self.base_model_name) | {path}
        ready = WaitingReply()
        self._thread = threading.Thread(target=self._run, args=(path, ready), name="vllm", daemon=True)
        self._thread.start()
        ready.result(timeout=None)
        self.max_positions = int(getattr(self._engine.model_config, "max_model_len", 0)) or getattr(
            config.get_text_config(), "max_position_embeddings", 1 << 30
        )
        log.info("base model %s served by vLLM from %s (%d positions)", self.base_model_name, path, self.max_positions)

    def _run(self, model_path: str, ready: WaitingReply) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:

            async def create():  # inside the loop, so vLLM's output handler starts on it
                return self._engine_factory(model_path)

            self._engine = self._loop.run_until_complete(create())
        except BaseException as exc:
            ready.finish(exc)
            self._loop.close()
            return
        ready.finish(None)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def stop(self, grace: float = 10.0) -> None:
        """Answers every request in flight UNAVAILABLE (vLLM aborts each),
        then shuts vLLM down and ends its thread."""
        with self._lock:
            if self._loop is None or self._loop.is_closed() or self._closing:
                return
            self._closing = True  # from here on, nothing new reaches vLLM

        async def close() -> None:
            tasks = [r.task for r in self._requests.values() if r.task is not None]
            for task in tasks:
                task.cancel()
            if tasks:  # their aborts take a few turns of the loop
                await asyncio.wait(tasks, timeout=grace)
            self._engine.shutdown()

        try:
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=grace + 30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=30)
            with self._lock:
                pending, self._pending = self._pending, set()
            for future in pending:
                future.cancel()  # answers its reply (or its waiting caller) UNAVAILABLE

    def _call(self, coroutine: Coroutine, reply: Reply | None):
        """Runs the coroutine on vLLM's loop; its result (or error) finishes
        the reply, or, without one, is returned here once done."""
        with self._lock:
            if self._loop is None or self._closing:
                coroutine.close()
                raise shutting_down()
            future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
            self._pending.add(future)

        def answer(done: concurrent.futures.Future) -> None:
            with self._lock:
                self._pending.discard(done)
            if reply is not None:
                reply.finish(shutting_down() if done.cancelled() else done.exception() or done.result())

        future.add_done_callback(answer)
        if reply is not None:
            return None
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise shutting_down() from None

    # Adapters (any thread)

    def read_adapter(self, local_dir: Path) -> AdapterWeights:
        """Reads and validates an adapter against the base model's layers
        (their shapes, from its config) without touching what is served."""
        return read_adapter(local_dir, self._linears, "model", self._base_names, self.limits.max_adapter_rank, ())

    def add_adapter(
        self,
        adapter_id: str,
        source_uri: str,
        local_dir: Path,
        weights: AdapterWeights,
        project: str = DEFAULT_PROJECT,
        published_at: dt.datetime | None = None,
        load_started: float = 0.0,
        reply: Reply | None = None,
    ) -> ServedAdapter | None:
        """Loads the adapter into vLLM and makes it servable to `project`; as
        BatchEngine.add_adapter."""
        if weights.task_type != CAUSAL_LM:
            raise InvalidArgument.field(
                "source", f"a {weights.task_type} adapter: the vLLM engine serves generation; classify on the built-in engine"
            )
        adapter = ServedAdapter(adapter_id, source_uri, local_dir, weights.task_type, weights.rank, [], project, published_at, load_started)

        async def place() -> ServedAdapter:
            existing = self.registry.get(adapter_id)
            if existing is not None:
                return self.registry.add(adapter)  # itself if from the same source, else refused
            adapter.slot = next(self._lora_ids)
            try:
                await self._engine.add_lora(_lora_request(adapter))
            except Exception as exc:
                raise InvalidArgument.field("source", f"vLLM could not load the adapter: {exc}") from exc
            return self.registry.add(adapter)

        return self._call(place(), reply)

    def remove_adapter(self, adapter_id: str, project: str | None = None, reply: Reply | None = None) -> None:
        """Stops new requests for the adapter; vLLM drops it once those already
        accepted finish."""

        async def remove() -> None:
            adapter = self.registry.remove(adapter_id, project)
            if self.registry.releasable(adapter):
                await self._release(adapter)

        self._call(remove(), reply)

    def adapters(self, project: str | None = None) -> list[AdapterView]:
        return self.registry.views(project)

    async def _release(self, adapter: ServedAdapter) -> None:
        lora_id, adapter.slot = adapter.slot, None
        await self._engine.remove_lora(lora_id)
        log.info("adapter %s unloaded", adapter.id)

    # Requests (any thread)

    def submit(
        self, request: GenerationRequest, reply: Reply, deadline: float | None = None, project: str | None = None, stream: bool = True
    ) -> VllmRequest:
        """Queues a generation in vLLM; as BatchEngine.submit."""
        prompt_ids, request = prepare_prompt(request, self.tokenizer, self.max_positions)
        handle = VllmRequest(uuid.uuid4().hex, reply, None)

        async def generate() -> None:
            gone = handle.cancelled or (deadline is not None and time.monotonic() > deadline)
            if gone:  # before it reached vLLM: nothing to abort
                reply.finish(GenerationResult("", CANCELLED, len(prompt_ids), 0))
                return
            if len(self._requests) >= self.limits.max_batch_size + self.limits.max_queued_requests:
                raise ResourceExhausted(
                    f"{len(self._requests)} requests are already running or waiting (TUNEWIRE_MAX_QUEUED_REQUESTS): retry with backoff"
                )
            handle.adapter = self.registry.use(request.adapter, CAUSAL_LM, project)
            handle.task = asyncio.current_task()
            self._requests[handle.id] = handle
            try:
                result = await self._generate(handle, prompt_ids, request, deadline, stream)
            finally:
                handle.task = None  # a cancel from here on has nothing to stop
                del self._requests[handle.id]
                if handle.adapter is not None and self.registry.done(handle.adapter):
                    await asyncio.shield(self._release(handle.adapter))
            reply.finish(result)

        self._call(generate(), _ErrorsOnly(reply))
        return handle

    async def _generate(
        self, handle: VllmRequest, prompt_ids: list[int], request: GenerationRequest, deadline: float | None, stream: bool
    ) -> GenerationResult | BaseException:
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        # Unset top_p and top_k (0) take vLLM's defaults; seed 0 is a seed.
        optional = {"top_p": request.top_p or None, "top_k": request.top_k or None, "seed": request.seed}
        params = SamplingParams(
            max_tokens=request.max_new_tokens,
            temperature=request.temperature,
            stop=list(request.stop),
            output_kind=RequestOutputKind.DELTA,
            **{k: v for k, v in optional.items() if v is not None},
        )
        lora = _lora_request(handle.adapter) if handle.adapter is not None else None
        completion_tokens, finish_reason = 0, STOP
        try:
            async with asyncio.timeout_at(deadline):  # the loop's clock is time.monotonic, as deadlines are
                async for output in self._engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, handle.id, lora_request=lora):
                    completion = output.outputs[0]
                    completion_tokens += len(completion.token_ids)
                    if completion.text:
                        handle.text.append(completion.text)
                        if stream:
                            handle.reply.send(completion.text)
                    if completion.finish_reason == "error":
                        raise Unavailable("vLLM failed this request: retry it")
                    if completion.finish_reason is not None:
                        finish_reason = FINISH_REASONS.get(completion.finish_reason, STOP)
        except TimeoutError:
            finish_reason = CANCELLED
            await asyncio.shield(self._engine.abort(handle.id))  # in case it ended before vLLM took it
        except asyncio.CancelledError:
            asyncio.current_task().uncancel()
            await asyncio.shield(self._engine.abort(handle.id))
            if self._closing:
                return shutting_down()
            finish_reason = CANCELLED  # the caller went away
        except Exception as exc:
            error = _as_tunewire_error(exc)
            if error is exc:  # already tunewire's, or one without a better status
                raise
            raise error from exc
        return GenerationResult("".join(handle.text), finish_reason, len(prompt_ids), completion_tokens)

    def classify(self, adapter_id: str, text: str, reply: Reply, project: str | None = None):
        raise FailedPrecondition("classification runs on the built-in engine: set TUNEWIRE_INFERENCE_ENGINE=builtin")

    def cancel(self, handle: VllmRequest) -> None:
        """The caller went away: its request is aborted in vLLM."""

        def cancel() -> None:
            handle.cancelled = True
            if handle.task is not None:
                handle.task.cancel()

        try:
            self._loop.call_soon_threadsafe(cancel)
        except (AttributeError, RuntimeError):  # no loop, or it has closed: nothing runs
            pass


def _lora_request(adapter: ServedAdapter):
    """The adapter as vLLM names it. vLLM tells LoRAs apart by name, so each
    load gets its own (an id unloaded and loaded again while a request still
    holds the first is two LoRAs)."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(f"{adapter.id}#{adapter.slot}", adapter.slot, str(adapter.local_dir))


class _ErrorsOnly(Reply):
    """Passes a failed request's error to its reply; the request finishes
    the reply itself when it ends normally."""

    def __init__(self, reply: Reply):
        self.reply = reply

    def send(self, item: Any) -> None:
        self.reply.send(item)

    def finish(self, outcome: Any) -> None:
        if isinstance(outcome, BaseException):
            self.reply.finish(outcome)


def _linear_layers(config) -> dict:
    """The base model's linear layers by name, built on the meta device from
    its config (no weights read), to check adapters' shapes against."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
