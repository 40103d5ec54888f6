"""A job's event stream rendered as a live progress bar (loss, learning rate,
tokens/s, ETA), with evaluations and state changes printed as they come."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tunewire.clients.sdk import TrainingClient
from tunewire.v1 import training_pb2


def state_name(state: int) -> str:
    return training_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


def follow_job(client: TrainingClient, job_id: str, console: Console) -> training_pb2.Job:
    """Streams the job's events until it ends; returns the final job."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metrics]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
        bar = progress.add_task("queued", total=None, metrics="")
        for event in client.stream_events(job_id):
            kind = event.WhichOneof("event")
            if kind == "state":
                progress.update(bar, description=state_name(event.state).lower())
                if event.error:
                    console.print(f"[red]{event.error}")
            elif kind == "step":
                s = event.step
                if not console.is_terminal:
                    # No live bar in a log file: one line per step instead.
                    console.print(
                        f"  step {s.step}/{s.total_steps} epoch {s.epoch:.2f} loss {s.loss:.3f} lr {s.learning_rate:.2e} "
                        f"{s.tokens_per_second:,.0f} tok/s ETA {s.eta_seconds:,.0f}s"
                    )
                progress.update(
                    bar,
                    total=s.total_steps,
                    completed=s.step,
                    metrics=f"loss {s.loss:.3f}  lr {s.learning_rate:.2e}  {s.tokens_per_second:,.0f} tok/s  ETA {s.eta_seconds:,.0f}s",
                )
            elif kind == "eval":
                e = event.eval
                console.print(f"  step {e.step}: {e.split} loss {e.loss:.3f} (perplexity {e.perplexity:.2f})")
            elif kind == "log":
                console.print(f"  {event.log}")
    return client.get_job(job_id)
