"""Greedy answers to tokenised prompts: what a job's answer-based measures
generate (validation answers, the test split's, the general probe's and its
reference).

A batch drops each row as soon as it ends (its end-of-turn token, its token
limit, or the caller's `done`), so it costs what its rows need rather than its
longest row's length times its width, and the loop does nothing else per
step. On the bundled model it makes the same tokens as transformers'
`generate` in about half the time (the probe's 133 answers: 10 s against 21 s
on 2 cores). Nothing here imports Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

BATCH_SIZE = 32


@dataclass(frozen=True)
class Answer:
    tokens: list[int]  # up to and with its end-of-turn token, if it has one


def stop_ids(model, tokenizer) -> set[int]:
    """The tokens that end an answer: the tokenizer's end and padding tokens
    and the model's own end-of-generation tokens."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return {tokenizer.eos_token_id, tokenizer.pad_token_id, *configured} - {None}


def greedy_answers(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    device,
    *,
    done: Callable[[int, list[int]], bool] | None = None,
    batch_size: int = BATCH_SIZE,
) -> list[Answer]:
    """Greedy answers, in the prompts' order, batched with left padding.
    `done(i, tokens)` ends prompt i's answer early (e.g. once it is known
    correct)."""
    stops = stop_ids(model, tokenizer)
    answers: list[Answer | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    # Only the last position's logits are made (logits_to_keep), from a slice
    # of the hidden states that is not contiguous; on a CPU a bfloat16 matmul
    # over such a view takes the slow path (a batch of 32 prompts: 2.7 s
    # against 6 ms), so the output layer gets a contiguous copy.
    contiguous = model.get_output_embeddings().register_forward_pre_hook(lambda layer, args: (args[0].contiguous(), *args[1:]))
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                chunk = range(start, min(start + batch_size, len(prompts)))
                batch = [prompts[i] for i in chunk]
                answers[start : chunk.stop] = _batch(model, tokenizer, batch, max_new_tokens, device, stops, done, start)
    finally:
        contiguous.remove()
        model.train(was_training)
    return answers


def _batch(model, tokenizer, prompts, max_new_tokens, device, stops, done, first) -> list[Answer]:
    from transformers import DynamicCache

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)  # masked out
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    tokens: list[list[int]] = [[] for _ in prompts]
    rows = list(range(len(prompts)))  # the batch's rows still answering
    cache = DynamicCache()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    while rows:
        chosen = logits.argmax(-1)
        going = []
        for at, row in enumerate(rows):
            token = int(chosen[at])
            tokens[row].append(token)
            ended = token in stops or len(tokens[row]) >= max_new_tokens or (done is not None and done(first + row, tokens[row]))
            if not ended:
                going.append(at)
        if not going:
            break
        if len(going) < len(rows):
            keep = torch.tensor(going, device=device)
            cache.batch_select_indices(keep)
            mask, positions, chosen = mask[keep], positions[keep], chosen[keep]
            rows = [rows[at] for at in going]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], -1)
        positions = positions[:, -1:] + 1
        logits = model(
            input_ids=chosen[:, None], attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
        ).logits[:, -1]
    return [Answer(t) for t in tokens]
