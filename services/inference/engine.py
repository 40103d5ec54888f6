"""The batching engine: one base model, many LoRA adapters, one model thread.

Requests wait in a bounded queue. The model thread runs a loop: admit
waiting requests into the running batch (each needs its adapter in a LoRA
slot), prefill the newcomers in one forward pass and merge them into the
batch's cache, then decode one token for every running row in one forward
pass, whatever adapter each row uses (lora.py). A request leaves the batch
when it finishes, is cancelled or passes its deadline, and its slot goes to
the next waiting request (continuous batching). Classification requests are
run between decoding steps, batched the same way.

Adapter loads and unloads are applied on the model thread between steps, so
no forward pass ever sees a half-written slot. An adapter in use by an
admitted or queued request is never evicted or removed until they finish;
an LRU keeps at most `max_resident_adapters` in slots and reloads an evicted
one from its local copy when a request needs it.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunewire.services.common import telemetry
from tunewire.services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from tunewire.services.common.hardware import native_bfloat16, serving_device
from tunewire.services.common.models import base_model_aliases, resolve_model
from tunewire.services.common.text import prompt_text
from tunewire.services.inference.kv_cache import BatchCache, new_cache
from tunewire.services.inference.lora import CAUSAL_LM, SEQ_CLS, AdapterWeights, SlotTable, read_adapter
from tunewire.services.inference.packed import pack_linears

log = logging.getLogger(__name__)

STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"
DEFAULT_MAX_NEW_TOKENS = 128
MAX_NEW_TOKENS_LIMIT = 4096
# Stop strings are looked for after every token: their count and length bound that work.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 128
# Heads of sequence classifiers, as PEFT saves them (modules_to_save).
CLASSIFIER_HEADS = ("score", "classifier")


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int = 16  # rows decoded together
    max_queued_requests: int = 64  # waiting to join the batch; more get RESOURCE_EXHAUSTED
    max_resident_adapters: int = 8  # LoRA slots
    max_adapter_rank: int = 64
    # Prompt tokens (padded) prefilled in one pass; a longer prompt runs alone.
    max_prefill_tokens: int = 8192


@dataclass(frozen=True)
class GenerationRequest:
    adapter: str = ""  # "" for the base model
    prompt: str | None = None
    messages: list[dict] | None = None
    raw_prompt: bool = False
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def check(self) -> None:
        if self.prompt is None and not self.messages:
            raise InvalidArgument.field("input", "set prompt or messages")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
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
class AdapterInfo:
    id: str
    source_uri: str
    task_type: str
    rank: int
    resident: bool
    requests_in_flight: int


@dataclass
class _Progress:
    """Incremental detokenisation with stop strings. Each token decodes only
    the last few tokens (as text-generation-inference does: the text of
    ids[prefix:] less that of ids[prefix:read], so a tokenizer's leading-space
    rules cancel out) and looks for stop strings only where the new text
    could complete one: a token costs the same at the end of a long answer
    as at its start."""

    tokenizer: object
    stop: tuple[str, ...]
    on_text: Callable[[str], None]
    ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far, whole characters only
    prefix: int = 0  # token offsets of the decoding window
    read: int = 0
    sent: int = 0
    stopped_at: int | None = None  # character index of a stop string

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        if self.stopped_at is not None:
            return
        before = self._decode(self.ids[self.prefix : self.read])
        window = self._decode(self.ids[self.prefix :])
        if len(window) <= len(before) or window.endswith("\ufffd"):
            return  # no new whole character yet
        searched_from = max(0, len(self.text) - max((len(s) - 1 for s in self.stop), default=0))
        self.text += window[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        for s in self.stop:
            index = self.text.find(s, searched_from)
            if index != -1 and (self.stopped_at is None or index < self.stopped_at):
                self.stopped_at = index
        if self.stopped_at is not None:
            self.text = self.text[: self.stopped_at]
            safe = len(self.text)
        else:
            # Hold back what could still become a stop string.
            safe = len(self.text) - max((len(s) - 1 for s in self.stop), default=0)
        if safe > self.sent:
            self.on_text(self.text[self.sent : safe])
            self.sent = safe

    def finish(self) -> str:
        if self.stopped_at is None:  # tokens that never made a whole character
            self.text += self._decode(self.ids[self.prefix :])[len(self._decode(self.ids[self.prefix : self.read])) :]
        if len(self.text) > self.sent:
            self.on_text(self.text[self.sent :])
            self.sent = len(self.text)
        return self.text


@dataclass
class _Adapter:
    id: str
    source_uri: str
    local_dir: Path
    task_type: str
    rank: int
    labels: list[str]
    slot: int | None = None
    in_use: int = 0  # queued or running requests
    last_used: float = 0.0
    removed: bool = False  # unloaded; its slot is freed once in_use reaches 0


@dataclass
class _Sequence:
    """A generation request inside the engine."""

    adapter: _Adapter | None
    prompt_ids: list[int]
    request: GenerationRequest
    progress: _Progress
    on_done: Callable[[GenerationResult | BaseException], None]
    cancelled: threading.Event
    deadline: float | None
    generator: torch.Generator | None = None
    generated: int = 0
    finish_reason: str | None = None
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class _Classification:
    adapter: _Adapter
    text: str
    future: Future


def serving_dtype(name: str, device: torch.device) -> torch.dtype:
    """float32, bfloat16, float16, or auto: bfloat16 where the device computes
    it natively (`hardware.native_bfloat16`); else float16 on a GPU (every
    CUDA GPU computes it) and float32 on a CPU (which emulates both)."""
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if native_bfloat16(device.type):
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else torch.float32


def not_loaded(adapter_id: str) -> NotFound:
    """The error for an adapter this service does not serve to the caller."""
    return NotFound(f"adapter {adapter_id!r} is not loaded here: ListLoadedAdapters shows those served, LoadAdapter adds one")


class BatchEngine:
    def __init__(
        self,
        base_model_name: str,
        model_cache: Path,
        limits: EngineLimits | None = None,
        dtype: str = "float32",
        device: str = "cpu",
    ):
        self.base_model_name = base_model_name
        self.model_cache = model_cache
        self.limits = limits or EngineLimits()
        self.device = serving_device(device)
        self.dtype = serving_dtype(dtype, self.device)
        self.model = None
        self.tokenizer = None
        self.generative = True
        self.slots: SlotTable | None = None
        self._base_names: set[str] = set()
        self._eos_ids: set[int] = set()
        self._max_positions = 0
        self._lock = threading.Condition()
        self._adapters: dict[str, _Adapter] = {}
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._classifications: collections.deque[_Classification] = collections.deque()
        self._commands: collections.deque[tuple[Callable, Future]] = collections.deque()
        self._running: list[_Sequence] = []
        self._batch: BatchCache | None = None
        self._next_tokens = torch.zeros(0, dtype=torch.long, device=self.device)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decoding steps run, for tests and metrics

    # Life cycle

    def load(self) -> None:
        """Loads the base model (may convert a bundled one first: tens of seconds)."""
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        path = resolve_model(self.base_model_name, self.model_cache)
        config = AutoConfig.from_pretrained(path)
        self.generative = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        loader = AutoModelForCausalLM if self.generative else AutoModel
        self.model = loader.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        self._base_names = base_model_aliases(self.base_model_name) | {path}
        self._max_positions = getattr(config.get_text_config(), "max_position_embeddings", 0) or 1 << 30
        if self.generative:
            eos = self.model.generation_config.eos_token_id
            self._eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
            if getattr(config.get_text_config(), "sliding_window", None):
                raise FailedPrecondition(f"{self.base_model_name}: sliding-window attention models are not served yet")
        # oneDNN's packed weights are a CPU kernel; a GPU runs the plain ones.
        packed = pack_linears(self.model, self.limits.max_batch_size) if self.device.type == "cpu" else 0
        self.slots = SlotTable(self.model, self.limits.max_resident_adapters)
        log.info(
            "base model %s loaded from %s (%s, %s on %s, %d linear layers packed for oneDNN)",
            self.base_model_name,
            path,
            "generation" if self.generative else "classification",
            str(self.dtype).removeprefix("torch."),
            self.device,
            packed,
        )

    def start(self) -> None:
        """Starts the model thread, which loads the base model first unless
        load() already has; returns once it serves, or raises why it cannot.

        Loading there matters on CPU: every thread that runs torch's parallel
        ops keeps an OpenMP thread pool of its own, and once the pools hold
        more threads than there are cores, libgomp stops busy-waiting between
        parallel regions. A decoding step ran 1.4x slower with the pool of a
        thread that had only loaded the model left behind."""
        loaded: Future = Future()
        self._thread = threading.Thread(target=self._loop, args=(loaded,), name="model", daemon=True)
        self._thread.start()
        loaded.result()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # Adapters (any thread)

    def read_adapter(self, local_dir: Path) -> AdapterWeights:
        """Reads and validates an adapter without touching what is served."""
        return read_adapter(
            local_dir,
            self.slots.linears,
            getattr(self.model, "base_model_prefix", ""),
            self._base_names,
            self.limits.max_adapter_rank,
            CLASSIFIER_HEADS,
        )

    def add_adapter(self, adapter_id: str, source_uri: str, local_dir: Path, weights: AdapterWeights) -> None:
        """Makes a validated adapter servable; returns once requests can use it."""
        if weights.task_type == CAUSAL_LM and not self.generative:
            raise InvalidArgument.field("source", f"a CAUSAL_LM adapter cannot run on {self.base_model_name}, which is not a causal LM")
        adapter = _Adapter(adapter_id, source_uri, local_dir, weights.task_type, weights.rank, weights.labels)

        def place() -> None:
            with self._lock:
                existing = self._adapters.get(adapter_id)
                if existing is not None:
                    if existing.source_uri != source_uri:
                        raise FailedPrecondition(f"adapter {adapter_id} is already loaded from {existing.source_uri}: unload it first")
                    return
            if self._claim_slot():
                adapter.slot = self.slots.place(weights)
            adapter.last_used = time.monotonic()
            with self._lock:
                self._adapters[adapter_id] = adapter

        self._on_model_thread(place).result()

    def remove_adapter(self, adapter_id: str) -> None:
        """Stops new requests for the adapter; its slot is freed when the ones
        already accepted finish."""

        def remove() -> None:
            with self._lock:
                adapter = self._adapters.pop(adapter_id, None)
                if adapter is None:
                    raise NotFound(f"adapter {adapter_id!r} is not loaded")
                adapter.removed = True
            self._release_if_unused(adapter)

        self._on_model_thread(remove).result()

    def adapters(self) -> list[AdapterInfo]:
        with self._lock:
            return [
                AdapterInfo(a.id, a.source_uri, a.task_type, a.rank, a.slot is not None, a.in_use)
                for a in sorted(self._adapters.values(), key=lambda a: a.id)
            ]

    # Requests (any thread)

    def submit(
        self,
        request: GenerationRequest,
        on_text: Callable[[str], None],
        on_done: Callable[[GenerationResult | BaseException], None],
        cancelled: threading.Event,
        deadline: float | None = None,
    ) -> None:
        """Queues a generation; on_text gets text deltas and on_done the result
        or the error, both on the model thread."""
        request.check()
        if not self.generative:
            raise FailedPrecondition(f"{self.base_model_name} is not a causal LM: this service classifies (Classify) but does not generate")
        text = prompt_text(self.tokenizer, request.messages, request.prompt, request.raw_prompt)
        prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] or [self.tokenizer.eos_token_id]
        if len(prompt_ids) + request.max_new_tokens > self._max_positions:
            raise InvalidArgument.field(
                "sampling.max_new_tokens",
                f"prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({request.max_new_tokens}) is over the model's "
                f"{self._max_positions} positions: shorten the prompt or lower max_new_tokens",
            )
        generator = None
        if request.temperature > 0:
            generator = torch.Generator().manual_seed(
                request.seed if request.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            )
        progress = _Progress(self.tokenizer, tuple(request.stop), on_text)
        with self._lock:
            if len(self._waiting) >= self.limits.max_queued_requests:
                raise ResourceExhausted(
                    f"{len(self._waiting)} requests are already waiting (TUNEWIRE_MAX_QUEUED_REQUESTS): retry with backoff"
                )
            adapter = self._use(request.adapter, CAUSAL_LM)
            sequence = _Sequence(adapter, prompt_ids, request, progress, on_done, cancelled, deadline, generator)
            self._waiting.append(sequence)
            telemetry.INFERENCE_QUEUE_DEPTH.set(len(self._waiting))
            self._lock.notify_all()

    def classify(self, adapter_id: str, text: str) -> Future:
        """A Future of the ClassificationResult for `text` under a SEQ_CLS adapter."""
        if not adapter_id:
            raise InvalidArgument.field("adapter", "classification needs a SEQ_CLS adapter (the head is part of the adapter)")
        if not text:
            raise InvalidArgument.field("text", "must not be empty")
        tokens = len(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if tokens > self._max_positions:
            raise InvalidArgument.field("text", f"is {tokens} tokens, over the model's {self._max_positions} positions: shorten it")
        future: Future = Future()
        with self._lock:
            if len(self._classifications) >= self.limits.max_queued_requests:
                raise ResourceExhausted(f"{len(self._classifications)} classifications are already waiting: retry with backoff")
            adapter = self._use(adapter_id, SEQ_CLS)
            self._classifications.append(_Classification(adapter, text, future))
            self._lock.notify_all()
        return future

    def _use(self, adapter_id: str, task_type: str) -> _Adapter | None:
        """The adapter a request names, counted as in use (call with the lock held)."""
        if not adapter_id:
            return None
        adapter = self._adapters.get(adapter_id)
        if adapter is None:
            raise not_loaded(adapter_id)
        if adapter.task_type != task_type:
            what = "Classify" if adapter.task_type == SEQ_CLS else "Generate or GenerateStream"
            raise InvalidArgument.field("adapter", f"{adapter_id} is a {adapter.task_type} adapter: use it with {what}")
        adapter.in_use += 1
        return adapter

    # The model thread

    def _on_model_thread(self, fn: Callable) -> Future:
        future: Future = Future()
        if threading.current_thread() is self._thread or self._thread is None:
            with torch.inference_mode():
                _run_into(fn, future)
            return future
        with self._lock:
            if self._stopping:
                future.set_exception(_shutting_down())
            else:
                self._commands.append((fn, future))
                self._lock.notify_all()
        return future

    def _loop(self, loaded: Future) -> None:
        try:
            if self.model is None:
                self.load()
        except BaseException as exc:
            loaded.set_exception(exc)
            return
        loaded.set_result(None)
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._stopping or self._commands or self._waiting or self._classifications or self._running):
                        self._lock.wait()
                    if self._stopping:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                for fn, future in commands:
                    _run_into(fn, future)
                try:
                    self._step()
                except Exception as exc:  # a bug must not take the service down: fail the batch
                    log.exception("generation step failed")
                    for sequence in self._running:
                        self._finish(sequence, exc)
                    self._running, self._batch = [], None
                    self._next_tokens = torch.zeros(0, dtype=torch.long, device=self.device)
        for sequence in [*self._running, *self._waiting]:
            self._finish(sequence, _shutting_down())
        for _, future in self._commands:
            future.set_exception(_shutting_down())
        for item in self._classifications:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(_shutting_down())

    def _step(self) -> None:
        self._drop_cancelled()
        self._run_classifications()
        admitted = self._admit()
        telemetry.INFERENCE_QUEUE_DEPTH.set(len(self._waiting))
        if admitted:
            self._prefill(admitted)
        if self._running and len(self._running) > len(admitted):
            self._decode()
        self._retire()

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
            for sequence in waiting:
                if sequence.cancelled.is_set() or (sequence.deadline is not None and now > sequence.deadline):
                    sequence.finish_reason = CANCELLED
                    self._finish(sequence, None)
                else:
                    self._waiting.append(sequence)

    def _admit(self) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        with self._lock:
            candidates = list(self._waiting)
        room = self.limits.max_batch_size - len(self._running)
        width = 0
        for sequence in candidates:
            if len(admitted) >= room:
                break
            wider = max(width, len(sequence.prompt_ids))
            if admitted and wider * (len(admitted) + 1) > self.limits.max_prefill_tokens:
                break  # the rest join at the next step
            try:
                if sequence.adapter is not None and not self._make_resident(sequence.adapter):
                    continue  # every slot is busy: it waits for a running adapter to finish
            except Exception as exc:  # e.g. an evicted adapter's files are gone: this request fails, not the batch
                log.warning("adapter %s could not be reloaded: %s", sequence.adapter.id, exc)
                with self._lock:
                    self._waiting.remove(sequence)
                self._finish(sequence, exc)
                continue
            admitted.append(sequence)
            width = wider
        if admitted:
            with self._lock:
                for sequence in admitted:
                    self._waiting.remove(sequence)
        return admitted

    def _make_resident(self, adapter: _Adapter) -> bool:
        adapter.last_used = time.monotonic()
        if adapter.slot is not None:
            return True
        if not self._claim_slot():
            return False
        # Evicted earlier: read again from its local copy (already validated once).
        adapter.slot = self.slots.place(self.read_adapter(adapter.local_dir))
        log.info("adapter %s reloaded into slot %d", adapter.id, adapter.slot)
        return True

    def _claim_slot(self) -> bool:
        """Whether a slot is free, evicting the least recently used idle adapter if needed."""
        if self.slots.free:
            return True
        with self._lock:
            idle = [a for a in self._adapters.values() if a.slot is not None and a.in_use == 0]
        if not idle:
            return False
        victim = min(idle, key=lambda a: a.last_used)
        self.slots.remove(victim.slot)
        victim.slot = None
        log.info("adapter %s evicted (least recently used)", victim.id)
        return True

    def _prefill(self, sequences: list[_Sequence]) -> None:
        self._running.extend(sequences)  # from here on, a failure fails them with the batch
        pad = self.tokenizer.pad_token_id
        width = max(len(s.prompt_ids) for s in sequences)
        input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, width - len(sequence.prompt_ids) :] = torch.tensor(sequence.prompt_ids)
            mask[row, width - len(sequence.prompt_ids) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = new_cache(self.model.config.get_text_config().num_hidden_layers)
        self.slots.row_slots.set([_slot(s) for s in sequences])
        logits = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
        ).logits[:, -1]
        if self._batch is None:
            self._batch = BatchCache(len(cache.layers), self.device)
        self._batch.merge(cache, mask)
        tokens = self._sample(logits, sequences)
        self._next_tokens = torch.cat([self._next_tokens, tokens])
        self._accept(sequences, tokens.tolist())

    def _decode(self) -> None:
        decoding = self._running[: len(self._running)]
        mask = self._batch.extend_mask()
        positions = mask.sum(dim=1, keepdim=True) - 1
        self.slots.row_slots.set([_slot(s) for s in decoding])
        # Rows prefilled this step already have their first token; decode them too:
        # every row is one token ahead of its cache.
        logits = self.model(
            input_ids=self._next_tokens[:, None],
            attention_mask=mask,
            position_ids=positions,
            cache=self._batch.cache,
            use_cache=True,
        ).logits[:, -1]
        tokens = self._sample(logits, decoding)
        self._next_tokens = tokens
        self.steps += 1
        telemetry.INFERENCE_BATCH_SIZE.observe(len(decoding))
        self._accept(decoding, tokens.tolist())

    def _sample(self, logits: torch.Tensor, sequences: list[_Sequence]) -> torch.Tensor:
        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        for row, sequence in enumerate(sequences):
            if sequence.generator is not None:
                # Sampled on the CPU, whose generator the request's seed drives on any device.
                tokens[row] = _sample_row(logits[row].cpu(), sequence.request, sequence.generator)
        return tokens

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
            if token in self._eos_ids:
                sequence.finish_reason = STOP
                continue
            sequence.progress.add(token)
            if sequence.progress.stopped_at is not None:
                sequence.finish_reason = STOP
            elif sequence.generated >= sequence.request.max_new_tokens:
                sequence.finish_reason = LENGTH
            elif sequence.cancelled.is_set() or (sequence.deadline is not None and now > sequence.deadline):
                sequence.finish_reason = CANCELLED
        telemetry.INFERENCE_TOKENS.inc(accepted)  # once a step, not once a token

    def _retire(self) -> None:
        keep = [row for row, s in enumerate(self._running) if s.finish_reason is None]
        if len(keep) == len(self._running):
            return
        for sequence in self._running:
            if sequence.finish_reason is not None:
                self._finish(sequence, None)
        self._running = [self._running[row] for row in keep]
        self._next_tokens = self._next_tokens[keep]
        self._batch.keep(keep)

    def _finish(self, sequence: _Sequence, error: BaseException | None) -> None:
        if sequence.adapter is not None:
            self._done_with(sequence.adapter)
        if error is not None:
            sequence.on_done(error)
            return
        text = sequence.progress.finish()
        sequence.on_done(
            GenerationResult(
                text=text,
                finish_reason=sequence.finish_reason or STOP,
                prompt_tokens=len(sequence.prompt_ids),
                completion_tokens=sequence.generated,
            )
        )

    def _done_with(self, adapter: _Adapter) -> None:
        with self._lock:
            adapter.in_use -= 1
        self._release_if_unused(adapter)

    def _release_if_unused(self, adapter: _Adapter) -> None:
        if adapter.removed and adapter.in_use == 0 and adapter.slot is not None:
            self.slots.remove(adapter.slot)
            adapter.slot = None
            log.info("adapter %s unloaded", adapter.id)

    # Classification

    def _run_classifications(self) -> None:
        with self._lock:
            items = [self._classifications.popleft() for _ in range(min(len(self._classifications), self.limits.max_batch_size))]
        ready = []
        for item in items:
            if item.future.cancelled():
                self._done_with(item.adapter)  # the caller went away
                continue
            try:
                resident = self._make_resident(item.adapter)
            except Exception as exc:
                self._done_with(item.adapter)
                item.future.set_exception(exc)
                continue
            if not resident:
                with self._lock:
                    self._classifications.append(item)  # no free slot yet
            elif item.future.set_running_or_notify_cancel():
                ready.append(item)
            else:
                self._done_with(item.adapter)
        if not ready:
            return
        try:
            results = self._classify([item.adapter for item in ready], [item.text for item in ready])
        except Exception as exc:
            results = [exc] * len(ready)
        for item, result in zip(ready, results, strict=True):
            self._done_with(item.adapter)
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    def _classify(self, adapters: list[_Adapter], texts: list[str]) -> list[ClassificationResult]:
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self._max_positions, return_tensors="pt", padding_side="right"
        ).to(self.device)
        self.slots.row_slots.set([a.slot for a in adapters])
        if self.generative:
            # A decoder classifies from its last real token's hidden state.
            hidden = self.model.get_decoder()(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).last_hidden_state
            last = encoded["attention_mask"].sum(dim=1) - 1
            features = hidden[torch.arange(len(texts), device=self.device), last]
        else:
            output = self.model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
            features = output.pooler_output if getattr(output, "pooler_output", None) is not None else output.last_hidden_state[:, 0]
        features = features.float()
        results = []
        for row, adapter in enumerate(adapters):
            head = self.slots.heads[adapter.slot]
            logits = features[row] @ head["weight"].t()
            if "bias" in head:
                logits = logits + head["bias"]
            probabilities = logits.softmax(dim=-1).tolist()
            best = max(range(len(probabilities)), key=probabilities.__getitem__)
            results.append(ClassificationResult(adapter.labels[best], dict(zip(adapter.labels, probabilities, strict=True))))
        return results


def _slot(sequence: _Sequence) -> int:
    return sequence.adapter.slot if sequence.adapter is not None else 0


def _sample_row(logits: torch.Tensor, request: GenerationRequest, generator: torch.Generator) -> int:
    logits = logits / request.temperature
    if request.top_k:
        kth = torch.topk(logits, min(request.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probabilities = logits.softmax(dim=-1)
    if request.top_p and request.top_p < 1:
        ordered, order = probabilities.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always the first token).
        outside = ordered.cumsum(dim=-1) - ordered > request.top_p
        ordered = ordered.masked_fill(outside, 0)
        probabilities = torch.zeros_like(probabilities).scatter(0, order, ordered)
    return int(torch.multinomial(probabilities, 1, generator=generator))


def _shutting_down() -> FailedPrecondition:
    return FailedPrecondition("the inference service is shutting down: retry on another replica")


def _run_into(fn: Callable, future: Future) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:  # handed to the caller
        future.set_exception(exc)
