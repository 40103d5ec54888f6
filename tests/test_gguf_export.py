"""GGUF export of LoRA adapters for llama.cpp: the file holds, for every
adapted module, the update PEFT applies, in llama.cpp's tensor names and row
order. (bench.inference runs such files in llama-server beside tunewire.)"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch

from tunewire.clients.export import adapter_to_gguf


def make_adapter(model_dir: Path, out: Path, **lora) -> tuple[Path, dict[str, torch.Tensor]]:
    """A LoRA adapter on every linear layer with random A and B, and the
    weight update PEFT applies for each module (by module name)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(target_modules="all-linear", init_lora_weights=False, **{"task_type": "CAUSAL_LM", **lora}),
    )
    model.save_pretrained(out)
    deltas = {
        name.removeprefix("base_model.model."): module.get_delta_weight("default")
        for name, module in model.named_modules()
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})
    }
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir)
    return out, deltas


def hf_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undoes llama.cpp's rotary row order (the inverse of its converter's permute)."""
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@pytest.mark.parametrize(
    "lora",
    [
        {"r": 4, "lora_alpha": 8},
        # rsLoRA and a per-module alpha: each module's own scaling goes into its B
        # (and an adapter saved with no task type, as causal LM adapters often are).
        {"r": 4, "lora_alpha": 8, "use_rslora": True, "alpha_pattern": {"v_proj": 3.0}, "task_type": None},
    ],
    ids=["alpha-over-r", "rslora-with-alpha-pattern"],
)
def test_each_module_carries_the_update_peft_applies(tiny_model_dir, tmp_path, lora):
    adapter_dir, deltas = make_adapter(tiny_model_dir, tmp_path / "adapter", **lora)
    out = adapter_to_gguf(adapter_dir, tmp_path / "adapter.gguf", tmp_path / "models")
    assert out.exists() and not list(tmp_path.glob(".*.partial"))

    reader = gguf.GGUFReader(out)

    def field(key: str):
        return reader.fields[key].contents()

    assert field("general.architecture") == "llama" and field("general.type") == "adapter"
    assert field("adapter.type") == "lora" and field("adapter.lora.alpha") == 0.0  # llama.cpp: scale 1
    tensors = {t.name: torch.from_numpy(t.data.copy()).float() for t in reader.tensors}
    config = json.loads((tiny_model_dir / "config.json").read_text())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    assert len(tensors) == 2 * len(deltas) == 2 * 7 * config["num_hidden_layers"]
    for module, delta in deltas.items():
        name = names.get_name(module) + ".weight"
        update = tensors[f"{name}.lora_b"] @ tensors[f"{name}.lora_a"]
        if module.endswith("q_proj"):
            update = hf_rows(update, config["num_attention_heads"])
        elif module.endswith("k_proj"):
            update = hf_rows(update, config["num_key_value_heads"])
        torch.testing.assert_close(update, delta.float(), rtol=1e-5, atol=1e-6, msg=module)
    # The q and k rows really are reordered (a GQA model: k has fewer heads).
    q = names.get_name("model.layers.0.self_attn.q_proj") + ".weight.lora_b"
    assert not torch.equal(tensors[q] @ tensors[q.replace("lora_b", "lora_a")], deltas["model.layers.0.self_attn.q_proj"].float())


def test_what_llama_cpp_cannot_run_is_refused_plainly(tiny_model_dir, tmp_path):
    adapter_dir, _ = make_adapter(tiny_model_dir, tmp_path / "adapter", r=4, lora_alpha=8)
    existing = tmp_path / "taken.gguf"
    existing.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        adapter_to_gguf(adapter_dir, existing, tmp_path / "models")
    assert existing.read_bytes() == b"keep"

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    other_architecture = tmp_path / "qwen-like"
    other_architecture.mkdir()
    base_config = json.loads((tiny_model_dir / "config.json").read_text())
    (other_architecture / "config.json").write_text(json.dumps({**base_config, "architectures": ["Qwen2ForCausalLM"]}))
    for change, reason in (
        ({"use_dora": True}, "DoRA"),
        ({"lora_bias": True}, "LoRA bias"),
        ({"task_type": "SEQ_CLS"}, "causal language models"),
        ({"modules_to_save": ["score"]}, "whole modules"),
        ({"base_model_name_or_path": str(other_architecture)}, "architecture Qwen2ForCausalLM"),
        ({"base_model_name_or_path": str(tmp_path / "nowhere")}, "on this machine"),
    ):
        (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=reason):
            adapter_to_gguf(adapter_dir, tmp_path / "refused.gguf", tmp_path / "models")
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))

    # A tensor that is not half of an A/B pair is refused, not left out.
    from safetensors.torch import load_file, save_file

    weights = load_file(adapter_dir / "adapter_model.safetensors")
    weights["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 8)
    save_file(weights, adapter_dir / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="lora_embedding_A: not half of a LoRA A/B pair"):
        adapter_to_gguf(adapter_dir, tmp_path / "refused.gguf", tmp_path / "models")

    whole_model = tmp_path / "full-fine-tune"
    whole_model.mkdir()
    (whole_model / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="whole model"):
        adapter_to_gguf(whole_model, tmp_path / "whole.gguf", tmp_path / "models")
