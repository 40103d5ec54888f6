"""The README.md model card a published adapter carries: what it was trained
from and how, and what it scored, so the directory explains itself wherever
it travels (the Hugging Face Hub, another team's disk). It names things as
other tools load them (a bundled base model by its Hugging Face id) and holds
no path of the machine that trained it, save a base model the job itself
named by its directory."""

from __future__ import annotations

from tunewire.services.common.models import is_hub_id
from tunewire.services.training.config import CLASSIFY, FULL

# The hyperparameters a reader needs to repeat the run, in this order.
_SHOWN = (
    "learning_rate",
    "epochs",
    "batch_size",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "max_seq_length",
    "warmup_fraction",
    "weight_decay",
    "prompt_word_dropout",
    "ema_decay",
    "retention_weight",
    "forgetting_budget",
    "seed",
)
_METHOD_NAMES = {"lora": "LoRA", "qlora": "QLoRA"}
_LORA_ONLY = {"lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules"}


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(
    *, base_model: str, job_id: str, dataset_id: str, train_rows: int, task: str, method: str, hyperparameters: dict, report: dict
) -> str:
    """The card's Markdown, with the Hub's metadata block. `base_model` is
    the name other tools load it by (the Hugging Face id where known)."""
    classify = task == CLASSIFY
    auto_class = "AutoPeftModelForSequenceClassification" if classify else "AutoPeftModelForCausalLM"
    front = [
        "---",
        f"base_model: {base_model}",
        "library_name: transformers" if method == FULL else "library_name: peft",
        f"pipeline_tag: {'text-classification' if classify else 'text-generation'}",
        "tags:",
        "- tunewire",
        f"- {method}",
        "---",
        "",
    ]
    what = "The whole model, fine-tuned" if method == FULL else f"A {_METHOD_NAMES.get(method, method)} adapter"
    base = f"[{base_model}](https://huggingface.co/{base_model})" if is_hub_id(base_model) else f"`{base_model}`"
    lines = [
        f"# {job_id}",
        "",
        f"{what} for {base}, trained by tunewire job `{job_id}` "
        f"({task}) on dataset `{dataset_id}` ({train_rows} training rows; the id is a hash of the rows and their splits).",
        "",
        "## Use",
        "",
        "```python",
    ]
    if method == FULL:
        lines += [
            "from transformers import AutoModelForCausalLM",
            "",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
        ]
    else:
        lines += [
            f"from peft import {auto_class}",
            "",
            f'model = {auto_class}.from_pretrained("path/to/this/directory")  # with the base model adapter_config.json names',
        ]
    lines += ["```", "", "## Training", "", "| hyperparameter | value |", "|---|---|"]
    for name in _SHOWN:
        if name in hyperparameters and not (method == FULL and name in _LORA_ONLY):
            value = hyperparameters[name]
            lines.append(f"| {name} | {', '.join(value) if isinstance(value, list) else _number(value)} |")
    if report.get("run"):
        within = report.get("within_forgetting_budget", True)
        why = "within the forgetting budget" if within else "none was within the forgetting budget: the least forgetting"
        lines += [
            "",
            f"Published: run `{report['run']}`, step {report.get('best_step', 0)} (chosen by validation; {why}).",
        ]
    before, after = report.get("base_metrics", {}), report.get("tuned_metrics", {})
    if after:
        lines += [
            "",
            f"## Evaluation (held-out test split, {report.get('test_rows', 0)} rows)",
            "",
            "| metric | base model | fine-tuned |",
            "|---|---|---|",
        ]
        lines += [f"| {name} | {_number(before.get(name, float('nan')))} | {_number(value)} |" for name, value in sorted(after.items())]
    if report.get("general_questions"):
        kept = report.get("general_kept", 0.0)
        lines += [
            "",
            "## General ability (forgetting)",
            "",
            f"- General questions answered right: {report['general_correct_before']} of {report['general_questions']} by the base model, "
            f"{report['general_correct_after']} after fine-tuning ({kept:.0%} of the base's right answers kept).",
            f"- Reference-text perplexity: {report.get('reference_perplexity_before', 0.0):.2f} before, "
            f"{report.get('reference_perplexity_after', 0.0):.2f} after.",
            f"- Forgetting budget {report.get('forgetting_budget', 0.0):.0%}: "
            + ("within it." if report.get("within_forgetting_budget", True) else "over it (published held back: not served by default)."),
        ]
    return "\n".join(front + lines) + "\n"
