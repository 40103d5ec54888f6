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
            elif kind == "checkpoint":
                console.print(f"  step {event.checkpoint.step}: checkpoint (best so far)")
            elif kind == "log":
                console.print(f"  {event.log}")
    return client.get_job(job_id)


def print_evaluation(report: training_pb2.EvaluationReport, console: Console) -> None:
    """Base model against fine-tuned, on the held-out test split."""
    from rich.table import Table

    table = Table("metric", "base model", "fine-tuned", title=f"{report.task}: {report.test_rows} held-out test rows")
    for name in sorted(report.tuned_metrics):
        table.add_row(name, f"{report.base_metrics.get(name, float('nan')):.4f}", f"{report.tuned_metrics[name]:.4f}")
    if report.reference_perplexity_before:
        table.add_row("general-text perplexity", f"{report.reference_perplexity_before:.2f}", f"{report.reference_perplexity_after:.2f}")
    console.print(table)
    stopped = ", stopped early" if report.stopped_early else ""
    console.print(f"published the weights of step {report.best_step} (validation loss {report.best_validation_loss:.4f}{stopped})")


def save_loss_plot(client: TrainingClient, job_id: str, path) -> None:
    """Training loss per step and validation loss per evaluation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses, eval_steps, eval_losses = [], [], [], []
    for event in client.stream_events(job_id):
        if event.WhichOneof("event") == "step":
            steps.append(event.step.step)
            losses.append(event.step.loss)
        elif event.WhichOneof("event") == "eval":
            eval_steps.append(event.eval.step)
            eval_losses.append(event.eval.loss)
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(steps, losses, label="training loss")
    if eval_steps:
        axes.plot(eval_steps, eval_losses, "o-", label="validation loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(job_id)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
