"""Hyperparameter checks and defaults, without gRPC."""

import pytest

from tunewire.services.common.errors import InvalidArgument
from tunewire.services.training.config import CLASSIFY, DEFAULTS, FULL, auto_epochs, resolve_config


def test_defaults_fill_what_is_unset_and_say_so():
    config = resolve_config({"learning_rate": 1e-3}, train_rows=100)
    assert config.learning_rate == 1e-3
    assert config.batch_size == DEFAULTS["batch_size"]
    assert "learning_rate" not in config.auto and "epochs" in config.auto and "batch_size" in config.auto
    assert config.epochs == auto_epochs(100) == 12


@pytest.mark.parametrize(
    "field, value",
    [
        ("learning_rate", 0.0),
        ("learning_rate", 2.0),
        ("epochs", 0),
        ("batch_size", 0),
        ("max_seq_length", 4),
        ("lora_rank", 0),
        ("lora_dropout", 1.0),
        ("lora_alpha", -1.0),
        ("warmup_fraction", 1.0),
        ("weight_decay", -0.1),
        ("lora_target_modules", ["q_proj; rm -rf"]),
        ("precision", "fp8"),
        ("prompt_word_dropout", 0.6),
        ("ema_decay", 1.0),
    ],
)
def test_each_bad_hyperparameter_names_its_field(field, value):
    with pytest.raises(InvalidArgument) as caught:
        resolve_config({field: value}, train_rows=100)
    assert [v.field for v in caught.value.violations] == [f"spec.hyperparameters.{field}"]


def test_all_bad_fields_are_reported_at_once():
    with pytest.raises(InvalidArgument) as caught:
        resolve_config({"learning_rate": -1.0, "epochs": 0}, train_rows=10)
    assert len(caught.value.violations) == 2


def test_auto_epochs_shrink_as_data_grows():
    assert auto_epochs(10) == 12 and auto_epochs(500) == 4 and auto_epochs(5000) == 2 and auto_epochs(50000) == 1


def test_steps_per_epoch_counts_each_workers_share():
    config = resolve_config({"batch_size": 8}, train_rows=100)
    assert config.steps_per_epoch(100, 2) == 7  # 50 rows per worker
    assert config.steps_per_epoch(100, 1) == 13


def test_a_job_searches_when_its_learning_rate_is_unset():
    from tunewire.services.training.config import DEFAULT_MAX_TRIALS, SEARCH_LEARNING_RATES, resolve_search

    plan = resolve_search({}, {}, "lora", 40)
    assert [c["learning_rate"] for c in plan.candidates] == SEARCH_LEARNING_RATES["lora"][:DEFAULT_MAX_TRIALS]
    assert resolve_search({}, {"learning_rate": 1e-3}) is None  # every searched value set: it trains once
    assert resolve_search({"mode": "off"}, {}) is None
    # On, with a learning rate set: the ranks are searched at that rate.
    ranks = resolve_search({"mode": "on", "lora_ranks": [4, 16]}, {"learning_rate": 1e-3})
    assert [(c["learning_rate"], c["lora_rank"]) for c in ranks.candidates] == [(1e-3, 4), (1e-3, 16)]
    # The trial budget takes the candidates in order.
    one = resolve_search({"max_trials": 1, "learning_rates": [1e-3, 2e-3]}, {}, "lora", 40)
    assert [c["learning_rate"] for c in one.candidates] == [1e-3]


def test_the_default_search_time_grows_with_the_rows_a_trial_sees_and_bounds_the_trials_after_the_first():
    from tunewire.services.training.config import DEFAULT_SEARCH_SECONDS, SearchPlan, resolve_search

    # A second per training row a trial sees (rows × epochs), at least the default.
    assert resolve_search({}, {}, "lora", 20).max_seconds == DEFAULT_SEARCH_SECONDS
    assert resolve_search({}, {}, "lora", 30).max_seconds == DEFAULT_SEARCH_SECONDS  # 30 × 12 epochs
    assert resolve_search({}, {}, "lora", 38).max_seconds == 38 * 12
    assert resolve_search({}, {}, "lora", 150).max_seconds == 150 * 12
    # Epochs the job set count, and a time the job set wins.
    assert resolve_search({}, {"epochs": 1}, "lora", 150).max_seconds == DEFAULT_SEARCH_SECONDS
    assert resolve_search({"max_seconds": 60}, {}, "lora", 150).max_seconds == 60
    # The default bounds only the trials after the first; a time the job set
    # bounds every trial (as did every plan saved before the rule).
    assert not resolve_search({}, {}, "lora", 38).time_bounds_first_trial
    assert resolve_search({"max_seconds": 456}, {}, "lora", 38).time_bounds_first_trial
    assert SearchPlan.from_dict({"candidates": [{"learning_rate": 1e-3}], "max_seconds": 60}).time_bounds_first_trial


