"""The training loop each Ray Train worker runs: LoRA on a causal LM, loss on
completion tokens only, gradients averaged across workers (DDP).

Rank 0 sends step metrics and evaluations to the orchestrator through the
`progress` queue, and reports the finished adapter as a Ray Train checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

ADAPTER_METADATA = "tunewire_adapter.json"


def train_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    from tunewire.services.common.models import resolve_model
    from tunewire.services.training.config import TrainingConfig

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # Ray gives each worker a CPU slot; let torch use this node's cores among its workers.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, context.get_local_world_size())))
    config = TrainingConfig.from_dict(loop_config["training"])
    progress = loop_config["progress"]
    torch.manual_seed(config.seed)

    def send(kind: str, data: dict) -> None:
        if rank == 0:
            progress.put({"kind": kind, "data": data})

    model_path = resolve_model(loop_config["base_model"], Path(loop_config["model_cache"]))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules if config.lora_target_modules != ["all-linear"] else "all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    peft_model = model
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    total_steps = loop_config["total_steps"]
    steps_per_epoch = loop_config["steps_per_epoch"]
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_fraction * total_steps), total_steps)

    def global_sum(*values: float) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def batches(shard_name: str):
        shard = ray.train.get_dataset_shard(shard_name)
        for table in shard.iter_batches(batch_size=config.batch_size, batch_format="pyarrow"):
            yield collate(table.to_pylist(), tokenizer, config.max_seq_length, device)

    def evaluate(step: int) -> None:
        if not loop_config["has_validation"]:
            return
        model.eval()
        loss_sum = tokens = 0.0
        with torch.no_grad():
            for batch in batches("validation"):
                n = float((batch["labels"][:, 1:] != -100).sum())
                loss_sum += float(model(**batch).loss) * n
                tokens += n
        model.train()
        loss_sum, tokens = global_sum(loss_sum, tokens)
        if tokens:
            loss = loss_sum / tokens
            send("eval", {"split": "validation", "loss": loss, "perplexity": math.exp(min(loss, 50)), "step": step})

    model.train()
    step, started = 0, time.monotonic()
    send(
        "log",
        {"message": f"model {loop_config['base_model']} loaded; {peft_model.get_nb_trainable_parameters()[0]:,} trainable parameters"},
    )
    for epoch in range(config.epochs):
        for batch in batches("train"):
            step_start = time.monotonic()
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            trained = float((batch["labels"][:, 1:] != -100).sum())
            loss_sum, trained, real_tokens = global_sum(loss.item() * trained, trained, float(batch["attention_mask"].sum()))
            elapsed = time.monotonic() - started
            send(
                "step",
                {
                    "step": step,
                    "total_steps": total_steps,
                    "epoch": epoch + min(1.0, (step - epoch * steps_per_epoch) / steps_per_epoch),
                    "loss": loss_sum / max(trained, 1),
                    "learning_rate": scheduler.get_last_lr()[0],
                    "tokens_per_second": real_tokens / max(time.monotonic() - step_start, 1e-9),
                    "eta_seconds": elapsed / step * max(total_steps - step, 0),
                },
            )
        evaluate(step)

    metrics = {"steps": step, "train_seconds": time.monotonic() - started}
    if rank == 0:
        with tempfile.TemporaryDirectory() as out:
            # The adapter names its base model as the job did, not by this worker's cache path.
            peft_model.peft_config["default"].base_model_name_or_path = loop_config["base_model"]
            peft_model.save_pretrained(out)
            Path(out, ADAPTER_METADATA).write_text(
                json.dumps({"job_id": loop_config["job_id"], "base_model": loop_config["base_model"], **metrics}, indent=2)
            )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(out))
    else:
        ray.train.report(metrics)


def collate(rows: list[dict], tokenizer, max_length: int, device):
    """Tokenised rows padded to the longest in the batch."""
    import torch

    from tunewire.services.common.text import IGNORE_INDEX, row_to_messages, tokenize_for_training

    examples = [tokenize_for_training(tokenizer, row_to_messages(row), max_length) for row in rows]
    width = max(len(e.input_ids) for e in examples)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention[i, :n] = 1
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": attention.to(device)}
