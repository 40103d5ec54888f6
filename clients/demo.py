"""The demo: upload → fine-tune → hot-load → generate, over the real services."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunewire.clients import sdk
from tunewire.clients.local_stack import LocalStack
from tunewire.clients.progress import follow_job, print_evaluation, state_name
from tunewire.v1 import training_pb2

BASE_MODEL = "smollm2-135m-instruct"
# Not in the dataset: the adapter must generalise, not recall.
HELD_OUT_PROMPTS = [
    "What is the capital of Italy?",
    "What is 12 plus 30?",
    "How can I stay healthy?",
    "What do cats like to eat?",
]
HYPERPARAMETERS = {"learning_rate": 1e-3, "epochs": 3}


def demo_dataset() -> Path:
    return Path(str(resources.files("tunewire.clients") / "data" / "pirate.jsonl"))


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
            upload = datasets.upload(demo_dataset(), name="pirate-demo")
            d = upload.dataset
            console.print(f"1. uploaded [bold]{d.id}[/bold]: {d.row_count} rows, splits {dict(d.split_row_counts)}")

            job = training.create_job(BASE_MODEL, d.id, HYPERPARAMETERS, num_workers=workers)
            console.print(f"2. fine-tuning job [bold]{job.id}[/bold]: LoRA on {BASE_MODEL}, {workers} Ray Train workers")
            job = follow_job(training, job.id, console)
            if job.state != training_pb2.JOB_STATE_SUCCEEDED:
                console.print(f"[red]job {state_name(job.state)}: {job.error}")
                return 1
            print_evaluation(job.evaluation, console)

            loaded = inference.wait_for_adapter(job.adapter_id)
            console.print(
                f"3. adapter [bold]{job.adapter_id}[/bold] hot-loaded by the inference service "
                f"{loaded.publish_to_servable_seconds:.2f}s after publication (no restart)"
            )

            table = Table("prompt (held out)", "base model", "fine-tuned", show_lines=True, title="4. generations")
            for prompt in HELD_OUT_PROMPTS:
                base = inference.generate(prompt, max_new_tokens=48)
                tuned = inference.generate(prompt, adapter=job.adapter_id, max_new_tokens=48)
                table.add_row(prompt, base.text.strip(), tuned.text.strip())
            console.print(table)
        console.print(f"demo finished in {time.monotonic() - started:.0f}s")
        return 0
    finally:
        with console.status("stopping the services"):
            stack.stop()
