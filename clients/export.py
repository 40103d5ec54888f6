"""A downloaded adapter turned into what tools without PEFT run: a full
model with the adapter's weights merged in (PEFT's `merge_and_unload`),
saved with its tokenizer as a plain transformers directory; or a GGUF LoRA
file for llama.cpp and the tools built on it.

Needs torch, transformers, peft and gguf (the server stack), imported here only.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path


def adapter_config(adapter_dir: Path) -> dict:
    """The adapter's adapter_config.json; a full fine-tune (a whole model,
    with no adapter config) is refused with what to do instead."""
    path = adapter_dir / "adapter_config.json"
    if not path.exists():
        raise ValueError(
            f"{adapter_dir.name} is a whole model (a full fine-tune), not an adapter: load it with transformers "
            "(AutoModelForCausalLM.from_pretrained), or convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    return json.loads(path.read_text())


def base_model_of(adapter_dir: Path) -> str:
    """The name the adapter gives its base model, as tunewire loads it: a
    bundled model's Hugging Face id maps back to the bundled copy."""
    from tunewire.services.common.models import BUNDLED_MODELS

    name = adapter_config(adapter_dir).get("base_model_name_or_path") or ""
    if not name:
        raise ValueError(f"{adapter_dir}/adapter_config.json names no base model (base_model_name_or_path)")
    return next((bundled.name for bundled in BUNDLED_MODELS.values() if bundled.hub_id == name), name)


def merge_adapter(adapter_dir: Path, out_dir: Path, model_cache: Path) -> Path:
    """Writes the base model with the adapter merged into `out_dir` (which
    must not exist; it appears only once whole) and returns it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists: give a new directory for the merged model")
    config = adapter_config(adapter_dir)
    base_path = _base_model_path(base_model_of(adapter_dir), model_cache)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    if config.get("task_type") == "SEQ_CLS":
        metadata = adapter_dir / "tunewire_adapter.json"
        labels = json.loads(metadata.read_text()).get("labels", []) if metadata.exists() else []
        base = AutoModelForSequenceClassification.from_pretrained(
            base_path, num_labels=len(labels) or 2, id2label=dict(enumerate(labels)) or None, torch_dtype=torch.float32
        )
        base.config.pad_token_id = tokenizer.pad_token_id
    else:
        base = AutoModelForCausalLM.from_pretrained(base_path, torch_dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


# Hugging Face architectures whose LoRA tensors llama.cpp names as its "llama"
# architecture; its converter reorders the rows of q_proj and k_proj for its
# rotary embedding, so their LoRA B matrices are reordered the same way.
GGUF_LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


def adapter_to_gguf(adapter_dir: Path, out_file: Path, model_cache: Path) -> Path:
    """Writes a LoRA adapter of a Llama-family causal LM as a GGUF LoRA file
    for llama.cpp (`llama-server --lora`, Ollama's ADAPTER) and returns it.
    The base model's weights are not read, only its config (a bundled model
    is converted once, as the services do). Each module's PEFT scaling
    (alpha/r, rsLoRA, alpha patterns) is folded into its B matrix and the
    file's alpha is 0, which llama.cpp reads as "scale 1": the file then
    applies the update PEFT does, whatever the scaling rule. `out_file`
    appears only once whole; what a GGUF LoRA file cannot hold is refused
    (ValueError) rather than left out."""
    import gguf
    from peft.utils.other import get_pattern_key
    from safetensors.torch import load_file

    from tunewire.services.inference.lora import UNSUPPORTED_LORA_OPTIONS

    if out_file.exists():
        raise FileExistsError(f"{out_file} exists: give a new file name for the GGUF adapter")
    config = adapter_config(adapter_dir)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config.get('peft_type')} adapter: llama.cpp runs LoRA adapters only")
    for option, what in UNSUPPORTED_LORA_OPTIONS.items():
        if config.get(option):
            raise ValueError(f"the adapter uses {what} ({option}), which llama.cpp's LoRA files cannot hold")
    if config.get("task_type") not in (None, "CAUSAL_LM"):  # None: saved without one, as causal LMs often are
        raise ValueError(f"{config.get('task_type')} adapter: llama.cpp runs adapters of causal language models (generation) only")
    if config.get("modules_to_save"):
        raise ValueError(f"the adapter also trains whole modules ({config['modules_to_save']}), which a GGUF LoRA file cannot hold")
    base = _base_config(base_model_of(adapter_dir), model_cache)
    architecture = (base.get("architectures") or ["unknown"])[0]
    if architecture not in GGUF_LLAMA_ARCHITECTURES:
        raise ValueError(
            f"base model architecture {architecture}: GGUF export covers {', '.join(GGUF_LLAMA_ARCHITECTURES)}; "
            "llama.cpp's convert_lora_to_gguf.py converts others"
        )
    heads = base["num_attention_heads"]
    kv_heads = base.get("num_key_value_heads") or heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, base["num_hidden_layers"])
    alphas = config.get("alpha_pattern") or {}
    weights = load_file(adapter_dir / "adapter_model.safetensors")

    tensors = []
    for key in sorted(weights):
        if key.endswith(".lora_B.weight") and key.replace(".lora_B.", ".lora_A.") in weights:
            continue  # taken with its A
        if not key.endswith(".lora_A.weight") or key.replace(".lora_A.", ".lora_B.") not in weights:
            raise ValueError(f"{key}: not half of a LoRA A/B pair, which is all a GGUF LoRA file holds")
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        name = names.get_name(module)
        if name is None or (name == "output" and base.get("tie_word_embeddings")):
            raise ValueError(f"{module}: llama.cpp's {architecture} has no separate weight for this module to adapt")
        a = weights[key].float()
        b = weights[key.replace(".lora_A.", ".lora_B.")].float()
        alpha = alphas.get(get_pattern_key(list(alphas), module), config["lora_alpha"])
        rank = a.shape[0]
        b = b * (alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank)
        if module.endswith("q_proj"):
            b = _rope_rows(b, heads)
        elif module.endswith("k_proj"):
            b = _rope_rows(b, kv_heads)
        tensors += [(f"{name}.weight.lora_a", a), (f"{name}.weight.lora_b", b)]
    if not tensors:
        raise ValueError(f"{adapter_dir.name}/adapter_model.safetensors holds no LoRA tensors")

    out_file.parent.mkdir(parents=True, exist_ok=True)
    staging = out_file.with_name(f".{out_file.name}.partial")
    writer = gguf.GGUFWriter(staging, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
        writer.add_name(adapter_dir.name)
        for name, tensor in tensors:
            writer.add_tensor(name, tensor.contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        staging.rename(out_file)
    finally:
        writer.close()
        staging.unlink(missing_ok=True)
    return out_file


def _base_config(name: str, model_cache: Path) -> dict:
    """The base model's config (transformers' AutoConfig: a directory's
    config.json, or a hub id's config file alone)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(_base_model_path(name, model_cache)).to_dict()
    except OSError as error:
        raise ValueError(f"the base model {name}'s config cannot be read on this machine ({error})") from None


def _base_model_path(name: str, model_cache: Path) -> str:
    """What from_pretrained loads for the base model, as the services resolve
    it; a ValueError that says why where it is not on this machine."""
    from tunewire.services.common.errors import TunewireError
    from tunewire.services.common.models import resolve_model

    try:
        return resolve_model(name, model_cache)
    except TunewireError as error:
        raise ValueError(f"the base model {name} cannot be loaded on this machine: {error}") from None


def _rope_rows(weight, heads: int):
    """The rows of a q or k projection in llama.cpp's order: within each head,
    Hugging Face's two rotary halves interleaved (its converter's `permute`)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
