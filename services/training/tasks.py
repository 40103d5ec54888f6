"""What differs between fine-tuning tasks: the model and its head, how rows
become batches, the loss, and the test metrics. Plain torch/transformers/PEFT,
no Ray, so each piece is testable on a tiny model."""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from importlib import resources

import torch

from tunewire.services.common.hardware import native_bfloat16
from tunewire.services.common.text import IGNORE_INDEX, row_to_messages, tokenize_for_training
from tunewire.services.training import metrics
from tunewire.services.training.config import CLASSIFY, FULL, PRETRAIN, QLORA, SUMMARIZE, TrainingConfig

MAX_TEST_GENERATIONS = 32
MAX_NEW_TOKENS_EVAL = 64


def load_tokenizer(model_path: str):
    from tunewire.services.common.models import TRANSFORMERS_IMPORT_LOCK

    with TRANSFORMERS_IMPORT_LOCK:  # the orchestrator calls this on threads (estimates)
        from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def compute_dtype(precision: str, use_gpu: bool):
    """The dtype matmuls run in: bfloat16 when asked, or for `auto` where the
    hardware computes it natively; else float32."""
    if precision == "bfloat16" or (precision == "auto" and native_bfloat16("cuda" if use_gpu else "cpu")):
        return torch.bfloat16
    return torch.float32


