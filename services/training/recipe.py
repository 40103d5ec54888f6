"""The fine-tuning recipe: one method per phase, built from a RecipeConfig
that the orchestrator fills.

- `measure_base` (a Ray task, once per job) measures the base model: the test
  split's metrics, the reference perplexity and the general probe, and makes
  (or reads from the cache) the base model's answers to the general prompts.
- `train_worker` (each Ray Train worker of a run, which is the job's one
  training run or one trial of its search) sets up, then trains: it
  validates every eval_every_steps (or each epoch), measures forgetting on
  the general probe when the validation loss could beat the run's best, and
  checkpoints each candidate that beats it (`selection_score`).
- `evaluate_and_publish` (a Ray task) evaluates the checkpoint the
  orchestrator chose and writes the adapter directory to publish.

Every worker holds a replica of the model (LoRA or full, DDP across workers)
and reads its shard of the train and validation splits through Ray Data.
Training batches are packed (no compute on padding), and for generative tasks
each one carries a few of the base model's answers to general prompts, whose
KL penalty keeps what the model says elsewhere (`general`). Decisions every
worker must agree on (stop, cancel, forgetting) travel in all-reduces.
Rank 0 sends progress through the `progress` queue and watches `control`
for a cancellation. A job's own inputs at fault end the run with a
`user_error` result (JobInputError), which the orchestrator reports as such.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import os
import random
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunewire.services.common import layout
from tunewire.services.common.models import hub_name
from tunewire.services.training.config import CLASSIFY, FULL, LORA, PRETRAIN, SFT, TrainingConfig
from tunewire.services.training.model_card import model_card

log = logging.getLogger(__name__)

SHUFFLE_WINDOW = 16  # batches read ahead and shuffled, for shards kept out of memory
MAX_TEST_ROWS = 256
# A split of up to this many rows per worker is read by each worker straight
# from its Parquet file and kept in memory (each worker takes every n-th row):
# Ray Data's streaming execution costs seconds of start-up per run and CPU
# taken from training, which small splits need not pay. Larger splits stream
# through Ray Data shards.
MAX_CACHED_ROWS = 20_000
# Retention examples (the base model's general answers) per training row.
RETENTION_PER_ROW = 1.0
# Scores of candidates over the forgetting budget start here, so any
# candidate within the budget ranks first (lower is better).
OVER_BUDGET = 1000.0
NO_CHECKPOINT = 1e9
# Validation rows (across workers) a prompt/completion or chat run answers
# at each validation, and the weight of the loss beside what the answers miss.
MAX_VALIDATION_ANSWERS = 32
LOSS_TIE_WEIGHT = 0.01
# Within the forgetting budget, what a candidate forgot (its share of the
# probe's answers lost, plus the reference perplexity's rise) weighs beside
# its validation as much as its loss does: one answer in 71 lost counts as
# 0.014 nats. That decides between candidates that answer the validation
# prompts alike late in training, where the loss moves by thousandths and the
# answers kept by several from one validation to the next (a person fact set:
# step 55 kept 99% and step 60 92%, their losses 0.0116 and 0.0112), and
# never against a validation answer more.
FORGETTING_TIE_WEIGHT = LOSS_TIE_WEIGHT
CHANGED_EXAMPLES = 5


def learning_rate_factor(step: int, total: int, warmup: int, time_spent: float = 0.0) -> float:
    """The share of the learning rate at `step`: a linear warm-up over
    `warmup` steps, then a linear decay to 0 at `total`, or sooner where
    `time_spent` (the share of a search's time gone) is further along than
    the steps. A search trial on a slower machine than its budget was set
    for then ends with its learning rate decayed and its weights settled,
    not cut off mid-schedule at a high learning rate."""
    # The time's share counts as that share of the steps (warm-up included).
    remaining = 1.0 - (max(step, time_spent * total) - warmup) / max(1, total - warmup)
    warming = step / max(1, warmup) if step < warmup else 1.0
    return max(0.0, min(warming, remaining))


class JobInputError(Exception):
    """The job's own inputs are at fault (model, data, hyperparameters): the
    orchestrator reports it as a user error, with what to change."""


@dataclass(frozen=True)
class RecipeConfig:
    """Everything a run needs, filled by the orchestrator."""

    job_id: str
    base_model: str
    task: str
    method: str
    dataset_uri: str
    train_rows: int
    validation_rows: int
    num_workers: int
    use_gpu: bool
    model_cache: str
    artifact_root: str
    training: TrainingConfig
    labels: tuple[str, ...] = ()
    # The project the job and its adapter belong to (in the adapter's metadata).
    project: str = "default"
    # "train" for a job that trains once, else the search trial's name.
    run: str = layout.SINGLE_RUN
    dataset_id: str = ""  # named in the published model card
    # From measure_base: the base model's general answers and perplexity.
    general_uri: str = ""
    base_perplexity: float = 0.0
    # A search trial's end (wall-clock seconds; 0: none): its schedule fits
    # the search's time (learning_rate_factor), and it finishes then.
    finish_by: float = 0.0

    @property
    def has_validation(self) -> bool:
        return self.validation_rows >= self.num_workers

    @property
    def steps_per_epoch(self) -> int:
        return self.training.steps_per_epoch(self.train_rows, self.num_workers)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.training.epochs

    @property
    def generative(self) -> bool:
        return self.task != CLASSIFY

    def kept_in_memory(self, split: str) -> bool:
        """Whether each worker reads its share of a split itself and keeps it
        (a small split), rather than streaming a Ray Data shard."""
        rows = self.train_rows if split == "train" else self.validation_rows
        return rows <= MAX_CACHED_ROWS * self.num_workers

    def replace(self, **changes) -> RecipeConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Forgetting:
    """General ability of the model now, against the base model's."""

    kept: int  # the base model's correct probe answers still correct
    base_correct: int
    perplexity: float
    base_perplexity: float

    @property
    def lost_share(self) -> float:
        return (self.base_correct - self.kept) / self.base_correct if self.base_correct else 0.0

    @property
    def kept_share(self) -> float:
        return 1.0 - self.lost_share

    @property
    def amount(self) -> float:
        """How much was forgotten, in one figure: the share of answers lost
        plus the reference perplexity's rise (a fall counts as none)."""
        return self.lost_share + max(self.perplexity_rise, 0.0)

    @property
    def perplexity_rise(self) -> float:
        return self.perplexity / self.base_perplexity - 1 if self.base_perplexity and self.perplexity else 0.0

    def within(self, budget: float) -> bool:
        if budget >= 1.0:  # the guard is off: any change is allowed
            return True
        # A hair of slack: 3 of 30 lost is 0.1 however it is rounded.
        return self.lost_share <= budget + 1e-9 and self.perplexity_rise <= budget + 1e-9


def validation_score(loss: float | None, answer_recall: float | None) -> float | None:
    """How good a validation is, lower first. Where the model answered the
    validation prompts (prompt/completion and chat tasks): the share of the
    reference answers' own words its greedy answers miss, then, a hundredth
    as much, the loss. Else the loss alone. The loss also counts the
    reference's wording, which a held-out phrasing cannot know: on a fact set
    whose answers are worded differently each time, validation loss rose
    from epoch 5 while held-out questions answered right went 23 -> 27 of
    30, and the answers' recall rose with them."""
    if loss is None or answer_recall is None:
        return loss
    return (1.0 - answer_recall) + LOSS_TIE_WEIGHT * loss


def selection_score(validation: float | None, step: int, forgetting: Forgetting | None, budget: float) -> float:
    """How a candidate checkpoint ranks, lower first: within the forgetting
    budget by its validation score, what it forgot breaking near-ties
    (FORGETTING_TIE_WEIGHT), or, without a validation split, the later the
    better; over the budget, after all of those, by how much it forgot. With
    the guard off (a budget of 1) forgetting does not count."""
    if forgetting is not None and not forgetting.within(budget):
        return OVER_BUDGET + forgetting.amount
    if validation is None:
        return -float(step)
    return validation + (FORGETTING_TIE_WEIGHT * forgetting.amount if forgetting is not None and budget < 1.0 else 0.0)


@dataclass
class TrainState:
    """What a resumed run needs besides weights and optimizer."""

    step: int = 0
    epoch: int = 0
    best_score: float = math.inf  # selection_score of the run's latest checkpoint
    # The best validation_score seen (early stopping and the search follow
    # it), and that validation's loss and answer recall.
    best_validation: float = math.inf
    best_loss: float = math.inf
    best_recall: float | None = None
    best_step: int = 0
    evals_since_best: int = 0
    stopped_early: bool = False
    # Each validation: step, loss and, where measured, forgetting.
    history: list[dict] = field(default_factory=list)
    # A search trial's share of its time gone (a resumed one goes on from it).
    time_share: float = 0.0


def list_checkpoints(artifacts, job_id: str, run: str = "") -> list[dict]:
    """A job's checkpoints in the store (of one run, or of all), oldest
    first: step, run, validation_loss, forgetting, selection score, uri and
    modification time."""
    fs = artifacts.fs
    found = []
    pattern = f"{artifacts.path(*layout.job_parts(job_id))}/{run + '.' if run else ''}*/checkpoint_*/{layout.STATE_FILE}"
    for state_file in fs.glob(pattern):
        state = _whole_checkpoint_state(fs, state_file)
        if state is None:
            continue
        found.append(
            {
                "step": state["step"],
                "run": state.get("run", layout.SINGLE_RUN),
                "validation_loss": state.get("validation_loss") or 0.0,
                "answer_recall": state.get("answer_recall"),
                "selection_score": state.get("selection_score", math.inf),
                "forgetting": state.get("forgetting"),
                "within_budget": state.get("within_budget", True),
                "uri": state_file.rsplit("/", 1)[0],
                "modified": fs.modified(state_file),
            }
        )
    return sorted(found, key=lambda c: (c["modified"], c["step"]))


def _whole_checkpoint_state(fs, state_file: str) -> dict | None:
    """A checkpoint's state if the checkpoint is whole: its state file reads,
    and every file it lists is there at its size. A copy to the store cut
    short (a crash, a full disk) is skipped, so a resume takes the checkpoint
    before it rather than failing on it again and again."""
    directory = state_file.rsplit("/", 1)[0]
    try:
        state = json.loads(fs.cat_file(state_file))
        whole = all(fs.size(f"{directory}/{name}") == size for name, size in state.get("files", {}).items())
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        log.warning("checkpoint %s is not readable (%s): skipped", directory, exc)
        return None
    if not whole:
        log.warning("checkpoint %s is missing files or holds them cut short: skipped", directory)
        return None
    return state


def read_split(uri: str, split: str, limit: int | None = None) -> list[dict]:
    """The rows of one split (up to `limit`), read straight from the artifact store."""
    import fsspec
    import pyarrow.parquet as pq

    rows: list[dict] = []
    with fsspec.open(uri, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
            rows += [r for r in batch.to_pylist() if r["split"] == split]
            if limit is not None and len(rows) >= limit:
                return rows[:limit]
    return rows


class FineTuneRecipe:
    """One fine-tuning run's phases. The training phases run on Ray Train
    workers (`rank`, `world` from its context); the others in one process."""

    def __init__(self, config: RecipeConfig, progress=None, control=None, rank: int = 0, world: int = 1):
        self.config = config
        self.training = config.training
        self.progress, self.control = progress, control
        self.rank, self.world = rank, world
        self.label_ids = {label: i for i, label in enumerate(config.labels)}
        self.state = TrainState()
        self.reference = None  # general.GeneralReference, for generative tasks
        self.answer_rows: list[dict] | None = None  # the validation rows answered at each validation
        self.average = None  # averaging.WeightAverage of the trained weights (ema_decay), once set up
        # A search trial's clock: when this run's training began (wall-clock
        # seconds), the time share it resumed at, and how long its longest
        # validation took (its training ends early enough for one more: the
        # forgetting is measured at some validations and not others).
        self.training_started: float | None = None
        self.resumed_share = 0.0
        self.validation_seconds = 0.0
        self.rng = random.Random(self.training.seed + rank)
        # Within one_answering_model: the merged copy, made at its first use.
        self.shared_answering: list | None = None

    def send(self, kind: str, data: dict) -> None:
        if self.rank == 0 and self.progress is not None:
            self.progress.put({"kind": kind, "data": data | {"run": self.config.run}})

    def log(self, message: str) -> None:
        self.send("log", {"message": message})

    # Setup

    def setup_model(self, device=None) -> None:
        """Tokenizer, model (LoRA-wrapped unless full fine-tuning), device,
        dtype; JobInputError when the base model cannot be loaded."""
        import torch

        from tunewire.services.common.errors import TunewireError
        from tunewire.services.common.models import resolve_model
        from tunewire.services.training import tasks

        config = self.config
        torch.manual_seed(self.training.seed)
        try:
            model_path = resolve_model(config.base_model, Path(config.model_cache))
            self.tokenizer = tasks.load_tokenizer(model_path)
            self.model = tasks.load_model(
                config.task, model_path, config.method, self.training, list(config.labels), self.tokenizer, config.use_gpu
            )
        except (OSError, ValueError, TunewireError) as exc:
            raise JobInputError(f"cannot load base model {config.base_model!r}: {exc}") from exc
        self.device = device or (torch.device("cuda") if config.use_gpu and torch.cuda.is_available() else torch.device("cpu"))
        self.model.to(self.device)
        self.dtype = tasks.compute_dtype(self.training.precision, config.use_gpu)
        self.packing = config.generative and tasks.packing_works(self.model, self.device)
        self.attention_switch = tasks.attention_switch(self.model, self.device, self.packing)

    def autocast(self):
        from tunewire.services.training import tasks

        return tasks.mixed_precision(self.device, self.dtype)

    @property
    def answers_merged(self) -> bool:
        """Whether answers come from a merged copy (with_answering_model)."""
        return self.device.type == "cpu" and self.config.method == LORA and self.config.generative

    @property
    def answering(self) -> str:
        """How this recipe generates answers: the base model's cached answers
        are kept apart by it, as a tuned model's are compared with them."""
        way = "merged" if self.answers_merged else "as-trained"
        return f"{way}-{self.config.method}-{self.device.type}-{str(self.dtype).removeprefix('torch.')}"

    def with_answering_model(self, answer):
        """`answer(model)` with the model to generate answers with (validation
        answers, the general probe, the test split). On a CPU, a generative
        LoRA model's adapter is merged into a copy whose weights are in the
        compute dtype: no adapter operations beside each layer and no casts
        inside autocast, about twice as fast as the wrapped model (the copy
        lives while `answer` runs: for the bundled model 270 MB, float32's
        540 MB while it is made). Merging rounds the adapter's change into
        the weights' dtype, as a merged bfloat16 export would; base and tuned
        answers are made alike. Elsewhere (a GPU, whose memory a copy would
        take; QLoRA; full fine-tuning) the model itself under autocast.
        Losses stay on the model as it trains."""
        if not self.answers_merged:
            with self.autocast():
                return answer(self.model)
        if self.shared_answering:
            return answer(self.shared_answering[0])
        merged = copy.deepcopy(self.model).merge_and_unload().to(self.dtype).eval()
        if self.shared_answering is not None:
            self.shared_answering.append(merged)
        return answer(merged)

    @contextlib.contextmanager
    def one_answering_model(self):
        """Within, with_answering_model merges once (the weights must not
        change meanwhile): a validation's answers and its general probe share
        one copy, a second merge saved."""
        self.shared_answering = []
        try:
            yield
        finally:
            self.shared_answering = None

    def load_general_reference(self) -> None:
        from tunewire.services.common.artifacts import read_text
        from tunewire.services.training.general import GeneralReference

        if self.config.general_uri:
            self.reference = GeneralReference.from_json(read_text(self.config.general_uri))

    def setup(self) -> None:
        """Everything training needs: model, optimizer and schedule, the
        general reference, and the run's latest checkpoint if it has one
        (written before Ray replaced a failed worker, or by an earlier
        attempt before the orchestrator restarted)."""
        import ray.train
        import ray.train.torch
        import torch

        from tunewire.services.common.artifacts import ArtifactStore

        context = ray.train.get_context()
        # Ray gives each worker a CPU slot; let torch use this node's cores among its workers.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, context.get_local_world_size())))
        self.setup_model(ray.train.torch.get_device())
        self.load_general_reference()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.training.ema_decay > 0:
            from tunewire.services.training.averaging import WeightAverage

            self.average = WeightAverage(self.trainable, self.training.ema_decay)
        latest = list_checkpoints(ArtifactStore(self.config.artifact_root), self.config.job_id, self.config.run)
        optimizer_state = None
        if latest:
            self.state, optimizer_state = self._restore(Path(latest[-1]["uri"]))
            mid_epoch = self.state.step > self.state.epoch * self.config.steps_per_epoch
            self.log(
                f"resumed from the checkpoint of step {self.state.step}: epoch {self.state.epoch + 1} "
                + ("starts again from its first batch" if mid_epoch else "starts")
            )
        n_trainable = sum(p.numel() for p in self.trainable)
        self.log(f"{self.config.base_model} loaded for {self.config.task} ({self.config.method}); {n_trainable:,} trainable parameters")
        if self.dtype != torch.float32:
            why = "this hardware computes it natively" if self.training.precision == "auto" else "as the job asks"
            self.log(f"matmuls run in bfloat16 ({why}); set precision=float32 to train in float32")
        if self.config.generative and not self.packing:
            self.log("this model's attention does not keep packed rows apart: batches are padded instead (slower)")
        self.ddp_model = ray.train.torch.prepare_model(self.model, move_to_device=False)
        self.optimizer = torch.optim.AdamW(self.trainable, lr=self.training.learning_rate, weight_decay=self.training.weight_decay)
        total = self.config.total_steps
        warmup = int(self.training.warmup_fraction * total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: learning_rate_factor(step, total, warmup, self.state.time_share)
        )
        # A resumed epoch goes through its data again from the first batch (nothing
        # skipped); steps and the learning-rate schedule follow the data position.
        self.state.step = self.state.epoch * self.config.steps_per_epoch
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state["optimizer"])
            if self.average is not None:
                self.average.restore(optimizer_state.get("live_weights"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # stepping the schedule alone is the point here
                for _ in range(self.state.step):
                    self.scheduler.step()
        self.cached: dict[str, list[dict]] = {}
        # Small shards are read now, as start-up, rather than inside the first step.
        for split in ("train", "validation") if self.config.has_validation else ("train",):
            if self._kept_in_memory(split):
                for _ in self._batches(split):
                    pass

    def time_spent(self) -> float:
        """The share of a search trial's time gone (0 outside a search, and
        before training): from the share it resumed at, over the time from
        this run's start to the search's end less its longest validation."""
        if not self.config.finish_by or self.training_started is None:
            return 0.0
        available = max(self.config.finish_by - 1.2 * self.validation_seconds - self.training_started, 1e-9)
        share = min(1.0, max(0.0, (time.time() - self.training_started) / available))
        return self.resumed_share + (1.0 - self.resumed_share) * share

    def all_sum(self, *values: float) -> list[float]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def _kept_in_memory(self, split: str) -> bool:
        return self.config.kept_in_memory(split)

    def _batches(self, split: str):
        """Batches of the worker's shard: from memory for a small split (read
        once, straight from its Parquet file), else from a window of its Ray
        Data shard read ahead."""
        import ray.train

        from tunewire.services.training import tasks

        size = self.training.batch_size
        if self._kept_in_memory(split):
            if split not in self.cached:
                self.cached[split] = read_split(self.config.dataset_uri, split)[self.rank :: self.world]
            yield from tasks.make_batches(self.cached[split], self.config.task, size, self.rng)
            return
        window: list[dict] = []
        for table in ray.train.get_dataset_shard(split).iter_batches(batch_size=size, batch_format="pyarrow"):
            window += table.to_pylist()
            if len(window) >= SHUFFLE_WINDOW * size:
                yield from tasks.make_batches(window, self.config.task, size, self.rng)
                window = []
        if window:
            yield from tasks.make_batches(window, self.config.task, size, self.rng)

    # Train

    def train(self) -> None:
        """Epochs of steps, validating along the way; ends with a `finished`
        report (or `cancelled`)."""
        import torch

        config, training, state = self.config, self.training, self.state
        self.ddp_model.train()
        started, first_step = time.monotonic(), state.step
        self.training_started, self.resumed_share = time.time(), state.time_share
        cancelled = stop = out_of_time = False
        for epoch in range(state.epoch, training.epochs):
            state.epoch = epoch
            micro, trained_in_epoch = 0, 0.0
            step_start, loss_total, loss_tokens, real_tokens = time.monotonic(), 0.0, 0.0, 0.0
            for rows, last in _with_last(self._batches("train")):
                loss, targets, tokens = self._loss(rows)
                (loss / training.gradient_accumulation_steps).backward()
                trained_in_epoch += targets
                loss_total, loss_tokens, real_tokens = loss_total + loss.item() * targets, loss_tokens + targets, real_tokens + tokens
                micro += 1
                if micro % training.gradient_accumulation_steps and not last:
                    continue
                torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                state.step += 1
                if self.average is not None:
                    self.average.update(state.step)
                wants_cancel = float(self.rank == 0 and self.control is not None and self.control.qsize() > 0)
                # Rank 0's clock decides: every worker decays its learning rate by the same share.
                time_spent = self.time_spent() if self.rank == 0 else 0.0
                loss_total, loss_tokens, real_tokens, wants_cancel, state.time_share = self.all_sum(
                    loss_total, loss_tokens, real_tokens, wants_cancel, time_spent
                )
                elapsed, step_seconds = time.monotonic() - started, max(time.monotonic() - step_start, 1e-9)
                self.send(
                    "step",
                    {
                        "step": state.step,
                        "total_steps": config.total_steps,
                        "epoch": epoch + min(1.0, (state.step - epoch * config.steps_per_epoch) / config.steps_per_epoch),
                        "loss": loss_total / max(loss_tokens, 1),
                        "learning_rate": self.scheduler.get_last_lr()[0],
                        "tokens_per_second": real_tokens / step_seconds,
                        "tokens": int(real_tokens),
                        "step_seconds": step_seconds,
                        "eta_seconds": elapsed / max(state.step - first_step, 1) * max(config.total_steps - state.step, 0),
                    },
                )
                loss_total, loss_tokens, real_tokens = 0.0, 0.0, 0.0
                if wants_cancel:
                    cancelled = True
                    break
                if state.time_share >= 1.0:
                    out_of_time = True
                    if last:  # the epoch is done: a checkpoint resumes with the next
                        state.epoch = epoch + 1
                    break
                if training.eval_every_steps and state.step % training.eval_every_steps == 0:
                    if last:  # the epoch is done: its checkpoint resumes with the next, not this one again
                        state.epoch = epoch + 1
                    if self.validate_and_checkpoint():
                        stop = True
                        break
                step_start = time.monotonic()  # validation is not part of the next step
            if out_of_time:
                self.log(
                    f"the search's time is up: training ends at step {state.step} of {config.total_steps}, "
                    "its learning rate decayed with the time"
                )
                self.validate_and_checkpoint()
                break
            if cancelled or stop:
                break
            if not self.all_sum(trained_in_epoch)[0]:
                raise JobInputError(
                    f"no row has a token left to train on after truncation to max_seq_length={training.max_seq_length}: "
                    "raise max_seq_length or shorten the prompts"
                )
            state.epoch = epoch + 1
            if not training.eval_every_steps and self.validate_and_checkpoint():
                break
        if cancelled:
            self.finish({"cancelled": 1})
            return
        self.finish(
            {
                "finished": 1,
                "step": state.step,
                "epoch": state.step / config.steps_per_epoch,
                "train_seconds": time.monotonic() - started,
                "stopped_early": state.stopped_early,
                "out_of_time": out_of_time,
            }
        )

    def finish(self, outcome: dict) -> None:
        """The run's outcome (finished, cancelled, or user_error), as a typed
        result: to the orchestrator through the progress queue, and to Ray
        (and so to Ray Tune, for a search trial) as the last report."""
        import ray.train

        outcome = outcome | self.best_metrics
        self.send("result", outcome)
        ray.train.report(outcome)

    def _loss(self, rows: list[dict]):
        """The step's loss on a batch of rows, the count it averages over
        (tokens, or rows for classification) and the batch's real tokens. A
        generative task's batch also carries retention examples, whose KL
        penalty is added with retention_weight; a chat or prompt/completion
        row is trained with some of its prompt's words left out
        (prompt_word_dropout)."""
        import torch

        from tunewire.services.training import general, tasks

        config, training = self.config, self.training
        if not config.generative:
            batch = tasks.collate(config.task, rows, self.tokenizer, training.max_seq_length, self.label_ids, self.device)
            with self.autocast(), tasks.short_rows_attention(self.attention_switch, batch.inputs):
                return tasks.batch_loss(self.ddp_model, self.model, batch), batch.targets, batch.real_tokens
        if config.task == SFT:
            rows = [tasks.drop_prompt_words(r, training.prompt_word_dropout, self.rng) for r in rows]
        examples = tasks.token_examples(config.task, rows, self.tokenizer, training.max_seq_length)
        retained = []
        if self.reference is not None and training.retention_weight > 0 and self.reference.retention:
            retained = self.rng.sample(
                self.reference.retention, min(len(self.reference.retention), math.ceil(len(rows) * RETENTION_PER_ROW))
            )
        batch = tasks.pack(examples + general.retention_examples(retained), self.tokenizer.pad_token_id, self.packing, self.device)
        with self.autocast(), tasks.short_rows_attention(self.attention_switch, batch.inputs):
            logits, targets, sources = tasks.label_logits(self.ddp_model, self.model, batch)
        own = ((sources >= 0) & (sources < len(examples))).to(logits.device)
        count = float(own.sum())
        # A batch with nothing to train on (all truncated away) still has a graph, for DDP.
        loss = torch.nn.functional.cross_entropy(logits[own].float(), targets[own]) if count else logits.sum() * 0.0
        if retained:
            loss = loss + training.retention_weight * general.retention_loss(logits, sources, retained, len(examples))
        return loss, count, batch.real_tokens

    def validate(self) -> tuple[float | None, float | None]:
        """The mean loss on the validation split, over every worker's shard,
        and for prompt/completion and chat tasks the mean answer recall
        (metrics.answer_recall) of greedy answers to the first
        MAX_VALIDATION_ANSWERS of its rows (the same rows every time)."""
        import torch

        from tunewire.services.training import tasks

        if not self.config.has_validation:
            return None, None
        scores_answers = self.config.task == SFT
        # The rows to answer are picked at the first validation, then kept.
        wanted = math.ceil(MAX_VALIDATION_ANSWERS / self.world) if scores_answers and self.answer_rows is None else 0
        seen: list[dict] = []
        self.ddp_model.eval()
        total = count = 0.0
        with torch.no_grad():
            for rows in self._batches("validation"):
                seen += rows[: max(0, wanted - len(seen))]
                batch = tasks.collate(
                    self.config.task, rows, self.tokenizer, self.training.max_seq_length, self.label_ids, self.device, self.packing
                )
                if batch.targets:
                    with self.autocast():
                        total += float(tasks.batch_loss(self.ddp_model, self.model, batch)) * batch.targets
                    count += batch.targets
        self.ddp_model.train()
        recall_sum = answered = 0.0
        if scores_answers:
            if self.answer_rows is None:
                # A small split's rows in their stored order, else the first rows seen.
                self.answer_rows = (self.cached.get("validation") or seen)[:wanted]
            if self.answer_rows:
                recall_sum, answered = self.with_answering_model(
                    lambda model: tasks.answer_recall_sum(model, self.tokenizer, self.answer_rows, self.device)
                )
        total, count, recall_sum, answered = self.all_sum(total, count, recall_sum, answered)
        return (total / count if count else None), (recall_sum / answered if answered else None)

    def measure_forgetting(self):
        """General ability now (rank 0 measures; every worker gets the
        result), and the probe's answers (rank 0's)."""
        from tunewire.services.training import general, tasks

        if self.reference is None:
            return None, None
        result, kept, perplexity = None, 0.0, 0.0
        if self.rank == 0:
            result = self.with_answering_model(lambda model: general.check_probe(model, self.tokenizer, self.reference, self.device))
            with self.autocast():
                perplexity = tasks.reference_perplexity(self.model, self.tokenizer, self.training.max_seq_length, self.device)
            kept = result.kept(self.reference)[0]
        kept, perplexity = self.all_sum(kept, perplexity)
        return Forgetting(int(kept), self.reference.base_correct, perplexity, self.config.base_perplexity), result

    def validate_and_checkpoint(self) -> bool:
        """Validation of the weights' average (ema_decay) where there is one,
        else of the weights; see _validate_and_checkpoint. Timed: a search
        trial ends its training early enough for one more."""
        started = time.monotonic()
        try:
            if self.average is None:
                with self.one_answering_model():
                    return self._validate_and_checkpoint()
            with self.average.applied(), self.one_answering_model():
                return self._validate_and_checkpoint()
        finally:
            self.validation_seconds = max(self.validation_seconds, time.monotonic() - started)

    def _validate_and_checkpoint(self) -> bool:
        """Validation; forgetting measured when the candidate could become the
        run's checkpoint; a checkpoint when it does; whether to stop early
        (the validation loss has not improved for early_stopping_patience
        evaluations: forgetting that rose early often falls back as the
        retention penalty pulls, so it does not stop training)."""
        import ray.train

        state, budget = self.state, self.training.forgetting_budget
        val_loss, recall = self.validate()
        if val_loss is None and self.config.has_validation:
            return False
        validation = validation_score(val_loss, recall)
        if validation is None or validation < state.best_validation:
            if validation is not None:
                state.best_validation, state.best_loss, state.best_recall = validation, val_loss, recall
            state.evals_since_best = 0
        else:
            state.evals_since_best += 1
        forgetting = result = None
        # Measured where it can change the choice: a candidate that could become
        # the run's checkpoint, under a budget that some change would exceed.
        if (validation is None or validation < state.best_score) and budget < 1.0:
            forgetting, result = self.measure_forgetting()
        score = selection_score(validation, state.step, forgetting, budget)
        record = (
            {"step": state.step, "loss": val_loss}
            | ({"answer_recall": recall} if recall is not None else {})
            | (self._forgetting_fields(forgetting, budget) if forgetting else {})
        )
        state.history.append(record)
        if val_loss is not None:
            self.send("eval", {"split": "validation", "loss": val_loss, "perplexity": math.exp(min(val_loss, 50))} | record)
        if forgetting is not None and not forgetting.within(budget):
            self._log_forgetting(forgetting, result, budget)
        metrics = {"step": state.step, "epoch": state.step / self.config.steps_per_epoch} | self.best_metrics
        if score < state.best_score:
            state.best_score, state.best_step = score, state.step
            self.checkpoint(val_loss, recall, forgetting, metrics | {"selection_score": score})
        else:
            ray.train.report(metrics)
        patience = self.training.early_stopping_patience
        if patience and state.evals_since_best >= patience:
            state.stopped_early = True
            best = f"loss {state.best_loss:.4f}" + (
                f", answers {state.best_recall:.0%} of the reference words" if state.best_recall is not None else ""
            )
            self.log(
                f"stopping early: validation has not improved for {state.evals_since_best} evaluations "
                f"(best {best}; the checkpoint kept is of step {state.best_step})"
            )
            return True
        return False

    @property
    def best_metrics(self) -> dict:
        """The search's objective, and the best validation's loss and answer
        recall (-1: none), for the trial table."""
        state = self.state
        return {
            "objective": self.objective,
            "best_validation_loss": state.best_loss if math.isfinite(state.best_loss) else 0.0,
            "best_answer_recall": state.best_recall if state.best_recall is not None else -1.0,
        }

    @property
    def objective(self) -> float:
        """What the search's scheduler compares: the run's best validation
        score (without a validation split, its best selection score). Not the
        forgetting: it often rises in a trial's first epochs and falls back as
        the retention penalty pulls, and the checkpoints are chosen within the
        budget at the end anyway."""
        for value in (self.state.best_validation, self.state.best_score):
            if math.isfinite(value):
                return value
        return NO_CHECKPOINT

    @staticmethod
    def _forgetting_fields(forgetting: Forgetting, budget: float) -> dict:
        return {
            "general_kept": forgetting.kept_share,
            "reference_perplexity": forgetting.perplexity,
            "within_forgetting_budget": forgetting.within(budget),
        }

    def _log_forgetting(self, forgetting: Forgetting, result, budget: float) -> None:
        from tunewire.services.training import diagnostics

        lost = (
            [
                (p.prompt, answer)
                for p, answer, correct in zip(self.reference.probe, result.answers, result.correct, strict=True)
                if p.base_correct and not correct
            ]
            if result
            else []
        )
        example = f', e.g. "{lost[0][0]}" now gets "{diagnostics.short(lost[0][1])}"' if lost else ""
        self.log(
            f"step {self.state.step}: over the forgetting budget ({budget:.0%}): {forgetting.base_correct - forgetting.kept} of "
            f"{forgetting.base_correct} general answers lost{example}; reference perplexity "
            f"{forgetting.base_perplexity:.2f} -> {forgetting.perplexity:.2f}"
        )

    def checkpoint(self, val_loss: float | None, recall: float | None, forgetting: Forgetting | None, metrics: dict) -> None:
        """Every worker reports; rank 0 attaches weights, optimizer and state."""
        import ray.train
        import torch

        if self.rank != 0:
            ray.train.report(metrics)
            return
        budget = self.training.forgetting_budget
        with tempfile.TemporaryDirectory() as out:
            self._save_weights(Path(out))
            # With an average, the weights saved are the average; training resumes from the live ones.
            live = {"live_weights": self.average.live_weights()} if self.average is not None else {}
            torch.save({"optimizer": self.optimizer.state_dict()} | live, Path(out, layout.OPTIMIZER_FILE))
            extra = {
                "run": self.config.run,
                "validation_loss": val_loss,
                "answer_recall": recall,
                "selection_score": metrics["selection_score"],
                "within_budget": forgetting is None or forgetting.within(budget),
                "forgetting": asdict(forgetting) if forgetting else None,
                # What the checkpoint holds: one cut short in its copy to the store is not resumed from.
                "files": {f.name: f.stat().st_size for f in Path(out).iterdir() if f.is_file()},
            }
            Path(out, layout.STATE_FILE).write_text(json.dumps(asdict(self.state) | extra))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(out))
        self.send(
            "checkpoint", {"step": self.state.step, "validation_loss": val_loss or 0.0, "within_forgetting_budget": extra["within_budget"]}
        )

    def _save_weights(self, out: Path) -> None:
        """A PEFT adapter (LoRA, QLoRA) or a whole model (full fine-tuning)."""
        if self.config.method == FULL:
            self.model.save_pretrained(out)
            self.tokenizer.save_pretrained(out)
            return
        # The adapter names its base model as other tools load it (a bundled
        # model by its Hugging Face id), not by a worker's cache path.
        for peft_config in self.model.peft_config.values():
            peft_config.base_model_name_or_path = hub_name(self.config.base_model)
        self.model.save_pretrained(out)

    def restore_weights(self, directory: Path) -> None:
        from safetensors.torch import load_file

        if self.config.method == FULL:
            self.model.load_state_dict(load_file(str(directory / layout.MODEL_WEIGHTS)), strict=False)
        else:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, load_file(str(directory / layout.ADAPTER_WEIGHTS)))

    def _restore(self, directory: Path):
        """Weights, optimizer state and TrainState from one of our checkpoints."""
        import torch

        self.restore_weights(directory)
        saved = json.loads((directory / layout.STATE_FILE).read_text())
        fields = {f.name for f in dataclasses.fields(TrainState)}
        state = TrainState(**{k: v for k, v in saved.items() if k in fields})
        # Saved by rank 0 from its device: each worker loads onto its own.
        return state, torch.load(directory / layout.OPTIMIZER_FILE, map_location=self.device, weights_only=True)

    # Evaluate and publish

    def test_rows(self) -> list[dict]:
        return read_split(self.config.dataset_uri, "test", MAX_TEST_ROWS)

    def evaluate(self, probe: bool = True) -> dict:
        """The current weights on the test split, the reference text and
        (with `probe`) every question of the general probe: what the report
        shows for base and tuned alike."""
        from tunewire.services.training import general, tasks

        config, training = self.config, self.training
        rows = self.test_rows()

        def measure(answering) -> dict:
            with self.autocast():  # for the losses (a merged copy answers the same under it)
                test_metrics = tasks.test_metrics(
                    config.task,
                    self.model,
                    self.tokenizer,
                    rows,
                    training.max_seq_length,
                    self.label_ids,
                    self.device,
                    answering,
                )
                out = {"test_metrics": test_metrics}
                if config.generative:
                    out["reference_perplexity"] = tasks.reference_perplexity(
                        self.model, self.tokenizer, training.max_seq_length, self.device
                    )
                if probe and self.reference is not None:
                    result = general.check_probe(answering, self.tokenizer, self.reference, self.device, every_question=True)
                    out["probe"] = {"correct": result.correct, "answers": result.answers}
            return out

        # A copy to answer with only where something is answered.
        answers = (probe and self.reference is not None) or (config.task not in (PRETRAIN, CLASSIFY) and rows)
        return self.with_answering_model(measure) if answers else measure(self.model)

    def report(self, base: dict, tuned: dict, extras: dict) -> dict:
        """The evaluation report: base against tuned, and what the search and
        the forgetting guard found (`extras`, from the orchestrator)."""
        from tunewire.services.training import diagnostics

        budget = self.training.forgetting_budget
        report = {
            "task": self.config.task,
            "test_rows": len(self.test_rows()),
            "base_metrics": base["test_metrics"],
            "tuned_metrics": tuned["test_metrics"],
            "reference_perplexity_before": base.get("reference_perplexity", 0.0),
            "reference_perplexity_after": tuned.get("reference_perplexity", 0.0),
            "forgetting_budget": budget,
        }
        if self.reference is not None:
            probe = self.reference.probe
            after = tuned["probe"]["correct"]
            forgetting = Forgetting(
                sum(p.base_correct and c for p, c in zip(probe, after, strict=True)),
                self.reference.base_correct,
                report["reference_perplexity_after"],
                report["reference_perplexity_before"],
            )
            changed = [
                {"prompt": p.prompt, "base_answer": p.base_answer, "tuned_answer": answer}
                for p, answer, correct in zip(probe, tuned["probe"]["answers"], after, strict=True)
                if p.base_correct and not correct
            ]
            report |= {
                "general_questions": len(probe),
                "general_correct_before": self.reference.base_correct,
                "general_correct_after": sum(after),
                "general_kept": forgetting.kept_share,
                "within_forgetting_budget": forgetting.within(budget),
                "general_changes": changed[:CHANGED_EXAMPLES],
            }
            lost = forgetting.base_correct - forgetting.kept
            found = [
                diagnostics.forgetting(changed, lost, forgetting.base_correct, forgetting.base_perplexity, forgetting.perplexity),
                None
                if forgetting.within(budget)
                else diagnostics.over_budget(budget, lost, forgetting.base_correct, forgetting.perplexity_rise),
            ]
            extras = extras | {"diagnostics": extras.get("diagnostics", []) + [d for d in found if d]}
        return report | extras

    def publish(self, checkpoint_dir: Path, report: dict, out: Path) -> None:
        """The directory to publish: the checkpoint's weights (not its
        optimizer or state), the evaluation report and tunewire's metadata."""
        import shutil

        for item in checkpoint_dir.iterdir():
            if item.name not in (layout.OPTIMIZER_FILE, layout.STATE_FILE) and item.is_file():
                shutil.copy2(item, out / item.name)
        (out / layout.EVALUATION_FILE).write_text(json.dumps(report, indent=2))
        # In place of the placeholder card PEFT writes (which names a worker's paths).
        (out / layout.MODEL_CARD).write_text(
            model_card(
                base_model=hub_name(self.config.base_model),
                job_id=self.config.job_id,
                dataset_id=self.config.dataset_id,
                train_rows=self.config.train_rows,
                task=self.config.task,
                method=self.config.method,
                hyperparameters=self.training.to_dict(),
                report=report,
            )
        )
        (out / layout.ADAPTER_METADATA).write_text(
            json.dumps(
                {
                    "job_id": self.config.job_id,
                    "project": self.config.project,
                    "base_model": self.config.base_model,
                    "task": self.config.task,
                    "method": self.config.method,
                    "labels": list(self.config.labels),
                    "run": self.config.run,
                    "steps": report.get("best_step", 0),
                },
                indent=2,
            )
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


# Entry points: Ray Train's worker function and the two Ray tasks.


def _user_errors_as_results(task):
    """A Ray task whose JobInputError comes back as {"user_error": ...}, a
    typed result the orchestrator reports as the user's error."""

    @functools.wraps(task)
    def run(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except JobInputError as exc:
            return {"user_error": str(exc)}

    return run


def train_worker(loop_config: dict) -> None:
    """A Ray Train worker of one run. `loop_config`: recipe (RecipeConfig),
    progress and control (Ray queues)."""
    import ray.train

    context = ray.train.get_context()
    recipe = FineTuneRecipe(
        loop_config["recipe"], loop_config["progress"], loop_config["control"], context.get_world_rank(), context.get_world_size()
    )
    try:
        recipe.setup()
        recipe.train()
    except JobInputError as exc:
        # A typed result, not an exception: the orchestrator reads it as the user's error.
        recipe.finish({"user_error": str(exc)})


@_user_errors_as_results
def measure_base(config: RecipeConfig) -> dict:
    """The base model before any training: test metrics, reference
    perplexity, and the general probe (its reference made once per base
    model, then read from the artifact store's cache)."""
    import torch

    from tunewire.services.common.artifacts import ArtifactStore
    from tunewire.services.training import general

    torch.set_num_threads(os.cpu_count() or 1)
    recipe = FineTuneRecipe(config)
    recipe.setup_model()  # a fresh LoRA wrapper is the base model
    out = recipe.evaluate(probe=False)
    if config.generative:
        store = ArtifactStore(config.artifact_root)
        parts = layout.general_parts(config.base_model, general.reference_version(recipe.answering))
        # A job without the retention penalty needs only the probe's answers
        # (the retention prompts' are most of the work): cached apart, so a
        # later job with the penalty still builds the whole reference.
        retention = config.training.retention_weight > 0
        if not retention and not store.exists(*parts):
            parts = (*parts[:-1], parts[-1] + "-probe")
        if not store.exists(*parts):

            def answer(model):
                answers = general.retention_answers(model, recipe.tokenizer, recipe.device) if retention else []
                return general.probe_answers(model, recipe.tokenizer, recipe.device), answers

            probe, answers = recipe.with_answering_model(answer)
            targets = []
            if retention:  # the KL penalty's targets: scored by the model as it trains
                with recipe.autocast():
                    targets = general.retention_targets(recipe.model, recipe.tokenizer, answers, recipe.device)
            reference = general.GeneralReference(probe, targets)
            with store.staged_dir() as staged:
                (staged / layout.GENERAL_FILE).write_text(reference.to_json())
                store.publish_dir(staged, *parts)
        recipe.config = config.replace(general_uri=store.uri(*parts, layout.GENERAL_FILE))
        recipe.load_general_reference()
        probe = recipe.reference.probe
        out |= {
            "general_uri": recipe.config.general_uri,
            "probe": {"correct": [p.base_correct for p in probe], "answers": [p.base_answer for p in probe]},
        }
    return out


@_user_errors_as_results
def evaluate_and_publish(config: RecipeConfig, checkpoint_uri: str, base: dict, extras: dict, final_parts: tuple[str, ...]) -> str:
    """Evaluates the chosen checkpoint and writes the directory to publish
    into the artifact store at `final_parts`; returns its URI."""
    import torch

    from tunewire.services.common.artifacts import ArtifactStore

    torch.set_num_threads(os.cpu_count() or 1)
    store = ArtifactStore(config.artifact_root)
    recipe = FineTuneRecipe(config)
    recipe.setup_model()
    recipe.load_general_reference()
    with tempfile.TemporaryDirectory(prefix="tunewire-checkpoint-") as downloads, store.staged_dir() as staged:
        checkpoint_dir = store.local_copy(checkpoint_uri, Path(downloads))
        recipe.restore_weights(checkpoint_dir)
        report = recipe.report(base, recipe.evaluate(), extras)
        recipe.publish(checkpoint_dir, report, staged)
        return store.publish_dir(staged, *final_parts)
