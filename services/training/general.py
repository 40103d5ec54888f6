"""General ability: what a fine-tune must not break, measured and kept.

Two bundled sets of general prompts, kept apart:

- **The probe** (`data/general_probe.json`): questions with reference answers
  (facts, arithmetic, simple instructions). An answer is correct when it
  contains every reference term. Forgetting is the share of the questions the
  base model answers correctly that the tuned model gets wrong.
- **The retention prompts** (`data/general_prompts.json`): the base model's
  own answers to them are what training keeps. Each step adds a KL penalty
  between the tuned model's next-token distribution on those answers and the
  base model's (its top TOP_K tokens and the rest of the mass as one), so the
  task is learned without moving what the model says elsewhere.

The base model answers both once; `GeneralReference` holds the result and is
cached in the artifact store per base model. Nothing here imports Ray.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import resources

import torch

from tunewire.services.common.text import IGNORE_INDEX
from tunewire.services.training import decoding, tasks
from tunewire.services.training.metrics import is_correct

PROBE_ANSWER_TOKENS = 32
# A probe question counts when the base model's answer is correct within its
# first this many tokens: a right answer reached only at the end of a long
# ramble flips with any change to the ramble, and would measure noise, not
# forgetting.
PROBE_MATCH_TOKENS = 16
# How much of each base answer the KL penalty holds. At 16 tokens the form of
# general answers drifted, arithmetic most often ("To find 9 times 9, we can
# use..." where the base gives the number); holding 32 kept as many of the
# probe's answers or more on four fact sets (up to four more of 72), for
# about 12% more tokens a step.
RETENTION_ANSWER_TOKENS = 32
TOP_K = 32
SCORING_BATCH = 32
# Bumped when what a reference holds, or how it is made, changes.
FORMAT = 4


def _data(name: str) -> str:
    return (resources.files("tunewire.services.training") / "data" / name).read_text()


def probe_questions() -> list[dict]:
    """[{prompt, answer: [terms, each 'a|b' for alternatives]}]"""
    return json.loads(_data("general_probe.json"))


def retention_prompts() -> list[str]:
    return json.loads(_data("general_prompts.json"))


def reference_version(answering: str) -> str:
    """Names a cached reference: the bundled prompts and how they are
    answered (`answering`: the job's way of generating answers, which a
    tuned model's answers are compared in, FineTuneRecipe.answering)."""
    made_with = json.dumps(
        [FORMAT, PROBE_ANSWER_TOKENS, PROBE_MATCH_TOKENS, RETENTION_ANSWER_TOKENS, TOP_K, probe_questions(), retention_prompts(), answering]
    )
    return hashlib.sha256(made_with.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ProbeAnswer:
    prompt: str
    terms: list[str]
    base_answer: str
    base_correct: bool
    prompt_ids: list[int]
    # The base model's answer tokens up to the first point its text is correct.
    answer_ids: list[int]


@dataclass(frozen=True)
class RetentionTarget:
    """A prompt and the base model's answer, with the base model's top-K
    next-token log-probabilities at each answer position."""

    input_ids: list[int]
    answer_start: int
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass(frozen=True)
class GeneralReference:
    probe: list[ProbeAnswer]
    retention: list[RetentionTarget]

    @property
    def base_correct(self) -> int:
        return sum(p.base_correct for p in self.probe)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "probe": [asdict(p) for p in self.probe], "retention": [asdict(r) for r in self.retention]})

    @classmethod
    def from_json(cls, text: str) -> GeneralReference:
        data = json.loads(text)
        return cls([ProbeAnswer(**p) for p in data["probe"]], [RetentionTarget(**r) for r in data["retention"]])


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def _text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def answered_within(tokenizer, answer: list[int], terms: list[str]) -> int | None:
    """How many of the answer's tokens make it correct (None: it is not): a
    tuned model that still predicts these greedily still answers correctly.
    Where its last term ends the answer, the whole answer ("is 5" then the
    end of turn, not "is 5" then ".5")."""
    for k in range(1, len(answer) + 1):
        if is_correct(_text(tokenizer, answer[:k]), terms, more_may_follow=k < len(answer)):
            return k
    return None


def build_reference(model, tokenizer, device, retention: bool = True) -> GeneralReference:
    """The base model's answers to the probe and (with `retention`) the
    retention prompts (the model must be the base: a fresh LoRA wrapper is)."""
    targets = retention_targets(model, tokenizer, retention_answers(model, tokenizer, device), device) if retention else []
    return GeneralReference(probe_answers(model, tokenizer, device), targets)


def probe_answers(model, tokenizer, device) -> list[ProbeAnswer]:
    """The base model's answers to the probe, made the way a tuned model's
    will be (check_probe)."""
    questions = probe_questions()
    probe_prompts = [prompt_ids(tokenizer, q["prompt"]) for q in questions]
    probe = []
    # A question counts only when it is answered within PROBE_MATCH_TOKENS:
    # the rest of an answer could not change that (the report shows its start).
    answers = decoding.greedy_answers(model, tokenizer, probe_prompts, PROBE_MATCH_TOKENS, device)
    for q, prompt, answer in zip(questions, probe_prompts, answers, strict=True):
        text = _text(tokenizer, answer)
        upto = answered_within(tokenizer, answer, q["answer"])
        correct = upto is not None and upto <= PROBE_MATCH_TOKENS
        probe.append(ProbeAnswer(q["prompt"], q["answer"], text, correct, prompt, answer[:upto] if correct else []))
    return probe


