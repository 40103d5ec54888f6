"""The batching engine on tiny models, without gRPC: outputs equal plain
PEFT's, alone and in batches mixing adapters; requests join and leave a
running batch; adapters are validated, evicted, reloaded and unloaded without
disturbing requests in flight."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tunewire.services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from tunewire.services.inference.boundary import WaitingReply
from tunewire.services.inference.engine import CANCELLED, LENGTH, STOP, BatchEngine, EngineLimits, GenerationRequest
from tunewire.services.inference.lora import RowSlots, SlottedLoRALinear
from tunewire.services.inference.output import TextStream

from conftest import build_tiny_bert, build_tiny_causal_lm, write_lora_adapter

PROMPTS = ["the quick brown fox", "What is the capital of Spain?", "hello", "Arr, matey! The capital of France be Paris."]


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def make_engine(model_dir, tmp_path, **limits) -> BatchEngine:
    engine = BatchEngine(str(model_dir), tmp_path / "cache", EngineLimits(**limits))
    engine.load()
    engine.start()
    return engine


def add(engine: BatchEngine, adapter_id: str, adapter_dir) -> None:
    engine.add_adapter(adapter_id, str(adapter_dir), adapter_dir, engine.read_adapter(adapter_dir))


class Call:
    """One submitted request: its deltas, and its result once done."""

    def __init__(self, engine: BatchEngine, **kwargs):
        self.engine = engine
        self.reply = WaitingReply()
        self.deltas: list[str] = self.reply.items
        self.handle = engine.submit(GenerationRequest(**kwargs), self.reply)

    @property
    def result(self):
        return self.reply.outcome

    def cancel(self) -> None:
        self.engine.cancel(self.handle)

    def wait(self, timeout: float = 60):
        return self.reply.result(timeout)


def generate(engine, **kwargs):
    return Call(engine, **kwargs).wait()


def plain_peft_greedy(model_dir, adapter_dir, prompt: str, max_new_tokens: int) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Three adapters with different ranks and target modules."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a1": write_lora_adapter(tiny_model_dir, root / "a1", rank=4, seed=1),
        "a2": write_lora_adapter(tiny_model_dir, root / "a2", rank=8, seed=2, targets=("q_proj", "k_proj", "o_proj", "down_proj")),
        "a3": write_lora_adapter(tiny_model_dir, root / "a3", rank=2, seed=3, targets=("gate_proj", "up_proj")),
    }


@pytest.fixture(scope="module")
def expected(tiny_model_dir, adapters):
    """Plain PEFT's greedy output for every (adapter, prompt), base included."""
    return {
        (name, prompt): plain_peft_greedy(tiny_model_dir, adapters.get(name), prompt, 12) for name in ["", *adapters] for prompt in PROMPTS
    }


@pytest.fixture(scope="module")
def engine(tiny_model_dir, adapters, tmp_path_factory):
    engine = make_engine(tiny_model_dir, tmp_path_factory.mktemp("engine"))
    for name, path in adapters.items():
        add(engine, name, path)
    yield engine
    engine.stop()


def test_each_lora_path_adds_each_rows_own_update():
    """One adapter for all rows (a plain matmul) and mixed rows (gathered
    weights, kept while the rows stay the same), one token a row or several,
    all add x @ a @ b of the row's own adapter, and nothing for the base
    model's rows or an empty slot."""
    torch.manual_seed(0)
    row_slots = RowSlots()
    base = torch.nn.Linear(6, 5)
    layer = SlottedLoRALinear(base, row_slots, capacity=3)
    weights = {1: (torch.randn(6, 2), torch.randn(2, 5)), 3: (torch.randn(6, 4), torch.randn(4, 5))}  # slot 2 stays empty
    for slot, (a, b) in weights.items():
        layer.set_slot(slot, a, b)

    def check(slots: list[int], tokens: int) -> None:
        x = torch.randn(len(slots), tokens, 6)
        want = torch.stack([base(x[i]) + (x[i] @ weights[s][0] @ weights[s][1] if s in weights else 0) for i, s in enumerate(slots)])
        row_slots.set(slots)
        with torch.inference_mode():
            assert torch.allclose(layer(x), want, atol=1e-5), (slots, tokens)

    for tokens in (1, 3):
        for slots in ([1, 1, 1, 1], [0, 0], [2, 2], [3, 0, 1, 3], [2, 0, 2], [1, 2]):
            check(slots, tokens)
    # The same rows again keep their gathered weights, until a slot changes;
    # other rows drop them.
    check([3, 0, 1, 3], 1)
    assert set(row_slots.gathered) == {layer}
    check([1, 1], 1)
    assert row_slots.gathered == {}
    check([3, 0, 1, 3], 1)
    weights[1] = (torch.randn(6, 6), torch.randn(6, 5))  # replaced, by a rank the table must grow to
    layer.set_slot(1, *weights[1])
    check([3, 0, 1, 3], 1)
    layer.clear_slot(3)
    del weights[3]
    check([3, 0, 1, 3], 2)


