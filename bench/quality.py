"""What a fine-tune gives its user: the task learned, general ability kept,
and the time it took, for tunewire with no hyperparameters set beside what
users would otherwise get, on the same data in the same run.

Two tasks, each trained by every contender on the same training rows:

- facts: 45 prompt/completion rows teaching 15 facts of a company that does
  not exist, three phrasings each (bench/data/quality_facts_train.jsonl).
  Scored on 30 questions worded differently from every training row
  (quality_facts_test.jsonl), on 40 general questions of the bench's own
  (quality_general.jsonl: none of them in tunewire's bundled probe or
  retention prompts; "kept" is the share of the base model's correct answers
  still correct), on tunewire's bundled probe the same way, and on the
  reference text's perplexity.
- sentiment: clients/data/sentiment.jsonl on all-minilm-l6-v2 (sequence
  classification); accuracy and macro-F1 on the dataset's test split.

Contenders:

- tunewire, no hyperparameters: the learning rate searched on Ray Tune, the
  forgetting guard on (its defaults);
- tunewire before the search and guard: its former automatic choice
  (learning rate 2e-4, 10 epochs as its automatic epochs were), no retention, no budget, no
  prompt word dropout, the last step's weights (no average);
- a plain Hugging Face `Trainer` + PEFT script with the libraries' defaults
  (TrainingArguments: lr 5e-5, 3 epochs, batch 8; LoraConfig: rank 8 on the
  attention projections PEFT picks for the architecture).

Every model is scored by the same code here, from the adapter on disk.

    .venv/bin/python -m bench.quality
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from importlib import resources
from pathlib import Path

from bench.common import write_results
from tunewire.clients.local_stack import LocalStack
from tunewire.clients.sdk import DatasetClient, TrainingClient
from tunewire.services.common.models import resolve_model
from tunewire.services.training.config import CLASSIFY, SFT
from tunewire.services.training.metrics import is_correct
from tunewire.v1 import training_pb2

DATA = Path(__file__).resolve().parent / "data"
CAUSAL_MODEL = "smollm2-135m-instruct"
ENCODER_MODEL = "all-minilm-l6-v2"
ANSWER_TOKENS = 40
MAX_LENGTH = 512
# What tunewire chose before the search and the forgetting guard existed.
BEFORE = {
    "learning_rate": 2e-4,
    "epochs": 10,
    "retention_weight": 0.0,
    "forgetting_budget": 1.0,
    "prompt_word_dropout": 0.0,
    "ema_decay": 0.0,
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# Scoring, the same for every contender


def answers(model, tokenizer, questions: list[str]) -> list[str]:
    """Greedy answers, one question at a time: in a padded batch an answer
    the base model only just gets right can flip with its neighbours."""
    from tunewire.services.training import tasks

    return [tasks._generate(model, tokenizer, [[{"role": "user", "content": q}]], ANSWER_TOKENS, "cpu")[0] for q in questions]


def share_correct(model, tokenizer, items: list[dict]) -> tuple[float, list[bool]]:
    correct = [is_correct(a, i["answers"]) for a, i in zip(answers(model, tokenizer, [i["question"] for i in items]), items, strict=True)]
    return sum(correct) / len(correct), correct


def kept(base_correct: list[bool], tuned_correct: list[bool]) -> float:
    """Of the base model's correct answers, the share still correct."""
    return sum(b and t for b, t in zip(base_correct, tuned_correct, strict=True)) / max(1, sum(base_correct))


def score_facts(model, tokenizer, base: dict, reference) -> dict:
    from tunewire.services.training import general, tasks

    model.eval()
    held_out, _ = share_correct(model, tokenizer, read_jsonl(DATA / "quality_facts_test.jsonl"))
    _, general_correct = share_correct(model, tokenizer, read_jsonl(DATA / "quality_general.jsonl"))
    probe = general.check_probe(model, tokenizer, reference, "cpu")
    still, of = probe.kept(reference)
    return {
        "held-out accuracy": held_out,
        "general right (bench's own)": f"{sum(general_correct)}/{len(general_correct)}",
        "general kept (bench's own)": kept(base["general"], general_correct) if base else 1.0,
        "bundled probe kept": still / max(1, of),
        "reference perplexity": tasks.reference_perplexity(model, tokenizer, MAX_LENGTH, "cpu"),
    }


