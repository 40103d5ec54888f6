"""The engine's scheduling policy: which waiting requests run at each step.

Pure policy, as vLLM's scheduler is: no model, no tensors. The engine asks it,
once a step on its model thread, which generation requests join the running
batch and which classifications run; what the policy needs to know of the
model's side (whether a request's adapter can have a LoRA slot) it is given
as a function. It runs on the model thread alone (requests reach it as the
engine's commands), so it takes no lock.

The policy:
- a bounded queue: a request beyond `max_queued` is refused at once
  (RESOURCE_EXHAUSTED), so callers back off instead of waiting unseen;
- a request cancelled or past its deadline while waiting leaves the queue;
- admission fills the batch up to `max_batch_size` rows, fairly across
  projects: the next row goes to the project holding the fewest rows, the
  oldest request first within it, so one project's burst does not take
  every row while another's requests wait;
- the prompts admitted in one step are padded to the longest: their padded
  total stays within `max_prefill_tokens`, and the rest join at the next step;
- a prompt longer than `prefill_chunk_tokens` is prefilled a chunk a step
  (chunked prefill), one such prompt at a time, so the running streams go on
  decoding between its chunks instead of stalling for the whole prompt;
- while streams decode, those chunks are paced (PrefillPacer): they take
  about `prefill_share` of the decoding steps' time, so the streams' mean
  inter-token latency stays about (1 + prefill_share) times its usual;
- a request whose adapter cannot have a slot (every slot held by running
  adapters) waits, and those behind it may go first; one whose adapter cannot
  be placed at all fails alone.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tunewire.services.common.errors import ResourceExhausted


def is_gone(sequence, now: float) -> bool:
    """Whether a request's caller cancelled it or its deadline has passed."""
    return sequence.cancelled or (sequence.deadline is not None and now > sequence.deadline)


class Waiting(Protocol):
    """What the policy reads of a queued generation request."""

    adapter: object | None  # None: the base model
    project: str | None
    prompt_ids: list[int]
    cancelled: bool
    deadline: float | None


@dataclass
class Admission:
    admitted: list  # prefilled whole this step, joining the batch in this order
    failed: list[tuple[object, BaseException]]  # their adapter could not be placed
    chunked: object | None = None  # a long prompt whose chunked prefill starts now


class PrefillPacer:
    """When a long prompt's next chunk may run while other streams decode.

    On a CPU a forward pass costs about its tokens' compute: a 256-token
    chunk late in a 4k-token prompt takes ten decoding steps' time.
    So the prefill earns time as the streams decode, `share` of each
    decoding step's seconds, and a chunk runs once its credit covers what the
    chunk before it took (a prompt's chunks cost a little more each, as
    attention reaches further back; the first runs at once). Over the
    prefill the chunks take about `share` of the decoding time, whatever each
    costs: the streams' mean inter-token latency stays about (1 + share)
    times its usual, and the longest pause is one step's decoding, short
    prompts' prefill and one chunk. With no stream decoding, every step
    prefills."""

    def __init__(self, share: float):
        if share <= 0:
            raise ValueError(f"prefill share must be positive, got {share}")
        self.share = share
        self.credit = 0.0
        self.last_chunk_seconds = 0.0

    def start(self) -> None:
        """A chunked prefill starts: no credit from an earlier one."""
        self.credit = self.last_chunk_seconds = 0.0

    def may_prefill(self, decoding: bool) -> bool:
        return not decoding or self.credit >= self.last_chunk_seconds

    def prefilled(self, seconds: float, decoding: bool) -> None:
        self.last_chunk_seconds = seconds
        if decoding:
            self.credit -= seconds

    def decoded(self, seconds: float) -> None:
        """A decoding step ran while a chunked prefill was in progress."""
        self.credit += self.share * seconds


