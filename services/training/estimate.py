"""What a job would take, before any training: tokens, steps, parameters,
memory per worker and, from earlier jobs' measured throughput, time."""

from __future__ import annotations

from pathlib import Path

from tunewire.services.training.config import CLASSIFY, FULL, TASK_OF_FORMAT, SearchPlan, TrainingConfig

SAMPLE_ROWS = 2000
BYTES_PER_PARAMETER = 4  # float32 weights


def estimate_job(
    spec,
    dataset,
    workers: int,
    config: TrainingConfig,
    measured_tokens_per_second: float,
    model_cache: Path | None = None,
    plan: SearchPlan | None = None,
) -> dict:
    from tunewire.services.common.models import TRANSFORMERS_IMPORT_LOCK, loading_requested_model, resolve_model

    with TRANSFORMERS_IMPORT_LOCK:
        from transformers import AutoConfig
    from tunewire.services.training import general, tasks
    from tunewire.services.training.recipe import RETENTION_PER_ROW, read_split

    task = TASK_OF_FORMAT[dataset.format]
    with loading_requested_model(spec.base_model, "spec.base_model"):
        path = resolve_model(spec.base_model, model_cache or Path.home() / ".cache" / "tunewire" / "models")
        tokenizer = tasks.load_tokenizer(path)
        model_config = AutoConfig.from_pretrained(path)
    rows = read_split(dataset.uri, "train", SAMPLE_ROWS)
    sample_tokens = 0
    for start in range(0, len(rows), 64):
        batch = tasks.collate(
            task, rows[start : start + 64], tokenizer, config.max_seq_length, {label: i for i, label in enumerate(dataset.labels)}, "cpu"
        )
        sample_tokens += batch.real_tokens
    train_tokens = round(sample_tokens * dataset.train_rows / max(len(rows), 1))
    # Each batch of a generative task also carries the base model's general answers (retention).
    retention_tokens = 0
    if task != CLASSIFY and config.retention_weight > 0:
        prompts = general.retention_prompts()
        per_example = sum(len(general.prompt_ids(tokenizer, p)) for p in prompts) / len(prompts) + general.RETENTION_ANSWER_TOKENS
        retention_tokens = round(dataset.train_rows * RETENTION_PER_ROW * per_example)

    parameters, trainable = count_parameters(model_config, task, spec.method, config, len(dataset.labels))
    steps = config.steps_per_epoch(dataset.train_rows, workers) * config.epochs
    hidden = getattr(model_config, "hidden_size", 0)
    layers = getattr(model_config, "num_hidden_layers", 0)
    tokens_per_batch = config.batch_size * min(config.max_seq_length, max(1, train_tokens // max(dataset.train_rows, 1)) * 2)
    # Roughly 16 saved values per hidden unit per layer per token of activations.
    activations = tokens_per_batch * hidden * layers * 16 * BYTES_PER_PARAMETER // (4 if config.gradient_checkpointing else 1)
    memory = weights_bytes(parameters, trainable, config.ema_decay > 0) + activations
    tokens_to_process = (train_tokens + retention_tokens) * config.epochs
    trials = len(plan.candidates) if plan else 1
    if measured_tokens_per_second > 0:
        eta = tokens_to_process / measured_tokens_per_second
        basis = f"measured {measured_tokens_per_second:,.0f} tokens/s on earlier jobs of this model, method and worker count"
        if plan and plan.time_bounds_first_trial:
            # The scheduler stops trailing trials early: this is the most it takes.
            eta = min(eta * trials, plan.max_seconds)
            basis += f"; at most {trials} trials within the search's {plan.max_seconds} s"
        elif plan:
            eta = max(eta, min(eta * trials, plan.max_seconds))
            basis += (
                f"; the first of {trials} trials takes its whole schedule, the others start while the search's {plan.max_seconds} s last"
            )
    else:
        eta, basis = 0.0, "no earlier job of this model, method and worker count has run yet: no throughput measured"
    return {
        "train_rows": dataset.train_rows,
        "train_tokens": train_tokens,
        "steps": steps,
        "parameters": parameters,
        "trainable_parameters": trainable,
        "memory_bytes_per_worker": int(memory),
        "eta_seconds": eta,
        "measured_tokens_per_second": measured_tokens_per_second,
        "eta_basis": basis,
        "trials": trials,
        "search_max_seconds": plan.max_seconds if plan else 0,
    }


def count_parameters(model_config, task: str, method: str, config: TrainingConfig, labels: int = 0) -> tuple[int, int]:
    """The model's parameters and the trainable part of them, built on the
    meta device: no weights are allocated or read."""
    import torch

    from tunewire.services.common.models import TRANSFORMERS_IMPORT_LOCK
    from tunewire.services.training import tasks

    with TRANSFORMERS_IMPORT_LOCK:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    with torch.device("meta"):
        if task == CLASSIFY:
            model_config.num_labels = max(2, labels)
            model = AutoModelForSequenceClassification.from_config(model_config)
        else:
            model = AutoModelForCausalLM.from_config(model_config)
        parameters = sum(p.numel() for p in model.parameters())
        if method == FULL:
            return parameters, parameters
        model = tasks.load_peft(model, task, config)
        return parameters, sum(p.numel() for p in model.parameters() if p.requires_grad)


def weights_bytes(parameters: int, trainable: int, averaged: bool = False) -> int:
    """What a worker holds for the weights alone, before any activation:
    float32 weights, and the trainable part's gradients and Adam's two
    moments; with the weights' average (ema_decay), that average and the
    live weights set aside while it is validated."""
    return parameters * BYTES_PER_PARAMETER + trainable * BYTES_PER_PARAMETER * (5 if averaged else 3)
