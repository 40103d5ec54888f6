"""General ability on tiny models, without Ray: the probe's scoring and its
fast path, the retention penalty, the forgetting budget's rule, and the
diagnostics."""

import dataclasses
import math
import re

import pytest
import torch

from tunewire.services.training import decoding, diagnostics, general, metrics, tasks
from tunewire.services.training.config import resolve_config
from tunewire.services.training.recipe import OVER_BUDGET, Forgetting, selection_score, validation_score


def test_an_answer_is_correct_when_it_holds_every_term_as_a_word():
    assert metrics.is_correct("The capital of France is Paris.", ["Paris"])
    assert metrics.is_correct("Seven times eight is fifty-six", ["56|fifty-six"])
    assert metrics.is_correct("Red, Blue and Yellow.", ["red", "blue", "yellow"])
    assert not metrics.is_correct("Red and Blue.", ["red", "blue", "yellow"])
    assert not metrics.is_correct("It ended in 1945.", ["4"])  # not a word of its own
    assert not metrics.is_correct("The capital of France is Tromsø.", ["Paris"])
    # A number is not the start or the end of a longer one.
    assert not metrics.is_correct("15 divided by 3 is 5.5.", ["5"])
    assert not metrics.is_correct("It costs 1,500 dollars.", ["500"])
    assert metrics.is_correct("15 divided by 3 is 5.", ["5"]) and metrics.is_correct("Paris, France", ["Paris"])
    # While an answer is written, a term counts once what follows shows it whole.
    assert not metrics.is_correct("15 divided by 3 is 5", ["5"], more_may_follow=True)
    assert not metrics.is_correct("15 divided by 3 is 5.", ["5"], more_may_follow=True)
    assert metrics.is_correct("15 divided by 3 is 5. That", ["5"], more_may_follow=True)


def test_a_base_answer_counts_only_when_its_term_is_whole(monkeypatch):
    # Token by token, as the base model wrote them; "<end>" ends the turn.
    answers = {
        "15/3?": ["15 / 3 is", " 5", ".5", "."],
        "10/2?": ["10 / 2 is", " 5", ".", " Done", "."],
        "20/4?": ["20 / 4 is", " 5", "<end>"],
    }
    monkeypatch.setattr(general, "probe_questions", lambda: [{"prompt": q, "answer": ["5"]} for q in answers])
    monkeypatch.setattr(general, "prompt_ids", lambda tokenizer, prompt: [prompt])
    monkeypatch.setattr(decoding, "greedy_answers", lambda model, tokenizer, prompts, *args, **kwargs: [answers[p[0]] for p in prompts])
    monkeypatch.setattr(general, "_text", lambda tokenizer, ids: "".join(t for t in ids if t != "<end>"))
    probe = general.probe_answers(None, None, "cpu")
    assert [p.base_correct for p in probe] == [False, True, True]
    # What a tuned model must still predict: up to what shows the term whole.
    assert probe[1].answer_ids == ["10 / 2 is", " 5", ".", " Done"] and probe[2].answer_ids == answers["20/4?"]


def test_the_bundled_sets_are_apart():
    probe = {q["prompt"] for q in general.probe_questions()}
    assert len(probe) >= 40 and not probe & set(general.retention_prompts())
    assert all(q["answer"] and all(t.strip() for t in q["answer"]) for q in general.probe_questions())


