"""The adapters an inference service serves: one registry, in one place.

An entry is both what callers see (source, task, rank, labels, project, how
fast it became servable) and what the engine runs it with (its LoRA slot,
the requests that hold it, when it was last used). Every change (entries
added and removed, holds taken and released, slots and kept weights) is
made on the model thread, where callers' commands run (boundary.py); the
registry's lock lets other threads read it (what is served, to whom, and
whether it is resident) while it changes. Nothing here imports torch:
the eviction policy is tested without a model.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunewire.services.common.auth import DEFAULT_PROJECT
from tunewire.services.common.errors import FailedPrecondition, InvalidArgument, NotFound

CAUSAL_LM, SEQ_CLS = "CAUSAL_LM", "SEQ_CLS"


@dataclass
class ServedAdapter:
    id: str
    source_uri: str
    local_dir: Path
    task_type: str
    rank: int
    labels: list[str] = field(default_factory=list)
    project: str = DEFAULT_PROJECT  # only this project's callers may use it
    published_at: dt.datetime | None = None  # by the orchestrator; None when loaded by hand
    load_started: float = 0.0  # time.perf_counter() when its load began
    # Set by the registry when the adapter becomes servable.
    loaded_at: dt.datetime | None = None
    load_seconds: float = 0.0
    publish_to_servable_seconds: float | None = None
    # The engine's side.
    slot: int | None = None
    in_use: int = 0  # queued or running requests
    last_used: float = 0.0
    removed: bool = False  # unloaded; its slot is freed once in_use reaches 0
    # Evicted from its slot: its weights kept in host memory (within the
    # registry's bound), so coming back is a copy, not a disk read.
    host_weights: object | None = None


@dataclass(frozen=True)
class AdapterView:
    """A served adapter as callers see it at one moment."""

    id: str
    source_uri: str
    task_type: str
    rank: int
    labels: list[str]
    project: str
    loaded_at: dt.datetime
    load_seconds: float
    publish_to_servable_seconds: float | None
    resident: bool
    requests_in_flight: int


def not_loaded(adapter_id: str) -> NotFound:
    """The error for an adapter this service does not serve to the caller."""
    return NotFound(f"adapter {adapter_id!r} is not loaded here: ListLoadedAdapters shows those served, LoadAdapter adds one")


class AdapterRegistry:
    def __init__(self, max_evicted_bytes: int = 0):
        self.max_evicted_bytes = max_evicted_bytes  # evicted adapters' weights kept in host memory
        self._lock = threading.Lock()
        self._adapters: dict[str, ServedAdapter] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._adapters)

    def get(self, adapter_id: str) -> ServedAdapter | None:
        with self._lock:
            return self._adapters.get(adapter_id)

    def views(self, project: str | None = None) -> list[AdapterView]:
        """The adapters served, in id order: a project's, or all (None)."""
        with self._lock:
            return [_view(a) for a in sorted(self._adapters.values(), key=lambda a: a.id) if project in (None, a.project)]

    def view(self, adapter_id: str) -> AdapterView | None:
        with self._lock:
            adapter = self._adapters.get(adapter_id)
            return None if adapter is None else _view(adapter)

    def add(self, adapter: ServedAdapter) -> ServedAdapter:
        """Makes `adapter` servable, timing its load; the one already served
        under its id when that came from the same source."""
        with self._lock:
            existing = self._adapters.get(adapter.id)
            if existing is not None:
                if existing.source_uri != adapter.source_uri:
                    raise FailedPrecondition(f"adapter {adapter.id} is already loaded from {existing.source_uri}: unload it first")
                return existing
            now = dt.datetime.now(dt.UTC)
            adapter.loaded_at = now
            adapter.load_seconds = time.perf_counter() - adapter.load_started if adapter.load_started else 0.0
            if adapter.published_at is not None:
                adapter.publish_to_servable_seconds = (now - adapter.published_at).total_seconds()
            adapter.last_used = time.monotonic()
            self._adapters[adapter.id] = adapter
            return adapter

    def remove(self, adapter_id: str, project: str | None = None) -> ServedAdapter:
        """Takes the adapter out of service: new requests no longer find it,
        and those holding it keep it until they finish. A `project` removes
        only its own (another's is as unknown as one never loaded)."""
        with self._lock:
            adapter = self._adapters.get(adapter_id)
            if adapter is None:
                raise NotFound(f"adapter {adapter_id!r} is not loaded")
            if project not in (None, adapter.project):
                raise not_loaded(adapter_id)
            del self._adapters[adapter_id]
            adapter.removed = True
            if adapter.in_use == 0:  # else queued requests still need them
                adapter.host_weights = None
            return adapter

    def use(self, adapter_id: str, task_type: str, project: str | None = None) -> ServedAdapter | None:
        """The adapter a request names, held until `done` (None: the base
        model). Another project's adapter is as unknown as one never loaded."""
        if not adapter_id:
            return None
        with self._lock:
            adapter = self._adapters.get(adapter_id)
            if adapter is None or project not in (None, adapter.project):
                raise not_loaded(adapter_id)
            if adapter.task_type != task_type:
                what = "Classify" if adapter.task_type == SEQ_CLS else "Generate or GenerateStream"
                raise InvalidArgument.field("adapter", f"{adapter_id} is a {adapter.task_type} adapter: use it with {what}")
            adapter.in_use += 1
            adapter.last_used = time.monotonic()
            return adapter

    def done(self, adapter: ServedAdapter) -> bool:
        """Releases one request's hold; True when the adapter was removed and
        nothing holds it any more, so its slot is to be freed."""
        with self._lock:
            adapter.in_use -= 1
            if adapter.removed and adapter.in_use == 0:
                adapter.host_weights = None
            return self._releasable(adapter)

    def releasable(self, adapter: ServedAdapter) -> bool:
        with self._lock:
            return self._releasable(adapter)

    @staticmethod
    def _releasable(adapter: ServedAdapter) -> bool:
        return adapter.removed and adapter.in_use == 0 and adapter.slot is not None

    def keep_in_host_memory(self, adapter: ServedAdapter, weights) -> None:
        """Keeps an evicted adapter's weights (anything with `num_bytes`),
        then drops those of the least recently used evicted adapters until
        the kept total is within the bound: they are read from disk again."""
        with self._lock:
            adapter.host_weights = weights
            kept = sorted((a for a in self._adapters.values() if a.host_weights is not None), key=lambda a: a.last_used)
            total = sum(a.host_weights.num_bytes for a in kept)
            for oldest in kept:
                if total <= self.max_evicted_bytes:
                    break
                total -= oldest.host_weights.num_bytes
                oldest.host_weights = None

    def host_bytes(self) -> int:
        with self._lock:
            return sum(a.host_weights.num_bytes for a in self._adapters.values() if a.host_weights is not None)

    def least_recently_used_idle(self) -> ServedAdapter | None:
        """The resident adapter to evict for another: the least recently
        used that no request holds (None: every resident one is held)."""
        with self._lock:
            idle = [a for a in self._adapters.values() if a.slot is not None and a.in_use == 0]
        return min(idle, key=lambda a: a.last_used, default=None)


def _view(adapter: ServedAdapter) -> AdapterView:
    return AdapterView(
        adapter.id,
        adapter.source_uri,
        adapter.task_type,
        adapter.rank,
        list(adapter.labels),
        adapter.project,
        adapter.loaded_at,
        adapter.load_seconds,
        adapter.publish_to_servable_seconds,
        adapter.slot is not None,
        adapter.in_use,
    )
