"""What differs between fine-tuning tasks: the model and its head, how rows
become batches, and the test metrics. Plain torch/transformers/PEFT, no Ray,
so each piece is testable on a tiny model."""

from __future__ import annotations

import math
from importlib import resources

from tunewire.services.common.text import IGNORE_INDEX, row_to_messages, tokenize_for_training
from tunewire.services.training import metrics
from tunewire.services.training.config import CLASSIFY, FULL, PRETRAIN, QLORA, SUMMARIZE, TrainingConfig

MAX_TEST_GENERATIONS = 32
MAX_NEW_TOKENS_EVAL = 64


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(task: str, model_path: str, method: str, config: TrainingConfig, labels: list[str], tokenizer, use_gpu: bool):
    """The model to train: a causal LM or a sequence classifier, wrapped in
    LoRA unless the method is full fine-tuning."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = torch.bfloat16 if use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    options: dict = {"dtype": dtype}
    if method == QLORA:
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
        )
    if task == CLASSIFY:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            **options,
        )
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, **options)
    if method == QLORA:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if method == FULL:
        return model
    model = load_peft(model, task, config)
    if config.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def load_peft(model, task: str, config: TrainingConfig):
    """The model wrapped in the job's LoRA configuration."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = "all-linear" if config.lora_target_modules == ["all-linear"] else config.lora_target_modules
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type=TaskType.SEQ_CLS if task == CLASSIFY else TaskType.CAUSAL_LM,
    )
    return get_peft_model(model, lora)


def row_length(task: str, row: dict) -> int:
    """A cheap length for grouping rows of similar size into batches."""
    if task == CLASSIFY or task == PRETRAIN:
        return len(row["text"])
    return sum(len(m["content"]) for m in row_to_messages(row))


def length_grouped(rows: list[dict], task: str, batch_size: int, rng) -> list[list[dict]]:
    """Batches of rows of similar length, so little compute goes to padding,
    in a shuffled order (not always short to long)."""
    ordered = sorted(rows, key=lambda r: row_length(task, r))
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(task: str, rows: list[dict], tokenizer, max_length: int, label_ids: dict[str, int], device):
    """Tokenised rows padded to the longest in the batch: input_ids,
    attention_mask and labels (token labels, or class ids for classification)."""
    import torch

    if task == CLASSIFY:
        encoded = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {
            "input_ids": encoded["input_ids"].to(device),
            "attention_mask": encoded["attention_mask"].to(device),
            "labels": torch.tensor([label_ids[r["label"]] for r in rows], device=device),
        }
    if task == PRETRAIN:
        examples = []
        for r in rows:
            ids = tokenizer(r["text"] + (tokenizer.eos_token or ""), truncation=True, max_length=max_length, add_special_tokens=False)[
                "input_ids"
            ]
            examples.append((ids, ids))
    else:
        examples = [(e.input_ids, e.labels) for e in (tokenize_for_training(tokenizer, row_to_messages(r), max_length) for r in rows)]
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": attention.to(device)}


class TokenWeights:
    """Weights each batch's mean loss by its token count over the running
    mean, so that a batch of short rows (length grouping makes them) moves
    the weights less than a batch of long ones: the steps follow the
    token-weighted loss that validation measures, as random batches would."""

    def __init__(self) -> None:
        self.tokens = 0.0
        self.batches = 0

    def __call__(self, tokens: float) -> float:
        self.tokens += tokens
        self.batches += 1
        return tokens * self.batches / self.tokens if self.tokens else 0.0


def trained_tokens(task: str, batch) -> float:
    """How many targets the batch's mean loss averages over."""
    if task == CLASSIFY:
        return float(batch["labels"].numel())
    return float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def loss_sum(
    task: str, model, rows: list[dict], tokenizer, max_length: int, label_ids: dict[str, int], device, batch_size: int = 8
) -> tuple[float, float]:
    """Summed loss and target count over rows, without gradients."""
    import torch

    total = count = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate(task, rows[start : start + batch_size], tokenizer, max_length, label_ids, device)
            n = trained_tokens(task, batch)
            if n:
                total += float(model(**batch).loss) * n
                count += n
    return total, count


def _generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, device) -> list[str]:
    """Greedy completions of chat prompts, batched with left padding."""
    import torch

    texts = [
        tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
        if tokenizer.chat_template
        else "".join(x["content"] for x in m)
        for m in prompts
    ]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        out = []
        for start in range(0, len(texts), 8):
            encoded = tokenizer(texts[start : start + 8], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            out += tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        return out
    finally:
        tokenizer.padding_side = side


def test_metrics(task: str, model, tokenizer, rows: list[dict], max_length: int, label_ids: dict[str, int], device) -> dict[str, float]:
    """The task's metrics on held-out rows (generation on at most MAX_TEST_GENERATIONS)."""
    import torch

    if not rows:
        return {}
    model.eval()
    try:
        if task == CLASSIFY:
            predictions = []
            with torch.no_grad():
                for start in range(0, len(rows), 16):
                    batch = collate(task, rows[start : start + 16], tokenizer, max_length, label_ids, device)
                    predictions += model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1).tolist()
            return metrics.accuracy_and_macro_f1(predictions, [label_ids[r["label"]] for r in rows], len(label_ids))
        out = metrics.loss_metrics(*loss_sum(task, model, rows, tokenizer, max_length, label_ids, device))
        if task == PRETRAIN:
            return out
        sample = rows[:MAX_TEST_GENERATIONS]
        conversations = [row_to_messages(r) for r in sample]
        prompts = [c[: max(i for i, m in enumerate(c) if m["role"] == "assistant")] for c in conversations]
        references = [c[len(p)]["content"] for c, p in zip(conversations, prompts, strict=True)]
        longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
        predictions = _generate(model, tokenizer, prompts, min(MAX_NEW_TOKENS_EVAL, longest + 8), device)
        out |= metrics.rouge(predictions, references) if task == SUMMARIZE else metrics.exact_match(predictions, references)
        return out
    finally:
        model.train()


def reference_perplexity(model, tokenizer, max_length: int, device) -> float:
    """Perplexity on a short general-English text: how much a fine-tune has
    made the model forget about ordinary language."""
    text = (resources.files("tunewire.services.training") / "reference_text.txt").read_text()
    rows = [{"text": p} for p in text.split("\n\n") if p.strip()]
    model.eval()
    try:
        total, count = loss_sum(PRETRAIN, model, rows, tokenizer, max_length, {}, device)
    finally:
        model.train()
    return math.exp(min(total / count, 50)) if count else 0.0
