"""Training throughput of a tunewire LoRA job on the bundled SmolLM2-135M,
against what users would otherwise run, in the same run on the same data
(prompt/completion rows of widely varying length) and hyperparameters:

- baseline: a plain Hugging Face `Trainer` + PEFT script with default
  settings (TrainingArguments defaults, padding to the longest row of each
  shuffled batch);
- for reference, the baseline with `bf16=True`, the one setting a user who
  knows the CPU computes bfloat16 natively might add;
- in-process: the training loop's own pieces (tunewire.services.training.tasks:
  model, random batches packed without padding, the loss) in one process, no
  gRPC, no Ray;
- tunewire: the job through gRPC and Ray Train, with 1 worker (the in-process
  loop's twin, for the orchestration overhead) and with 2 workers.

Throughput counts real (non-padding) tokens. The final validation loss of each
is computed the same way (token-weighted over the validation split, float32).
Model FLOPs utilisation: 4 x parameters FLOPs per token (forward, and the
backward pass's input gradients; LoRA's own weight gradients are negligible)
over the measured matmul peak of the dtype on this machine.

    .venv/bin/python -m bench.training
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

from bench.common import write_results
from tunewire.clients.local_stack import LocalStack
from tunewire.clients.sdk import DatasetClient, TrainingClient
from tunewire.services.common.models import resolve_model
from tunewire.services.common.text import row_to_messages, tokenize_for_training
from tunewire.v1 import training_pb2

BASE_MODEL = "smollm2-135m-instruct"
WORDS = "the ship sails north at dawn and the crew sings of gold silver wind rain harbour maps stars rope deck".split()


def make_rows(count: int, seed: int) -> list[dict]:
    """Questions with answers from a few words to a few hundred (log-uniform)."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        words = int(math.exp(rng.uniform(math.log(3), math.log(250))))
        answer = " ".join(rng.choice(WORDS) for _ in range(words))
        rows.append({"prompt": f"Question {i}: tell me about the voyage.", "completion": f"Arr, {answer}."})
    return rows


def hyperparameters(args, workers: int = 1) -> dict:
    """The same for every contender; batch_size is per worker, 8 rows a step in all."""
    return {
        "learning_rate": args.learning_rate,
        "epochs": 1,
        "batch_size": 8 // workers,
        "max_seq_length": 512,
        "lora_rank": 16,
        "lora_alpha": 32.0,
        "lora_dropout": 0.05,
        "warmup_fraction": 0.05,
        "seed": 0,
    }


def examples(tokenizer, rows: list[dict], max_length: int) -> list[tuple[list[int], list[int]]]:
    encoded = [tokenize_for_training(tokenizer, row_to_messages(r), max_length) for r in rows]
    return [(e.input_ids, e.labels) for e in encoded]


def validation_loss(model, tokenizer, rows: list[dict], max_length: int) -> float:
    """Token-weighted loss over `rows`, the same for every contender."""
    import torch

    from tunewire.services.training import tasks

    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            batch = tasks.collate("sft", rows[i : i + 8], tokenizer, max_length, {}, "cpu")
            total += float(model(**batch.inputs).loss) * batch.targets
            count += batch.targets
    return total / count


def matmul_peak(dtype) -> float:
    """FLOP/s of a large square matmul on this machine, all threads."""
    import torch

    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    for _ in range(3):
        a @ b
    start, runs = time.perf_counter(), 10
    for _ in range(runs):
        a @ b
    return runs * 2 * 2048**3 / (time.perf_counter() - start)


