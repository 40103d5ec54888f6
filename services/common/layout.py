"""Where a job's bytes live in the artifact store, and the names of the files
in an adapter directory: defined once, for the orchestrator, the training
workers and the inference service.

    <root>/ray/<job>/<run>.<attempt>/checkpoint_*/   a Ray Train run's checkpoints
    <root>/ray/<job>/tune/                           a search's Ray Tune experiment state
    <root>/ray/<job>/base/measured.json              the base model measured for the job
    <root>/ray/<job>/final/                          the evaluated result, before it is published
    <root>/general/<model>/<version>/reference.json  the base model's answers to the general prompts
    <root>/adapters/<adapter id>/                    published adapters

`<run>` is "train" for a job that trains once, or a search trial's name.
"""

from __future__ import annotations

import hashlib
import re

# A PEFT adapter directory (what `save_pretrained` writes and PEFT loads).
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# A whole model (full fine-tuning).
MODEL_WEIGHTS = "model.safetensors"
# Written beside the weights by tunewire: the job, task and class labels.
ADAPTER_METADATA = "tunewire_adapter.json"
# The evaluation report, base model against fine-tuned.
EVALUATION_FILE = "evaluation.json"
# The model card: what the adapter is, how it was trained, what it scored.
MODEL_CARD = "README.md"
# In a checkpoint, besides the weights: what a resumed run needs.
STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.pt"

JOBS = "ray"
TENSORBOARD = "tensorboard"  # <job id>/: each job's TensorBoard event files
SINGLE_RUN = "train"
TUNE_DIR = "tune"
BASE_DIR = "base"
BASE_FILE = "measured.json"
FINAL_DIR = "final"
GENERAL = "general"
GENERAL_FILE = "reference.json"
ADAPTERS = "adapters"


def job_parts(job_id: str, *rest: str) -> tuple[str, ...]:
    return (JOBS, job_id, *rest)


def run_name(run: str, attempt: int) -> str:
    """A Ray Train run's directory name under the job: one per attempt, so an
    attempt after a restart never writes into the one before."""
    return f"{run}.{attempt}"


def general_parts(base_model: str, version: str) -> tuple[str, ...]:
    """The cache of a base model's general answers: named by the model and a
    hash of it (two paths may differ only in characters a name drops)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", base_model).strip("._")[-64:] or "model"
    digest = hashlib.sha256(base_model.encode()).hexdigest()[:12]
    return (GENERAL, f"{readable}-{digest}", version)
