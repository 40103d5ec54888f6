"""The serving engine's policy without a model: the scheduler's admission
and the adapter registry's holds and eviction order."""

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tunewire.services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from tunewire.services.inference.adapters import CAUSAL_LM, SEQ_CLS, AdapterRegistry, ServedAdapter
from tunewire.services.inference.scheduler import Admission, PrefillPacer, Scheduler


@dataclass(eq=False)
class Request:
    project: str = "p"
    adapter: object | None = None
    prompt_ids: list[int] = field(default_factory=lambda: [1, 2, 3])
    cancelled: bool = False
    deadline: float | None = None


@dataclass(eq=False)
class Classification:
    adapter: object


def always(_adapter) -> bool:
    return True


def test_admission_fills_the_batch_in_arrival_order_and_the_rest_wait():
    scheduler = Scheduler(max_batch_size=3, max_queued=10, max_prefill_tokens=1000)
    requests = [Request() for _ in range(5)]
    for request in requests:
        scheduler.add(request)
    running = [Request()]
    assert scheduler.admit(running, always).admitted == requests[:2]
    assert scheduler.queued() == 3
    assert scheduler.admit([*running, *requests[:2]], always).admitted == []
    assert scheduler.admit([], always).admitted == requests[2:]
    assert not scheduler.has_work()


def test_rows_go_to_the_project_holding_fewest_so_a_burst_does_not_take_the_batch():
    scheduler = Scheduler(max_batch_size=4, max_queued=20, max_prefill_tokens=1000)
    burst = [Request(project="a") for _ in range(8)]
    later = [Request(project="b") for _ in range(2)]
    for request in [*burst, *later]:
        scheduler.add(request)
    admitted = scheduler.admit([], always).admitted
    assert admitted == [burst[0], later[0], burst[1], later[1]]
    # Rows already running count: project a holds three, so c's request goes first.
    scheduler = Scheduler(max_batch_size=5, max_queued=20, max_prefill_tokens=1000)
    a, c = Request(project="a"), Request(project="c")
    scheduler.add(a)
    scheduler.add(c)
    assert scheduler.admit([Request(project="a")] * 3, always).admitted == [c, a]


def test_prompts_admitted_together_stay_within_the_padded_prefill_budget():
    scheduler = Scheduler(max_batch_size=8, max_queued=10, max_prefill_tokens=100)
    short, long_, other = Request(prompt_ids=[0] * 10), Request(prompt_ids=[0] * 60), Request(prompt_ids=[0] * 10)
    for request in (short, long_, other):
        scheduler.add(request)
    # short + long pad to 2 × 60 = 120 > 100: the long one waits for the next step.
    assert scheduler.admit([], always).admitted == [short]
    assert scheduler.admit([], always).admitted == [long_]
    assert scheduler.admit([], always).admitted == [other]
    # A prompt over the budget is prefilled in chunks instead.
    huge = Request(prompt_ids=[0] * 500)
    scheduler.add(huge)
    assert scheduler.admit([], always) == Admission([], [], chunked=huge)


def test_long_prompts_are_prefilled_in_chunks_one_at_a_time_while_short_ones_still_join():
    scheduler = Scheduler(max_batch_size=3, max_queued=10, max_prefill_tokens=1000, prefill_chunk_tokens=64)
    first, second = Request(prompt_ids=[0] * 300), Request(prompt_ids=[0] * 65)
    short = Request(prompt_ids=[0] * 64)
    for request in (first, second, short):
        scheduler.add(request)
    admission = scheduler.admit([], always)
    assert (admission.admitted, admission.chunked) == ([short], first)
    # While the first is chunked, the second waits (and counts against nothing).
    running = [short, first]
    assert scheduler.admit(running, always, chunking=True) == Admission([], [], None)
    assert scheduler.admit([short], always, chunking=False).chunked is second
    # A chunked prompt takes a row: no room, no start.
    scheduler.add(late := Request(prompt_ids=[0] * 100))
    assert scheduler.admit([Request()] * 3, always).chunked is None and scheduler.queued() == 1
    assert scheduler.admit([], always).chunked is late


