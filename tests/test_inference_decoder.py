"""The lean decoding pass (decoder.py) against transformers' own forward:
the same logits and cache through a left-padded prefill, decoding steps and
a chunk appended to a cache, for each family it covers; other models keep
transformers' forward."""

from __future__ import annotations

import pytest
import torch

from tunewire.services.inference.decoder import LlamaDecoderPass, _attention_mask
from tunewire.services.inference.kv_cache import new_cache


def tiny(family: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    # Six query heads over two key/value heads: groups of three.
    common = {"vocab_size": 64, "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 6}
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2)).eval()
    if family == "llama-biased-mha":  # biases on every projection, as many heads for keys as for queries
        return LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=6, attention_bias=True, mlp_bias=True)).eval()
    if family == "qwen2":  # biases on q, k and v
        return Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2)).eval()
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4)).eval()


def transformers_logits(model, ids, mask, positions, cache) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True).logits[:, -1]


@pytest.mark.parametrize("family", ["llama", "llama-biased-mha", "qwen2"])
def test_the_lean_pass_gives_transformers_logits_and_cache(family):
    model = tiny(family)
    lean = LlamaDecoderPass.for_model(model)
    assert lean is not None
    layers = model.config.num_hidden_layers
    ours, theirs = new_cache(layers), new_cache(layers)
    # A batch with a left-padded row, as the engine prefills newcomers.
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.inference_mode():
        got, want = lean(ids, mask, positions, ours), transformers_logits(model, ids, mask, positions, theirs)
        assert torch.isfinite(got).all()
        assert torch.allclose(got, want, atol=1e-5)
        for step in range(3):  # decoding steps, one token a row
            tokens = got.argmax(dim=-1)[:, None]
            mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
            positions = mask.sum(dim=1, keepdim=True) - 1
            got, want = lean(tokens, mask, positions, ours), transformers_logits(model, tokens, mask, positions, theirs)
            assert torch.allclose(got, want, atol=1e-5), step
        for mine, other in zip(ours.layers, theirs.layers, strict=True):
            real = mask.bool()[:, None, :, None]
            assert torch.allclose(mine.keys.masked_fill(~real, 0), other.keys.masked_fill(~real, 0), atol=1e-5)
            assert torch.allclose(mine.values.masked_fill(~real, 0), other.values.masked_fill(~real, 0), atol=1e-5)
        # A chunk of several tokens appended to one row's cache (a chunked prefill's later chunk).
        ours, theirs = new_cache(layers), new_cache(layers)
        first, second = torch.arange(20, 25)[None], torch.arange(30, 34)[None]
        lean(first, torch.ones(1, 5, dtype=torch.long), torch.arange(5)[None], ours)
        transformers_logits(model, first, torch.ones(1, 5, dtype=torch.long), torch.arange(5)[None], theirs)
        mask, positions = torch.ones(1, 9, dtype=torch.long), torch.arange(5, 9)[None]
        assert torch.allclose(lean(second, mask, positions, ours), transformers_logits(model, second, mask, positions, theirs), atol=1e-5)


def test_a_padding_position_sees_itself_alone_and_a_real_one_the_real_tokens_up_to_itself():
    mask = _attention_mask(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]), new=3)
    assert mask.shape == (2, 1, 3, 4)
    assert mask[0, 0].tolist() == [[False, True, False, False], [False, False, True, False], [False, False, True, True]]
    assert mask[1, 0].tolist() == [[True, True, False, False], [True, True, True, False], [True, True, True, True]]
    # One new token a row: every real position, nothing else.
    assert _attention_mask(torch.tensor([[0, 1, 1]]), new=1).tolist() == [[[[False, True, True]]]]


def test_models_it_does_not_cover_or_does_not_match_keep_transformers_forward(monkeypatch):
    assert LlamaDecoderPass.for_model(tiny("gpt2")) is None
    model = tiny("llama")
    # A pass whose logits were wrong for this model is not used.
    monkeypatch.setattr(LlamaDecoderPass, "__call__", lambda self, ids, *rest: torch.zeros(ids.shape[0], 64))
    assert LlamaDecoderPass.for_model(model) is None