def score_sentiment(model, tokenizer, test_rows: list[dict], labels: list[str]) -> dict:
    from tunewire.services.training import tasks

    result = tasks.test_metrics(CLASSIFY, model, tokenizer, test_rows, MAX_LENGTH, {label: i for i, label in enumerate(labels)}, "cpu")
    return {"accuracy": result["accuracy"], "macro-F1": result["macro_f1"]}


def load_causal(model_path: str, adapter_dir: Path | None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path)
    return PeftModel.from_pretrained(model, str(adapter_dir)) if adapter_dir else model


def load_classifier(model_path: str, labels: list[str], adapter_dir: Path | None, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(labels))
    model.config.pad_token_id = tokenizer.pad_token_id
    return PeftModel.from_pretrained(model, str(adapter_dir)) if adapter_dir else model


# Contenders


def run_tunewire(
    training: TrainingClient, base_model: str, dataset_id: str, hyperparameters: dict, artifacts: Path
) -> tuple[Path, float, str]:
    """A job over gRPC and Ray Train: (adapter directory, wall seconds, what it chose)."""
    started = time.perf_counter()
    job = training.create_job(base_model, dataset_id, hyperparameters, num_workers=1)
    for event in training.stream_events(job.id, timeout=3600):
        if event.HasField("trial") and event.trial.state in (training_pb2.TRIAL_STATE_STOPPED, training_pb2.TRIAL_STATE_DONE):
            print(f"  trial {event.trial.run}: lr {event.trial.learning_rate:g}, {event.trial.message}", flush=True)
    seconds = time.perf_counter() - started
    job = training.get_job(job.id)
    if job.state != training_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"benchmark job {job.id} ended {training_pb2.JobState.Name(job.state)}: {job.error}")
    report = job.evaluation
    chose = f"lr {report.learning_rate:g}" + (f", {len(report.trials)} trials" if report.trials else "")
    return artifacts / "adapters" / job.adapter_id, seconds, chose


def run_trainer(task: str, model_path: str, rows: list[dict], labels: list[str], out: Path):
    """The script a user would write with the libraries' defaults: (model, seconds)."""
    import datasets
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, DataCollatorWithPadding, Trainer, TrainingArguments

    from tunewire.services.common.text import row_to_messages, tokenize_for_training
    from tunewire.services.training import tasks

    started = time.perf_counter()
    torch.manual_seed(0)
    tokenizer = tasks.load_tokenizer(model_path)
    if task == CLASSIFY:
        label_ids = {label: i for i, label in enumerate(labels)}
        encoded = [tokenizer(r["text"], truncation=True, max_length=MAX_LENGTH) | {"labels": label_ids[r["label"]]} for r in rows]
        model = get_peft_model(load_classifier(model_path, labels, None, tokenizer), LoraConfig(task_type=TaskType.SEQ_CLS))
        collator = DataCollatorWithPadding(tokenizer)
    else:
        encoded = []
        for r in rows:
            example = tokenize_for_training(tokenizer, row_to_messages(r), MAX_LENGTH)
            encoded.append({"input_ids": example.input_ids, "labels": example.labels, "attention_mask": [1] * len(example.input_ids)})
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), LoraConfig(task_type=TaskType.CAUSAL_LM))
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    arguments = TrainingArguments(output_dir=str(out), report_to=[], save_strategy="no", use_cpu=True, seed=0)
    Trainer(model=model, args=arguments, train_dataset=datasets.Dataset.from_list(encoded), data_collator=collator).train()
    return model, time.perf_counter() - started


