"""How rows and requests become tokens, the same way in training and serving.

A prompt/completion row is a two-turn chat (user, assistant). Models with a
chat template get it applied; the loss covers only assistant turns (the
completion), so the model learns to answer, not to repeat questions.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


SUMMARIZE_INSTRUCTION = "Summarize the following text.\n\n"


def row_to_messages(row: dict) -> list[dict]:
    """A dataset row (prompt/completion, chat or summarization) as chat messages."""
    if row.get("messages") is not None:
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    if row.get("document") is not None:
        return [
            {"role": "user", "content": SUMMARIZE_INSTRUCTION + row["document"]},
            {"role": "assistant", "content": row["summary"]},
        ]
    return [
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": row["completion"]},
    ]


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_for_training(tokenizer, messages: list[dict], max_length: int) -> TokenizedExample:
    """Tokens of the conversation, with labels on assistant turns only.

    The template is rendered once per turn; the text an assistant turn adds
    (its content and end-of-turn marker) is the trained span. Tokens are then
    matched to spans through the tokenizer's character offsets.
    """
    if tokenizer.chat_template:
        text = _render(tokenizer, messages, add_generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(_render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
            end = len(_render(tokenizer, messages[: i + 1], add_generation_prompt=False))
            spans.append((start, end))
        add_special = False
    else:
        # No template: prompt and completion are plain text, joined; the
        # completion ends with the end-of-sequence token.
        prefix = "".join(m["content"] for m in messages[:-1])
        text = prefix + messages[-1]["content"] + (tokenizer.eos_token or "")
        spans = [(len(prefix), len(text))] if messages[-1]["role"] == "assistant" else []
        add_special = True
    encoded = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True, truncation=True, max_length=max_length)
    labels = []
    for token_id, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        # A token that overlaps a trained span is trained: with byte-level
        # tokenizers the completion's first token often carries the space before it.
        inside = any(start < e and end > s for s, e in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    return TokenizedExample(input_ids=list(encoded["input_ids"]), labels=labels)


def prompt_text(tokenizer, messages: list[dict] | None, prompt: str | None, raw: bool) -> str:
    """The text the model continues for a generation request."""
    if messages is None:
        if raw or not tokenizer.chat_template:
            return prompt or ""
        messages = [{"role": "user", "content": prompt or ""}]
    if not tokenizer.chat_template:
        return "".join(m["content"] for m in messages)
    return _render(tokenizer, messages, add_generation_prompt=True)
