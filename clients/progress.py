"""A job's event stream rendered live: a progress bar (loss, learning rate,
tokens/s, ETA), the search's trials as a table, and evaluations, forgetting
checks, diagnostics and state changes printed as they come."""

from __future__ import annotations

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tunewire.clients.sdk import TrainingClient
from tunewire.v1 import training_pb2


def state_name(state: int) -> str:
    return training_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


def trial_state_name(state: int) -> str:
    return training_pb2.TrialState.Name(state).removeprefix("TRIAL_STATE_").lower()


class TrialTable:
    """The search's trials, one row each, from trial and eval events."""

    def __init__(self) -> None:
        self.trials: dict[str, training_pb2.TrialUpdate] = {}
        self.kept: dict[str, str] = {}

    def update(self, trial: training_pb2.TrialUpdate) -> None:
        self.trials[trial.run] = trial

    def saw_eval(self, e: training_pb2.EvalMetrics) -> None:
        if e.run and e.HasField("general_kept"):
            budget = "" if e.within_forgetting_budget else " (over budget)"
            self.kept[e.run] = f"{e.general_kept:.0%}{budget}"

    def __rich__(self) -> Table:
        table = Table("trial", "learning rate", "rank", "state", "epoch", "best val answers", "val loss", "general kept", title="search")
        for run, t in sorted(self.trials.items()):
            # 0 or a placeholder of 1e9: no validation yet.
            validated = 0 < t.best_objective < 1e8
            table.add_row(
                run,
                f"{t.learning_rate:.1e}",
                str(t.lora_rank),
                trial_state_name(t.state),
                f"{t.epoch:.1f}",
                f"{t.best_answer_recall:.0%}" if validated and t.HasField("best_answer_recall") else "–",
                f"{t.best_validation_loss:.4f}" if validated and t.best_validation_loss else "–",
                self.kept.get(run, "–"),
            )
        return table


