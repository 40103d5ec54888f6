"""The vLLM backend (vllm_engine.py) over a fake of vLLM's AsyncLLM: what it
asks vLLM for (prompt tokens, sampling, the LoRA of each request), what it
gives callers back, and tunewire's rules kept on top (projects' adapters,
unloads that wait for requests in flight, cancel, deadlines, shutdown).
vLLM itself needs a CUDA GPU: `make gpu-check` runs the real one."""

from __future__ import annotations

import asyncio
import enum
import importlib.machinery
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tunewire.services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from tunewire.services.common.settings import Settings, SettingsError
from tunewire.services.inference.boundary import WaitingReply
from tunewire.services.inference.engine import CANCELLED, LENGTH, STOP, EngineLimits, GenerationRequest, prepare_prompt
from tunewire.services.inference.vllm_engine import VllmEngine

from conftest import build_tiny_causal_lm, write_lora_adapter


@dataclass(eq=False)
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str

    # As vLLM's: LoRAs are told apart by name alone.
    def __eq__(self, other) -> bool:
        return isinstance(other, LoRARequest) and other.lora_name == self.lora_name

    def __hash__(self) -> int:
        return hash(self.lora_name)


class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None


@dataclass
class Output:
    outputs: list[Completion]


@dataclass
class FakeAsyncLLM:
    """vLLM's AsyncLLM as the backend uses it. Each request answers with its
    LoRA's name, then one word a token; `gate`, when set, holds every
    request before its first token."""

    max_model_len: int = 200
    loras: dict[int, LoRARequest] = field(default_factory=dict)
    removed: list[int] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    gate: asyncio.Event | None = None
    shut_down: bool = False

    @property
    def model_config(self):
        return types.SimpleNamespace(max_model_len=self.max_model_len)

    async def add_lora(self, lora: LoRARequest) -> bool:
        self.loras[lora.lora_int_id] = lora
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        self.removed.append(lora_id)
        return self.loras.pop(lora_id, None) is not None

    async def generate(self, prompt, params, request_id, lora_request=None):
        self.requests.append({"prompt": prompt, "params": params.kwargs, "id": request_id, "lora": lora_request})
        try:
            if self.gate is not None:
                await self.gate.wait()
            words = [f"[{Path(lora_request.lora_path).name if lora_request else 'base'}]"] + [f" w{i}" for i in range(1, 100)]
            limit = params.kwargs["max_tokens"]
            for i, word in enumerate(words[:limit]):
                if word.strip() in params.kwargs["stop"]:
                    yield Output([Completion("", [i], "stop")])
                    return
                yield Output([Completion(word, [i], "length" if i == limit - 1 else None)])
                await asyncio.sleep(0)
        except (asyncio.CancelledError, GeneratorExit):
            for _ in range(3):  # vLLM's abort goes to its engine process: a few turns of the loop
                await asyncio.sleep(0)
            self.aborted.append(request_id)  # as vLLM aborts a request whose generator closes
            raise

    async def abort(self, request_id: str) -> None:
        if request_id not in self.aborted:
            self.aborted.append(request_id)

    def shutdown(self) -> None:
        self.shut_down = True


@pytest.fixture
def fake_vllm(monkeypatch):
    """The vllm modules the backend imports, made of the fakes above."""
    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # found, as an installed one is
    vllm.SamplingParams = SamplingParams
    vllm.TokensPrompt = dict
    lora, request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    sampling = types.ModuleType("vllm.sampling_params")
    sampling.RequestOutputKind = RequestOutputKind
    for name, module in {"vllm": vllm, "vllm.lora": lora, "vllm.lora.request": request, "vllm.sampling_params": sampling}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return vllm


@pytest.fixture
def served(fake_vllm, tiny_model_dir, tmp_path):
    """A started backend over a FakeAsyncLLM: (engine, fake)."""
    fake = FakeAsyncLLM()
    engine = VllmEngine(
        str(tiny_model_dir), tmp_path / "cache", EngineLimits(max_batch_size=2, max_queued_requests=2), engine_factory=lambda path: fake
    )
    engine.start()
    yield engine, fake
    engine.stop()


def add(engine, adapter_id, adapter_dir, project="default"):
    return engine.add_adapter(adapter_id, str(adapter_dir), adapter_dir, engine.read_adapter(adapter_dir), project)


def submit(engine, project=None, deadline=None, **kwargs):
    reply = WaitingReply()
    return engine.submit(GenerationRequest(**kwargs), reply, deadline, project), reply


