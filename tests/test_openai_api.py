"""The OpenAI-compatible HTTP API over a real socket, driven by the real
`openai` package: chat and text completions (plain and streamed) with the
base model and an adapter, answering as gRPC does from the same engine;
OpenAI's parameters, defaults and error shapes."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from tunewire.clients.sdk import InferenceClient

from conftest import free_port, three_services, write_lora_adapter

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital of Spain?"}]


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("openai")
    port = free_port()
    with three_services(tmp, tiny_model_dir, inference_http_port=port) as servers:
        grpc_client = InferenceClient(servers["inference"].address, timeout=60)
        grpc_client.load_adapter("pirate", str(write_lora_adapter(tiny_model_dir, tmp / "own" / "pirate", seed=7)))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="local", max_retries=0, timeout=60)
        yield {"client": client, "grpc": grpc_client, "base": str(tiny_model_dir), "url": f"http://127.0.0.1:{port}/v1"}
        grpc_client.close()


def test_chat_and_text_completions_answer_as_grpc_does_for_the_base_model_and_an_adapter(api):
    client, grpc_client = api["client"], api["grpc"]
    for model, adapter in ((api["base"], ""), ("pirate", "pirate")):
        chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
        want = grpc_client.generate(messages=MESSAGES, adapter=adapter, max_new_tokens=12)
        assert chat.object == "chat.completion" and chat.model == model
        assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == want.text
        assert chat.choices[0].finish_reason == ("length" if want.completion_tokens == 12 else "stop")
        assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
        assert chat.usage.total_tokens == want.prompt_tokens + want.completion_tokens

        text = client.completions.create(model=model, prompt="the quick brown fox", max_tokens=8, temperature=0)
        raw = grpc_client.generate("the quick brown fox", adapter=adapter, max_new_tokens=8, raw_prompt=True)
        assert text.object == "text_completion" and text.choices[0].text == raw.text
    # The adapter changes the answer: the model named is the one that ran.
    base = client.completions.create(model=api["base"], prompt="hello", max_tokens=8, temperature=0).choices[0].text
    assert client.completions.create(model="pirate", prompt="hello", max_tokens=8, temperature=0).choices[0].text != base


def test_streamed_chat_and_completions_are_the_plain_answer_in_pieces_with_usage(api):
    client = api["client"]
    plain = client.chat.completions.create(model="pirate", messages=MESSAGES, max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="pirate", messages=MESSAGES, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == plain.choices[0].message.content and len([p for p in content if p]) > 1
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens

    text = client.completions.create(model=api["base"], prompt="hello", max_tokens=10, temperature=0)
    streamed = list(client.completions.create(model=api["base"], prompt="hello", max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text
    assert all(c.usage is None for c in streamed)  # usage only when asked


def test_sampling_parameters_and_several_choices(api):
    client = api["client"]
    full = client.completions.create(model=api["base"], prompt="hello", max_tokens=20, temperature=0).choices[0].text
    stop = full[3:6]
    cut = client.completions.create(model=api["base"], prompt="hello", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"
    seeded = [
        client.chat.completions.create(model="pirate", messages=MESSAGES, max_tokens=10, temperature=1.0, seed=5, n=3) for _ in range(2)
    ]
    texts = [[c.message.content for c in s.choices] for s in seeded]
    assert [c.index for c in seeded[0].choices] == [0, 1, 2]
    assert texts[0] == texts[1] and len(set(texts[0])) > 1  # a seed repeats; each choice samples its own
    streamed = list(
        client.chat.completions.create(model="pirate", messages=MESSAGES, max_tokens=10, temperature=1.0, seed=5, n=3, stream=True)
    )
    by_choice = {i: "".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i) for i in range(3)}
    assert list(by_choice.values()) == texts[0]
    # No max_tokens: a chat answer may run to the model's positions (OpenAI's default), and here stops at its end of turn or there.
    open_ended = client.chat.completions.create(model=api["base"], messages=MESSAGES, temperature=0)
    assert open_ended.usage.completion_tokens > 0


def test_models_lists_the_base_and_the_served_adapters(api):
    client = api["client"]
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {api["base"], "pirate"} and models["pirate"].owned_by == "default"
    assert client.models.retrieve("pirate").id == "pirate"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("absent")


def test_errors_come_in_openais_shape_with_its_status_codes(api):
    client = api["client"]
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="absent", messages=MESSAGES, max_tokens=4)
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["param"] == "model"
    for arguments, param in (({"max_tokens": 0}, "max_tokens"), ({"temperature": 3}, "temperature"), ({"n": 99}, "n")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="pirate", messages=MESSAGES, **arguments)
        assert caught.value.body["type"] == "invalid_request_error" and caught.value.body["param"] == param, caught.value.body
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="pirate", messages=[{"role": "user", "content": "hi " * 300}], max_tokens=100)
    assert caught.value.body["param"] == "max_tokens" and "positions" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="pirate", messages=[{"role": "tool", "content": "x"}])
    assert caught.value.body["param"].startswith("messages.0")
    # Not JSON at all, and a path that does not exist: the same shape.
    for path, body, status in (("/chat/completions", b"{not json", 400), ("/nowhere", b"{}", 404)):
        request = urllib.request.Request(api["url"] + path, data=body, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        assert caught.value.code == status and set(json.loads(caught.value.read())["error"]) == {"message", "type", "param", "code"}
