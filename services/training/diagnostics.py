"""What a finished run's curves and forgetting figures say, in words a user
can act on. Plain functions over plain values, so each is easy to test.

A diagnostic is {"kind": underfitting | overfitting | forgetting |
over_budget, "message": ...}.
"""

from __future__ import annotations

# A change in validation loss smaller than this share is noise.
SIGNIFICANT = 0.02
# A last fall smaller than this share of the run's whole fall is a curve
# flattening at its floor (0.038 -> 0.036 after 0.84 -> 0.038), not one
# that more training would take much further.
STILL_FALLING = 0.1


def _loss_points(history: list[dict]) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in sorted(history, key=lambda h: h["step"]) if h.get("loss") is not None]


def underfitting(history: list[dict], stopped_early: bool, cut_by_time: tuple[float, int, float] | None = None) -> dict | None:
    """The validation loss was still falling steeply when training ended.
    `cut_by_time`: (epoch reached, epochs planned, the search's seconds) when
    the search's time ended the run before its last epoch, which the advice
    then names."""
    points = _loss_points(history)
    if stopped_early or len(points) < 2:
        return None
    (step_before, before), (step_last, last) = points[-2], points[-1]
    whole_fall = max(loss for _, loss in points) - last
    falling = last < min(loss for _, loss in points[:-1]) and last < before * (1 - SIGNIFICANT)
    if falling and before - last >= STILL_FALLING * whole_fall:
        return {
            "kind": "underfitting",
            "message": (
                f"validation loss was still falling at the end ({before:.3f} at step {step_before}, {last:.3f} at step {step_last}): "
                + (
                    f"the search's time ({cut_by_time[2]:g} s) ended training at epoch {cut_by_time[0]:.1f} of {cut_by_time[1]}; "
                    "a search with more time (max_seconds), or the learning rate set (one run, no time limit), would let it finish"
                    if cut_by_time
                    else "more epochs or a higher learning rate would likely help"
                )
            ),
        }
    return None


def overfitting(history: list[dict], best_step: int) -> dict | None:
    """The validation loss rose after the published step."""
    points = _loss_points(history)
    best = next((loss for step, loss in points if step == best_step), None)
    later = [(step, loss) for step, loss in points if step > best_step]
    if best is None or not later:
        return None
    step_worst, worst = max(later, key=lambda p: p[1])
    if worst <= best * (1 + SIGNIFICANT):
        return None
    return {
        "kind": "overfitting",
        "message": (
            f"validation loss rose after step {best_step} ({best:.3f}, then up to {worst:.3f} at step {step_worst}): "
            f"the weights of step {best_step} are published; more data or fewer epochs would spend less time past it"
        ),
    }


def forgetting(changes: list[dict], lost: int, base_correct: int, perplexity_before: float, perplexity_after: float) -> dict | None:
    """General answers the base model got right that the tuned model gets wrong."""
    if not lost and perplexity_after <= perplexity_before * (1 + SIGNIFICANT):
        return None
    parts = []
    if lost:
        examples = "; ".join(f'"{c["prompt"]}" base: "{short(c["base_answer"])}" tuned: "{short(c["tuned_answer"])}"' for c in changes[:3])
        parts.append(
            f"{lost} of the {base_correct} general questions the base model answered correctly are now answered wrongly ({examples})"
        )
    if perplexity_before and perplexity_after > perplexity_before * (1 + SIGNIFICANT):
        parts.append(f"reference-text perplexity {perplexity_before:.2f} -> {perplexity_after:.2f}")
    return {"kind": "forgetting", "message": "; ".join(parts)}


def over_budget(budget: float, lost: int, base_correct: int, perplexity_rise: float) -> dict:
    """No checkpoint stayed within the forgetting budget."""
    return {
        "kind": "over_budget",
        "message": (
            f"no checkpoint stayed within the forgetting budget ({budget:.0%}): the one that forgot least is published "
            f"({lost} of {base_correct} general answers lost, reference perplexity {perplexity_rise:+.0%}) and it is not "
            "hot-loaded; load it by hand to serve it anyway, or raise forgetting_budget, lower the learning rate or "
            "raise retention_weight"
        ),
    }


def short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