def test_a_request_goes_to_vllm_with_its_tokens_sampling_and_lora(served, tiny_model_dir, tmp_path):
    engine, fake = served
    adapter = add(engine, "a1", write_lora_adapter(tiny_model_dir, tmp_path / "a1", rank=4))
    assert vars(fake.loras[adapter.slot]) == vars(LoRARequest(f"a1#{adapter.slot}", adapter.slot, str(tmp_path / "a1")))  # hot-loaded
    assert engine.max_positions == 200  # vLLM's, not the model config's 256

    _, reply = submit(engine, adapter="a1", messages=[{"role": "user", "content": "hello"}], max_new_tokens=3)
    result = reply.result()
    assert result.text == "[a1] w1 w2" == "".join(reply.items)  # streamed as deltas
    assert (result.finish_reason, result.completion_tokens) == (LENGTH, 3)
    sent = fake.requests[-1]
    expected_ids, _ = prepare_prompt(GenerationRequest(messages=[{"role": "user", "content": "hello"}]), engine.tokenizer, 200)
    assert sent["prompt"] == {"prompt_token_ids": expected_ids} and result.prompt_tokens == len(expected_ids)
    assert sent["lora"] == fake.loras[adapter.slot]
    # Unset sampling options are left to vLLM; the deltas are asked for.
    assert sent["params"] == {"max_tokens": 3, "temperature": 0.0, "stop": [], "output_kind": RequestOutputKind.DELTA}

    _, reply = submit(engine, prompt="hi", max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=5, seed=0, stop=("w2",))
    result = reply.result()
    assert (result.text, result.finish_reason) == ("[base] w1", STOP)
    assert fake.requests[-1]["lora"] is None
    assert fake.requests[-1]["params"] | {"output_kind": None} == {
        "max_tokens": 8,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 5,
        "seed": 0,  # a seed, not unset
        "stop": ["w2"],
        "output_kind": None,
    }


def test_projects_are_served_their_own_adapters_only(served, tiny_model_dir, tmp_path):
    engine, _ = served
    add(engine, "mine", write_lora_adapter(tiny_model_dir, tmp_path / "mine"), project="p1")
    _, reply = submit(engine, project="p2", adapter="mine", prompt="hi")
    with pytest.raises(NotFound, match="not loaded"):
        reply.result()
    assert [a.id for a in engine.adapters("p2")] == [] and [a.id for a in engine.adapters("p1")] == ["mine"]
    _, reply = submit(engine, project="p1", adapter="mine", prompt="hi", max_new_tokens=1)
    assert reply.result().text == "[mine]"


def test_an_unloaded_adapter_leaves_vllm_once_its_requests_finish(served, tiny_model_dir, tmp_path):
    engine, fake = served
    adapter = add(engine, "a1", write_lora_adapter(tiny_model_dir, tmp_path / "a1"))
    fake.gate = asyncio.Event()
    _, reply = submit(engine, adapter="a1", prompt="hi", max_new_tokens=2)
    wait_for(lambda: fake.requests)
    engine.remove_adapter("a1")
    assert engine.adapters() == [] and adapter.slot in fake.loras  # no new requests; this one keeps it
    engine._loop.call_soon_threadsafe(fake.gate.set)
    assert reply.result().text == "[a1] w1"
    wait_for(lambda: fake.removed)
    assert fake.loras == {}
    # Idle: removed at once.
    idle = add(engine, "a2", write_lora_adapter(tiny_model_dir, tmp_path / "a2"))
    engine.remove_adapter("a2")
    assert idle.slot is None and fake.loras == {}


def test_an_id_loaded_again_while_its_old_weights_serve_is_another_lora_to_vllm(served, tiny_model_dir, tmp_path):
    engine, fake = served
    add(engine, "a1", write_lora_adapter(tiny_model_dir, tmp_path / "old", seed=1))
    fake.gate = asyncio.Event()
    _, old_reply = submit(engine, adapter="a1", prompt="hi", max_new_tokens=1)
    wait_for(lambda: fake.requests)
    engine.remove_adapter("a1")
    add(engine, "a1", write_lora_adapter(tiny_model_dir, tmp_path / "new", seed=2))
    _, new_reply = submit(engine, adapter="a1", prompt="hi", max_new_tokens=1)
    wait_for(lambda: len(fake.requests) == 2)
    old, new = (r["lora"] for r in fake.requests)
    assert old != new and old.lora_int_id != new.lora_int_id  # vLLM tells LoRAs apart by name
    engine._loop.call_soon_threadsafe(fake.gate.set)
    assert (old_reply.result().text, new_reply.result().text) == ("[old]", "[new]")


def test_vllm_errors_reach_callers_as_tunewire_errors(served, tiny_model_dir, tmp_path):
    engine, fake = served

    async def refuse(lora):
        raise Exception("target modules not supported")

    fake.add_lora = refuse
    with pytest.raises(InvalidArgument, match="vLLM could not load the adapter: target modules"):
        add(engine, "a1", write_lora_adapter(tiny_model_dir, tmp_path / "a1"))
    assert engine.adapters() == []

    class EngineDeadError(Exception):
        pass

    async def dead(*args, **kwargs):
        raise EngineDeadError()
        yield

    fake.generate = dead
    _, reply = submit(engine, prompt="hi")
    with pytest.raises(Unavailable, match="vLLM engine has stopped"):
        reply.result()


def test_cancel_and_deadline_abort_the_request_in_vllm(served):
    engine, fake = served
    fake.gate = asyncio.Event()
    handle, reply = submit(engine, prompt="hi")
    wait_for(lambda: fake.requests)
    engine.cancel(handle)
    assert reply.result().finish_reason == CANCELLED
    assert fake.aborted == [fake.requests[0]["id"]]
    _, reply = submit(engine, prompt="hi", deadline=time.monotonic() + 0.2)
    assert reply.result().finish_reason == CANCELLED
    assert len(fake.aborted) == 2