def retention_answers(model, tokenizer, device) -> list[tuple[list[int], list[int]]]:
    """The base model's answers to the retention prompts: (prompt, answer) token ids."""
    prompts = [prompt_ids(tokenizer, p) for p in retention_prompts()]
    answers = decoding.greedy_answers(model, tokenizer, prompts, RETENTION_ANSWER_TOKENS, device)
    return list(zip(prompts, answers, strict=True))


def retention_targets(model, tokenizer, answers: list[tuple[list[int], list[int]]], device) -> list[RetentionTarget]:
    """The retention answers with the scores the KL penalty pulls towards,
    from one teacher-forced pass of `model` as it trains: the distributions
    training itself computes on those answers, however they were generated
    (a merged copy generates them in a third of the time)."""
    targets = []
    packing = tasks.packing_works(model, device)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(answers), SCORING_BATCH):
            chunk = answers[start : start + SCORING_BATCH]
            examples = [(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer) for prompt, answer in chunk]
            with torch.no_grad():
                logits, _, sources = tasks.label_logits(model, model, tasks.pack(examples, tokenizer.pad_token_id, packing, device))
                values, indices = logits.float().log_softmax(-1).topk(TOP_K)
            values, indices = values.cpu(), indices.cpu()
            for j, (prompt, answer) in enumerate(chunk):
                rows = sources == j
                targets.append(
                    RetentionTarget(
                        input_ids=prompt + answer,
                        answer_start=len(prompt),
                        top_ids=indices[rows].tolist(),
                        top_logprobs=[[round(v, 4) for v in step] for step in values[rows].tolist()],
                    )
                )
    finally:
        model.train(was_training)
    return targets


# Probe checks


@dataclass(frozen=True)
class ProbeResult:
    correct: list[bool]  # per probe question
    answers: list[str]  # the tuned model's answer where it was generated, else the base model's

    def kept(self, reference: GeneralReference) -> tuple[int, int]:
        """(base-correct answers still correct, base-correct answers)."""
        base = [p.base_correct for p in reference.probe]
        return sum(b and c for b, c in zip(base, self.correct, strict=True)), sum(base)


def check_probe(model, tokenizer, reference: GeneralReference, device, every_question: bool = False) -> ProbeResult:
    """Which probe questions the model answers correctly now. A question the
    base answered correctly, whose answer tokens the model still predicts
    greedily (one teacher-forced pass), is answered the same way, so only the
    others are generated. `every_question` also generates the answers to the
    questions the base got wrong (for the report's before/after counts)."""
    probe = reference.probe
    kept_examples = [(p.prompt_ids + p.answer_ids, [IGNORE_INDEX] * len(p.prompt_ids) + p.answer_ids) for p in probe if p.base_correct]
    unchanged: dict[int, bool] = {}
    if kept_examples:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                batch = tasks.pack(kept_examples, tokenizer.pad_token_id, tasks.packing_works(model, device), device)
                logits, targets, sources = tasks.label_logits(model, model, batch)
        finally:
            model.train(was_training)
        hits = (logits.argmax(-1) == targets).cpu()
        base_correct = [i for i, p in enumerate(probe) if p.base_correct]
        for j, question in enumerate(base_correct):
            unchanged[question] = bool(hits[sources == j].all())
    correct = [p.base_correct and unchanged.get(i, False) for i, p in enumerate(probe)]
    answers = [p.base_answer for p in probe]
    changed = [i for i, p in enumerate(probe) if p.base_correct and not unchanged[i]]
    base_wrong = [i for i, p in enumerate(probe) if not p.base_correct] if every_question else []
    # Each group in its own generate call: a padded batch's other prompts can
    # flip a borderline answer, and the report must count the base's correct
    # answers exactly as the checkpoint's choice during training counted them.
    for group in (changed, base_wrong):
        prompts = [probe[i].prompt_ids for i in group]

        # An answer ends once it holds its reference terms: more tokens cannot take them out again.
        def found(at: int, tokens: list[int], group=group) -> bool:
            return is_correct(_text(tokenizer, tokens), probe[group[at]].terms, more_may_follow=True)

        for i, answer in zip(
            group, decoding.greedy_answers(model, tokenizer, prompts, PROBE_ANSWER_TOKENS, device, done=found), strict=True
        ):
            answers[i] = _text(tokenizer, answer)
            correct[i] = is_correct(answers[i], probe[i].terms)
    return ProbeResult(correct, answers)


# Retention during training


def retention_examples(targets: list[RetentionTarget]) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) to pack beside a batch's own examples: labels on the answer."""
    return [(t.input_ids, [IGNORE_INDEX] * t.answer_start + t.input_ids[t.answer_start :]) for t in targets]


def retention_loss(logits: torch.Tensor, sources: torch.Tensor, targets: list[RetentionTarget], first: int) -> torch.Tensor:
    """Mean KL divergence, per answer token, from the base model's
    distribution to the tuned model's, both seen as the base's top-K tokens
    and the rest as one. `logits` are the label positions of a packed batch
    (tasks.label_logits), `sources` their examples; the retention examples are
    those from `first` on, in the order of `targets`."""
    rows = sources >= first
    if not bool(rows.any()):
        return logits.sum() * 0.0
    order = torch.unique_consecutive(sources[rows]).tolist()
    device = logits.device
    top_ids = torch.cat([torch.tensor(targets[e - first].top_ids, device=device) for e in order])
    base = torch.cat([torch.tensor(targets[e - first].top_logprobs, device=device) for e in order])
    log_q = logits[rows.to(device)].float().log_softmax(-1)
    log_q_top = log_q.gather(-1, top_ids)
    p_top = base.exp()
    p_rest = (1 - p_top.sum(-1)).clamp_min(1e-6)
    q_rest = (1 - log_q_top.exp().sum(-1)).clamp_min(1e-6)
    kl = (p_top * (base - log_q_top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return kl.mean()