def test_a_bad_search_is_refused_naming_each_field():
    from tunewire.services.training.config import resolve_search

    with pytest.raises(InvalidArgument) as caught:
        resolve_search({"max_trials": 1000, "max_seconds": 5, "learning_rates": [2.0]}, {})
    assert {v.field for v in caught.value.violations} == {"spec.search.max_trials", "spec.search.max_seconds", "spec.search.learning_rates"}
    with pytest.raises(InvalidArgument) as caught:
        resolve_search({"learning_rates": [1e-3]}, {"learning_rate": 1e-3})
    assert [v.field for v in caught.value.violations] == ["spec.search.learning_rates"]
    with pytest.raises(InvalidArgument) as caught:
        resolve_search({"lora_ranks": [8]}, {}, "full")
    assert [v.field for v in caught.value.violations] == ["spec.search.lora_ranks"]


def test_a_requested_model_that_cannot_be_loaded_is_the_requests_fault(tmp_path):
    from transformers import AutoConfig

    from tunewire.services.common.models import loading_requested_model

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # no model_type: transformers raises ValueError
    with pytest.raises(InvalidArgument) as caught, loading_requested_model(str(broken), "spec.base_model"):
        AutoConfig.from_pretrained(broken)
    assert caught.value.violations[0].field == "spec.base_model"
    assert "cannot be loaded" in caught.value.violations[0].description and "model_type" not in str(caught.value)


def test_the_model_card_says_what_was_trained_how_and_what_it_scored():
    from tunewire.services.common.models import hub_name
    from tunewire.services.training.model_card import model_card

    report = {
        "run": "trial-1",
        "best_step": 35,
        "test_rows": 5,
        "base_metrics": {"exact_match": 0.0, "perplexity": 6.59},
        "tuned_metrics": {"exact_match": 0.8, "perplexity": 1.04},
        "general_questions": 44,
        "general_correct_before": 30,
        "general_correct_after": 32,
        "general_kept": 0.967,
        "reference_perplexity_before": 29.15,
        "reference_perplexity_after": 30.22,
        "forgetting_budget": 0.1,
        "within_forgetting_budget": True,
    }
    card = model_card(
        base_model=hub_name("smollm2-135m-instruct"),
        job_id="job-1",
        dataset_id="ds-abc",
        train_rows=40,
        task="sft",
        method="lora",
        hyperparameters=DEFAULTS | {"learning_rate": 2e-3, "epochs": 10},
        report=report,
    )
    front = card.split("---")[1]
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in front and "library_name: peft" in front
    assert "AutoPeftModelForCausalLM" in card and "`ds-abc`" in card and "40 training rows" in card
    assert "| learning_rate | 0.002 |" in card and "| epochs | 10 |" in card and "| lora_target_modules | all-linear |" in card
    assert "| exact_match | 0 | 0.8 |" in card and "trial-1`, step 35" in card
    assert "30 of 44 by the base model, 32 after" in card and "29.15 before, 30.22 after" in card and "within it" in card
    # A classifier's card, and a model given by directory: named as given, no Hub link.
    card = model_card(
        base_model="/models/encoder",
        job_id="job-2",
        dataset_id="ds-x",
        train_rows=9,
        task=CLASSIFY,
        method=FULL,
        hyperparameters=DEFAULTS,
        report={"tuned_metrics": {"accuracy": 1.0}},
    )
    assert "pipeline_tag: text-classification" in card and "huggingface.co" not in card and "lora_rank" not in card