def test_requests_past_the_bounds_are_refused_and_shutdown_answers_those_in_flight(fake_vllm, tiny_model_dir, tmp_path):
    fake = FakeAsyncLLM(gate=None)
    engine = VllmEngine(
        str(tiny_model_dir), tmp_path / "cache", EngineLimits(max_batch_size=1, max_queued_requests=1), engine_factory=lambda path: fake
    )
    engine.start()
    fake.gate = asyncio.Event()
    running = [submit(engine, prompt="hi")[1] for _ in range(2)]
    wait_for(lambda: len(fake.requests) == 2)
    _, refused = submit(engine, prompt="hi")
    with pytest.raises(ResourceExhausted, match="already running or waiting"):
        refused.result()
    engine.stop()
    for reply in running:
        with pytest.raises(Unavailable, match="shutting down"):
            reply.result()
    assert fake.shut_down


def test_what_the_vllm_engine_does_not_serve_is_refused(served, tiny_model_dir, tmp_path):
    engine, fake = served
    with pytest.raises(FailedPrecondition, match="built-in engine"):
        engine.classify("any", "text", WaitingReply())
    other = build_tiny_causal_lm(tmp_path / "other", hidden_size=48)
    with pytest.raises(InvalidArgument, match="another model|trained on"):
        engine.read_adapter(write_lora_adapter(other, tmp_path / "other-adapter"))
    with pytest.raises(InvalidArgument, match="max_new_tokens"):
        submit(engine, prompt="hi", max_new_tokens=300)
    assert fake.loras == {} and fake.requests == []


def test_the_setting_chooses_the_engine(fake_vllm, monkeypatch, tmp_path):
    from tunewire.services.inference.server import InferenceDeps

    settings = Settings(home=tmp_path, inference_engine="vllm", training_address="")
    assert type(InferenceDeps.from_settings(settings).manager.engine).__name__ == "VllmEngine"
    with pytest.raises(SettingsError, match="TUNEWIRE_INFERENCE_DTYPE='float32'.*bfloat16"):
        InferenceDeps.from_settings(Settings(home=tmp_path, inference_engine="vllm", inference_dtype="float32", training_address=""))
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    with pytest.raises(SettingsError, match=r"pip install 'tunewire\[vllm\]'"):
        InferenceDeps.from_settings(settings)
    assert type(InferenceDeps.from_settings(Settings(home=tmp_path, training_address="")).manager.engine).__name__ == "BatchEngine"


def wait_for(condition, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_both_apis_answer_from_the_vllm_engine_over_real_sockets(fake_vllm, tiny_model_dir, tmp_path):
    """gRPC (unary, streamed, load, unload) and the OpenAI-compatible API
    (the real `openai` client) over a service whose engine is vLLM's."""
    import grpc
    import openai

    from tunewire.clients.sdk import ApiError, InferenceClient
    from tunewire.services.common.artifacts import ArtifactStore
    from tunewire.services.common.settings import load_settings
    from tunewire.services.inference.core import InferenceManager
    from tunewire.services.inference.server import InferenceDeps, create_server

    from conftest import ServerThread, free_port

    http_port = free_port()
    settings = load_settings(home=tmp_path / "home", base_model=str(tiny_model_dir), inference_http_port=http_port)
    fake = FakeAsyncLLM()
    adapter_dir = write_lora_adapter(tiny_model_dir, tmp_path / "own" / "pirate")

    async def make_inference():
        engine = VllmEngine(settings.base_model, settings.model_cache, EngineLimits(), engine_factory=lambda path: fake)
        manager = InferenceManager(engine, ArtifactStore(settings.artifact_root), tmp_path / "adapter-cache", (str(tmp_path / "own"),))
        return await create_server(settings, InferenceDeps(manager, ""), port=0)

    with ServerThread(make_inference) as inference, InferenceClient(inference.address, timeout=60) as client:
        client.load_adapter("pirate", str(adapter_dir))
        unary = client.generate("hello", adapter="pirate", max_new_tokens=4)
        streamed = list(client.generate_stream("hello", adapter="pirate", max_new_tokens=4))
        assert unary.text == "[pirate] w1 w2 w3" == "".join(s.text_delta for s in streamed)
        assert streamed[-1].completion_tokens == unary.completion_tokens == 4

        api = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="local", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "hello"}]
        chat = api.chat.completions.create(model="pirate", messages=messages, max_tokens=3, temperature=0)
        assert chat.choices[0].message.content == "[pirate] w1 w2" and chat.choices[0].finish_reason == "length"
        chunks = api.chat.completions.create(model="pirate", messages=messages, max_tokens=3, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "[pirate] w1 w2"
        assert all(r["lora"].lora_path == str(adapter_dir) for r in fake.requests)  # each request carries its LoRA

        client.unload_adapter("pirate")
        assert fake.loras == {}
        with pytest.raises(ApiError) as caught:
            client.generate("hello", adapter="pirate")
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