def follow_job(client: TrainingClient, job_id: str, console: Console) -> training_pb2.Job:
    """Streams the job's events until it ends; returns the final job."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metrics]}"),
        TimeElapsedColumn(),
    ]
    progress = Progress(*columns, console=console)
    trials = TrialTable()
    bar = progress.add_task("queued", total=None, metrics="")
    live_parts = [progress]
    live = Live(Group(*live_parts), console=console, transient=False, refresh_per_second=4) if console.is_terminal else None
    if live:
        live.start()
    try:
        for event in client.stream_events(job_id):
            kind = event.WhichOneof("event")
            if kind == "state":
                progress.update(bar, description=state_name(event.state).lower())
                if event.error:
                    console.print(f"[red]{escape(event.error)}")
            elif kind == "step":
                s = event.step
                run = f"{s.run} " if s.run and s.run != "train" else ""
                if not console.is_terminal:
                    # No live bar in a log file: one line per step instead.
                    console.print(
                        f"  {run}step {s.step}/{s.total_steps} epoch {s.epoch:.2f} loss {s.loss:.3f} lr {s.learning_rate:.2e} "
                        f"{s.tokens_per_second:,.0f} tok/s ETA {s.eta_seconds:,.0f}s"
                    )
                progress.update(
                    bar,
                    description=f"{run}running".strip(),
                    total=s.total_steps,
                    completed=s.step,
                    metrics=f"loss {s.loss:.3f}  lr {s.learning_rate:.2e}  {s.tokens_per_second:,.0f} tok/s  ETA {s.eta_seconds:,.0f}s",
                )
            elif kind == "trial":
                if not trials.trials and live:
                    live.update(Group(progress, trials))
                previous = trials.trials.get(event.trial.run)
                trials.update(event.trial)
                if not console.is_terminal and (previous is None or previous.state != event.trial.state):
                    t = event.trial
                    message = f": {escape(t.message)}" if t.message else ""
                    console.print(
                        f"  {t.run} (learning rate {t.learning_rate:.1e}, rank {t.lora_rank}) {trial_state_name(t.state)}{message}"
                    )
            elif kind == "eval":
                e = event.eval
                trials.saw_eval(e)
                run = f"{e.run} " if e.run and e.run != "train" else ""
                kept = ""
                if e.HasField("general_kept"):
                    over = "" if e.within_forgetting_budget else ", over the forgetting budget"
                    kept = f"; general answers kept {e.general_kept:.0%}, reference perplexity {e.reference_perplexity:.2f}{over}"
                answers = f", answers {e.answer_recall:.0%} of the reference words" if e.HasField("answer_recall") else ""
                console.print(f"  {run}step {e.step}: {e.split} loss {e.loss:.3f} (perplexity {e.perplexity:.2f}){answers}{kept}")
            elif kind == "checkpoint":
                run = f"{event.checkpoint.run} " if event.checkpoint.run and event.checkpoint.run != "train" else ""
                console.print(f"  {run}step {event.checkpoint.step}: checkpoint (best so far)")
            elif kind == "diagnostic":
                console.print(f"  [yellow]{event.diagnostic.kind}[/yellow]: {escape(event.diagnostic.message)}")
            elif kind == "log":
                console.print(f"  {escape(event.log)}")
    finally:
        if live:
            live.stop()
    if trials.trials and not console.is_terminal:
        console.print(trials)
    return client.get_job(job_id)


def print_evaluation(report: training_pb2.EvaluationReport, console: Console) -> None:
    """Base model against fine-tuned: the held-out test split, general
    ability, the search's trials and what the run's curves say."""
    table = Table("metric", "base model", "fine-tuned", title=f"{report.task}: {report.test_rows} held-out test rows")
    for name in sorted(report.tuned_metrics):
        table.add_row(name, f"{report.base_metrics.get(name, float('nan')):.4f}", f"{report.tuned_metrics[name]:.4f}")
    if report.general_questions:
        table.add_row(
            f"general questions right (of {report.general_questions})",
            str(report.general_correct_before),
            f"{report.general_correct_after} ({report.general_kept:.0%} of the base's kept)",
        )
    if report.reference_perplexity_before:
        table.add_row("general-text perplexity", f"{report.reference_perplexity_before:.2f}", f"{report.reference_perplexity_after:.2f}")
    console.print(table)
    if report.trials:
        trials = Table(
            "trial",
            "learning rate",
            "rank",
            "state",
            "epochs",
            "best step",
            "val answers",
            "val loss",
            "general kept",
            "within budget",
            title="search",
        )
        for t in report.trials:
            chosen = " (published)" if t.run == report.run else ""
            # A trial stopped before its first validation has no checkpoint to show.
            answers = f"{t.best_answer_recall:.0%}" if t.HasField("best_answer_recall") else "–"
            measured = [str(t.best_step), answers, f"{t.best_validation_loss:.4f}", f"{t.general_kept:.0%}"]
            measured.append("yes" if t.within_forgetting_budget else "no")
            trials.add_row(
                t.run + chosen,
                f"{t.learning_rate:.1e}",
                str(t.lora_rank),
                trial_state_name(t.state),
                f"{t.epoch:.1f}",
                *(measured if t.best_step else ["–"] * 5),
            )
        console.print(trials)
    stopped = ", stopped early" if report.stopped_early else ""
    chosen = f" of {report.run}" if report.run and report.run != "train" else ""
    answers = (
        f", answers holding {report.best_answer_recall:.0%} of the reference answers' words"
        if report.HasField("best_answer_recall")
        else ""
    )
    console.print(
        f"published the weights of step {report.best_step}{chosen} (validation loss {report.best_validation_loss:.4f}{answers}{stopped}; "
        f"learning rate {report.learning_rate:.1e})"
    )
    if report.general_questions:
        verdict = "within" if report.within_forgetting_budget else "[red]over[/red]"
        console.print(f"forgetting: {verdict} the budget of {report.forgetting_budget:.0%}")
    for d in report.diagnostics:
        console.print(f"[yellow]{d.kind}[/yellow]: {escape(d.message)}")


def save_loss_plot(client: TrainingClient, job_id: str, path) -> None:
    """Training loss per step and validation loss per evaluation, as a PNG
    (one curve per run when the job searched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps: dict[str, tuple[list, list]] = {}
    evals: dict[str, tuple[list, list]] = {}
    for event in client.stream_events(job_id):
        if event.WhichOneof("event") == "step":
            xs, ys = steps.setdefault(event.step.run or "train", ([], []))
            xs.append(event.step.step)
            ys.append(event.step.loss)
        elif event.WhichOneof("event") == "eval":
            xs, ys = evals.setdefault(event.eval.run or "train", ([], []))
            xs.append(event.eval.step)
            ys.append(event.eval.loss)
    figure, axes = plt.subplots(figsize=(7, 4))
    for run, (xs, ys) in sorted(steps.items()):
        axes.plot(xs, ys, label=f"{run}: training loss")
    for run, (xs, ys) in sorted(evals.items()):
        axes.plot(xs, ys, "o-", label=f"{run}: validation loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(job_id)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
