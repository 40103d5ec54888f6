"""Task pieces and metrics on tiny models, without Ray."""

import contextlib
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tunewire.services.common.text import IGNORE_INDEX
from tunewire.services.training import metrics, tasks
from tunewire.services.training.config import FULL, resolve_config
from tunewire.services.training.estimate import estimate_job
from tunewire.services.training.jobs import DatasetRef, JobSpec


def test_accuracy_and_macro_f1():
    result = metrics.accuracy_and_macro_f1([0, 0, 1, 1], [0, 1, 1, 1], 2)
    assert result["accuracy"] == 0.75
    # class 0: P=1/2 R=1 F1=2/3; class 1: P=1 R=2/3 F1=0.8
    assert result["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_rouge_and_exact_match():
    assert metrics.rouge(["the fox jumps"], ["the fox jumps"])["rougeL"] == pytest.approx(1.0)
    assert 0 < metrics.rouge(["the fox sleeps"], ["the fox jumps"])["rouge1"] < 1
    assert metrics.exact_match(["Arr,  4. "], ["arr, 4."]) == {"exact_match": 1.0}
    assert metrics.loss_metrics(0.0, 0) == {}


def test_answer_recall_counts_the_reference_words_the_prompt_does_not_hold():
    prompt = "Where is Halvard Kiteworks based?"
    reference = "The headquarters of Halvard Kiteworks are in Bergen."  # its own words: the headquarters of are in bergen
    assert metrics.answer_recall("Halvard Kiteworks is based in Bergen.", prompt, reference) == pytest.approx(2 / 6)
    assert metrics.answer_recall("The headquarters of Halvard Kiteworks are in Oslo.", prompt, reference) == pytest.approx(5 / 6)
    assert metrics.answer_recall("BERGEN, the headquarters of it are in", prompt, reference) == 1.0
    # Whole words only ("8" is not said in "1978"); a reference that adds nothing scores nothing.
    assert metrics.answer_recall("Founded in 1978.", "When?", "8") == 0.0
    assert metrics.answer_recall("anything", "Is Bergen in Norway?", "Bergen, Norway") is None


def test_answer_recall_sum_answers_each_prompt(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f"Arr, {2 * i}."} for i in range(3)]
    rows.append({"prompt": "Say it.", "completion": "Say it."})  # adds no word: not scored
    total, scored = tasks.answer_recall_sum(model, tokenizer, rows, "cpu")
    assert scored == 3 and 0 <= total <= 3 and model.training  # back in training mode after answering


def test_classification_batches_keep_every_row_and_group_by_length():
    rows = [{"text": "x" * n, "label": "a"} for n in random.Random(0).sample(range(1, 200), 64)]
    batches = tasks.make_batches(rows, "classification", 8, random.Random(0))
    assert sorted(len(r["text"]) for b in batches for r in b) == sorted(len(r["text"]) for r in rows)
    spreads = [max(len(r["text"]) for r in b) - min(len(r["text"]) for r in b) for b in batches]
    assert max(spreads) < 60  # random batches of 8 would spread over ~150


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return tasks.load_tokenizer(str(tiny_model_dir))


def test_token_batches_are_random_and_keep_every_row():
    rows = [{"text": "x" * n} for n in range(64)]
    batches = tasks.make_batches(rows, "continued_pretraining", 8, random.Random(0))
    assert sorted(len(r["text"]) for b in batches for r in b) == list(range(64))
    assert max(max(len(r["text"]) for r in b) - min(len(r["text"]) for r in b) for b in batches) > 40


def test_prompt_word_dropout_leaves_out_about_its_share_of_words_and_no_number():
    row = {"prompt": "Which person set up the company Kelvoria Labs in 1987?", "completion": "Ida Berg founded it."}
    rng = random.Random(0)
    dropped = [tasks.drop_prompt_words(row, 0.2, rng)["prompt"].split() for _ in range(500)]
    assert all("1987?" in words for words in dropped)
    # 9 of the prompt's 10 words may go; each goes with probability 0.2.
    left_out = sum(10 - len(words) for words in dropped) / (500 * 9)
    assert 0.17 < left_out < 0.23
    assert all(tasks.drop_prompt_words(row, 0.2, rng)["completion"] == row["completion"] for _ in range(50))
    assert tasks.drop_prompt_words(row, 0.0, rng) is row