def simulate_paced_prefill(share: float, decode_seconds: float, chunk_seconds: list[float]) -> tuple[list[float], int]:
    """A stream decoding while a long prompt's chunks run, as the engine's
    step does: a chunk when the pacer allows, then a decoding step. Returns
    the stream's gaps between tokens and the steps the prefill took."""
    pacer, chunks, gaps = PrefillPacer(share), list(chunk_seconds), []
    pacer.start()
    while chunks:
        gap = 0.0
        if pacer.may_prefill(decoding=True):
            gap += (seconds := chunks.pop(0))
            pacer.prefilled(seconds, decoding=True)
        pacer.decoded(decode_seconds)
        gaps.append(gap + decode_seconds)
    return gaps, len(gaps)


@pytest.mark.parametrize("share", [0.5, 1.0, 3.0])
def test_paced_chunks_take_their_share_of_the_decoding_time_whatever_each_costs(share):
    # Chunks late in a long prompt cost more (attention over what came before).
    chunk_seconds = [0.05 + 0.02 * i for i in range(20)]
    gaps, steps = simulate_paced_prefill(share, decode_seconds=0.04, chunk_seconds=chunk_seconds)
    mean_gap = sum(gaps) / len(gaps)
    # Within (1 + share) times the usual gap (each chunk paid for before it
    # runs, at the price of the one before: a growing cost overshoots by the growth).
    assert mean_gap <= (1 + share) * 0.04 + 0.02
    assert mean_gap >= (1 + share) * 0.04 * 0.85  # and the prefill takes the share it is given
    # No pause is longer than one decoding step and one chunk.
    assert max(gaps) <= 0.04 + max(chunk_seconds)


def test_without_decoding_streams_every_step_prefills_and_no_debt_carries_over():
    pacer = PrefillPacer(0.5)
    pacer.start()
    assert pacer.may_prefill(decoding=True)  # the first chunk runs at once
    pacer.prefilled(10.0, decoding=True)
    assert not pacer.may_prefill(decoding=True)
    assert pacer.may_prefill(decoding=False)  # no stream to keep pace for
    pacer.prefilled(10.0, decoding=False)
    pacer.decoded(4.0)
    assert not pacer.may_prefill(decoding=True)  # 10 s owed, 2 s earned
    pacer.decoded(36.0)
    assert pacer.may_prefill(decoding=True)  # 10 s in hand: the next chunk's likely cost
    # The next long prompt starts afresh: the scheduler starts the pacer when it admits one.
    scheduler = Scheduler(max_batch_size=2, max_queued=4, max_prefill_tokens=1000, prefill_chunk_tokens=8, prefill_share=0.5)
    scheduler.pacer.prefilled(10.0, decoding=True)
    scheduler.add(Request(prompt_ids=[0] * 9))
    assert scheduler.admit([], always).chunked is not None and scheduler.pacer.may_prefill(decoding=True)


def test_a_request_whose_adapter_has_no_slot_waits_and_those_behind_it_go_first():
    scheduler = Scheduler(max_batch_size=8, max_queued=10, max_prefill_tokens=1000)
    blocked, free, broken = Request(adapter="busy"), Request(adapter="ok"), Request(adapter="gone")

    def make_resident(adapter) -> bool:
        if adapter == "gone":
            raise FileNotFoundError("its files are gone")
        return adapter == "ok"

    for request in (blocked, free, broken):
        scheduler.add(request)
    admission = scheduler.admit([], make_resident)
    assert admission.admitted == [free]
    assert [(r, type(e)) for r, e in admission.failed] == [(broken, FileNotFoundError)]
    assert scheduler.queued() == 1  # the blocked one, still waiting
    assert scheduler.admit([], always).admitted == [blocked]


def test_the_queue_is_bounded_and_cancelled_or_late_requests_leave_it():
    scheduler = Scheduler(max_batch_size=8, max_queued=3, max_prefill_tokens=1000)
    keep, cancelled, late = Request(), Request(), Request(deadline=10.0)
    for request in (keep, cancelled, late):
        scheduler.add(request)
    with pytest.raises(ResourceExhausted, match="3 requests are already waiting"):
        scheduler.add(Request())
    cancelled.cancelled = True
    assert scheduler.expired(now=5.0) == [cancelled]
    assert scheduler.expired(now=11.0) == [late]
    assert scheduler.admit([], always).admitted == [keep]