def test_each_adapter_alone_equals_plain_peft(engine, expected):
    for (name, prompt), want in expected.items():
        got = generate(engine, adapter=name, prompt=prompt, raw_prompt=True, max_new_tokens=12)
        assert got.text == want, (name, prompt)
    # The adapters really change the output.
    assert len({expected[(name, PROMPTS[0])] for name in ["", "a1", "a2", "a3"]}) == 4


def test_mixed_batch_gives_each_row_its_own_adapters_output(engine, expected):
    steps_before = engine.steps
    calls = [(key, Call(engine, adapter=key[0], prompt=key[1], raw_prompt=True, max_new_tokens=12)) for key in expected]
    for key, call in calls:
        result = call.wait()
        assert result.text == expected[key], key
        assert "".join(call.deltas) == result.text
    # 16 requests of up to 12 tokens shared decoding steps: far fewer than 16 x 11.
    assert engine.steps - steps_before < 4 * 11


def test_a_request_joins_and_leaves_a_running_batch(engine, expected):
    long = Call(engine, adapter="a1", prompt=PROMPTS[0], raw_prompt=True, max_new_tokens=40)
    while not long.deltas:
        time.sleep(0.001)
    joined = [Call(engine, adapter=name, prompt=PROMPTS[1], raw_prompt=True, max_new_tokens=12) for name in ("", "a2", "a3")]
    assert [c.wait().text for c in joined] == [expected[(name, PROMPTS[1])] for name in ("", "a2", "a3")]
    assert not long.reply.done()  # still running when the others left
    alone = plain_peft_greedy_cached(engine, "a1", PROMPTS[0], 40)
    assert long.wait().text == alone


def plain_peft_greedy_cached(engine, adapter, prompt, max_new_tokens):
    # The engine alone (already checked equal to PEFT) as the reference for long outputs.
    return generate(engine, adapter=adapter, prompt=prompt, raw_prompt=True, max_new_tokens=max_new_tokens).text


def test_lru_evicts_idle_adapters_and_reloads_them_on_demand(tiny_model_dir, adapters, expected, tmp_path):
    engine = make_engine(tiny_model_dir, tmp_path, max_resident_adapters=2)
    try:
        for name, path in adapters.items():
            add(engine, name, path)
        assert sum(a.resident for a in engine.adapters()) == 2
        for _ in range(2):
            for name in adapters:
                assert (
                    generate(engine, adapter=name, prompt=PROMPTS[2], raw_prompt=True, max_new_tokens=12).text
                    == expected[(name, PROMPTS[2])]
                )
        # All three at once with two slots: the third waits for a slot, then runs.
        calls = [Call(engine, adapter=name, prompt=PROMPTS[3], raw_prompt=True, max_new_tokens=12) for name in adapters]
        assert [c.wait().text for c in calls] == [expected[(name, PROMPTS[3])] for name in adapters]
        assert [a.requests_in_flight for a in engine.adapters()] == [0, 0, 0]
    finally:
        engine.stop()


def test_an_adapter_in_use_is_neither_evicted_nor_unloaded_until_its_requests_finish(tiny_model_dir, adapters, expected, tmp_path):
    engine = make_engine(tiny_model_dir, tmp_path, max_resident_adapters=1)
    try:
        add(engine, "a1", adapters["a1"])
        running = Call(engine, adapter="a1", prompt=PROMPTS[0], raw_prompt=True, max_new_tokens=60)
        while not running.deltas:
            time.sleep(0.001)
        add(engine, "a2", adapters["a2"])  # no idle slot: registered, not resident
        assert {a.id: a.resident for a in engine.adapters()} == {"a1": True, "a2": False}
        waiting = Call(engine, adapter="a2", prompt=PROMPTS[0], raw_prompt=True, max_new_tokens=12)
        engine.remove_adapter("a1")
        with pytest.raises(NotFound):
            Call(engine, adapter="a1", prompt="hello").wait()
        assert running.wait().completion_tokens == 60  # ran to the end on its adapter
        assert waiting.wait().text == expected[("a2", PROMPTS[0])]
        assert [a.id for a in engine.adapters()] == ["a2"]
    finally:
        engine.stop()