def main() -> None:
    from tunewire.services.training import general, tasks
    from tunewire.services.training.recipe import read_split

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path(".tunewire"), help="TUNEWIRE_HOME whose converted model is reused")
    parser.add_argument("--tasks", default="facts,sentiment", help="comma-separated: facts, sentiment")
    args = parser.parse_args()
    home = args.home.resolve()
    chosen = args.tasks.split(",")
    causal_path = resolve_model(CAUSAL_MODEL, home / "models")
    encoder_path = resolve_model(ENCODER_MODEL, home / "models")
    results: list[dict] = []

    def record(task: str, what: str, seconds: float, chose: str, figures: dict) -> None:
        row = {"task": task, "what": what, "chose": chose, "wall s": seconds} | figures
        results.append(row)
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory(dir=home) as tmp:
        tmp = Path(tmp)
        env = {
            "TUNEWIRE_HOME": str(tmp / "home"),
            "TUNEWIRE_MODEL_CACHE": str(home / "models"),
            "TUNEWIRE_DATASET_PORT": "50197",
            "TUNEWIRE_TRAINING_PORT": "50198",
        }
        artifacts = tmp / "home" / "artifacts"
        with (
            LocalStack(env=env, services=("dataset", "training"), log_dir=tmp / "logs") as stack,
            DatasetClient(stack.address("dataset"), timeout=600) as datasets,
            TrainingClient(stack.address("training"), timeout=120) as training,
        ):
            if "facts" in chosen:
                dataset = datasets.upload(DATA / "quality_facts_train.jsonl", name="quality-facts").dataset
                tokenizer = tasks.load_tokenizer(causal_path)
                base_model = load_causal(causal_path, None)
                reference = general.build_reference(base_model, tokenizer, "cpu")
                base = {"general": share_correct(base_model, tokenizer, read_jsonl(DATA / "quality_general.jsonl"))[1]}
                record("facts", "base model", 0.0, "", score_facts(base_model, tokenizer, {}, reference))
                for what, hyperparameters in (("tunewire, no hyperparameters set", {}), ("tunewire before search and guard", BEFORE)):
                    adapter_dir, seconds, chose = run_tunewire(training, CAUSAL_MODEL, dataset.id, hyperparameters, artifacts)
                    record("facts", what, seconds, chose, score_facts(load_causal(causal_path, adapter_dir), tokenizer, base, reference))
                model, seconds = run_trainer(SFT, causal_path, read_split(dataset.uri, "train"), [], tmp / "trainer")
                record("facts", "Trainer + PEFT, defaults", seconds, "lr 5e-05", score_facts(model, tokenizer, base, reference))
            if "sentiment" in chosen:
                source = Path(str(resources.files("tunewire.clients") / "data" / "sentiment.jsonl"))
                dataset = datasets.upload(source, name="quality-sentiment").dataset
                labels, test_rows = list(dataset.labels), read_split(dataset.uri, "test")
                tokenizer = tasks.load_tokenizer(encoder_path)
                for what, hyperparameters in (
                    ("tunewire, no hyperparameters set", {}),
                    ("tunewire before search and guard", BEFORE),
                    ("tunewire, the README's example (lr 1e-3, 3 epochs)", {"learning_rate": 1e-3, "epochs": 3}),
                ):
                    adapter_dir, seconds, chose = run_tunewire(training, ENCODER_MODEL, dataset.id, hyperparameters, artifacts)
                    model = load_classifier(encoder_path, labels, adapter_dir, tokenizer)
                    record("sentiment", what, seconds, chose, score_sentiment(model, tokenizer, test_rows, labels))
                model, seconds = run_trainer(CLASSIFY, encoder_path, read_split(dataset.uri, "train"), labels, tmp / "trainer-cls")
                record("sentiment", "Trainer + PEFT, defaults", seconds, "lr 5e-05", score_sentiment(model, tokenizer, test_rows, labels))

    columns = ["task", "what", "chose", "wall s", "held-out accuracy", "general right (bench's own)", "general kept (bench's own)"]
    columns += ["bundled probe kept"]
    columns += ["reference perplexity", "accuracy", "macro-F1"]
    table = [{k: row.get(k, "") for k in columns} for row in results]
    write_results(
        "quality",
        table,
        notes=(
            "1 Ray Train worker per job (per trial), 2-core CPU. Wall time: CreateJob to the job's end for tunewire "
            "(the first job of a base model also builds its general reference, ~1 min); model load and training for Trainer. "
            "facts: 30 held-out paraphrases, 40 general questions of the bench's own and tunewire's 133-question probe "
            "(kept = base-correct answers still correct), greedy answers of at most 40 tokens. "
            "sentiment: the dataset service's default test split."
        ),
    )


if __name__ == "__main__":
    main()