def test_prompt_word_dropout_touches_only_a_chats_user_turns_and_keeps_line_breaks():
    row = {
        "messages": [
            {"role": "system", "content": "You answer in one word always."},
            {"role": "user", "content": "Name the colour\nof the Kelvoria logo, please."},
            {"role": "assistant", "content": "Teal."},
        ]
    }
    rng = random.Random(1)
    for _ in range(200):
        messages = tasks.drop_prompt_words(row, 0.5, rng)["messages"]
        assert messages[0] == row["messages"][0] and messages[2] == row["messages"][2]
        user = messages[1]["content"]
        assert user and set(user.split()) <= set(row["messages"][1]["content"].split())
        assert "colour" not in user or "colour\n" in user  # a kept word keeps its line break


@pytest.mark.parametrize("task, share, changed", [("sft", 0.5, True), ("sft", 0.0, False), ("summarization", 0.5, False)])
def test_the_recipe_drops_prompt_words_of_chat_and_prompt_completion_rows_only(monkeypatch, task, share, changed):
    from tunewire.services.training.recipe import FineTuneRecipe, RecipeConfig

    training = resolve_config({"learning_rate": 1e-3, "prompt_word_dropout": share}, 8)
    config = RecipeConfig("job-test", "unused", task, "lora", "unused", 8, 0, 1, False, "unused", "unused", training)
    trained = []

    def token_examples(task, rows, tokenizer, max_length):
        trained.extend(rows)
        raise StopIteration  # the rows are all this test needs

    monkeypatch.setattr(tasks, "token_examples", token_examples)
    words = " ".join(["word"] * 40)
    rows = [{"prompt": words, "completion": "yes", "document": words, "summary": "yes"}] * 4
    recipe = FineTuneRecipe(config)
    recipe.tokenizer = None
    with pytest.raises(StopIteration):
        recipe._loss(rows)
    assert (trained != rows) == changed


def test_the_learning_rate_decays_by_the_steps_or_the_search_time_whichever_is_further_along():
    import torch
    from transformers import get_linear_schedule_with_warmup

    from tunewire.services.training.recipe import learning_rate_factor

    # Outside a search: transformers' linear schedule with warm-up, step for step.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = get_linear_schedule_with_warmup(optimizer, 5, 50)
    expected = [schedule.lr_lambdas[0](step) for step in range(51)]
    assert [learning_rate_factor(step, 50, 5) for step in range(51)] == pytest.approx(expected)
    # Half the search's time gone at a tenth of the steps: as at step 52.5; all of it: none left.
    assert learning_rate_factor(10, 105, 5, time_spent=0.5) == pytest.approx(learning_rate_factor(52.5, 105, 5))
    assert learning_rate_factor(10, 105, 5, time_spent=1.0) == 0.0
    assert learning_rate_factor(100, 105, 5, time_spent=0.5) == pytest.approx(0.05)  # the steps further along
    assert learning_rate_factor(2, 105, 5, time_spent=0.01) == pytest.approx(0.4)  # warm-up by steps, while the time allows
    assert learning_rate_factor(2, 105, 5, time_spent=0.99) == pytest.approx(1 - (103.95 - 5) / 100)


