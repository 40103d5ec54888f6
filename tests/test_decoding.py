"""Greedy decoding (decoding.greedy_answers) against transformers' generate."""

import torch

from tunewire.services.training import decoding, tasks


def _model(path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _prompts(tokenizer):
    words = ["Name a colour.", "What is two plus two? Answer briefly, please.", "Hi", "Tell me about the sea and the sky at night."]
    return [tokenizer(w)["input_ids"] for w in words]


def test_greedy_answers_are_generates_tokens_for_a_padded_batch(tiny_model_dir):
    tokenizer = tasks.load_tokenizer(str(tiny_model_dir))
    model = _model(tiny_model_dir)
    prompts = _prompts(tokenizer)
    ours = decoding.greedy_answers(model, tokenizer, prompts, 12, "cpu", batch_size=3)
    stops = decoding.stop_ids(model, tokenizer)
    for prompt, answer in zip(prompts, ours, strict=True):
        # One prompt at a time: no padding, so nothing the batch could change.
        generated = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        tokens = generated[0, len(prompt) :].tolist()
        ended = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
        assert answer == tokens[:ended]


def test_done_ends_one_answer_and_leaves_the_others_as_they_were(tiny_model_dir):
    tokenizer = tasks.load_tokenizer(str(tiny_model_dir))
    model = _model(tiny_model_dir)
    prompts = _prompts(tokenizer)
    full = decoding.greedy_answers(model, tokenizer, prompts, 10, "cpu")
    cut = decoding.greedy_answers(model, tokenizer, prompts, 10, "cpu", done=lambda i, tokens: i == 1 and len(tokens) == 2)
    assert cut[1] == full[1][:2]
    assert [a for i, a in enumerate(cut) if i != 1] == [a for i, a in enumerate(full) if i != 1]
    assert model.training is False


def test_a_model_with_a_recurrent_state_answers_through_generate(tiny_model_dir):
    """Mamba's cache is a state, not keys and values the loop could drop rows
    from: its answers come from generate, cut where the loop would end them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tasks.load_tokenizer(str(tiny_model_dir))
    config = AutoConfig.for_model(
        "mamba", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, state_size=4, expand=2, conv_kernel=4, use_mambapy=True
    )
    torch.manual_seed(0)
    mamba = AutoModelForCausalLM.from_config(config).eval()
    assert not decoding._keys_and_values_only(mamba) and decoding._keys_and_values_only(_model(tiny_model_dir))
    prompts = _prompts(tokenizer)
    ours = decoding.greedy_answers(mamba, tokenizer, prompts, 6, "cpu", done=lambda i, tokens: i == 0 and len(tokens) == 3)
    stops = decoding.stop_ids(mamba, tokenizer)
    for i, (prompt, answer) in enumerate(zip(prompts, ours, strict=True)):
        generated = mamba.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        tokens = generated[0, len(prompt) :].tolist()
        ended = 3 if i == 0 else next((k + 1 for k, t in enumerate(tokens) if t in stops), len(tokens))
        assert answer == tokens[:ended]