def test_classifications_run_a_batch_at_a_time_and_those_without_a_slot_let_the_others_go_first():
    scheduler = Scheduler(max_batch_size=2, max_queued=10, max_prefill_tokens=1000)
    # Two wait for a slot that only the third's adapter, once run, frees: the
    # third must get its turn though it is past the first batch.
    items = [Classification("busy"), Classification("busy"), Classification("holder")]
    for item in items:
        scheduler.add_classification(item)

    def make_resident(adapter) -> bool:
        return adapter == "holder"

    assert scheduler.take_classifications(make_resident, lambda item: False) == ([], [], [])
    ready, _, _ = scheduler.take_classifications(make_resident, lambda item: False)
    assert ready == [items[2]]
    ready, _, _ = scheduler.take_classifications(always, lambda item: False)
    assert ready == [items[1], items[0]]


def test_a_classification_whose_caller_went_away_is_dropped_before_its_adapter_is_placed():
    scheduler = Scheduler(max_batch_size=4, max_queued=10, max_prefill_tokens=1000)
    gone, broken, fine = Classification("a"), Classification("gone-files"), Classification("b")
    for item in (gone, broken, fine):
        scheduler.add_classification(item)
    placed = []

    def make_resident(adapter) -> bool:
        placed.append(adapter)
        if adapter == "gone-files":
            raise FileNotFoundError(adapter)
        return True

    ready, dropped, failed = scheduler.take_classifications(make_resident, lambda item: item is gone)
    assert (ready, dropped, [item for item, _ in failed]) == ([fine], [gone], [broken])
    assert placed == ["gone-files", "b"] and not scheduler.has_work()


def served(adapter_id: str, task_type: str = CAUSAL_LM, project: str = "p", source: str = "") -> ServedAdapter:
    return ServedAdapter(adapter_id, source or f"/adapters/{adapter_id}", Path("."), task_type, 8, project=project)


def test_the_registry_holds_an_adapter_while_requests_use_it_and_evicts_the_least_recently_used_idle_one():
    registry = AdapterRegistry()
    for i, adapter_id in enumerate(["a", "b", "c"]):
        registry.add(served(adapter_id)).slot = i
    a = registry.use("a", CAUSAL_LM)
    registry.use("b", CAUSAL_LM)
    assert registry.least_recently_used_idle().id == "c"  # a and b are held
    registry.done(registry.get("b"))
    assert registry.least_recently_used_idle().id == "c"  # c was used longest ago
    registry.use("c", CAUSAL_LM)
    assert registry.least_recently_used_idle().id == "b"
    # Removed while held: the slot is freed only when the last request is done.
    registry.remove("a")
    assert registry.get("a") is None and not registry.releasable(a)
    assert registry.done(a) is True
    assert [view.requests_in_flight for view in registry.views()] == [0, 1]


@dataclass
class Weights:
    num_bytes: int


def test_evicted_adapters_weights_stay_in_host_memory_within_the_bound_least_recently_used_dropped_first():
    registry = AdapterRegistry(max_evicted_bytes=250)
    old, mid, new = (registry.add(served(name)) for name in ("old", "mid", "new"))
    old.last_used, mid.last_used, new.last_used = 1.0, 2.0, 3.0
    registry.keep_in_host_memory(old, Weights(100))
    registry.keep_in_host_memory(mid, Weights(100))
    assert registry.host_bytes() == 200
    registry.keep_in_host_memory(new, Weights(100))  # 300 > 250: the oldest goes
    assert (old.host_weights, registry.host_bytes()) == (None, 200)
    registry.remove("mid")  # unloaded: nothing of it is kept
    assert registry.host_bytes() == 100


def test_the_registry_refuses_what_a_request_may_not_use():
    registry = AdapterRegistry()
    registry.add(served("gen", project="p"))
    registry.add(served("cls", task_type=SEQ_CLS, project="p"))
    assert registry.use("", CAUSAL_LM) is None  # the base model
    with pytest.raises(NotFound, match="'gen' is not loaded here"):
        registry.use("gen", CAUSAL_LM, project="other")  # another project's: as unknown as none
    with pytest.raises(InvalidArgument, match="SEQ_CLS adapter: use it with Classify"):
        registry.use("cls", CAUSAL_LM)
    with pytest.raises(FailedPrecondition, match="already loaded from /adapters/gen"):
        registry.add(served("gen", source="/elsewhere"))
    assert registry.add(served("gen")) is registry.get("gen")  # the same source: the one served
    assert [view.id for view in registry.views("p")] == ["cls", "gen"] and registry.views("other") == []
    with pytest.raises(NotFound, match="'gen' is not loaded here"):
        registry.remove("gen", project="other")  # nor may another project unload it
    assert registry.get("gen") is not None
    with pytest.raises(NotFound):
        registry.remove("never")
