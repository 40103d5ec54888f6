"""The batching engine: one base model, many LoRA adapters, one model thread.

Its parts, each in its own module:
- `scheduler.py`, the policy: the bounded queues, and which requests join
  the running batch at each step (fair across projects, within the prefill
  budget, only where the adapter can have a slot);
- `adapters.py`, the one registry of served adapters: who may use each, the
  requests holding it, its LoRA slot, the least recently used idle one;
- `output.py`, tokens to text: incremental detokenisation and stop strings;
- `runner.py`, the model on its device: prefill, decode, sampling and
  classification passes over the rows it is given;
- this module: the model thread that carries the scheduler's decisions to
  the runner. Each step the newcomers are prefilled in one forward pass (a
  long prompt one chunk a step) and merged into the batch's cache, then
  every running row decodes one token
  in one forward pass, whatever adapter each row uses (lora.py). A request leaves
  the batch when it finishes, is cancelled or passes its deadline, and its
  row goes to the next waiting request (continuous batching).
  Classifications run between decoding steps, batched the same way.

Callers reach the model thread through `boundary.py` alone: each operation is
a command posted to its inbox, run between steps, and what comes back goes
through the caller's Reply. So adapter loads and unloads are applied between
steps (no forward pass ever sees a half-written slot), and the queues, the
batch and the adapters' holds change on the model thread only. An adapter held by a queued or
admitted request is never evicted or removed until they finish; at most
`max_resident_adapters` are in slots. An evicted adapter's weights stay in
host memory (up to `max_evicted_adapter_bytes`, least recently used dropped
first), so its next request copies them back rather than reading its files.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from tunewire.services.common import telemetry
from tunewire.services.common.auth import DEFAULT_PROJECT
from tunewire.services.common.errors import FailedPrecondition, InvalidArgument
from tunewire.services.common.hardware import serving_device
from tunewire.services.common.text import prompt_text
from tunewire.services.inference.adapters import AdapterRegistry, AdapterView, ServedAdapter
from tunewire.services.inference.boundary import Command, Inbox, Reply, WaitingReply, run_command, shutting_down
from tunewire.services.inference.lora import CAUSAL_LM, SEQ_CLS, AdapterWeights
from tunewire.services.inference.output import CANCELLED, LENGTH, STOP, TextStream
from tunewire.services.inference.runner import ModelRunner, serving_dtype
from tunewire.services.inference.scheduler import Scheduler, is_gone

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128
MAX_NEW_TOKENS_LIMIT = 4096
# Stop strings are looked for after every token: their count and length bound that work.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 128


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int = 16  # rows decoded together
    max_queued_requests: int = 64  # waiting to join the batch; more get RESOURCE_EXHAUSTED
    max_resident_adapters: int = 8  # LoRA slots
    # Evicted adapters' weights kept in host memory, so a reload is a copy.
    max_evicted_adapter_bytes: int = 2 << 30
    max_adapter_rank: int = 64
    # Prompt tokens (padded) prefilled together in one pass.
    max_prefill_tokens: int = 8192
    # A longer prompt is prefilled this many tokens a step, between decoding
    # steps, so it does not stall the running streams for its whole length;
    # while streams decode, its chunks take about this share of their
    # decoding time (scheduler.PrefillPacer).
    prefill_chunk_tokens: int = 256
    prefill_share: float = 0.75


@dataclass(frozen=True)
class GenerationRequest:
    adapter: str = ""  # "" for the base model
    prompt: str | None = None
    messages: list[dict] | None = None
    raw_prompt: bool = False
    # None: as many as the model's positions leave after the prompt (at most MAX_NEW_TOKENS_LIMIT).
    max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def check(self) -> None:
        if self.prompt is None and not self.messages:
            raise InvalidArgument.field("input", "set prompt or messages")
        if self.max_new_tokens is not None and not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise InvalidArgument.field("sampling.max_new_tokens", f"must be in [1, {MAX_NEW_TOKENS_LIMIT}], got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 5:
            raise InvalidArgument.field("sampling.temperature", f"must be in [0, 5], got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise InvalidArgument.field("sampling.top_p", f"must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument.field("sampling.top_k", f"must be >= 0, got {self.top_k}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidArgument.field("sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for i, stop in enumerate(self.stop):
            if not 1 <= len(stop) <= MAX_STOP_CHARS:
                raise InvalidArgument.field(f"sampling.stop[{i}]", f"must be 1 to {MAX_STOP_CHARS} characters, got {len(stop)}")
        for i, message in enumerate(self.messages or []):
            if message["role"] not in ("system", "user", "assistant"):
                raise InvalidArgument.field(f"messages[{i}].role", f"unknown role {message['role']!r}")


def prepare_prompt(request: GenerationRequest, tokenizer, max_positions: int) -> tuple[list[int], GenerationRequest]:
    """Checks a generation request and tokenises its prompt (chat template
    and all); returns the prompt's ids and the request with max_new_tokens
    set (None: what the model's positions leave). InvalidArgument names
    what does not fit."""
    request.check()
    text = prompt_text(tokenizer, request.messages, request.prompt, request.raw_prompt)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    if request.max_new_tokens is None:
        room = max_positions - len(prompt_ids)
        if room < 1:
            raise InvalidArgument.field("prompt", f"is {len(prompt_ids)} tokens: the model has {max_positions} positions")
        request = replace(request, max_new_tokens=min(room, MAX_NEW_TOKENS_LIMIT))
    if len(prompt_ids) + request.max_new_tokens > max_positions:
        raise InvalidArgument.field(
            "sampling.max_new_tokens",
            f"prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({request.max_new_tokens}) is over the model's "
            f"{max_positions} positions: shorten the prompt or lower max_new_tokens",
        )
    return prompt_ids, request


@dataclass
class GenerationResult:
    text: str = ""
    finish_reason: str = STOP
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class ClassificationResult:
    label: str
    scores: dict[str, float]


@dataclass
class _Sequence:
    """A generation request inside the engine (its caller's handle, to cancel it)."""

    project: str | None  # None: no project (tools and tests): any adapter
    prompt_ids: list[int]
    request: GenerationRequest
    text: TextStream
    reply: Reply
    deadline: float | None
    generator: torch.Generator | None = None
    adapter: ServedAdapter | None = None  # held from admission to the end (model thread)
    cancelled: bool = False
    generated: int = 0
    finish_reason: str | None = None
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class _Classification:
    """A classification request inside the engine (its caller's handle)."""

    text: str
    reply: Reply
    adapter: ServedAdapter | None = None
    cancelled: bool = False


class BatchEngine:
    def __init__(
        self,
        base_model_name: str,
        model_cache: Path,
        limits: EngineLimits | None = None,
        dtype: str = "float32",
        device: str = "cpu",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.base_model_name = base_model_name
        self.limits = limits or EngineLimits()
        self.clock = clock  # times the passes the pacing of chunked prefill weighs
        serving_on = serving_device(device)
        self.runner = ModelRunner(base_model_name, model_cache, self.limits, serving_on, serving_dtype(dtype, serving_on))
        self.registry = AdapterRegistry(self.limits.max_evicted_adapter_bytes)
        self.scheduler = Scheduler(
            self.limits.max_batch_size,
            self.limits.max_queued_requests,
            self.limits.max_prefill_tokens,
            self.limits.prefill_chunk_tokens,
            self.limits.prefill_share,
        )
        self._inbox = Inbox()
        self._running: list[_Sequence] = []  # the batch's rows, in the runner's order
        self._prefilling: _Sequence | None = None  # a long prompt being prefilled in chunks
        self._thread: threading.Thread | None = None
        self.steps = 0  # decoding steps run, for tests and metrics

    # Life cycle

    def load(self) -> None:
        """Loads the base model (may convert a bundled one first: tens of seconds)."""
        self.runner.load()

    def start(self) -> None:
        """Starts the model thread, which loads the base model first unless
        load() already has; returns once it serves, or raises why it cannot.

        Loading there matters on CPU: every thread that runs torch's parallel
        ops keeps an OpenMP thread pool of its own, and once the pools hold
        more threads than there are cores, libgomp stops busy-waiting between
        parallel regions. A decoding step ran 1.4x slower with the pool of a
        thread that had only loaded the model left behind."""
        loaded = WaitingReply()
        self._thread = threading.Thread(target=self._loop, args=(loaded,), name="model", daemon=True)
        self._thread.start()
        loaded.result(timeout=None)

    def stop(self) -> None:
        for _, reply in self._inbox.close():
            if reply is not None:
                reply.finish(shutting_down())
        if self._thread is not None:
            self._thread.join(timeout=30)

    # Adapters (any thread)

    def read_adapter(self, local_dir: Path) -> AdapterWeights:
        """Reads and validates an adapter without touching what is served."""
        return self.runner.read_adapter(local_dir)

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
        """Makes a validated adapter servable to `project`. The reply gets the
        ServedAdapter once requests can use it (the one already served, when
        that came from the same source); without a reply, this waits for it
        and returns it. `load_started` (perf_counter) times the whole load."""
        if weights.task_type == CAUSAL_LM and not self.runner.generative:
            raise InvalidArgument.field("source", f"a CAUSAL_LM adapter cannot run on {self.base_model_name}, which is not a causal LM")
        adapter = ServedAdapter(
            adapter_id, source_uri, local_dir, weights.task_type, weights.rank, weights.labels, project, published_at, load_started
        )

        def place() -> ServedAdapter:
            if self.registry.get(adapter.id) is not None:
                return self.registry.add(adapter)  # itself if from the same source, else refused
            if self._claim_slot():
                adapter.slot = self.runner.slots.place(weights)
            added = self.registry.add(adapter)
            if added.slot is None and self.registry.max_evicted_bytes:
                self.registry.keep_in_host_memory(added, weights)  # no slot yet: its first request copies them in
            return added

        return self._call(place, reply)

    def remove_adapter(self, adapter_id: str, project: str | None = None, reply: Reply | None = None) -> None:
        """Stops new requests for the adapter (a `project`'s own only); its
        slot is freed when the ones already accepted finish. The reply (or,
        without one, this call) gets None once done."""

        def remove() -> None:
            adapter = self.registry.remove(adapter_id, project)
            if self.registry.releasable(adapter):
                self._free_slot(adapter)

        self._call(remove, reply)

    def adapters(self, project: str | None = None) -> list[AdapterView]:
        return self.registry.views(project)

    # Requests (any thread)

    def submit(
        self, request: GenerationRequest, reply: Reply, deadline: float | None = None, project: str | None = None, stream: bool = True
    ) -> _Sequence:
        """Queues a generation: the reply gets its text deltas (with `stream`)
        and then the GenerationResult, or the error. A `project`'s caller is
        served its own adapters only. Checks and tokenises here, in the
        caller's thread (a long prompt takes a while); returns the handle
        `cancel` takes."""
        runner = self.runner
        if not runner.generative:
            raise FailedPrecondition(f"{self.base_model_name} is not a causal LM: this service classifies (Classify) but does not generate")
        prompt_ids, request = prepare_prompt(request, runner.tokenizer, runner.max_positions)
        generator = None
        if request.temperature > 0:
            generator = torch.Generator().manual_seed(
                request.seed if request.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            )
        text_stream = TextStream(runner.tokenizer, tuple(request.stop), reply.send if stream else _ignore)
        sequence = _Sequence(project, prompt_ids, request, text_stream, reply, deadline, generator)

        def queue(_reply: Reply) -> None:
            sequence.adapter = self.registry.use(request.adapter, CAUSAL_LM, project)
            self._enqueue(sequence.adapter, lambda: self.scheduler.add(sequence))
            telemetry.INFERENCE_QUEUE_DEPTH.set(self.scheduler.queued())

        self._post(queue, reply)
        return sequence

    def classify(self, adapter_id: str, text: str, reply: Reply, project: str | None = None) -> _Classification:
        """Queues a classification of `text` under a SEQ_CLS adapter: the
        reply gets the ClassificationResult, or the error. Returns the
        handle `cancel` takes."""
        if not adapter_id:
            raise InvalidArgument.field("adapter", "classification needs a SEQ_CLS adapter (the head is part of the adapter)")
        if not text:
            raise InvalidArgument.field("text", "must not be empty")
        tokens = len(self.runner.tokenizer(text, add_special_tokens=True)["input_ids"])
        if tokens > self.runner.max_positions:
            raise InvalidArgument.field("text", f"is {tokens} tokens, over the model's {self.runner.max_positions} positions: shorten it")
        item = _Classification(text, reply)

        def queue(_reply: Reply) -> None:
            item.adapter = self.registry.use(adapter_id, SEQ_CLS, project)
            self._enqueue(item.adapter, lambda: self.scheduler.add_classification(item))

        self._post(queue, reply)
        return item

    def cancel(self, handle: _Sequence | _Classification) -> None:
        """The caller went away: the request ends at the next step (a
        generation with finish reason CANCELLED) and frees its batch row."""

        def cancel(_reply: None) -> None:
            handle.cancelled = True

        self._post(cancel, None)

    # The model thread

    def _post(self, command: Command, reply: Reply | None) -> None:
        """The one way in: the command runs on the model thread, between
        steps (here, at once, when this is the model thread or none runs)."""
        if threading.current_thread() is self._thread or self._thread is None:
            with torch.inference_mode():
                run_command(command, reply)
        else:
            self._inbox.post(command, reply)

    def _call(self, fn, reply: Reply | None):
        """Runs fn on the model thread; its result (or error) finishes the
        reply, or, without one, is returned here once done."""
        waiting = reply is None
        reply = reply or WaitingReply()
        self._post(lambda r: r.finish(fn()), reply)
        return reply.result(timeout=None) if waiting else None

    def _enqueue(self, adapter: ServedAdapter | None, add) -> None:
        """Queues a request holding `adapter`; one the queue refuses holds nothing."""
        try:
            add()
        except BaseException:
            if adapter is not None:
                self._done_with(adapter)
            raise

    def _loop(self, loaded: WaitingReply) -> None:
        try:
            try:
                if self.runner.model is None:
                    self.load()
            except BaseException as exc:
                loaded.finish(exc)
                return
            loaded.finish(None)
            with torch.inference_mode():
                while (commands := self._inbox.take(self._busy)) is not None:
                    for command, reply in commands:
                        run_command(command, reply)
                    try:
                        self._step()
                    except Exception as exc:  # a bug must not take the service down: fail the batch
                        log.exception("generation step failed")
                        for sequence in [*self._running, *([self._prefilling] if self._prefilling else [])]:
                            self._finish(sequence, exc)
                        self._running, self._prefilling = [], None
                        self.runner.reset()
        except BaseException:
            log.exception("the model thread stopped: requests are answered UNAVAILABLE from now on")
            raise
        finally:
            # However the thread ends, nothing waits on it for ever: what was
            # posted and what was queued or running are answered.
            for _, reply in self._inbox.close():
                if reply is not None:
                    reply.finish(shutting_down())
            waiting, classifications = self.scheduler.drain()
            for sequence in [*self._running, *([self._prefilling] if self._prefilling else []), *waiting]:
                self._finish(sequence, shutting_down())
            self._running, self._prefilling = [], None
            for item in classifications:
                self._done_with(item.adapter)
                item.reply.finish(shutting_down())

    def _busy(self) -> bool:
        return bool(self._running or self._prefilling or self.scheduler.has_work())

    def _step(self) -> None:
        for sequence in self.scheduler.expired():
            sequence.finish_reason = CANCELLED
            self._finish(sequence, None)
        self._run_classifications()
        self._drop_prefilling_if_gone()
        prefilling = [self._prefilling] if self._prefilling else []
        admission = self.scheduler.admit([*self._running, *prefilling], self._make_resident, chunking=bool(prefilling))
        for sequence, exc in admission.failed:
            log.warning("adapter %s could not be reloaded: %s", sequence.adapter.id, exc)
            self._finish(sequence, exc)
        admitted = admission.admitted
        self._prefilling = self._prefilling or admission.chunked
        telemetry.INFERENCE_QUEUE_DEPTH.set(self.scheduler.queued())
        if admitted:
            self._running.extend(admitted)  # from here on, a failure fails them with the batch
            self._accept(admitted, self.runner.prefill(admitted))
        joined = len(admitted)
        # Rows admitted this step decode only beside rows that ran before (below).
        pacer, decoding = self.scheduler.pacer, len(self._running) > joined
        if self._prefilling and pacer.may_prefill(decoding):
            started = self.clock()
            token = self.runner.prefill_chunk(self._prefilling, self.scheduler.prefill_chunk_tokens)
            pacer.prefilled(self.clock() - started, decoding)
            if token is not None:  # its last chunk: it joins the batch
                self._running.append(self._prefilling)
                self._accept([self._prefilling], [token])
                self._prefilling, joined = None, joined + 1
        if self._running and len(self._running) > joined:
            # Rows prefilled this step already have their first token; decode
            # them too: every row is one token ahead of its cache.
            started = self.clock()
            tokens = self.runner.decode(self._running)
            if self._prefilling:
                pacer.decoded(self.clock() - started)
            self.steps += 1
            telemetry.INFERENCE_BATCH_SIZE.observe(len(self._running))
            self._accept(self._running, tokens)
        self._retire()

    def _drop_prefilling_if_gone(self) -> None:
        """A request cancelled or past its deadline during its chunked prefill ends there."""
        sequence = self._prefilling
        if sequence is None or not is_gone(sequence, time.monotonic()):
            return
        self.runner.drop_partial()
        self._prefilling = None
        sequence.finish_reason = CANCELLED
        self._finish(sequence, None)

    def _make_resident(self, adapter: ServedAdapter) -> bool:
        if adapter.slot is not None:
            return True
        if not self._claim_slot():
            return False
        # Evicted earlier: from host memory where it was kept, else read again
        # from its local copy (validated when it was loaded).
        started, weights, source = time.perf_counter(), adapter.host_weights, "host memory"
        if weights is None:
            weights, source = self.read_adapter(adapter.local_dir), "disk"
        adapter.slot = self.runner.slots.place(weights)
        adapter.host_weights = None
        log.info(
            "adapter %s reloaded into slot %d from %s in %.1f ms", adapter.id, adapter.slot, source, (time.perf_counter() - started) * 1e3
        )
        return True

    def _claim_slot(self) -> bool:
        """Whether a slot is free, evicting the least recently used idle adapter if needed."""
        slots = self.runner.slots
        if slots.free:
            return True
        victim = self.registry.least_recently_used_idle()
        if victim is None:
            return False
        if self.registry.max_evicted_bytes:
            self.registry.keep_in_host_memory(victim, slots.copy_out(victim.slot, victim.task_type, victim.rank, victim.labels))
        slots.remove(victim.slot)
        victim.slot = None
        log.info("adapter %s evicted (least recently used)", victim.id)
        return True

    def _accept(self, sequences: list[_Sequence], tokens: list[int]) -> None:
        now = time.monotonic()
        accepted = 0
        for sequence, token in zip(sequences, tokens, strict=True):
            if sequence.finish_reason is not None:
                continue
            sequence.generated += 1
            accepted += 1
            if sequence.generated == 1:
                telemetry.INFERENCE_TIME_TO_FIRST_TOKEN.observe(now - sequence.submitted)
            if token in self.runner.eos_ids:
                sequence.finish_reason = STOP
                continue
            sequence.text.add(token)
            if sequence.text.stopped_at is not None:
                sequence.finish_reason = STOP
            elif sequence.generated >= sequence.request.max_new_tokens:
                sequence.finish_reason = LENGTH
            elif is_gone(sequence, now):
                sequence.finish_reason = CANCELLED
        telemetry.INFERENCE_TOKENS.inc(accepted)  # once a step, not once a token

    def _retire(self) -> None:
        keep = [row for row, s in enumerate(self._running) if s.finish_reason is None]
        if len(keep) == len(self._running):
            return
        finished = [s for s in self._running if s.finish_reason is not None]
        # Out of the batch first: a failure while answering them must not finish them twice.
        self._running = [self._running[row] for row in keep]
        self.runner.keep(keep)
        for sequence in finished:
            self._finish(sequence, None)

    def _finish(self, sequence: _Sequence, error: BaseException | None) -> None:
        if sequence.adapter is not None:
            self._done_with(sequence.adapter)
        if error is not None:
            sequence.reply.finish(error)
            return
        text = sequence.text.finish()
        sequence.reply.finish(
            GenerationResult(
                text=text,
                finish_reason=sequence.finish_reason or STOP,
                prompt_tokens=len(sequence.prompt_ids),
                completion_tokens=sequence.generated,
            )
        )

    def _done_with(self, adapter: ServedAdapter) -> None:
        if self.registry.done(adapter):
            self._free_slot(adapter)

    def _free_slot(self, adapter: ServedAdapter) -> None:
        self.runner.slots.remove(adapter.slot)
        adapter.slot = None
        log.info("adapter %s unloaded", adapter.id)

    # Classification

    def _run_classifications(self) -> None:
        ready, dropped, failed = self.scheduler.take_classifications(self._make_resident, lambda item: item.cancelled)
        for item in dropped:
            self._done_with(item.adapter)  # the caller went away
        for item, exc in failed:
            self._done_with(item.adapter)
            item.reply.finish(exc)
        if not ready:
            return
        try:
            probabilities = self.runner.classify([item.adapter.slot for item in ready], [item.text for item in ready])
            results = [_classification(item.adapter.labels, p) for item, p in zip(ready, probabilities, strict=True)]
        except Exception as exc:
            results = [exc] * len(ready)
        for item, result in zip(ready, results, strict=True):
            self._done_with(item.adapter)
            item.reply.finish(result)


def _classification(labels: list[str], probabilities: list[float]) -> ClassificationResult:
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    return ClassificationResult(labels[best], dict(zip(labels, probabilities, strict=True)))


def _ignore(_text: str) -> None:
    pass
