"""The generation engine on a tiny model, without gRPC."""

import threading

import pytest

from tunewire.services.common.errors import InvalidArgument, NotFound
from tunewire.services.inference.engine import LENGTH, GenerationEngine, GenerationRequest

from conftest import build_tiny_causal_lm, write_lora_adapter


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    engine = GenerationEngine(str(tiny_model_dir), tmp_path_factory.mktemp("cache"))
    engine.load()
    return engine


def run(engine, **kwargs):
    deltas = []
    result = engine.generate(GenerationRequest(**kwargs), deltas.append, threading.Event())
    return result, "".join(deltas)


def plain_peft_greedy(model_dir, adapter_dir, prompt_text, max_new_tokens):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter_dir)).eval()
    ids = tokenizer(prompt_text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_adapter_output_equals_plain_peft_and_base_is_unchanged(engine, tiny_model_dir, tmp_path):
    adapter = write_lora_adapter(tiny_model_dir, tmp_path / "a1")
    prompt = "the quick brown fox"
    base_before, _ = run(engine, prompt=prompt, raw_prompt=True, max_new_tokens=12)
    engine.load_adapter("a1", adapter)
    tuned, streamed = run(engine, prompt=prompt, raw_prompt=True, max_new_tokens=12, adapter="a1")
    base_after, _ = run(engine, prompt=prompt, raw_prompt=True, max_new_tokens=12)
    assert base_after.text == base_before.text
    assert tuned.text != base_before.text
    assert streamed == tuned.text
    assert tuned.text == plain_peft_greedy(tiny_model_dir, adapter, prompt, 12)
    assert tuned.prompt_tokens > 0 and tuned.completion_tokens <= 12


def test_length_finish_reason_and_stop_strings(engine):
    result, _ = run(engine, prompt="hello", max_new_tokens=3)
    assert (result.completion_tokens, result.finish_reason) == (3, LENGTH)
    full, _ = run(engine, prompt="hello", max_new_tokens=20)
    stop = full.text[2:4]
    assert len(stop) == 2
    cut, streamed = run(engine, prompt="hello", max_new_tokens=20, stop=(stop,))
    assert cut.text == full.text[: full.text.find(stop)] and streamed == cut.text
    assert cut.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(engine):
    first, _ = run(engine, prompt="hello", max_new_tokens=10, temperature=1.0, seed=3)
    again, _ = run(engine, prompt="hello", max_new_tokens=10, temperature=1.0, seed=3)
    assert first.text == again.text


def test_bad_adapters_are_refused_and_change_nothing(engine, tiny_model_dir, tmp_path):
    good = write_lora_adapter(tiny_model_dir, tmp_path / "good")
    engine.load_adapter("good", good)
    before, _ = run(engine, prompt="hello", max_new_tokens=8, adapter="good")

    foreign = write_lora_adapter(build_tiny_causal_lm(tmp_path / "other", seed=5), tmp_path / "foreign")
    with pytest.raises(InvalidArgument, match="trained on"):
        engine.load_adapter("foreign", foreign)
    # Claims our base model, but its tensors have another model's shapes.
    misfit = write_lora_adapter(build_tiny_causal_lm(tmp_path / "wide", hidden_size=64), tmp_path / "misfit", base_name=str(tiny_model_dir))
    with pytest.raises(InvalidArgument, match="does not fit"):
        engine.load_adapter("misfit", misfit)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArgument, match="adapter_config.json"):
        engine.load_adapter("empty", tmp_path / "empty")

    assert not {"foreign", "misfit", "empty"} & set(engine.adapters)
    assert not {"foreign", "misfit", "empty"} & set(engine.model.peft_config)
    after, _ = run(engine, prompt="hello", max_new_tokens=8, adapter="good")
    assert after.text == before.text
    with pytest.raises(NotFound):
        run(engine, prompt="hi", adapter="misfit")


def test_request_checks_name_the_field(engine):
    with pytest.raises(InvalidArgument) as caught:
        run(engine, prompt="hi", max_new_tokens=0)
    assert caught.value.violations[0].field == "sampling.max_new_tokens"
    with pytest.raises(InvalidArgument) as caught:
        run(engine)
    assert caught.value.violations[0].field == "input"