def _model(path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tokenizer = tasks.load_tokenizer(str(tiny_model_dir))
    model = _model(tiny_model_dir)
    reference = general.build_reference(model, tokenizer, "cpu")
    # A random model answers no question right: make each probe answer
    # "correct" by declaring its own first word the reference term.
    probe = []
    for p in reference.probe[:12]:
        ids = decoding.greedy_answers(model, tokenizer, [p.prompt_ids], 8, "cpu")[0]
        words = re.findall(r"[0-9A-Za-z]+", general._text(tokenizer, ids))
        upto = general.answered_within(tokenizer, ids, words[:1]) if words else None
        if upto is None:
            continue
        probe.append(general.ProbeAnswer(p.prompt, [words[0]], general._text(tokenizer, ids), True, p.prompt_ids, ids[:upto]))
    assert len(probe) >= 4
    return tokenizer, general.GeneralReference(probe, reference.retention)


def test_the_reference_round_trips_and_holds_the_base_models_answers(tiny):
    tokenizer, reference = tiny
    again = general.GeneralReference.from_json(reference.to_json())
    assert again == reference
    target = reference.retention[0]
    assert len(target.top_ids) == len(target.input_ids) - target.answer_start == len(target.top_logprobs)
    assert all(len(row) == general.TOP_K for row in target.top_ids)
    # Answers made one way are cached apart from answers made another.
    assert general.reference_version("merged-bfloat16") != general.reference_version("as-trained-bfloat16")


def test_a_reference_for_a_job_without_retention_holds_the_same_probe_answers_only(tiny_model_dir):
    tokenizer = tasks.load_tokenizer(str(tiny_model_dir))
    model = _model(tiny_model_dir)
    full = general.build_reference(model, tokenizer, "cpu")
    probe_only = general.build_reference(model, tokenizer, "cpu", retention=False)
    assert probe_only.probe == full.probe and probe_only.retention == [] and full.retention


def test_the_probes_fast_path_agrees_with_generating_every_answer(tiny, tiny_model_dir):
    tokenizer, reference = tiny
    model = _model(tiny_model_dir)
    result = general.check_probe(model, tokenizer, reference, "cpu")
    assert all(result.correct) and result.kept(reference) == (len(reference.probe), len(reference.probe))
    # Moved weights change answers: the fast path must say what generation says.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    result = general.check_probe(model, tokenizer, reference, "cpu")
    generated = decoding.greedy_answers(model, tokenizer, [p.prompt_ids for p in reference.probe], general.PROBE_ANSWER_TOKENS, "cpu")
    truth = [metrics.is_correct(general._text(tokenizer, a), p.terms) for p, a in zip(reference.probe, generated, strict=True)]
    assert result.correct == truth and not all(truth)


def test_the_reports_probe_counts_the_base_correct_answers_as_training_does(tiny, tiny_model_dir, monkeypatch):
    tokenizer, reference = tiny
    # Half the questions marked as ones the base got wrong: the report also
    # generates those, and must not batch them with the base's correct ones.
    probe = [dataclasses.replace(p, base_correct=False, answer_ids=[]) if i % 2 else p for i, p in enumerate(reference.probe)]
    mixed = general.GeneralReference(probe, reference.retention)
    model = _model(tiny_model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    calls = []
    generate = decoding.greedy_answers

    def recording(model, tokenizer, prompts, *args, **kwargs):
        calls.append(prompts)
        return generate(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(decoding, "greedy_answers", recording)
    during_training = general.check_probe(model, tokenizer, mixed, "cpu")
    report = general.check_probe(model, tokenizer, mixed, "cpu", every_question=True)
    assert report.kept(mixed) == during_training.kept(mixed)
    wrong = {tuple(p.prompt_ids) for p in probe if not p.base_correct}
    assert any(tuple(c[0]) in wrong for c in calls if c)  # the report did generate them
    for prompts in calls:
        assert len({tuple(ids) in wrong for ids in prompts}) <= 1, "one generate call mixed base-correct and base-wrong questions"


def test_the_retention_penalty_is_zero_at_the_base_distribution_and_pulls_towards_it(tiny):
    _, reference = tiny
    targets = reference.retention[:3]
    rows = sum(len(t.top_ids) for t in targets)
    vocab = 400
    # Logits whose softmax puts the base's top-K probabilities on its tokens
    # and spreads the rest evenly: the two coarsened distributions agree.
    logits = torch.full((rows + 5, vocab), -1e4)
    sources = torch.tensor([0] * 5 + [1 + i for i, t in enumerate(targets) for _ in t.top_ids])
    row = 5
    for t in targets:
        for ids, logprobs in zip(t.top_ids, t.top_logprobs, strict=True):
            rest = max(1 - sum(math.exp(v) for v in logprobs), 1e-6)
            others = [i for i in range(vocab) if i not in set(ids)]
            logits[row, others] = math.log(rest / len(others))
            logits[row, ids] = torch.tensor(logprobs)
            row += 1
    assert float(general.retention_loss(logits, sources, targets, first=1)) == pytest.approx(0.0, abs=1e-4)
    moved = logits.clone().requires_grad_(True)
    with torch.no_grad():
        moved[5:] = moved[5:] + torch.randn(rows, vocab)
    loss = general.retention_loss(moved, sources, targets, first=1)
    loss.backward()
    assert float(loss.detach()) > 0.01
    assert float(moved.grad[:5].abs().sum()) == 0  # the batch's own rows are not touched
    assert float(general.retention_loss(logits[:5], sources[:5], targets, first=1)) == 0.0


def test_the_forgetting_budget_rule():
    budget = 0.1
    kept = Forgetting(kept=27, base_correct=30, perplexity=31.0, base_perplexity=29.0)  # 10% lost, +7%
    lost_too_many = Forgetting(kept=26, base_correct=30, perplexity=29.0, base_perplexity=29.0)
    perplexity_too_high = Forgetting(kept=30, base_correct=30, perplexity=36.0, base_perplexity=29.0)  # +24%
    assert kept.within(budget) and not lost_too_many.within(budget) and not perplexity_too_high.within(budget)
    # Within the budget, the validation score ranks; any of those beats any over it.
    assert selection_score(2.5, 10, kept, budget) < selection_score(2.6, 10, kept, budget)
    over = selection_score(0.1, 10, lost_too_many, budget)
    assert over > OVER_BUDGET > selection_score(50.0, 10, kept, budget)
    # Over it, the one that forgot less ranks first (13% of answers lost against +24% perplexity).
    assert selection_score(0.1, 10, lost_too_many, budget) < selection_score(0.1, 10, perplexity_too_high, budget)
    assert selection_score(None, 20, None, budget) < selection_score(None, 10, None, budget)  # no validation split: later is better
    # A budget of 1 is the guard off: even every answer lost and the perplexity tripled is within it.
    forgot_everything = Forgetting(kept=0, base_correct=30, perplexity=90.0, base_perplexity=29.0)
    assert forgot_everything.within(1.0) and not forgot_everything.within(0.99)
    assert selection_score(0.3, 10, forgot_everything, 1.0) == 0.3


def test_what_a_checkpoint_forgot_breaks_near_ties_within_the_budget():
    budget = 0.1
    forgot_little = Forgetting(kept=70, base_correct=71, perplexity=29.2, base_perplexity=29.0)
    forgot_more = Forgetting(kept=65, base_correct=71, perplexity=29.4, base_perplexity=29.0)  # both within 10%
    # Answers alike, losses a hair apart (late in a run): the one that forgot less ranks first.
    assert selection_score(validation_score(0.0116, 1.0), 55, forgot_little, budget) < selection_score(
        validation_score(0.0112, 1.0), 60, forgot_more, budget
    )
    # A validation answer's word more (1 of 48 words) still beats forgetting less.
    assert selection_score(validation_score(0.05, 1.0), 60, forgot_more, budget) < selection_score(
        validation_score(0.05, 47 / 48), 55, forgot_little, budget
    )
    # And so does a clearly lower loss: 0.1 nats against five answers.
    assert selection_score(validation_score(0.05, 1.0), 60, forgot_more, budget) < selection_score(
        validation_score(0.15, 1.0), 55, forgot_little, budget
    )
    # With the guard off, forgetting does not rank at all.
    assert selection_score(0.3, 10, forgot_more, 1.0) == selection_score(0.3, 10, forgot_little, 1.0) == 0.3


def test_validation_is_scored_by_the_answers_first_then_the_loss():
    # Answers holding more of the reference words beat a lower loss; equal answers go by loss.
    assert validation_score(0.40, 0.9) < validation_score(0.30, 0.8)
    assert validation_score(0.30, 0.8) < validation_score(0.40, 0.8)
    assert validation_score(0.30, None) == 0.30 and validation_score(None, None) is None
    budget, kept = 0.1, Forgetting(kept=30, base_correct=30, perplexity=29.0, base_perplexity=29.0)
    assert selection_score(validation_score(0.40, 0.9), 10, kept, budget) < selection_score(validation_score(0.30, 0.8), 5, kept, budget)


def _lora_recipe(model_dir, given: dict):
    """A LoRA prompt/completion recipe on a local model, set up (no Ray)."""
    from tunewire.services.training.recipe import FineTuneRecipe, RecipeConfig

    config = RecipeConfig(
        job_id="job-test",
        base_model=str(model_dir),
        task="sft",
        method="lora",
        dataset_uri="unused",
        train_rows=16,
        validation_rows=0,
        num_workers=1,
        use_gpu=False,
        model_cache="unused",
        artifact_root="unused",
        training=resolve_config(given, 16),
    )
    recipe = FineTuneRecipe(config)
    recipe.setup_model()
    return recipe


def test_a_lora_recipe_answers_with_its_adapter_merged_into_a_copy(tiny_model_dir):
    """On a CPU the answers (validation, probe, test split) come from a copy
    with the adapter merged in: the same logits as the wrapped model, and the
    model being trained is left as it was."""
    recipe = _lora_recipe(tiny_model_dir, {"learning_rate": 1e-3, "precision": "float32"})
    with torch.no_grad():
        for name, p in recipe.model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.5)
    recipe.model.eval()
    before = {n: p.detach().clone() for n, p in recipe.model.named_parameters()}
    ids = torch.tensor([general.prompt_ids(recipe.tokenizer, "What is the capital of France?")])
    with torch.no_grad():
        wrapped = recipe.model(input_ids=ids).logits
        base = recipe.model.get_base_model()
        with recipe.model.disable_adapter():
            unadapted = recipe.model(input_ids=ids).logits
        seen = []

        def answer(model):
            seen.append(model)
            return model(input_ids=ids).logits

        merged = recipe.with_answering_model(answer)
        assert seen[0] is not recipe.model and seen[0] is not base and seen[0].dtype == torch.float32
        assert not any("lora" in n for n, _ in seen[0].named_parameters())
        assert torch.allclose(merged, wrapped, atol=1e-4) and not torch.allclose(merged, unadapted, atol=1e-2)
        assert all(torch.equal(before[n], p) for n, p in recipe.model.named_parameters())
        assert any("lora_B" in n for n in before)
        # In bfloat16 the copy's weights are bfloat16: close to the wrapped model's answers, not the base's.
        recipe.dtype = torch.bfloat16
        in_bf16 = recipe.with_answering_model(answer).float()
        assert seen[1].dtype == torch.bfloat16 and recipe.answering == "merged-lora-cpu-bfloat16"
        assert (in_bf16 - wrapped).abs().mean() < (in_bf16 - unadapted).abs().mean() / 4
        # Within one validation the answers and the probe share one merged copy; each validation makes its own.
        with recipe.one_answering_model():
            recipe.with_answering_model(answer)
            recipe.with_answering_model(answer)
        with recipe.one_answering_model():
            recipe.with_answering_model(answer)
        assert seen[2] is seen[3] and seen[4] is not seen[2]
        recipe.with_answering_model(answer)
        assert seen[5] is not seen[4]
    # Full fine-tuning has no adapter to merge: the model itself answers.
    recipe.config = recipe.config.replace(method="full")
    assert recipe.with_answering_model(lambda model: model) is recipe.model and recipe.answering == "as-trained-full-cpu-bfloat16"
    # Each way of answering names its own cache of the base model's answers (QLoRA's 4-bit model answers apart).
    keys = set()
    for method in ("lora", "qlora", "full"):
        recipe.config = recipe.config.replace(method=method)
        keys.add(general.reference_version(recipe.answering))
    assert len(keys) == 3


def test_the_budget_is_validated():
    from tunewire.services.common.errors import InvalidArgument

    assert resolve_config({}, 100).forgetting_budget == 0.1
    for field, value in (("forgetting_budget", 1.5), ("forgetting_budget", -0.1), ("retention_weight", -1.0)):
        with pytest.raises(InvalidArgument) as caught:
            resolve_config({field: value}, 100)
        assert [v.field for v in caught.value.violations] == [f"spec.hyperparameters.{field}"]


def test_diagnostics_name_underfitting_overfitting_and_forgetting():
    falling = [{"step": 5, "loss": 2.0}, {"step": 10, "loss": 1.5}, {"step": 15, "loss": 1.2}]
    assert diagnostics.underfitting(falling, stopped_early=False)["kind"] == "underfitting"
    assert diagnostics.underfitting(falling, stopped_early=True) is None
    # Ended by the search's time: the advice names that, and what to change.
    cut = diagnostics.underfitting(falling, stopped_early=False, cut_by_time=(1.8, 10, 360))["message"]
    assert "epoch 1.8 of 10" in cut and "360 s" in cut and "max_seconds" in cut and "more epochs" not in cut
    assert diagnostics.overfitting(falling, best_step=15) is None
    rising = [{"step": 5, "loss": 2.0}, {"step": 10, "loss": 1.1}, {"step": 15, "loss": 1.4}]
    assert diagnostics.underfitting(rising, stopped_early=False) is None
    # Still a little lower at the end, but flat beside the whole run's fall.
    flattened = [{"step": 5, "loss": 0.84}, {"step": 45, "loss": 0.038}, {"step": 50, "loss": 0.036}]
    assert diagnostics.underfitting(flattened, stopped_early=False) is None
    found = diagnostics.overfitting(rising, best_step=10)
    assert found["kind"] == "overfitting" and "step 10" in found["message"]
    change = {"prompt": "What is the capital of France?", "base_answer": "Paris.", "tuned_answer": "Tromsø."}
    found = diagnostics.forgetting([change], 1, 30, 29.0, 29.1)
    assert "1 of the 30" in found["message"] and "Tromsø" in found["message"]
    assert diagnostics.forgetting([], 0, 30, 29.0, 29.1) is None


# Made of the tiny tokenizer's own words, so each is a few tokens; no city
# is a word of a question, so an answer that echoes the question is not right.
COUNTRIES = ["quick", "brown", "fox", "jumps", "over", "lazy", "dog", "matey", "hello", "world", "answer", "question", "system", "user"]
COUNTRIES += ["assistant", "Spain"]
CITIES = ["Paris", "France", "Arr", "Yo", "ho", "What", "plus", "2"] * 2


def _capital_rows(countries):
    return [
        {"prompt": f"What is the capital of {c}?", "completion": f"The capital of {c} is {CITIES[COUNTRIES.index(c)]}."} for c in countries
    ]


@pytest.fixture(scope="module")
def knowing_model_dir(tmp_path_factory):
    """A tiny model that knows something: the capitals of 16 made-up
    countries, learnt by full fine-tuning, so there is general ability to lose."""
    from transformers import AutoModelForCausalLM

    from conftest import build_tiny_causal_lm

    path = build_tiny_causal_lm(tmp_path_factory.mktemp("knowing"), hidden_size=64)
    tokenizer = tasks.load_tokenizer(str(path))
    model = AutoModelForCausalLM.from_pretrained(path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    examples = tasks.token_examples("sft", _capital_rows(COUNTRIES), tokenizer, 128)
    torch.manual_seed(0)
    for _ in range(300):
        batch = tasks.pack(examples, tokenizer.pad_token_id, True, "cpu")
        tasks.batch_loss(model, model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    return path


def test_the_retention_penalty_keeps_what_the_base_model_knew(knowing_model_dir):
    """The mitigation, end to end on a tiny model: the same fine-tune on an
    unrelated task with and without the penalty; the base model's answers to
    probe questions that training never saw are kept with it, lost without."""

    tokenizer = tasks.load_tokenizer(str(knowing_model_dir))
    base = _model(knowing_model_dir)
    probe_rows, retained_rows = _capital_rows(COUNTRIES[:8]), _capital_rows(COUNTRIES[8:])
    # The base's answers: the probe's (with each question's capital as its
    # reference) and the retention targets, as build_reference makes them.
    probe = []
    for row in probe_rows:
        prompt = general.prompt_ids(tokenizer, row["prompt"])
        ids = decoding.greedy_answers(base, tokenizer, [prompt], 12, "cpu")[0]
        city = row["completion"].split()[-1].rstrip(".")
        text = general._text(tokenizer, ids)
        upto = general.answered_within(tokenizer, ids, [city])
        probe.append(general.ProbeAnswer(row["prompt"], [city], text, upto is not None, prompt, ids[:upto] if upto else []))
    prompts = [general.prompt_ids(tokenizer, r["prompt"]) for r in retained_rows]
    answers = decoding.greedy_answers(base, tokenizer, prompts, 12, "cpu")
    retention = general.retention_targets(base, tokenizer, list(zip(prompts, answers, strict=True)), "cpu")
    reference = general.GeneralReference(probe, retention)
    assert reference.base_correct >= 6  # the base knows most of them
    task = [{"prompt": f"What is {i} plus {i}?", "completion": "Arr, matey!"} for i in range(16)]

    def kept_after_training(weight: float) -> int:
        # The penalty alone: no other regulariser in play.
        given = {"learning_rate": 1e-2, "retention_weight": weight, "precision": "float32", "lora_dropout": 0.0, "prompt_word_dropout": 0.0}
        recipe = _lora_recipe(knowing_model_dir, given)
        recipe.ddp_model, recipe.reference = recipe.model, reference
        optimizer = torch.optim.AdamW([p for p in recipe.model.parameters() if p.requires_grad], lr=1e-2)
        recipe.model.train()
        for step in range(40):
            loss, _, _ = recipe._loss(task[(step * 4) % 16 : (step * 4) % 16 + 4])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return general.check_probe(recipe.model, tokenizer, reference, "cpu").kept(reference)[0]

    without, kept = kept_after_training(0.0), kept_after_training(3.0)
    assert without <= reference.base_correct // 2 and kept >= 3 * reference.base_correct // 4