def mixed_precision(device, dtype):
    """Autocast to `dtype` for the forward pass (a no-op for float32). On a
    CPU the weights and the residual stream stay float32 and only matmuls and
    attention run in bfloat16, so the loss follows float32 training's."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


# On a CPU, differentiating torch's fused attention kernel costs more than
# attention as plain matmuls ("eager") for short rows: a step of the demo's
# 74-token-wide rows took 3.42 s eager against 4.04 s (median, the two
# alternated in one process), and 128-token rows gained about as much; the
# two are level from about 192 tokens and the fused kernel wins beyond.
EAGER_ATTENTION_MAX_WIDTH = 192


def attention_switch(model, device, packing: bool = False):
    """The transformers model whose attention short_rows_attention may switch
    to eager for a training batch, or None: only on a CPU, from sdpa, without
    gradient checkpointing (whose recomputed forward must match the first),
    and, for packed batches, where eager keeps packed sequences apart too."""
    if torch.device(device).type != "cpu":
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) != "sdpa" or base.is_activation_checkpointing:
        return None
    try:
        base.set_attn_implementation("eager")
        switchable = base.config._attn_implementation == "eager" and (not packing or packing_works(model, device))
    except (ValueError, ImportError, NotImplementedError):
        switchable = False
    finally:
        base.set_attn_implementation("sdpa")
    return base if switchable else None


@contextlib.contextmanager
def short_rows_attention(switch, inputs: dict):
    """Within, a batch no wider than EAGER_ATTENTION_MAX_WIDTH runs eager
    attention (switch from attention_switch; None leaves it as it is). The
    backward pass follows the graph the forward recorded, so only the
    forward needs to be inside."""
    if switch is None or inputs["input_ids"].shape[1] > EAGER_ATTENTION_MAX_WIDTH:
        yield
        return
    switch.set_attn_implementation("eager")
    try:
        yield
    finally:
        switch.set_attn_implementation("sdpa")


def load_model(task: str, model_path: str, method: str, config: TrainingConfig, labels: list[str], tokenizer, use_gpu: bool):
    """The model to train: a causal LM or a sequence classifier, wrapped in
    LoRA unless the method is full fine-tuning. On a GPU computing in
    bfloat16 the frozen weights are stored in it too (half the memory); on a
    CPU they stay float32 under autocast (`mixed_precision`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    dtype = torch.float32
    if use_gpu and torch.cuda.is_available() and compute_dtype(config.precision, use_gpu) == torch.bfloat16:
        dtype = torch.bfloat16
    options: dict = {"dtype": dtype}
    if method == QLORA:
        import importlib.util

        from transformers import BitsAndBytesConfig

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(
                "QLoRA needs the bitsandbytes package on the training workers: install tunewire[qlora] there "
                "(the CUDA image has it), or use method lora"
            )

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
    model = get_peft_model(model, lora)
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in dropouts.items():
                if isinstance(dropout, torch.nn.Dropout):
                    dropouts[name] = LoraInputDropout(dropout.p)
    return model


class LoraInputDropout(torch.nn.Module):
    """Dropout of a LoRA layer's input, as PEFT's `lora_dropout`, drawing a
    quarter of the random bits on a CPU. torch's CPU dropout draws one random
    number per element, and with LoRA on every linear layer that was a fifth
    of a training step; this draws 64 bits at a time and uses 16 per element,
    so the drop probability is p rounded to a multiple of 1/65536 (0.05 is
    0.050003). On other devices it is torch's dropout."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * 65536) - 32768  # an int16 below this is dropped

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return torch.nn.functional.dropout(x, self.p, training=True)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None).view(torch.int16)[:n].view(x.shape)
        return x * ((bits >= self.threshold) * (1 / (1 - self.p))).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def length_grouped(rows: list[dict], batch_size: int, rng) -> list[list[dict]]:
    """Batches of text rows of similar length, so little compute goes to
    padding, in a shuffled order (not always short to long)."""
    ordered = sorted(rows, key=lambda r: len(r["text"]))
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    rng.shuffle(batches)
    return batches


def make_batches(rows: list[dict], task: str, batch_size: int, rng) -> list[list[dict]]:
    """The batches of one pass over `rows`. Token-level tasks take random
    batches (collate packs them, so no compute goes to padding, and the
    steps see the data as plain random batches would). Classification pads
    each row to its batch's longest, so its batches group similar lengths."""
    if task == CLASSIFY:
        return length_grouped(rows, batch_size, rng)
    shuffled = rng.sample(rows, len(rows))
    return [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]


def _drop_words(text: str, share: float, rng) -> str:
    """`text` with each word left out with probability `share`, except words
    with a digit (a changed number changes the question); the whitespace
    after a kept word (line breaks too) stays."""
    words = re.findall(r"\S+\s*", text)
    kept = [w for w in words if any(c.isdigit() for c in w) or rng.random() >= share]
    return text[: len(text) - len(text.lstrip())] + "".join(kept) if kept else text


def drop_prompt_words(row: dict, share: float, rng) -> dict:
    """A chat or prompt/completion row with about `share` of its prompt's
    words (a chat's user turns') left out at random, so what is learnt does
    not hang on one wording of the question."""
    if share <= 0:
        return row
    if row.get("messages") is not None:
        messages = [dict(m, content=_drop_words(m["content"], share, rng)) if m["role"] == "user" else m for m in row["messages"]]
        return {**row, "messages": messages}
    return {**row, "prompt": _drop_words(row["prompt"], share, rng)}


@dataclass
class Batch:
    """A collated batch: the model's keyword arguments and what they hold."""

    inputs: dict
    real_tokens: int  # tokens of the rows, without padding
    targets: float  # what the mean loss averages over (tokens, or rows for classification)
    # Packed token-level batches: the index of the example each position
    # came from (-1 for padding), so losses can be told apart by example.
    sources: torch.Tensor | None = None


def collate(task: str, rows: list[dict], tokenizer, max_length: int, label_ids: dict[str, int], device, packing: bool = True) -> Batch:
    """Tokenised rows as one batch: classification rows padded to the
    longest, with class ids as labels; token-level tasks packed (`pack`), or
    one row each for a model whose attention does not keep packed rows apart
    (`packing_works`)."""
    if task == CLASSIFY:
        encoded = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        inputs = {
            "input_ids": encoded["input_ids"].to(device),
            "attention_mask": encoded["attention_mask"].to(device),
            "labels": torch.tensor([label_ids[r["label"]] for r in rows], device=device),
        }
        return Batch(inputs, int(encoded["attention_mask"].sum()), float(len(rows)))
    return pack(token_examples(task, rows, tokenizer, max_length), tokenizer.pad_token_id, packing, device)


def token_examples(task: str, rows: list[dict], tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of each row of a token-level task: every token of a
    text row, the completion/assistant tokens of the others."""
    if task == PRETRAIN:
        examples = []
        for r in rows:
            text = r["text"] + (tokenizer.eos_token or "")
            ids = tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=False)["input_ids"]
            examples.append((ids, ids))
        return examples
    return [(e.input_ids, e.labels) for e in (tokenize_for_training(tokenizer, row_to_messages(r), max_length) for r in rows)]


def pack(examples: list[tuple[list[int], list[int]]], pad_id: int, packing: bool, device) -> Batch:
    """Token sequences packed end to end into rows as wide as the longest
    sequence, as few as first-fit (longest first) finds, and the rows padded
    to that width. Positions restart at 0 for each sequence, and with no
    attention mask transformers turns that into a block-diagonal mask: no
    token attends to another sequence's. A sequence's first label is dropped,
    so nothing is trained to predict it from the sequence before (it is never
    predicted unpacked either). The loss is the one of the same rows padded,
    without the compute padding costs. (Rows wider than the longest sequence
    would pad less, but attention under a block mask costs the row's width
    for every token: on CPU, bins of 512 for rows of 170 ran 25% slower.)
    Without `packing` every sequence has a row of its own: plain right
    padding, which causal attention never looks at."""
    longest_first = sorted((i for i, e in enumerate(examples) if e[0]), key=lambda i: -len(examples[i][0]))
    capacity = len(examples[longest_first[0]][0]) if longest_first and packing else 0
    bins: list[list[int]] = []  # example indices
    for index in longest_first:
        for packed in bins:
            if sum(len(examples[i][0]) for i in packed) + len(examples[index][0]) <= capacity:
                packed.append(index)
                break
        else:
            bins.append([index])
    if not bins:
        examples, bins = [([pad_id], [IGNORE_INDEX])], [[0]]  # nothing to train on: one padding row
    width = max(sum(len(examples[i][0]) for i in packed) for packed in bins)
    input_ids, labels, positions, sources, real = [], [], [], [], 0
    for packed in bins:
        row_ids, row_labels, row_positions, row_sources = [], [], [], []
        for index in packed:
            ids, lab = examples[index]
            row_ids += ids
            row_labels += [IGNORE_INDEX, *lab[1 : len(ids)]]
            row_positions += range(len(ids))
            row_sources += [index] * len(ids)
        real += len(row_ids)
        padding = width - len(row_ids)
        # Padding is a sequence of its own: nothing real attends to it.
        input_ids.append(row_ids + [pad_id] * padding)
        labels.append(row_labels + [IGNORE_INDEX] * padding)
        positions.append(row_positions + list(range(padding)))
        sources.append(row_sources + [-1] * padding)
    labels_tensor = torch.tensor(labels, dtype=torch.long)
    inputs = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long).to(device),
        "labels": labels_tensor.to(device),
        "position_ids": torch.tensor(positions, dtype=torch.long).to(device),
        # A cache would make transformers take the positions for generation's.
        "use_cache": False,
    }
    return Batch(inputs, real, float((labels_tensor[:, 1:] != IGNORE_INDEX).sum()), torch.tensor(sources, dtype=torch.long))


def batch_loss(forward, model, batch: Batch) -> torch.Tensor:
    """The batch's mean loss through `forward` (the model, or its DDP
    wrapper). For token-level tasks the vocabulary head runs only where a
    label is set: prompt tokens and padding need no logits, and the head (a
    49k-word vocabulary on SmolLM2) is a fifth of a small model's compute.
    A batch with nothing to train on (all truncated away) gives a zero loss
    that still has a graph, so it takes part in DDP's gradient all-reduce."""
    if "position_ids" not in batch.inputs:  # classification: the model's own loss
        return forward(**batch.inputs).loss
    logits, targets, _ = label_logits(forward, model, batch)
    if not logits.shape[0]:
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(logits.float(), targets)


def label_logits(forward, model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits of the positions whose next token is a label, that label,
    and the example each came from, in the batch's row-major order (an
    example's positions are consecutive and in order). The vocabulary head
    runs on those positions only."""
    labels = batch.inputs["labels"]
    targets = labels[:, 1:]
    # The logits at position t predict the token at t + 1.
    keep = torch.nn.functional.pad(targets != IGNORE_INDEX, (0, 1))
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0][keep], *args[1:]))
    try:
        logits = forward(**{k: v for k, v in batch.inputs.items() if k != "labels"}).logits
    finally:
        handle.remove()
    if logits.dim() == 3:  # a model that does not call its head as a module
        logits = logits[keep]
    sources = batch.sources[keep.cpu()] if batch.sources is not None else torch.full((logits.shape[0],), -1)
    return logits, targets[targets != IGNORE_INDEX], sources


def packing_works(model, device) -> bool:
    """Whether the model keeps packed sequences apart. Architectures built on
    transformers' mask utilities turn restarting positions into a
    block-diagonal mask; one that does not would let a sequence attend to the
    one before it, so the same three tokens twice would not give the same
    logits twice."""
    ids = torch.tensor([[5, 6, 7, 5, 6, 7]], device=device)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits.float()
    finally:
        model.train(was_training)
    return bool(torch.allclose(logits[0, :3], logits[0, 3:], atol=1e-3, rtol=1e-3))


def loss_sum(
    task: str, model, rows: list[dict], tokenizer, max_length: int, label_ids: dict[str, int], device, batch_size: int = 8
) -> tuple[float, float]:
    """Summed loss and target count over rows, without gradients."""
    total = count = 0.0
    packing = task != CLASSIFY and packing_works(model, device)
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate(task, rows[start : start + batch_size], tokenizer, max_length, label_ids, device, packing)
            if batch.targets:
                total += float(batch_loss(model, model, batch)) * batch.targets
                count += batch.targets
    return total, count


def _generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, device) -> list[str]:
    """Greedy completions of chat prompts."""
    from tunewire.services.training import decoding

    texts = [
        tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
        if tokenizer.chat_template
        else "".join(x["content"] for x in m)
        for m in prompts
    ]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    # Eight at a time: a task's prompts can be long, and a GPU's memory holds their caches.
    answers = decoding.greedy_answers(model, tokenizer, ids, max_new_tokens, device, batch_size=8)
    return [tokenizer.decode(a, skip_special_tokens=True) for a in answers]


def test_metrics(
    task: str, model, tokenizer, rows: list[dict], max_length: int, label_ids: dict[str, int], device, answering=None
) -> dict[str, float]:
    """The task's metrics on held-out rows: losses from `model`, answers
    (on at most MAX_TEST_GENERATIONS rows) from `answering` (default: `model`)."""
    if not rows:
        return {}
    model.eval()
    try:
        if task == CLASSIFY:
            predictions = []
            with torch.no_grad():
                for start in range(0, len(rows), 16):
                    inputs = collate(task, rows[start : start + 16], tokenizer, max_length, label_ids, device).inputs
                    predictions += model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.argmax(-1).tolist()
            return metrics.accuracy_and_macro_f1(predictions, [label_ids[r["label"]] for r in rows], len(label_ids))
        out = metrics.loss_metrics(*loss_sum(task, model, rows, tokenizer, max_length, label_ids, device))
        if task == PRETRAIN:
            return out
        _, references, predictions = generate_answers(
            answering if answering is not None else model, tokenizer, rows[:MAX_TEST_GENERATIONS], device
        )
        out |= metrics.rouge(predictions, references) if task == SUMMARIZE else metrics.exact_match(predictions, references)
        return out
    finally:
        model.train()


def generate_answers(model, tokenizer, rows: list[dict], device) -> tuple[list[list[dict]], list[str], list[str]]:
    """Greedy answers to prompt/completion or chat rows (to their last
    assistant turn), each up to a little longer than the longest reference:
    (prompts, references, answers)."""
    conversations = [row_to_messages(r) for r in rows]
    prompts = [c[: max(i for i, m in enumerate(c) if m["role"] == "assistant")] for c in conversations]
    references = [c[len(p)]["content"] for c, p in zip(conversations, prompts, strict=True)]
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
    return prompts, references, _generate(model, tokenizer, prompts, min(MAX_NEW_TOKENS_EVAL, longest + 8), device)


def answer_recall_sum(model, tokenizer, rows: list[dict], device) -> tuple[float, int]:
    """Summed answer recall (metrics.answer_recall) of the model's greedy
    answers to the rows' prompts, and the rows it scores."""
    if not rows:
        return 0.0, 0
    was_training = model.training
    model.eval()
    try:
        prompts, references, answers = generate_answers(model, tokenizer, rows, device)
    finally:
        model.train(was_training)
    scores = [
        metrics.answer_recall(answer, " ".join(m["content"] for m in prompt), reference)
        for prompt, reference, answer in zip(prompts, references, answers, strict=True)
    ]
    scored = [s for s in scores if s is not None]
    return sum(scored), len(scored)


def reference_perplexity(model, tokenizer, max_length: int, device) -> float:
    """Perplexity on a short general-English text: how much a fine-tune has
    made the model forget about ordinary language."""
    text = (resources.files("tunewire.services.training") / "data" / "reference_text.txt").read_text()
    rows = [{"text": p} for p in text.split("\n\n") if p.strip()]
    model.eval()
    try:
        total, count = loss_sum(PRETRAIN, model, rows, tokenizer, max_length, {}, device)
    finally:
        model.train()
    return math.exp(min(total / count, 50)) if count else 0.0
