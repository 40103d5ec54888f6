"""Training configuration as data: the hyperparameters a job may set, their
checks, and the defaults chosen for what the job leaves unset."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from tunewire.services.common.errors import FieldViolation, InvalidArgument

LORA, FULL, QLORA = "lora", "full", "qlora"
PRECISIONS = ("auto", "float32", "bfloat16")
METHODS = (LORA, FULL, QLORA)
MAX_WORKERS = 64

# The task follows from the dataset's format.
SFT, PRETRAIN, CLASSIFY, SUMMARIZE = "sft", "continued_pretraining", "classification", "summarization"
TASK_OF_FORMAT = {"prompt_completion": SFT, "chat": SFT, "text": PRETRAIN, "classification": CLASSIFY, "summarization": SUMMARIZE}


@dataclass(frozen=True)
class TrainingConfig:
    """Every value a run uses; `auto` names the ones tunewire chose."""

    learning_rate: float
    epochs: int
    batch_size: int
    max_seq_length: int
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_target_modules: list[str]
    seed: int
    warmup_fraction: float
    weight_decay: float
    gradient_accumulation_steps: int = 1
    # Validation every this many optimizer steps; 0: at the end of each epoch.
    eval_every_steps: int = 0
    # Stop after this many evaluations without a better validation loss; 0: never.
    early_stopping_patience: int = 3
    gradient_checkpointing: bool = False
    keep_checkpoints: int = 2
    # auto: bfloat16 autocast where the hardware computes bfloat16 natively.
    precision: str = "auto"
    # At most this share of the base model's correct general-probe answers
    # may be lost, and the reference perplexity may rise by at most this
    # share; checkpoints and trials are chosen among those within it.
    forgetting_budget: float = 0.1
    # Weight of the KL penalty that keeps the base model's answers to general
    # prompts (generative tasks); 0 turns it off.
    retention_weight: float = 3.0
    # Share of the words of a chat/prompt-completion row's prompt left out at
    # random each time it is trained on (numbers are kept), so a taught
    # answer does not hang on one wording of the question.
    prompt_word_dropout: float = 0.1
    # Decay of the exponential moving average of the trained weights that is
    # validated, checkpointed and published (averaging.py); 0: the weights
    # of the step itself. (0 here, for jobs stored before it existed; new
    # LoRA and QLoRA jobs get DEFAULTS' 0.9.)
    ema_decay: float = 0.0
    auto: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainingConfig:
        return cls(**data)

    def steps_per_epoch(self, train_rows: int, num_workers: int) -> int:
        """Optimizer steps per epoch: each worker sees train_rows / num_workers
        rows, batch_size at a time, gradient_accumulation_steps batches a step."""
        batches = math.ceil((train_rows // num_workers) / self.batch_size)
        return max(1, math.ceil(batches / self.gradient_accumulation_steps))


DEFAULTS = dict(
    learning_rate=2e-4,
    batch_size=8,
    max_seq_length=512,
    lora_rank=16,
    lora_alpha=32.0,
    lora_dropout=0.05,
    lora_target_modules=["all-linear"],
    seed=0,
    warmup_fraction=0.05,
    weight_decay=0.0,
    gradient_accumulation_steps=1,
    eval_every_steps=0,
    early_stopping_patience=3,
    gradient_checkpointing=False,
    keep_checkpoints=2,
    precision="auto",
    forgetting_budget=0.1,
    retention_weight=3.0,
    prompt_word_dropout=0.1,
    ema_decay=0.9,
)
# Full fine-tuning moves every weight: a far smaller step than LoRA's.
FULL_LEARNING_RATE = 2e-5


def _module_names(value) -> bool:
    return all(isinstance(m, str) and (m == "all-linear" or (m and m.replace(".", "").replace("_", "").isalnum())) for m in value)


# field -> (check, what a valid value is)
_CHECKS = {
    "learning_rate": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "epochs": (lambda v: 1 <= v <= 100, "must be in [1, 100]"),
    "batch_size": (lambda v: 1 <= v <= 1024, "must be in [1, 1024]"),
    "max_seq_length": (lambda v: 16 <= v <= 131072, "must be in [16, 131072]"),
    "lora_rank": (lambda v: 1 <= v <= 1024, "must be in [1, 1024]"),
    "lora_alpha": (lambda v: 0 < v <= 4096, "must be in (0, 4096]"),
    "lora_dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "seed": (lambda v: 0 <= v < 2**63, "must be in [0, 2^63)"),
    "warmup_fraction": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "weight_decay": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "lora_target_modules": (_module_names, "module names (letters, digits, '_', '.') or 'all-linear'"),
    "gradient_accumulation_steps": (lambda v: 1 <= v <= 1024, "must be in [1, 1024]"),
    "eval_every_steps": (lambda v: 0 <= v <= 10**6, "must be in [0, 1000000] (0: each epoch)"),
    "early_stopping_patience": (lambda v: 0 <= v <= 1000, "must be in [0, 1000] (0: never stop early)"),
    "gradient_checkpointing": (lambda v: isinstance(v, bool), "must be true or false"),
    "keep_checkpoints": (lambda v: 1 <= v <= 100, "must be in [1, 100]"),
    "precision": (lambda v: v in PRECISIONS, "must be one of " + ", ".join(PRECISIONS)),
    "forgetting_budget": (lambda v: 0 <= v <= 1, "must be in [0, 1] (a share: 0.1 allows 10% of the base's correct probe answers lost)"),
    "retention_weight": (lambda v: 0 <= v <= 100, "must be in [0, 100] (0 turns the retention penalty off)"),
    "prompt_word_dropout": (lambda v: 0 <= v <= 0.5, "must be in [0, 0.5] (0 trains on every prompt word)"),
    "ema_decay": (lambda v: 0 <= v < 1, "must be in [0, 1) (0 publishes the last step's weights, not their average)"),
}
LORA_ONLY = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules")


# Neighbouring facts of a ~50-row set (a city, a country) need the 12th
# epoch to come apart; on general questions the guard never sees, 12 kept
# as much as 10 (README).
MAX_AUTO_EPOCHS = 12


def auto_epochs(train_rows: int) -> int:
    """Small datasets need more passes to take effect (about 2000 rows seen,
    at most MAX_AUTO_EPOCHS); large ones fewer."""
    if train_rows >= 10_000:
        return 1
    if train_rows >= 1_000:
        return 2
    return max(1, min(MAX_AUTO_EPOCHS, math.ceil(2000 / max(train_rows, 1))))


def resolve_config(given: dict, train_rows: int, method: str = LORA) -> TrainingConfig:
    """Checks every hyperparameter the job set (InvalidArgument names each bad
    field at once) and fills the rest with defaults."""
    violations = []
    for name, value in given.items():
        check, rule = _CHECKS[name]
        if not check(value):
            violations.append(FieldViolation(f"spec.hyperparameters.{name}", f"{rule}, got {value!r}"))
        elif method == FULL and name in LORA_ONLY:
            violations.append(FieldViolation(f"spec.hyperparameters.{name}", "applies to LoRA only; the job's method is full fine-tuning"))
    if violations:
        raise InvalidArgument("invalid hyperparameters: " + "; ".join(f"{v.field} {v.description}" for v in violations), violations)
    defaults = {**DEFAULTS, "learning_rate": FULL_LEARNING_RATE if method == FULL else DEFAULTS["learning_rate"]}
    if method == FULL:  # an average of every weight of the model: memory a fine-tune of the whole model may not have
        defaults["ema_decay"] = 0.0
    values = {**defaults, **{k: v for k, v in given.items() if k != "epochs"}}
    auto = sorted(k for k in [*defaults, "epochs"] if k not in given)
    values["epochs"] = given.get("epochs") or auto_epochs(train_rows)
    return TrainingConfig(**values, auto=auto)


def check_compute(num_workers: int, use_gpu: bool) -> int:
    workers = num_workers or 1
    if not 1 <= workers <= MAX_WORKERS:
        raise InvalidArgument.field("spec.compute.num_workers", f"must be in [1, {MAX_WORKERS}], got {num_workers}")
    return workers


# Hyperparameter search: when a job leaves the learning rate unset (or asks
# for a search), its trials are Ray Tune trials of the same training loop.
SEARCH_AUTO, SEARCH_ON, SEARCH_OFF = "auto", "on", "off"
SEARCH_MODES = (SEARCH_AUTO, SEARCH_ON, SEARCH_OFF)
# The learning rates tried, most promising first (the first trial sets the
# bar the early-stopping scheduler holds the others to).
SEARCH_LEARNING_RATES = {LORA: [2e-3, 1e-3, 4e-3], QLORA: [2e-3, 1e-3, 4e-3], FULL: [2e-5, 6e-5, 7e-6]}
DEFAULT_MAX_TRIALS = 3
# The default time of a search: a second per training row a trial sees
# (rows × epochs), at least 400 s. About what one trial takes on 2 CPU
# cores with its validations (a ~50-row set: 12 epochs of 38 rows). Left
# to its default it decides only whether more trials start: the first
# trial trains its whole schedule, so a slower machine than it was set for
# takes longer rather than publishing a model cut off part way. A time the
# job sets bounds every trial.
DEFAULT_SEARCH_SECONDS = 400
SEARCH_SECONDS_PER_ROW_SEEN = 1.0
MAX_SEARCH_SECONDS = 7 * 86400
MAX_TRIALS = 64


def default_search_seconds(rows_seen: int) -> int:
    """The search's time when the job leaves it unset, for trials that each
    see rows_seen training rows (rows × epochs)."""
    return min(MAX_SEARCH_SECONDS, max(DEFAULT_SEARCH_SECONDS, round(SEARCH_SECONDS_PER_ROW_SEEN * rows_seen)))


@dataclass(frozen=True)
class SearchPlan:
    """The trials of a search: each one's hyperparameters over the job's
    resolved config, and the budget they share."""

    candidates: list[dict]
    max_seconds: int
    max_concurrent_trials: int = 0  # 0: as many as the cluster has room for
    # False where max_seconds is the default: the first trial then trains
    # all its epochs, and the time decides only whether later trials start.
    time_bounds_first_trial: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SearchPlan:
        return cls(**data)


def resolve_search(search: dict, given: dict, method: str = LORA, train_rows: int = 0) -> SearchPlan | None:
    """The search a job runs, or None to train once. `search` holds the
    SearchConfig fields the caller set, `given` the hyperparameters."""
    mode = search.get("mode") or SEARCH_AUTO
    violations = []

    def bad(name: str, rule: str) -> None:
        violations.append(FieldViolation(f"spec.search.{name}", rule))

    if mode not in SEARCH_MODES:
        bad("mode", f"must be one of {', '.join(SEARCH_MODES)}, got {mode!r}")
    max_trials = search.get("max_trials") or DEFAULT_MAX_TRIALS
    if not 1 <= max_trials <= MAX_TRIALS:
        bad("max_trials", f"must be in [1, {MAX_TRIALS}] (0: {DEFAULT_MAX_TRIALS}), got {max_trials}")
    epochs = given.get("epochs") or auto_epochs(train_rows)
    default_seconds = default_search_seconds(train_rows * epochs)
    max_seconds = search.get("max_seconds") or default_seconds
    if not 30 <= max_seconds <= MAX_SEARCH_SECONDS:
        bad("max_seconds", f"must be in [30, {MAX_SEARCH_SECONDS}] (0: {default_seconds} for this dataset), got {max_seconds}")
    concurrent = search.get("max_concurrent_trials") or 0
    if not 0 <= concurrent <= MAX_TRIALS:
        bad("max_concurrent_trials", f"must be in [0, {MAX_TRIALS}] (0: as the cluster has room), got {concurrent}")
    rates, ranks = search.get("learning_rates") or [], search.get("lora_ranks") or []
    if not all(0 < r <= 1 for r in rates):
        bad("learning_rates", f"each must be in (0, 1], got {rates}")
    if not all(1 <= r <= 1024 for r in ranks):
        bad("lora_ranks", f"each must be in [1, 1024], got {ranks}")
    if ranks and method == FULL:
        bad("lora_ranks", "applies to LoRA only; the job's method is full fine-tuning")
    for name, values, fixed in (("learning_rates", rates, "learning_rate"), ("lora_ranks", ranks, "lora_rank")):
        if values and fixed in given:
            bad(name, f"hyperparameters.{fixed} is set: leave it unset to search it")
    if mode == SEARCH_OFF and (rates or ranks):
        bad("mode", "is off, but candidate values are given: set mode on (or leave it unset)")
    if violations:
        raise InvalidArgument("invalid search: " + "; ".join(f"{v.field} {v.description}" for v in violations), violations)
    if mode == SEARCH_OFF or (mode == SEARCH_AUTO and "learning_rate" in given and not ranks):
        return None
    rates = [given["learning_rate"]] if "learning_rate" in given else rates or SEARCH_LEARNING_RATES[method]
    grid = [(i + j, rate, rank) for i, rate in enumerate(dict.fromkeys(rates)) for j, rank in enumerate(dict.fromkeys(ranks or [0]))]
    candidates = []
    # Spread over both lists first when the budget cannot take every pair.
    for _, rate, rank in sorted(grid, key=lambda g: g[0]):
        candidate = {"learning_rate": rate} | ({} if "epochs" in given else {"epochs": epochs})
        if rank:
            candidate |= {"lora_rank": rank} | ({} if "lora_alpha" in given else {"lora_alpha": 2.0 * rank})
        candidates.append(candidate)
    return SearchPlan(candidates[:max_trials], max_seconds, concurrent, time_bounds_first_trial=bool(search.get("max_seconds")))
