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
}
LORA_ONLY = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules")


def auto_epochs(train_rows: int) -> int:
    """Small datasets need more passes to take effect (about 2000 rows seen,
    at most 10 epochs); large ones fewer."""
    if train_rows >= 10_000:
        return 1
    if train_rows >= 1_000:
        return 2
    return max(1, min(10, math.ceil(2000 / max(train_rows, 1))))


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
    values = {**defaults, **{k: v for k, v in given.items() if k != "epochs"}}
    auto = sorted(k for k in [*defaults, "epochs"] if k not in given)
    values["epochs"] = given.get("epochs") or auto_epochs(train_rows)
    return TrainingConfig(**values, auto=auto)


def check_compute(num_workers: int, use_gpu: bool) -> int:
    workers = num_workers or 1
    if not 1 <= workers <= MAX_WORKERS:
        raise InvalidArgument.field("spec.compute.num_workers", f"must be in [1, {MAX_WORKERS}], got {num_workers}")
    return workers
