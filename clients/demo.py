"""The demo: upload → fine-tune → hot-load → generate, over the real services.

It teaches SmolLM2 the facts of a company that does not exist, with no
hyperparameters set: the orchestrator searches the learning rate on Ray
Tune (the trials show as a table while they run), keeps the base model's
general answers with its retention penalty, and checks them against the
forgetting budget. Then it asks the fine-tuned model questions worded
differently from the dataset's, and general questions, beside the base model.
"""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tunewire.clients import sdk
from tunewire.clients.local_stack import LocalStack
from tunewire.clients.progress import follow_job, print_evaluation, state_name
from tunewire.services.training.metrics import is_correct
from tunewire.v1 import training_pb2

BASE_MODEL = "smollm2-135m-instruct"
# General questions a fine-tune must not break (the ones the issue of
# forgetting shows: a capital, a colour, the primary colours, arithmetic).
GENERAL_QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of Japan?",
    "What are the three primary colors?",
    "What is the opposite of hot?",
    "What is 100 divided by 10?",
]


def demo_data(name: str) -> Path:
    return Path(str(resources.files("tunewire.clients") / "data" / name))


def demo_dataset() -> Path:
    """48 prompt/completion rows: 16 facts of a made-up company, three ways each."""
    return demo_data("facts.jsonl")


def held_out_questions() -> list[dict]:
    """The same facts asked in words the dataset does not use: {prompt, answer terms}."""
    return [json.loads(line) for line in demo_data("facts_heldout.jsonl").read_text().splitlines() if line.strip()]


def run_demo(console: Console, home: Path, workers: int) -> int:
    started = time.monotonic()
    home = home.expanduser().resolve()
    stack = LocalStack(env={"TUNEWIRE_HOME": str(home)}, log_dir=home / "logs")
    with console.status("starting the three services (the first run converts the bundled model, ~30 s)"):
        stack.__enter__()
    try:
        console.print(f"[green]services up[/green] in {time.monotonic() - started:.0f}s; logs in {stack.log_dir}")
        with (
            sdk.DatasetClient(stack.address("dataset")) as datasets,
            sdk.TrainingClient(stack.address("training")) as training,
            sdk.InferenceClient(stack.address("inference")) as inference,
        ):
            upload = datasets.upload(demo_dataset(), name="marrowfield-facts")
            d = upload.dataset
            console.print(f"1. uploaded [bold]{d.id}[/bold]: {d.row_count} rows, splits {dict(d.split_row_counts)}")

            job_started = time.monotonic()
            job = training.create_job(BASE_MODEL, d.id, num_workers=workers)
            console.print(
                f"2. fine-tuning job [bold]{job.id}[/bold]: LoRA on {BASE_MODEL}, {workers} Ray Train worker(s) a trial, "
                "no hyperparameters set (the learning rate is searched)"
            )
            job = follow_job(training, job.id, console)
            if job.state != training_pb2.JOB_STATE_SUCCEEDED:
                console.print(f"[red]job {state_name(job.state)}: {escape(job.error)}")
                return 1
            console.print(f"the job took {time.monotonic() - job_started:.0f}s")
            print_evaluation(job.evaluation, console)

            adapter = next(a for a in training.list_adapters() if a.id == job.adapter_id)
            if adapter.held_back:
                console.print("[yellow]the adapter is over its forgetting budget, so it is not hot-loaded; loading it by hand to show it")
                inference.load_adapter(job.adapter_id, adapter.uri)
            loaded = inference.wait_for_adapter(job.adapter_id)
            console.print(
                f"3. adapter [bold]{job.adapter_id}[/bold] servable {loaded.publish_to_servable_seconds:.2f}s after publication (no restart)"
            )
            _compare(console, inference, job.adapter_id)
        console.print(f"demo finished in {time.monotonic() - started:.0f}s")
        return 0
    finally:
        with console.status("stopping the services"):
            stack.stop()


def _compare(console: Console, inference: sdk.InferenceClient, adapter_id: str) -> None:
    """Held-out task questions and general questions, base model beside the fine-tuned one."""
    questions = held_out_questions()
    table = Table("question (worded unlike the dataset)", "base model", "fine-tuned", "", show_lines=True, title="4. the task")
    right = 0
    for q in questions:
        base = inference.generate(q["prompt"], max_new_tokens=40).text.strip()
        tuned = inference.generate(q["prompt"], adapter=adapter_id, max_new_tokens=40).text.strip()
        correct = is_correct(tuned, q["answer"])
        right += correct
        table.add_row(escape(q["prompt"]), escape(base), escape(tuned), "✔" if correct else "✘")
    console.print(table)
    console.print(f"held-out questions answered correctly: {right} of {len(questions)}")
    table = Table("general question", "base model", "fine-tuned", show_lines=True, title="5. what the base model knew")
    for prompt in GENERAL_QUESTIONS:
        base = inference.generate(prompt, max_new_tokens=32).text.strip()
        tuned = inference.generate(prompt, adapter=adapter_id, max_new_tokens=32).text.strip()
        table.add_row(escape(prompt), escape(base), escape(tuned))
    console.print(table)
