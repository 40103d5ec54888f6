"""Completion-only labels, with and without a chat template."""

import pytest

from tunewire.services.common.text import IGNORE_INDEX, prompt_text, row_to_messages, tokenize_for_training

from conftest import build_tiny_causal_lm


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX])


def test_loss_only_on_the_completion(tokenizer):
    messages = row_to_messages({"prompt": "What is 2 plus 2?", "completion": "Arr, 4."})
    example = tokenize_for_training(tokenizer, messages, max_length=256)
    assert trained_text(tokenizer, example) == "Arr, 4.<|im_end|>\n"
    assert "What is" in tokenizer.decode(example.input_ids)
    assert example.labels[0] == IGNORE_INDEX


def test_every_assistant_turn_of_a_chat_is_trained(tokenizer):
    messages = [
        {"role": "system", "content": "pirate"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Arr"},
        {"role": "user", "content": "world"},
        {"role": "assistant", "content": "ho"},
    ]
    example = tokenize_for_training(tokenizer, messages, max_length=256)
    assert trained_text(tokenizer, example) == "Arr<|im_end|>\nho<|im_end|>\n"


def test_truncation_keeps_labels_aligned(tokenizer):
    example = tokenize_for_training(tokenizer, row_to_messages({"prompt": "the quick brown fox " * 20, "completion": "x"}), max_length=16)
    assert len(example.input_ids) == len(example.labels) == 16


def test_without_a_chat_template_prompt_and_completion_are_joined(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_causal_lm(tmp_path, chat_template=False))
    example = tokenize_for_training(tokenizer, row_to_messages({"prompt": "hello ", "completion": "world"}), 64)
    assert trained_text(tokenizer, example).lstrip() == "world<|im_end|>"
    assert prompt_text(tokenizer, None, "hello ", raw=False) == "hello "


def test_generation_prompt_matches_training_prefix(tokenizer):
    text = prompt_text(tokenizer, None, "What is 2 plus 2?", raw=False)
    full = tokenizer.decode(
        tokenize_for_training(tokenizer, row_to_messages({"prompt": "What is 2 plus 2?", "completion": "Arr"}), 256).input_ids
    )
    assert full.startswith(text) and text.endswith("<|im_start|>assistant\n")
