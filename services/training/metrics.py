"""Evaluation metrics on plain Python values (no torch), so they are easy to test."""

from __future__ import annotations

import math
import re


def accuracy_and_macro_f1(predictions: list[int], labels: list[int], num_labels: int) -> dict[str, float]:
    if not labels:
        return {}
    correct = sum(p == t for p, t in zip(predictions, labels, strict=True))
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and t == c for p, t in zip(predictions, labels, strict=True))
        fp = sum(p == c and t != c for p, t in zip(predictions, labels, strict=True))
        fn = sum(p != c and t == c for p, t in zip(predictions, labels, strict=True))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": correct / len(labels), "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0}


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures (Google's rouge-score, with stemming)."""
    if not references:
        return {}
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references, strict=True):
        for name, score in scorer.score(reference, prediction).items():
            totals[name] += score.fmeasure
    return {name: total / len(references) for name, total in totals.items()}


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def exact_match(predictions: list[str], references: list[str]) -> dict[str, float]:
    if not references:
        return {}
    hits = sum(_normalise(p) == _normalise(r) for p, r in zip(predictions, references, strict=True))
    return {"exact_match": hits / len(references)}


def _words(text: str) -> list[str]:
    return re.findall(r"[0-9a-z]+", text.lower())


def answer_recall(prediction: str, prompt: str, reference: str) -> float | None:
    """The share of the reference answer's own words (those the prompt does
    not already hold) that the prediction contains: for "Where is Halvard
    Kiteworks based?" and "The headquarters of Halvard Kiteworks are in
    Bergen.", whether "headquarters", "are", "in" and "bergen" are said. None
    when the reference adds no word to the prompt."""
    asked = set(_words(prompt))
    own = [w for w in dict.fromkeys(_words(reference)) if w not in asked]
    if not own:
        return None
    said = set(_words(prediction))
    return sum(w in said for w in own) / len(own)


def loss_metrics(loss_sum: float, tokens: float) -> dict[str, float]:
    if not tokens:
        return {}
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50))}


# A term is a word of its own: no letter or digit beside it, and a number is
# not the start or the end of a longer one ("5" is not found in "5.5" or "1,500").
_TERM_BEFORE = r"(?<![0-9A-Za-z])(?<![0-9][.,])"
_TERM_AFTER = r"(?![0-9A-Za-z])(?![.,][0-9])"
# While an answer is being written, a term counts once what follows it shows it
# is whole: "is 5" may still become "is 5.5", "is 5." may too.
_TERM_AFTER_SETTLED = r"(?=[^0-9A-Za-z.,]|[.,][^0-9])"


def is_correct(answer: str, terms: list[str], more_may_follow: bool = False) -> bool:
    """Every term (or one of its '|' alternatives) appears in the answer as a
    word of its own: "4" is not found in "1945", nor "5" in "5.5".
    `more_may_follow`: the answer is a prefix of one still being generated."""
    after = _TERM_AFTER_SETTLED if more_may_follow else _TERM_AFTER
    return all(
        any(re.search(rf"{_TERM_BEFORE}{re.escape(alt.strip())}{after}", answer, re.IGNORECASE) for alt in term.split("|"))
        for term in terms
    )