def run_trainer_baseline(model_path: str, train_rows, validation_rows, args, out: Path, bf16: bool = False) -> dict:
    """The script a user would write: Trainer defaults, PEFT LoRA, same data
    and hyperparameters (with `bf16`, the one setting a user might add)."""
    import datasets
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tunewire.services.training import tasks

    hp = hyperparameters(args)
    tokenizer = tasks.load_tokenizer(model_path)
    pairs = examples(tokenizer, train_rows, hp["max_seq_length"])
    train = datasets.Dataset.from_list([{"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)} for ids, labels in pairs])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=hp["lora_rank"],
            lora_alpha=hp["lora_alpha"],
            lora_dropout=hp["lora_dropout"],
            target_modules="all-linear",
            task_type=TaskType.CAUSAL_LM,
        ),
    )
    training_args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=hp["batch_size"],
        learning_rate=hp["learning_rate"],
        num_train_epochs=1,
        warmup_steps=max(1, int(hp["warmup_fraction"] * math.ceil(len(pairs) / hp["batch_size"]))),
        seed=0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=bf16,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = sum(len(ids) for ids, _ in pairs)
    return {
        "tokens": tokens,
        "train seconds": seconds,
        "val loss": validation_loss(model, tokenizer, validation_rows, hp["max_seq_length"]),
    }


def run_in_process(model_path: str, train_rows, validation_rows, args) -> dict:
    """tunewire's training loop pieces in one process: no gRPC, no Ray."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from tunewire.services.training import tasks
    from tunewire.services.training.config import DEFAULTS, TrainingConfig

    started = time.perf_counter()
    config = TrainingConfig.from_dict(DEFAULTS | hyperparameters(args))
    torch.manual_seed(0)
    tokenizer = tasks.load_tokenizer(model_path)
    model = tasks.load_model("sft", model_path, "lora", config, [], tokenizer, use_gpu=False)
    model.train()
    dtype = tasks.compute_dtype(config.precision, use_gpu=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batches = tasks.make_batches(train_rows, "sft", config.batch_size, random.Random(0))
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_fraction * len(batches)), len(batches))
    first_step_at = None
    tokens, step_seconds = 0, 0.0
    for rows in batches:
        step_start = time.perf_counter()
        first_step_at = first_step_at or step_start
        batch = tasks.collate("sft", rows, tokenizer, config.max_seq_length, {}, "cpu")
        with tasks.mixed_precision("cpu", dtype):
            loss = tasks.batch_loss(model, model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch.real_tokens
        step_seconds += time.perf_counter() - step_start
    return {
        "tokens": tokens,
        "train seconds": step_seconds,
        "steps": len(batches),
        "start-up seconds": first_step_at - started,
        "val loss": validation_loss(model, tokenizer, validation_rows, config.max_seq_length),
    }


def run_service_job(stack: LocalStack, dataset_id: str, workers: int, model_path: str, validation_rows, args) -> dict:
    """A job through gRPC and Ray Train; figures from its step events."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunewire.services.training import tasks

    with TrainingClient(stack.address("training"), timeout=120) as client:
        created = time.perf_counter()
        job = client.create_job(BASE_MODEL, dataset_id, hyperparameters(args, workers), num_workers=workers)
        steps = []
        for event in client.stream_events(job.id, timeout=7200):
            if event.HasField("step"):
                steps.append((time.perf_counter(), event.step))
        finished = time.perf_counter()
        job = client.get_job(job.id)
    if job.state != training_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"benchmark job {job.id} ended {training_pb2.JobState.Name(job.state)}: {job.error}")
    first_arrival, first = steps[0]
    tokenizer = tasks.load_tokenizer(model_path)
    adapter_dir = Path(stack.env["TUNEWIRE_HOME"]) / "artifacts" / "adapters" / job.adapter_id
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path), str(adapter_dir))
    return {
        "tokens": sum(s.tokens for _, s in steps),
        "train seconds": sum(s.step_seconds for _, s in steps),
        "steps": len(steps),
        # From CreateJob to the first step's start (queueing, Ray, workers, model load, base evaluation).
        "start-up seconds": first_arrival - first.step_seconds - created,
        "job seconds": finished - created,
        "val loss": validation_loss(model, tokenizer, validation_rows, 512),
    }