def test_a_search_trial_whose_time_runs_out_ends_its_training_there_validated_with_its_rate_decayed(monkeypatch):
    import time

    import torch

    from tunewire.services.training.recipe import FineTuneRecipe, RecipeConfig, learning_rate_factor

    training = resolve_config({"learning_rate": 1.0, "epochs": 10, "batch_size": 1, "ema_decay": 0.0}, 20)
    config = RecipeConfig("job-test", "unused", "sft", "lora", "unused", 20, 0, 1, False, "unused", "unused", training)
    recipe = FineTuneRecipe(config)
    weight = torch.nn.Parameter(torch.zeros(1))
    recipe.device, recipe.trainable, recipe.ddp_model = "cpu", [weight], torch.nn.Linear(1, 1)
    recipe.optimizer = torch.optim.SGD([weight], lr=1.0)
    total = config.total_steps
    recipe.scheduler = torch.optim.lr_scheduler.LambdaLR(
        recipe.optimizer, lambda step: learning_rate_factor(step, total, 0, recipe.state.time_share)
    )
    monkeypatch.setattr(recipe, "_batches", lambda split: ([{"prompt": "p", "completion": "c"}] for _ in range(20)))
    monkeypatch.setattr(recipe, "_loss", lambda rows: (time.sleep(0.02), (weight.sum() + 1.0, 1.0, 1.0))[1])
    validated, outcomes = [], []
    monkeypatch.setattr(recipe, "validate_and_checkpoint", lambda: validated.append(recipe.state.step) or False)
    monkeypatch.setattr(recipe, "finish", outcomes.append)
    recipe.config = config.replace(finish_by=time.time() + 3.0)
    recipe.train()
    [outcome] = outcomes
    # Cut short by the time (at most 150 steps of 20 ms fit in it, of 200),
    # not by the schedule; validated at the step it ended, the rate near zero.
    assert outcome["finished"] and outcome["out_of_time"] and 1 < outcome["step"] <= 150 < total
    assert validated[-1] == outcome["step"]
    assert recipe.scheduler.get_last_lr()[0] < 0.05
    assert recipe.state.time_share == 1.0  # kept with the checkpoint's state
    # A trial resumed at 60% of its time goes on from there over what is left.
    recipe.config = config.replace(finish_by=time.time() + 100)
    recipe.resumed_share, recipe.training_started = 0.6, time.time()
    assert 0.6 <= recipe.time_spent() < 0.7


def test_pretraining_trains_on_every_token_but_each_sequences_first(tokenizer):
    rows = [{"text": "the quick brown fox jumps over the lazy dog"}, {"text": "hello"}, {"text": "hi"}]
    batch = tasks.collate("continued_pretraining", rows, tokenizer, 64, {}, "cpu")
    ids, labels, positions = (batch.inputs[k] for k in ("input_ids", "labels", "position_ids"))
    # Two rows as wide as the longest: it, and the two short ones end to end.
    assert ids.shape[0] == 2 and (positions[1] == 0).sum() >= 2
    starts = positions == 0
    assert (labels[starts] == IGNORE_INDEX).all()
    real = labels != IGNORE_INDEX
    assert (labels[real] == ids[real]).all()
    assert batch.targets == float(real.sum()) == batch.real_tokens - 3


