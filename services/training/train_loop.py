"""The training loop each Ray Train worker runs.

Every worker holds a replica of the model (LoRA or full, DDP across workers),
reads its shard of the train and validation splits through Ray Data, and
trains on random batches, packed so that no compute goes to padding
(`tasks.collate`). Validation runs every
eval_every_steps (or each epoch); a better validation loss writes a checkpoint
(the latest checkpoint is always the best so far), and early stopping ends
training after `early_stopping_patience` evaluations without improvement. The
best weights are published, with an evaluation of base and fine-tuned model on
the test split. Decisions every worker must agree on (stop, cancel) travel in
the same all-reduce as the step's metrics.

Rank 0 sends progress through the `progress` queue and watches the `control`
queue for a cancellation.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

ADAPTER_METADATA = "tunewire_adapter.json"
EVALUATION_FILE = "evaluation.json"
STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SHUFFLE_WINDOW = 16  # batches read ahead and shuffled, for shards kept out of memory
MAX_TEST_ROWS = 256
# A worker keeps a split's shard in memory up to this many rows: later epochs
# and validations then skip Ray Data (a new streaming execution each time,
# seconds of start-up and CPU taken from training), and batches are drawn
# from the whole shard.
MAX_CACHED_ROWS = 20_000


class JobInputError(Exception):
    """The job's own inputs are at fault (model, data, hyperparameters): the
    orchestrator reports it as a user error, with what to change."""


@dataclass
class TrainState:
    """What a resumed run needs besides weights and optimizer."""

    step: int = 0
    epoch: int = 0
    best_loss: float = math.inf
    best_step: int = 0
    evals_since_best: int = 0
    stopped_early: bool = False
    base_metrics: dict = field(default_factory=dict)
    reference_perplexity_before: float = 0.0


def list_checkpoints(artifacts, job_id: str) -> list[dict]:
    """A job's checkpoints in the store, oldest first: step, validation_loss,
    uri and modification time (runs are <root>/ray/<job>.<attempt>/)."""
    fs = artifacts.fs
    found = []
    for state_file in fs.glob(f"{artifacts.path('ray')}/{job_id}.*/checkpoint_*/{STATE_FILE}"):
        state = json.loads(fs.cat_file(state_file))
        found.append(
            {
                "step": state["step"],
                "validation_loss": state.get("validation_loss") or 0.0,
                "uri": state_file.rsplit("/", 1)[0],
                "modified": fs.modified(state_file),
            }
        )
    return sorted(found, key=lambda c: (c["step"], c["modified"]))


def read_split(uri: str, split: str, limit: int) -> list[dict]:
    """Up to `limit` rows of one split, read straight from the artifact store."""
    import fsspec
    import pyarrow.parquet as pq

    rows: list[dict] = []
    with fsspec.open(uri, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
            rows += [r for r in batch.to_pylist() if r["split"] == split]
            if len(rows) >= limit:
                break
    return rows[:limit]


def train_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from transformers import get_linear_schedule_with_warmup

    from tunewire.services.common.artifacts import ArtifactStore
    from tunewire.services.common.errors import TunewireError
    from tunewire.services.common.models import resolve_model
    from tunewire.services.training import tasks
    from tunewire.services.training.config import CLASSIFY, TrainingConfig

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # Ray gives each worker a CPU slot; let torch use this node's cores among its workers.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, context.get_local_world_size())))
    config = TrainingConfig.from_dict(loop_config["training"])
    task, method = loop_config["task"], loop_config["method"]
    progress, control = loop_config["progress"], loop_config["control"]
    labels = loop_config.get("labels") or []
    label_ids = {label: i for i, label in enumerate(labels)}
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed + rank)

    def send(kind: str, data: dict) -> None:
        if rank == 0:
            progress.put({"kind": kind, "data": data})

    try:
        model_path = resolve_model(loop_config["base_model"], Path(loop_config["model_cache"]))
        tokenizer = tasks.load_tokenizer(model_path)
        model = tasks.load_model(task, model_path, method, config, labels, tokenizer, loop_config["use_gpu"])
    except (OSError, ValueError, TunewireError) as exc:
        raise JobInputError(f"cannot load base model {loop_config['base_model']!r}: {exc}") from exc
    device = ray.train.torch.get_device()
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = TrainState()
    # The job's latest checkpoint, written by this run before Ray replaced a
    # failed worker, or by an earlier run before the orchestrator restarted.
    latest = list_checkpoints(ArtifactStore(loop_config["artifact_root"]), loop_config["job_id"])
    resumed = ray.train.Checkpoint(latest[-1]["uri"]) if latest else None
    optimizer_state = None
    if resumed is not None:
        with resumed.as_directory() as directory:
            state, optimizer_state = _restore(Path(directory), model, method)
        send(
            "log",
            {"message": f"resumed from the checkpoint of step {state.step}: epoch {state.epoch + 1} starts again from its first batch"},
        )
    n_trainable = sum(p.numel() for p in trainable)
    send("log", {"message": f"{loop_config['base_model']} loaded for {task} ({method}); {n_trainable:,} trainable parameters"})
    dtype = tasks.compute_dtype(config.precision, loop_config["use_gpu"])
    if dtype != torch.float32:
        why = "this hardware computes it natively" if config.precision == "auto" else "as the job asks"
        send("log", {"message": f"matmuls run in bfloat16 ({why}); set precision=float32 to train in float32"})

    def autocast():
        return tasks.mixed_precision(device, dtype)

    packing = task != CLASSIFY and tasks.packing_works(model, device)
    if task != CLASSIFY and not packing:
        send("log", {"message": "this model's attention does not keep packed rows apart: batches are padded instead (slower)"})

    test_rows = read_split(loop_config["dataset_uri"], "test", MAX_TEST_ROWS) if rank == 0 else []
    if rank == 0 and resumed is None:
        # Before any step the model is the base model (LoRA starts as a no-op).
        state.base_metrics = tasks.test_metrics(task, model, tokenizer, test_rows, config.max_seq_length, label_ids, device)
        if task != "classification":
            state.reference_perplexity_before = tasks.reference_perplexity(model, tokenizer, config.max_seq_length, device)

    best_weights = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False)
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    total_steps, steps_per_epoch = loop_config["total_steps"], loop_config["steps_per_epoch"]
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_fraction * total_steps), total_steps)
    # A resumed epoch goes through its data again from the first batch (nothing
    # skipped); steps and the learning-rate schedule follow the data position.
    state.step = state.epoch * steps_per_epoch
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state["optimizer"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # stepping the schedule alone is the point here
            for _ in range(state.step):
                scheduler.step()

    def all_sum(*values: float) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()

    cached: dict[str, list[dict]] = {}

    def kept_in_memory(split: str) -> bool:
        # Decided from the split's size, the same on every worker: Ray Data's
        # split iterators advance together, so all keep their shard or none do.
        return loop_config["split_rows"][split] <= MAX_CACHED_ROWS * world

    def batches(split: str):
        """Batches of the worker's shard: from memory once a small shard has
        been read, else from a window read ahead."""
        if split in cached:
            yield from tasks.make_batches(cached[split], task, config.batch_size, rng)
            return
        keep = kept_in_memory(split)
        shard = ray.train.get_dataset_shard(split)
        window: list[dict] = []
        for table in shard.iter_batches(batch_size=config.batch_size, batch_format="pyarrow"):
            window += table.to_pylist()
            if not keep and len(window) >= SHUFFLE_WINDOW * config.batch_size:
                yield from tasks.make_batches(window, task, config.batch_size, rng)
                window = []
        if keep:
            cached[split] = window
        if window:
            yield from tasks.make_batches(window, task, config.batch_size, rng)

    def validate() -> float | None:
        if not loop_config["has_validation"]:
            return None
        ddp_model.eval()
        total = count = 0.0
        with torch.no_grad():
            for rows in batches("validation"):
                batch = tasks.collate(task, rows, tokenizer, config.max_seq_length, label_ids, device, packing)
                if batch.targets:
                    with autocast():
                        total += float(tasks.batch_loss(ddp_model, model, batch)) * batch.targets
                    count += batch.targets
        ddp_model.train()
        total, count = all_sum(total, count)
        return total / count if count else None

    def checkpoint(val_loss: float | None) -> None:
        """Every worker reports; rank 0 attaches the weights and optimizer."""
        report = {"step": state.step, "epoch": state.epoch} | ({"val_loss": val_loss} if val_loss is not None else {})
        if rank != 0:
            ray.train.report(report)
            return
        with tempfile.TemporaryDirectory() as out:
            _save_weights(model, tokenizer, method, Path(out), loop_config["base_model"])
            torch.save({"optimizer": optimizer.state_dict()}, Path(out, OPTIMIZER_FILE))
            Path(out, STATE_FILE).write_text(json.dumps(asdict(state) | {"validation_loss": val_loss}))
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(out))
        send("checkpoint", {"step": state.step, "validation_loss": val_loss or 0.0})

    def evaluate_and_maybe_stop() -> bool:
        """Validation, a checkpoint when it improved, and whether to stop early."""
        nonlocal best_weights
        val_loss = validate()
        if val_loss is None:
            return False
        send("eval", {"split": "validation", "loss": val_loss, "perplexity": math.exp(min(val_loss, 50)), "step": state.step})
        if val_loss < state.best_loss:
            state.best_loss, state.best_step, state.evals_since_best = val_loss, state.step, 0
            best_weights = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
            checkpoint(val_loss)
            return False
        state.evals_since_best += 1
        if config.early_stopping_patience and state.evals_since_best >= config.early_stopping_patience:
            state.stopped_early = True
            send(
                "log",
                {
                    "message": f"stopping early: validation loss has not improved for {state.evals_since_best} evaluations (best {state.best_loss:.4f} at step {state.best_step})"
                },
            )
            return True
        return False

    # Small shards are read now, as start-up, rather than inside the first step.
    for split in ("train", "validation") if loop_config["has_validation"] else ("train",):
        if kept_in_memory(split):
            for _ in batches(split):
                pass
    ddp_model.train()
    started, cancelled, stop = time.monotonic(), False, False
    first_step = state.step
    for epoch in range(state.epoch, config.epochs):
        state.epoch = epoch
        micro, trained_in_epoch = 0, 0.0
        step_start, loss_total, loss_tokens, real_tokens = time.monotonic(), 0.0, 0.0, 0.0
        for rows, last in _with_last(batches("train")):
            batch = tasks.collate(task, rows, tokenizer, config.max_seq_length, label_ids, device, packing)
            n = batch.targets
            with autocast():
                loss = tasks.batch_loss(ddp_model, model, batch)
            (loss / config.gradient_accumulation_steps).backward()
            trained_in_epoch += n
            loss_total, loss_tokens, real_tokens = (
                loss_total + loss.item() * n,
                loss_tokens + n,
                real_tokens + batch.real_tokens,
            )
            micro += 1
            if micro % config.gradient_accumulation_steps and not last:
                continue
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            wants_cancel = float(rank == 0 and control.qsize() > 0)
            loss_total, loss_tokens, real_tokens, wants_cancel = all_sum(loss_total, loss_tokens, real_tokens, wants_cancel)
            elapsed, step_seconds = time.monotonic() - started, max(time.monotonic() - step_start, 1e-9)
            send(
                "step",
                {
                    "step": state.step,
                    "total_steps": total_steps,
                    "epoch": epoch + min(1.0, (state.step - epoch * steps_per_epoch) / steps_per_epoch),
                    "loss": loss_total / max(loss_tokens, 1),
                    "learning_rate": scheduler.get_last_lr()[0],
                    "tokens_per_second": real_tokens / step_seconds,
                    "tokens": int(real_tokens),
                    "step_seconds": step_seconds,
                    "eta_seconds": elapsed / max(state.step - first_step, 1) * max(total_steps - state.step, 0),
                },
            )
            loss_total, loss_tokens, real_tokens = 0.0, 0.0, 0.0
            if wants_cancel:
                cancelled = True
                break
            if config.eval_every_steps and state.step % config.eval_every_steps == 0 and evaluate_and_maybe_stop():
                stop = True
                break
            step_start = time.monotonic()  # validation is not part of the next step
        if cancelled or stop:
            break
        if not all_sum(trained_in_epoch)[0]:
            raise JobInputError(
                f"no row has a token left to train on after truncation to max_seq_length={config.max_seq_length}: raise max_seq_length or shorten the prompts"
            )
        state.epoch = epoch + 1
        if not config.eval_every_steps and evaluate_and_maybe_stop():
            break
        if not loop_config["has_validation"]:
            best_weights = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
            state.best_step = state.step
            checkpoint(None)

    if cancelled:
        ray.train.report({"cancelled": 1})
        return
    # The published weights are the best validated ones, not the last.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in best_weights:
                param.copy_(best_weights[name].to(param.device))
    evaluation = {}
    if rank == 0:
        evaluation = {
            "task": task,
            "test_rows": len(test_rows),
            "base_metrics": state.base_metrics,
            "tuned_metrics": tasks.test_metrics(task, model, tokenizer, test_rows, config.max_seq_length, label_ids, device),
            "best_step": state.best_step,
            "best_validation_loss": state.best_loss if math.isfinite(state.best_loss) else 0.0,
            "stopped_early": state.stopped_early,
            "reference_perplexity_before": state.reference_perplexity_before,
            "reference_perplexity_after": tasks.reference_perplexity(model, tokenizer, config.max_seq_length, device)
            if task != "classification"
            else 0.0,
        }
        send("evaluation", evaluation)
    final = {"steps": state.step, "train_seconds": time.monotonic() - started, "final": 1}
    if rank != 0:
        ray.train.report(final)
        return
    with tempfile.TemporaryDirectory() as out:
        _save_weights(model, tokenizer, method, Path(out), loop_config["base_model"])
        Path(out, EVALUATION_FILE).write_text(json.dumps(evaluation, indent=2))
        Path(out, ADAPTER_METADATA).write_text(
            json.dumps(
                {
                    "job_id": loop_config["job_id"],
                    "base_model": loop_config["base_model"],
                    "task": task,
                    "method": method,
                    "labels": labels,
                    **final,
                },
                indent=2,
            )
        )
        ray.train.report(
            final | ({"val_loss": state.best_loss} if math.isfinite(state.best_loss) else {}),
            checkpoint=ray.train.Checkpoint.from_directory(out),
        )


def _with_last(items):
    """(item, is_last) pairs, reading one item ahead."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


def _save_weights(model, tokenizer, method: str, out: Path, base_model: str) -> None:
    """A PEFT adapter (LoRA, QLoRA) or a whole model (full fine-tuning)."""
    from tunewire.services.training.config import FULL

    if method == FULL:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        return
    # The adapter names its base model as the job did, not by a worker's cache path.
    for peft_config in model.peft_config.values():
        peft_config.base_model_name_or_path = base_model
    model.save_pretrained(out)


def _restore(directory: Path, model, method: str):
    """Weights, optimizer state and TrainState from one of our checkpoints."""
    import torch
    from safetensors.torch import load_file

    from tunewire.services.training.config import FULL

    if method == FULL:
        model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=False)
    else:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(directory / "adapter_model.safetensors")))
    saved = json.loads((directory / STATE_FILE).read_text())
    saved.pop("validation_loss", None)
    optimizer_state = torch.load(directory / OPTIMIZER_FILE, weights_only=True)
    return TrainState(**saved), optimizer_state
