"""A downloaded adapter turned into what tools without PEFT run: a full
model with the adapter's weights merged in (PEFT's `merge_and_unload`),
saved with its tokenizer as a plain transformers directory.

Needs torch, transformers and peft (the server stack), imported here only.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path


def base_model_of(adapter_dir: Path) -> str:
    """The name the adapter gives its base model, as tunewire loads it: a
    bundled model's Hugging Face id maps back to the bundled copy."""
    from tunewire.services.common.models import BUNDLED_MODELS

    name = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    if not name:
        raise ValueError(f"{adapter_dir}/adapter_config.json names no base model (base_model_name_or_path)")
    return next((bundled.name for bundled in BUNDLED_MODELS.values() if bundled.hub_id == name), name)


def merge_adapter(adapter_dir: Path, out_dir: Path, model_cache: Path) -> Path:
    """Writes the base model with the adapter merged into `out_dir` (which
    must not exist; it appears only once whole) and returns it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from tunewire.services.common.models import resolve_model

    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists: give a new directory for the merged model")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    base_path = resolve_model(base_model_of(adapter_dir), model_cache)
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