def test_bad_adapters_are_refused_and_change_nothing(engine, tiny_model_dir, tmp_path, expected, adapters):
    foreign = write_lora_adapter(build_tiny_causal_lm(tmp_path / "other", seed=5), tmp_path / "foreign")
    with pytest.raises(InvalidArgument, match="trained on"):
        engine.read_adapter(foreign)
    misfit = write_lora_adapter(build_tiny_causal_lm(tmp_path / "wide", hidden_size=64), tmp_path / "misfit", base_name=str(tiny_model_dir))
    with pytest.raises(InvalidArgument, match="do not fit"):
        engine.read_adapter(misfit)
    too_big = write_lora_adapter(tiny_model_dir, tmp_path / "big", rank=128)
    with pytest.raises(InvalidArgument, match="over the maximum 64"):
        engine.read_adapter(too_big)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArgument, match="adapter_config.json"):
        engine.read_adapter(tmp_path / "empty")
    pickled = write_lora_adapter(tiny_model_dir, tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(InvalidArgument, match="only safetensors"):
        engine.read_adapter(pickled)
    assert [a.id for a in engine.adapters()] == ["a1", "a2", "a3"]
    assert generate(engine, adapter="a1", prompt=PROMPTS[0], raw_prompt=True, max_new_tokens=12).text == expected[("a1", PROMPTS[0])]
    with pytest.raises(FailedPrecondition, match="already loaded"):
        add(engine, "a1", adapters["a2"])  # another source under a served id


def test_finish_reasons_stop_strings_and_cancel(engine):
    result = generate(engine, prompt="hello", max_new_tokens=3)
    assert (result.completion_tokens, result.finish_reason) == (3, LENGTH)
    full = generate(engine, prompt="hello", max_new_tokens=20)
    stop = full.text[2:4]
    cut = Call(engine, prompt="hello", max_new_tokens=20, stop=(stop,))
    assert cut.wait().text == full.text[: full.text.find(stop)] == "".join(cut.deltas)
    assert cut.result.finish_reason == STOP
    call = Call(engine, prompt="hello", max_new_tokens=240)
    while len(call.deltas) < 2:
        time.sleep(0.001)
    call.cancel()
    assert call.wait().finish_reason == CANCELLED and call.result.completion_tokens < 240
    late = Call(engine, prompt="hello", max_new_tokens=20)
    expired = WaitingReply()
    engine.submit(GenerationRequest(prompt="hello"), expired, deadline=0.0)
    assert expired.result(10).finish_reason == CANCELLED and expired.outcome.completion_tokens == 0
    assert late.wait().completion_tokens > 0


def test_seeded_sampling_is_reproducible(engine):
    first = generate(engine, prompt="hello", max_new_tokens=10, temperature=1.0, seed=3).text
    assert generate(engine, prompt="hello", max_new_tokens=10, temperature=1.0, seed=3).text == first
    others = {generate(engine, prompt="hello", max_new_tokens=10, temperature=1.0, seed=s, top_p=0.9, top_k=50).text for s in range(4)}
    assert len(others) > 1


def test_queue_bound_and_request_checks(tiny_model_dir, tmp_path, engine, adapters):
    stalled = BatchEngine(str(tiny_model_dir), tmp_path / "cache", EngineLimits(max_queued_requests=2))
    stalled.load()  # not started: nothing leaves the queue
    add(stalled, "a1", adapters["a1"])
    for _ in range(2):
        stalled.submit(GenerationRequest(prompt="hi", adapter="a1"), WaitingReply())
    refused = WaitingReply()
    stalled.submit(GenerationRequest(prompt="hi", adapter="a1"), refused)
    with pytest.raises(ResourceExhausted, match="already waiting"):
        refused.result(0)
    assert [a.requests_in_flight for a in stalled.adapters()] == [2]  # the refused one holds nothing
    with pytest.raises(InvalidArgument) as caught:
        Call(engine, prompt="hi", max_new_tokens=0)
    assert caught.value.violations[0].field == "sampling.max_new_tokens"
    with pytest.raises(InvalidArgument) as caught:
        Call(engine, prompt="hi " * 100, max_new_tokens=200)  # past the model's 256 positions
    assert caught.value.violations[0].field == "sampling.max_new_tokens"
    with pytest.raises(InvalidArgument) as caught:
        Call(engine)
    assert caught.value.violations[0].field == "input"
    # Stop strings are looked for after every token: bounded in count and length.
    for stop, field in ((("x",) * 17, "sampling.stop"), (("",), "sampling.stop[0]"), (("ok", "y" * 129), "sampling.stop[1]")):
        with pytest.raises(InvalidArgument) as caught:
            Call(engine, prompt="hi", stop=stop)
        assert caught.value.violations[0].field == field
    # A text longer than the model's positions is refused, not run.
    with pytest.raises(InvalidArgument) as caught:
        engine.classify("any", "the quick brown fox " * 200, WaitingReply())
    assert caught.value.violations[0].field == "text" and "256 positions" in caught.value.violations[0].description


class CountingTokenizer:
    """A tokenizer that counts the ids it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids, **kwargs):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kwargs)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 399), max_size=80), st.lists(st.text(alphabet="abcdeht ", min_size=1, max_size=3), max_size=3))
def test_streamed_text_is_the_full_decode_cut_at_the_first_stop(tiny_tokenizer, ids, stops):
    deltas = []
    progress = TextStream(tiny_tokenizer, tuple(stops), deltas.append)
    for token in ids:
        progress.add(token)
    text = progress.finish()
    full = tiny_tokenizer.decode(ids, skip_special_tokens=True)
    cut = min((full.find(s) for s in stops if s in full), default=len(full))
    assert text == full[:cut] and "".join(deltas) == text


def test_each_token_decodes_a_few_tokens_however_long_the_answer(tiny_tokenizer):
    counting = CountingTokenizer(tiny_tokenizer)
    progress = TextStream(counting, ("never said",), lambda _: None)
    for token in list(range(10, 110)) * 20:  # 2000 tokens
        progress.add(token)
    progress.finish()
    # Decoding everything each time would be 2000 * 2001 ids (two million).
    assert counting.decoded < 20 * 2000


def reference_class_probabilities(model_dir, adapter_dir, text):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.inference_mode():
        return model(**tokenizer([text], return_tensors="pt")).logits.softmax(-1)[0].tolist()


@pytest.mark.parametrize("base", ["decoder", "encoder"])
def test_classification_adapters_equal_plain_peft(base, tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir if base == "decoder" else build_tiny_bert(tmp_path / "bert")
    targets = ("q_proj", "v_proj") if base == "decoder" else ("query", "value")
    engine = make_engine(model_dir, tmp_path)
    try:
        for seed in (1, 2):
            add(engine, f"c{seed}", write_lora_adapter(model_dir, tmp_path / f"c{seed}", seed=seed, targets=targets, classes=3))
        texts = ["the quick brown fox", "hello world", "What is the capital of Spain?"]
        replies = [(seed, text, WaitingReply()) for seed in (1, 2) for text in texts]
        for seed, text, reply in replies:
            engine.classify(f"c{seed}", text, reply)
        for seed, text, reply in replies:
            result = reply.result(30)
            want = reference_class_probabilities(model_dir, tmp_path / f"c{seed}", text)
            assert list(result.scores.values()) == pytest.approx(want, abs=1e-5)
            assert result.label == f"LABEL_{max(range(3), key=want.__getitem__)}"
        if base == "decoder":
            with pytest.raises(InvalidArgument, match="use it with Classify"):
                Call(engine, adapter="c1", prompt="hi").wait()
        else:
            with pytest.raises(FailedPrecondition, match="does not generate"):
                Call(engine, prompt="hi").wait()
        with pytest.raises(InvalidArgument, match="needs a SEQ_CLS adapter"):
            engine.classify("", "hi", WaitingReply())
    finally:
        engine.stop()


def test_an_evicted_adapter_comes_back_from_host_memory_without_its_files(tiny_model_dir, adapters, expected, tmp_path):
    import shutil

    engine = make_engine(tiny_model_dir, tmp_path, max_resident_adapters=1)
    try:
        kept = shutil.copytree(adapters["a2"], tmp_path / "kept")
        add(engine, "kept", kept)
        add(engine, "a1", adapters["a1"])  # evicts the idle "kept": its weights stay in host memory
        assert engine.registry.host_bytes() > 0
        shutil.rmtree(kept)
        assert generate(engine, adapter="kept", prompt=PROMPTS[0], raw_prompt=True, max_new_tokens=12).text == expected[("a2", PROMPTS[0])]
        assert generate(engine, adapter="a1", prompt=PROMPTS[0], raw_prompt=True, max_new_tokens=12).text == expected[("a1", PROMPTS[0])]
    finally:
        engine.stop()


def test_an_evicted_adapter_that_cannot_be_reloaded_fails_only_its_own_requests(tiny_model_dir, adapters, expected, tmp_path):
    import shutil

    # Nothing kept in host memory: a reload reads the adapter's files.
    engine = make_engine(tiny_model_dir, tmp_path, max_resident_adapters=1, max_evicted_adapter_bytes=0)
    try:
        doomed = shutil.copytree(adapters["a2"], tmp_path / "doomed")
        add(engine, "doomed", doomed)
        add(engine, "a1", adapters["a1"])  # evicts the idle "doomed"
        shutil.rmtree(doomed)
        running = Call(engine, adapter="a1", prompt=PROMPTS[0], raw_prompt=True, max_new_tokens=12)
        failing = Call(engine, adapter="doomed", prompt=PROMPTS[0], raw_prompt=True, max_new_tokens=12)
        assert running.wait().text == expected[("a1", PROMPTS[0])]
        with pytest.raises(InvalidArgument, match="adapter_config.json"):
            failing.wait()
        assert generate(engine, prompt=PROMPTS[1], raw_prompt=True, max_new_tokens=12).text == expected[("", PROMPTS[1])]
    finally:
        engine.stop()


def test_prompts_over_the_prefill_budget_are_prefilled_in_turns(tiny_model_dir, expected, tmp_path):
    engine = make_engine(tiny_model_dir, tmp_path, max_prefill_tokens=16)
    try:
        calls = [Call(engine, prompt=prompt, raw_prompt=True, max_new_tokens=12) for prompt in PROMPTS]
        assert [c.wait().text for c in calls] == [expected[("", prompt)] for prompt in PROMPTS]
    finally:
        engine.stop()


class PassClock:
    """The engine's clock for pacing: it moves only when a pass runs, by a
    fixed cost per prefill chunk and per decoding step, so the pacing is
    the same on any machine. Records, at each chunk, the decoding steps and
    the whole-prompt prefill passes run before it."""

    def __init__(self, chunk_seconds: float, decode_seconds: float):
        self.chunk_seconds, self.decode_seconds = chunk_seconds, decode_seconds
        self.now = 0.0
        self.prefills = 0
        self.chunks: list[tuple[int, int]] = []  # (decoding steps, prefills) before each chunk

    def __call__(self) -> float:
        return self.now

    def attach(self, engine: BatchEngine) -> None:
        runner = engine.runner
        prefill, prefill_chunk, decode = runner.prefill, runner.prefill_chunk, runner.decode

        def whole(sequences):
            self.prefills += 1
            return prefill(sequences)

        def chunk(sequence, size):
            self.chunks.append((engine.steps, self.prefills))
            self.now += self.chunk_seconds
            return prefill_chunk(sequence, size)

        def step(sequences):
            self.now += self.decode_seconds
            return decode(sequences)

        runner.prefill, runner.prefill_chunk, runner.decode = whole, chunk, step


def paced_engine(model_dir, tmp_path, **limits) -> tuple[BatchEngine, PassClock]:
    clock = PassClock(chunk_seconds=1.0, decode_seconds=0.5)
    engine = BatchEngine(str(model_dir), tmp_path / "cache", EngineLimits(prefill_chunk_tokens=8, prefill_share=0.5, **limits), clock=clock)
    engine.load()
    clock.attach(engine)
    return engine, clock


def test_a_long_prompt_is_prefilled_a_chunk_at_a_time_paced_while_running_streams_decode(tiny_model_dir, adapters, tmp_path):
    # A chunk costs 1 s and a decoding step 0.5 s: at share 0.5 a chunk
    # earns the next one in four decoding steps.
    engine, clock = paced_engine(tiny_model_dir, tmp_path)
    engine.start()
    add(engine, "a1", adapters["a1"])
    long_prompt = " ".join(PROMPTS * 3)
    length = len(engine.runner.tokenizer(long_prompt, add_special_tokens=False)["input_ids"])
    try:
        running = Call(engine, prompt=PROMPTS[1], raw_prompt=True, max_new_tokens=200)
        while not running.deltas:
            time.sleep(0.001)
        chunked = Call(engine, adapter="a1", prompt=long_prompt, raw_prompt=True, max_new_tokens=12)
        assert chunked.wait().text == plain_peft_greedy(tiny_model_dir, adapters["a1"], long_prompt, 12)
        assert running.wait().completion_tokens == 200
        steps = [decoded for decoded, _ in clock.chunks]
        # Chunks of at most 8 tokens, the running stream decoding between
        # them: it never waited for the whole prompt. The first chunk runs at
        # once, the second once the first is paid for and the next earned
        # (8 steps), the rest four decoding steps apart.
        assert len(steps) == -(-length // 8) > 3
        assert [b - a for a, b in zip(steps, steps[1:], strict=False)] == [8] + [4] * (len(steps) - 2)
    finally:
        engine.stop()


def test_a_long_prompt_is_prefilled_every_step_beside_requests_that_never_decode(tiny_model_dir, tmp_path):
    # Requests that end with their first token never decode: no stream's
    # pace to keep, so the long prompt's chunks run every step beside them.
    engine, clock = paced_engine(tiny_model_dir, tmp_path, max_batch_size=4)
    # Queued before the model thread starts: its first step sees them all.
    long_call = Call(engine, prompt=" ".join(PROMPTS * 3), raw_prompt=True, max_new_tokens=1)
    short_calls = [Call(engine, prompt=PROMPTS[i % len(PROMPTS)], raw_prompt=True, max_new_tokens=1) for i in range(30)]
    engine.start()
    try:
        assert long_call.wait().completion_tokens == 1
        assert all(c.wait().completion_tokens == 1 for c in short_calls)
        assert engine.steps == 0 and len(clock.chunks) > clock.prefills > 3
        # A pass of short prompts and a chunk every step while they lasted,
        # not the long prompt held back until they were gone.
        prefills_before = [prefills for _, prefills in clock.chunks]
        assert prefills_before[: clock.prefills] == list(range(1, clock.prefills + 1))
    finally:
        engine.stop()


def test_a_request_cancelled_during_its_chunked_prefill_ends_there_and_frees_its_adapter(tiny_model_dir, adapters, expected, tmp_path):
    engine = make_engine(tiny_model_dir, tmp_path, prefill_chunk_tokens=2)
    add(engine, "a1", adapters["a1"])
    chunks = []
    prefill_chunk = engine.runner.prefill_chunk

    def cancel_after_two_chunks(sequence, size):
        chunks.append(size)
        if len(chunks) == 2:
            sequence.cancelled = True
        return prefill_chunk(sequence, size)

    engine.runner.prefill_chunk = cancel_after_two_chunks
    try:
        result = generate(engine, adapter="a1", prompt=" ".join(PROMPTS * 2), raw_prompt=True, max_new_tokens=12)
        assert (result.finish_reason, result.completion_tokens, len(chunks)) == (CANCELLED, 0, 2)
        assert [a.requests_in_flight for a in engine.adapters()] == [0]
        # The next long prompt starts from its own first chunk, not the cancelled one's.
        engine.runner.prefill_chunk = prefill_chunk
        long_prompt = " ".join(PROMPTS)
        assert generate(engine, adapter="a1", prompt=long_prompt, raw_prompt=True, max_new_tokens=12).text == plain_peft_greedy(
            tiny_model_dir, adapters["a1"], long_prompt, 12
        )
    finally:
        engine.stop()


def test_bfloat16_serving_runs_adapters(tiny_model_dir, adapters, tmp_path):
    engine = BatchEngine(str(tiny_model_dir), tmp_path / "cache", dtype="bfloat16")
    engine.load()
    engine.start()
    try:
        assert engine.runner.model.dtype == torch.bfloat16
        add(engine, "a1", adapters["a1"])
        calls = {name: Call(engine, adapter=name, prompt=PROMPTS[0], raw_prompt=True, max_new_tokens=12) for name in ("", "a1")}
        texts = {name: call.wait().text for name, call in calls.items()}
        # (A random tiny model's logits are all near-ties: bf16 rounding changes
        # its words, so only that the adapter is applied is checked here.)
        assert texts[""] and texts["a1"] and texts[""] != texts["a1"]
        assert all(a.resident for a in engine.adapters())
    finally:
        engine.stop()


def test_a_stopped_engine_refuses_adapter_loads_instead_of_hanging(tiny_model_dir, adapters, tmp_path):
    engine = make_engine(tiny_model_dir, tmp_path)
    engine.stop()
    with pytest.raises(Unavailable, match="shutting down"):
        add(engine, "a1", adapters["a1"])


def test_the_serving_device_and_dtype_follow_what_the_machine_has(monkeypatch):
    from tunewire.services.common import hardware
    from tunewire.services.common.hardware import serving_device
    from tunewire.services.inference.engine import serving_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert serving_device("auto") == cpu and serving_device("cpu") == cpu
    with pytest.raises(ValueError, match="not a CUDA device this process can see.*CUDA_VISIBLE_DEVICES"):
        serving_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert serving_device("auto") == cuda and serving_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="2 visible"):
        serving_device("cuda:2")

    # auto: bfloat16 where computed natively; else float16 on a GPU (every one has it), float32 on a CPU.
    native = {"cuda": False, "cpu": False}
    monkeypatch.setattr(hardware, "native_bfloat16", lambda device_type: native[device_type])
    monkeypatch.setattr("tunewire.services.inference.runner.native_bfloat16", lambda device_type: native[device_type])
    assert serving_dtype("auto", cuda) == torch.float16 and serving_dtype("auto", cpu) == torch.float32
    native["cuda"] = native["cpu"] = True
    assert serving_dtype("auto", cuda) == torch.bfloat16 and serving_dtype("auto", cpu) == torch.bfloat16
    assert serving_dtype("float16", cpu) == torch.float16 and serving_dtype("float32", cuda) == torch.float32


def test_a_device_the_machine_lacks_is_a_settings_error_naming_the_variable(tmp_path, monkeypatch):
    from tunewire.services.common.settings import SettingsError, load_settings
    from tunewire.services.inference.server import InferenceDeps

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings = load_settings(home=tmp_path, inference_device="cuda")
    with pytest.raises(SettingsError, match="TUNEWIRE_INFERENCE_DEVICE='cuda': cuda is not a CUDA device"):
        InferenceDeps.from_settings(settings)
    with pytest.raises(SettingsError, match="TUNEWIRE_INFERENCE_DEVICE='gpu'"):
        load_settings(home=tmp_path, inference_device="gpu")


def test_adapter_holds_are_taken_and_released_on_the_model_thread_only(engine, expected):
    threads = set()
    registry = engine.registry
    use, done = registry.use, registry.done

    def spy(fn):
        def wrapped(*args, **kwargs):
            threads.add(threading.current_thread().name)
            return fn(*args, **kwargs)

        return wrapped

    registry.use, registry.done = spy(use), spy(done)
    try:
        calls = [Call(engine, adapter=name, prompt=PROMPTS[2], raw_prompt=True, max_new_tokens=12) for name in ("a1", "a2", "a1")]
        assert [c.wait().text for c in calls] == [expected[(name, PROMPTS[2])] for name in ("a1", "a2", "a1")]
    finally:
        registry.use, registry.done = use, done
    assert threads == {"model"}


def test_a_model_thread_that_dies_answers_every_request_instead_of_leaving_it_waiting(tiny_model_dir, adapters, tmp_path):
    engine = make_engine(tiny_model_dir, tmp_path)
    try:

        def broken(*args, **kwargs):
            raise RuntimeError("the device is gone")

        engine.runner.decode = engine.runner.prefill = engine.runner.reset = broken  # the step fails, and so does recovering from it
        with pytest.raises(RuntimeError, match="the device is gone"):
            generate(engine, prompt="hello", max_new_tokens=5)
        engine._thread.join(10)
        assert not engine._thread.is_alive()
        with pytest.raises(Unavailable, match="shutting down"):  # answered at once: no thread to wait for
            generate(engine, prompt="hello", max_new_tokens=5)
    finally:
        engine.stop()