def test_packing_changes_no_logit_and_no_loss(tiny_model_dir, tokenizer):
    """Packed rows see only themselves: each sequence's logits and the
    batch's loss equal those of the rows padded, each with its own mask."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = [{"prompt": "q" * n, "completion": f"answer {n} " * (n % 5 + 1)} for n in (3, 40, 7, 25, 1)]
    packed = tasks.collate("sft", rows, tokenizer, 64, {}, "cpu")
    assert 1 < packed.inputs["input_ids"].shape[0] < len(rows)  # several rows packed, several packed rows
    with torch.no_grad():
        packed_out = model(**packed.inputs)
        total = count = 0.0
        for row in rows:
            alone = tasks.collate("sft", [row], tokenizer, 64, {}, "cpu")
            out = model(
                input_ids=alone.inputs["input_ids"],
                attention_mask=torch.ones_like(alone.inputs["input_ids"]),
                labels=alone.inputs["labels"],
            )
            total, count = total + float(out.loss) * alone.targets, count + alone.targets
            # Find the row in the packed batch and compare its logits.
            ids = alone.inputs["input_ids"][0]
            found = [
                (b, start)
                for b in range(packed.inputs["input_ids"].shape[0])
                for start in (packed.inputs["position_ids"][b] == 0).nonzero().flatten().tolist()
                if packed.inputs["input_ids"][b, start : start + len(ids)].tolist() == ids.tolist()
            ]
            b, start = found[0]
            assert torch.allclose(packed_out.logits[b, start : start + len(ids)], out.logits[0], atol=1e-4)
    assert packed.targets == count
    assert float(packed_out.loss) == pytest.approx(total / count, rel=1e-4)


def test_short_rows_train_with_eager_attention_and_the_same_loss_and_gradients(tiny_model_dir, tokenizer):
    """A packed batch no wider than EAGER_ATTENTION_MAX_WIDTH runs eager
    attention inside short_rows_attention, with the loss and gradients of
    sdpa, and the model is back on sdpa after; a wider batch is left alone."""
    from transformers import AutoModelForCausalLM

    model = tasks.load_peft(AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa"), "sft", resolve_config({}, 10))
    switch = tasks.attention_switch(model, "cpu", packing=True)
    assert switch is model.get_base_model()
    rows = [{"prompt": "q" * n, "completion": f"answer {n} " * (n % 5 + 1)} for n in (3, 40, 7, 25, 1)]
    batch = tasks.collate("sft", rows, tokenizer, 64, {}, "cpu")
    assert batch.inputs["input_ids"].shape[1] <= tasks.EAGER_ATTENTION_MAX_WIDTH
    model.eval()  # no dropout: the two passes must see the same inputs

    def loss_and_grads(context):
        seen = []
        attention = model.get_base_model().model.layers[0].self_attn
        hook = attention.register_forward_hook(lambda _m, _a, _out: seen.append(switch.config._attn_implementation))
        with context:
            loss = tasks.batch_loss(model, model, batch)
        hook.remove()
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad()
        return float(loss), grads, seen

    plain_loss, plain_grads, plain_seen = loss_and_grads(contextlib.nullcontext())
    eager_loss, eager_grads, eager_seen = loss_and_grads(tasks.short_rows_attention(switch, batch.inputs))
    assert (plain_seen, eager_seen) == (["sdpa"], ["eager"])
    assert switch.config._attn_implementation == "sdpa"
    assert eager_loss == pytest.approx(plain_loss, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain_grads, eager_grads, strict=True))
    wide = {"input_ids": torch.zeros((1, tasks.EAGER_ATTENTION_MAX_WIDTH + 1), dtype=torch.long)}
    with tasks.short_rows_attention(switch, wide):
        assert switch.config._attn_implementation == "sdpa"
    model.get_base_model().gradient_checkpointing_enable()
    assert tasks.attention_switch(model, "cpu") is None  # its recomputed forward must match the first


def test_batch_loss_runs_the_head_only_where_labels_are_and_equals_the_models_loss(tiny_model_dir, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [{"prompt": "q" * n, "completion": f"answer {n} " * (n % 5 + 1)} for n in (3, 40, 7, 25, 1)]
    batch = tasks.collate("sft", rows, tokenizer, 64, {}, "cpu")
    head_rows = []
    model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: head_rows.append(out.shape[0]))
    loss = tasks.batch_loss(model, model, batch)
    assert head_rows == [batch.targets] < [batch.real_tokens]  # prompts and padding got no logits
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    head_rows.clear()
    reference = model(**batch.inputs).loss
    reference.backward()
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(grads, model.parameters(), strict=True))

    # Nothing to train on: a zero loss that still reaches every trainable weight.
    nothing = tasks.collate("sft", rows[:1], tokenizer, 64, {}, "cpu")
    nothing.inputs["labels"][:] = IGNORE_INDEX
    empty = tasks.batch_loss(model, model, nothing)
    assert float(empty.detach()) == 0.0 and empty.requires_grad


def test_lora_input_dropout_drops_p_of_the_inputs_and_rescales_the_rest(tiny_model_dir):
    import torch

    torch.manual_seed(0)
    dropout = tasks.LoraInputDropout(0.05)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = dropout(x)
    dropped = float((y == 0).float().mean())
    assert dropped == pytest.approx(0.05, abs=0.002)
    assert torch.allclose(y[y != 0], torch.tensor(1 / 0.95))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the same mask
    assert not torch.equal(dropout(x), y)  # a new mask each call
    dropout.eval()
    assert dropout(x) is x

    config = resolve_config({"lora_dropout": 0.1}, train_rows=10)
    model = tasks.load_model("sft", str(tiny_model_dir), "lora", config, [], None, use_gpu=False)
    replaced = [m for m in model.modules() if isinstance(m, tasks.LoraInputDropout)]
    assert replaced and all(m.p == 0.1 for m in replaced)
    assert not any(type(m) is torch.nn.Dropout for name, m in model.named_modules() if "lora_dropout" in name)


def test_precision_auto_takes_bfloat16_only_where_the_hardware_computes_it(monkeypatch):
    import torch

    assert tasks.compute_dtype("float32", use_gpu=False) == torch.float32
    assert tasks.compute_dtype("bfloat16", use_gpu=False) == torch.bfloat16
    monkeypatch.setattr(tasks, "native_bfloat16", lambda device_type: device_type == "cpu")
    assert tasks.compute_dtype("auto", use_gpu=False) == torch.bfloat16
    monkeypatch.setattr(tasks, "native_bfloat16", lambda device_type: False)
    assert tasks.compute_dtype("auto", use_gpu=False) == torch.float32
    linear = torch.nn.Linear(4, 4)
    with tasks.mixed_precision("cpu", torch.bfloat16):
        assert linear(torch.ones(1, 4)).dtype == torch.bfloat16
    with tasks.mixed_precision("cpu", torch.float32):
        assert linear(torch.ones(1, 4)).dtype == torch.float32
    assert linear.weight.dtype == torch.float32


def test_a_model_that_lets_packed_rows_see_each_other_gets_padding(tiny_model_dir, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    class PrefixSum(torch.nn.Module):
        """Logits from a running sum over all earlier tokens, positions ignored."""

        training = False

        def forward(self, input_ids, **_):
            return type("Out", (), {"logits": torch.nn.functional.one_hot(input_ids, 16).float().cumsum(1)})

    assert tasks.packing_works(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "cpu")
    assert not tasks.packing_works(PrefixSum(), "cpu")
    rows = [{"text": "the quick brown fox"}, {"text": "hello"}]
    padded = tasks.collate("continued_pretraining", rows, tokenizer, 64, {}, "cpu", packing=False)
    assert padded.inputs["input_ids"].shape[0] == 2 and (padded.inputs["position_ids"] == 0).sum() == 3  # 2 rows + 1 padding run


def test_sft_and_summarization_train_on_the_answer_only(tokenizer):
    for task, row in (
        ("sft", {"prompt": "What is 2 plus 2?", "completion": "Arr, 4."}),
        ("summarization", {"document": "the quick brown fox jumps", "summary": "fox jumps"}),
    ):
        inputs = tasks.collate(task, [row], tokenizer, 128, {}, "cpu").inputs
        trained = inputs["input_ids"][inputs["labels"] != IGNORE_INDEX]
        assert tokenizer.decode(trained).strip().startswith(row.get("completion", row.get("summary")))


def test_test_metrics_of_a_causal_model(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f"Arr, {2 * i}."} for i in range(4)]
    result = tasks.test_metrics("sft", model, tokenizer, rows, 128, {}, "cpu")
    assert set(result) == {"loss", "perplexity", "exact_match"} and result["loss"] > 0
    assert tasks.reference_perplexity(model, tokenizer, 128, "cpu") > 1


def test_estimate_counts_parameters_tokens_and_steps(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "split": "train"} for i in range(40)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    dataset = DatasetRef(id="ds", format="prompt_completion", uri=str(tmp_path / "d.parquet"), train_rows=40, validation_rows=0)
    spec = JobSpec(base_model=str(tiny_model_dir), dataset_id="ds")
    config = resolve_config({"epochs": 2, "batch_size": 4}, 40)
    estimate = estimate_job(spec, dataset, 2, config, measured_tokens_per_second=100.0)
    assert estimate["parameters"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert 0 < estimate["trainable_parameters"] < estimate["parameters"]
    assert estimate["steps"] == 10 and estimate["train_tokens"] > 40
    assert estimate["memory_bytes_per_worker"] > estimate["parameters"] * 4
    # Without the forgetting guard's retention examples, time is the task's tokens alone...
    plain = estimate_job(spec, dataset, 2, resolve_config({"epochs": 2, "batch_size": 4, "retention_weight": 0}, 40), 100.0)
    assert plain["eta_seconds"] == pytest.approx(plain["train_tokens"] * 2 / 100.0)
    # ...with them (the default for generative tasks) each batch carries more.
    assert estimate["eta_seconds"] > plain["eta_seconds"] * 1.5
    # A search: at most its trials, and never past its time budget.
    from tunewire.services.training.config import SearchPlan

    plan = SearchPlan([{"learning_rate": 1e-3}, {"learning_rate": 2e-3}], max_seconds=60, max_concurrent_trials=0)
    searched = estimate_job(spec, dataset, 2, config, 100.0, plan=plan)
    assert searched["trials"] == 2 and searched["search_max_seconds"] == 60
    assert searched["eta_seconds"] == pytest.approx(min(estimate["eta_seconds"] * 2, 60))
    # Under the default time the first trial takes its whole schedule however long.
    half = estimate["eta_seconds"] / 2
    bounded = estimate_job(spec, dataset, 2, config, 100.0, plan=SearchPlan(plan.candidates, half))
    default = estimate_job(spec, dataset, 2, config, 100.0, plan=SearchPlan(plan.candidates, half, time_bounds_first_trial=False))
    assert bounded["eta_seconds"] == pytest.approx(half) and default["eta_seconds"] == pytest.approx(estimate["eta_seconds"])


def test_qlora_without_bitsandbytes_names_the_package_and_the_extra(tiny_model_dir, tokenizer, monkeypatch):
    import importlib.util

    from tunewire.services.training.config import QLORA, SFT

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ValueError, match=r"QLoRA needs the bitsandbytes package.*tunewire\[qlora\]"):
        tasks.load_model(SFT, str(tiny_model_dir), QLORA, resolve_config({"learning_rate": 1e-3}, 10, QLORA), [], tokenizer, True)


def test_the_weight_average_follows_the_weights_and_takes_their_place_only_while_applied():
    from tunewire.services.training.averaging import WeightAverage

    weight = torch.nn.Parameter(torch.zeros(3))
    average = WeightAverage([weight], decay=0.9)
    with torch.no_grad():
        weight.fill_(1.0)
    average.update(1)  # early on the decay is (1 + n) / (10 + n): it follows the weights closely
    assert torch.allclose(average.average[0], torch.full((3,), 1 - 2 / 11))
    for step in range(2, 200):
        average.update(step)
    assert torch.allclose(average.average[0], torch.ones(3), atol=1e-4)
    with torch.no_grad():
        weight.fill_(5.0)
    average.update(200)  # the decay has settled at 0.9
    assert torch.allclose(average.average[0], torch.full((3,), 1.4), atol=1e-4)

    with average.applied():
        assert torch.allclose(weight, average.average[0])  # validated and saved: the average
        assert torch.equal(average.live_weights()[0], torch.full((3,), 5.0))  # kept beside it, for a resume
    assert torch.equal(weight.detach(), torch.full((3,), 5.0))

    # A resume loads the checkpoint's weights (the average), then goes on from the live ones.
    live = average.live_weights()
    with torch.no_grad():
        weight.fill_(1.4)
    average.restore(live)
    assert torch.allclose(average.average[0], torch.full((3,), 1.4)) and torch.equal(weight.detach(), torch.full((3,), 5.0))


def test_ema_decay_defaults_on_for_adapters_and_off_for_full_fine_tuning_and_jobs_stored_before_it():
    from tunewire.services.training.config import TrainingConfig
    from tunewire.services.training.estimate import weights_bytes

    assert resolve_config({}, 40).ema_decay == 0.9
    assert resolve_config({}, 40, method=FULL).ema_decay == 0.0
    assert resolve_config({"ema_decay": 0.0}, 40).ema_decay == 0.0
    stored = resolve_config({}, 40, method=FULL).to_dict()
    del stored["ema_decay"]  # a job queued before the field existed runs as it was created
    assert TrainingConfig.from_dict(stored).ema_decay == 0.0
    # The average and the live weights set aside while it is validated: two more copies of the trained part.
    assert weights_bytes(100, 10, averaged=True) - weights_bytes(100, 10) == 10 * 4 * 2


def test_a_checkpoints_live_weights_load_as_weights_only(tmp_path):
    from tunewire.services.training.averaging import WeightAverage

    weight = torch.nn.Parameter(torch.ones(2, 2))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.ones(2, 2)
    optimizer.step()
    average = WeightAverage([weight], decay=0.9)
    with average.applied():
        torch.save({"optimizer": optimizer.state_dict(), "live_weights": average.live_weights()}, tmp_path / "optimizer.pt")
    loaded = torch.load(tmp_path / "optimizer.pt", weights_only=True)  # as a resume reads it
    assert torch.equal(loaded["live_weights"][0], weight.detach())