def main() -> None:
    import torch

    from tunewire.services.training import tasks
    from tunewire.services.training.config import DEFAULTS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path(".tunewire"), help="TUNEWIRE_HOME whose converted model is reused")
    parser.add_argument("--rows", type=int, default=176, help="training rows (one epoch)")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    args = parser.parse_args()
    home = args.home.resolve()
    model_path = resolve_model(BASE_MODEL, home / "models")
    validation_count = 24
    rows = make_rows(args.rows + validation_count, seed=0)
    train_rows, validation_rows = rows[:-validation_count], rows[-validation_count:]
    n_params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model_path).parameters())
    peaks = {dtype: matmul_peak(dtype) for dtype in (torch.float32, torch.bfloat16)}
    tunewire_dtype = tasks.compute_dtype(DEFAULTS["precision"], use_gpu=False)
    results = []

    def record(what: str, figures: dict, dtype=torch.float32) -> None:
        tokens_per_second = figures["tokens"] / figures["train seconds"]
        row = {
            "what": what,
            "dtype": str(dtype).removeprefix("torch."),
            "real tokens": figures["tokens"],
            "train s": figures["train seconds"],
            "tokens/s": tokens_per_second,
            "MFU %": 100 * 4 * n_params * tokens_per_second / peaks[dtype],
            "start-up s": figures.get("start-up seconds", 0.0),
            "val loss": figures["val loss"],
        }
        results.append(row)
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory(dir=home) as tmp:
        tmp = Path(tmp)
        record(
            "plain Trainer + PEFT, defaults (baseline)",
            run_trainer_baseline(model_path, train_rows, validation_rows, args, tmp / "trainer"),
        )
        record(
            "plain Trainer + PEFT, defaults and bf16=True",
            run_trainer_baseline(model_path, train_rows, validation_rows, args, tmp / "trainer-bf16", bf16=True),
            torch.bfloat16,
        )
        in_process = run_in_process(model_path, train_rows, validation_rows, args)
        record("tunewire loop in-process (no gRPC, no Ray)", in_process, tunewire_dtype)
        data = tmp / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
        env = {
            "TUNEWIRE_HOME": str(tmp / "home"),
            "TUNEWIRE_MODEL_CACHE": str(home / "models"),
            "TUNEWIRE_DATASET_PORT": "50194",
            "TUNEWIRE_TRAINING_PORT": "50195",
        }
        with LocalStack(env=env, services=("dataset", "training"), log_dir=tmp / "logs") as stack:
            with DatasetClient(stack.address("dataset"), timeout=600) as datasets:
                # The bench evaluates on its own validation rows; the job validates on 1 row.
                dataset = datasets.upload(data, name="bench", split={"validation_count": 1, "test_count": 0}).dataset
            for workers in (1, 2):
                record(
                    f"tunewire job: gRPC + Ray Train, {workers} worker(s)",
                    run_service_job(stack, dataset.id, workers, model_path, validation_rows, args),
                    tunewire_dtype,
                )

    baseline = results[0]["tokens/s"]
    for row in results:
        row["x baseline"] = row["tokens/s"] / baseline
    one_worker = results[3]
    write_results(
        "training",
        results,
        notes=(
            f"SmolLM2-135M-Instruct ({n_params / 1e6:.0f}M parameters), LoRA rank 16 on every linear layer, 8 rows a step, "
            f"1 epoch of {len(train_rows)} rows ({results[0]['real tokens']:,} real tokens), lr {args.learning_rate}; "
            "tunewire's precision=auto (bfloat16 autocast where the CPU computes bfloat16 natively, float32 weights). "
            f"Matmul peak measured here: {peaks[torch.float32] / 1e9:.0f} GFLOP/s float32, {peaks[torch.bfloat16] / 1e9:.0f} bfloat16; "
            "MFU is against the peak of the row's dtype. Orchestration overhead, 1 worker vs in-process: "
            f"{100 * (one_worker['train s'] / one_worker['real tokens'] / (in_process['train seconds'] / in_process['tokens']) - 1):+.1f}% "
            f"per token of training, {one_worker['start-up s'] - in_process['start-up seconds']:+.1f}s of start-up."
        ),
    )


if __name__ == "__main__":
    main()