class Scheduler:
    def __init__(
        self,
        max_batch_size: int,
        max_queued: int,
        max_prefill_tokens: int,
        prefill_chunk_tokens: int | None = None,
        prefill_share: float = 0.75,
    ):
        self.max_batch_size = max_batch_size
        self.max_queued = max_queued
        self.max_prefill_tokens = max_prefill_tokens
        # A chunk is one prefill pass: never over the pass's budget.
        self.prefill_chunk_tokens = min(prefill_chunk_tokens or max_prefill_tokens, max_prefill_tokens)
        self.pacer = PrefillPacer(prefill_share)
        self._waiting: collections.deque = collections.deque()
        self._classifications: collections.deque = collections.deque()

    # Queues

    def add(self, sequence: Waiting) -> None:
        if len(self._waiting) >= self.max_queued:
            raise ResourceExhausted(f"{len(self._waiting)} requests are already waiting (TUNEWIRE_MAX_QUEUED_REQUESTS): retry with backoff")
        self._waiting.append(sequence)

    def add_classification(self, item) -> None:
        if len(self._classifications) >= self.max_queued:
            raise ResourceExhausted(f"{len(self._classifications)} classifications are already waiting: retry with backoff")
        self._classifications.append(item)

    def has_work(self) -> bool:
        return bool(self._waiting or self._classifications)

    def queued(self) -> int:
        return len(self._waiting)

    def drain(self) -> tuple[list, list]:
        """Everything still queued, removed: at shutdown."""
        waiting, self._waiting = list(self._waiting), collections.deque()
        items, self._classifications = list(self._classifications), collections.deque()
        return waiting, items

    # Decisions

    def expired(self, now: float | None = None) -> list:
        """The waiting requests cancelled or past their deadline, removed from the queue."""
        now = time.monotonic() if now is None else now
        gone = [s for s in self._waiting if is_gone(s, now)]
        for sequence in gone:
            self._waiting.remove(sequence)
        return gone

    def admit(self, running: list[Waiting], make_resident: Callable[[object], bool], chunking: bool = False) -> Admission:
        """The waiting requests that join the running batch now. `running`
        holds the batch's rows (a prompt being prefilled in chunks among
        them), `chunking` whether such a prompt is in progress.
        `make_resident(adapter)` gives the adapter a slot (True), says none
        is free (False), or raises why it cannot be placed."""
        candidates = list(self._waiting)
        rows = collections.Counter(s.project for s in running)
        room = self.max_batch_size - len(running)
        admitted, failed, chunked, width = [], [], None, 0
        while candidates and len(admitted) + (chunked is not None) < room:
            # The oldest request of the project holding the fewest rows (min keeps the first of equals).
            sequence = min(candidates, key=lambda s: rows[s.project])
            candidates.remove(sequence)
            long_prompt = len(sequence.prompt_ids) > self.prefill_chunk_tokens
            if long_prompt and (chunking or chunked is not None):
                continue  # one chunked prefill at a time: it waits, those behind it may go
            wider = max(width, len(sequence.prompt_ids))
            if not long_prompt and admitted and wider * (len(admitted) + 1) > self.max_prefill_tokens:
                break  # the rest join at the next step
            try:
                if sequence.adapter is not None and not make_resident(sequence.adapter):
                    continue  # every slot is busy: it waits for a running adapter to finish
            except Exception as exc:  # e.g. an evicted adapter's files are gone: this request fails, not the batch
                failed.append((sequence, exc))
                continue
            rows[sequence.project] += 1
            if long_prompt:
                chunked = sequence
                self.pacer.start()
            else:
                admitted.append(sequence)
                width = wider
        for sequence in [*admitted, *(s for s, _ in failed), *([chunked] if chunked is not None else [])]:
            self._waiting.remove(sequence)
        return Admission(admitted, failed, chunked)

    def take_classifications(
        self, make_resident: Callable[[object], bool], gone: Callable[[object], bool]
    ) -> tuple[list, list, list[tuple[object, BaseException]]]:
        """Takes up to a batch of queued classifications: those to run now
        (their adapter has a slot), those whose caller is `gone` (never
        placed), and those whose adapter cannot be placed. The ones without a
        slot go to the back of the queue, so the ones behind them, which may
        hold the adapters they wait for, get their turn."""
        items = [self._classifications.popleft() for _ in range(min(len(self._classifications), self.max_batch_size))]
        ready, dropped, failed, later = [], [], [], []
        for item in items:
            if gone(item):
                dropped.append(item)
                continue
            try:
                (ready if make_resident(item.adapter) else later).append(item)
            except Exception as exc:
                failed.append((item, exc))
        self._classifications.extend(later)
        return ready, dropped, failed
