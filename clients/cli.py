"""The `tunewire` command: start the services, run the demo, and call every
service from the shell. Heavy libraries are never imported here, so it starts fast."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import DownloadColumn, Progress
from rich.table import Column, Table

from tunewire.clients import sdk
from tunewire.services.training.config import DEFAULT_MAX_TRIALS, DEFAULT_SEARCH_SECONDS

app = typer.Typer(help="tunewire: fine-tune language models as gRPC microservices.", no_args_is_help=True)
datasets_app = typer.Typer(help="Upload and inspect datasets.", no_args_is_help=True)
jobs_app = typer.Typer(help="Create and follow fine-tuning jobs.", no_args_is_help=True)
adapters_app = typer.Typer(
    help="The inference service's adapters (list, load, unload) and the project's published ones (published, delete).",
    no_args_is_help=True,
)
keys_app = typer.Typer(
    help="Create, list and revoke API keys in a keys file (TUNEWIRE_API_KEYS_FILE). Calls send the key from TUNEWIRE_API_KEY.",
    no_args_is_help=True,
)
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")
app.add_typer(adapters_app, name="adapters")
app.add_typer(keys_app, name="keys")
console = Console()
# Errors go to stderr, so a script reading stdout (--json) gets results only.
errors = Console(stderr=True)

# Exit codes by what went wrong, so scripts can tell a missing id from a service that is down.
EXIT_CODES = {
    "NOT_FOUND": 3,
    "INVALID_ARGUMENT": 4,
    "FAILED_PRECONDITION": 4,
    "ALREADY_EXISTS": 4,
    "UNAUTHENTICATED": 5,
    "PERMISSION_DENIED": 5,
    "RESOURCE_EXHAUSTED": 6,
    "UNAVAILABLE": 7,
    "DEADLINE_EXCEEDED": 7,
}

DATASET = typer.Option(
    sdk.DEFAULT_DATASET_ADDRESS, "--dataset-address", envvar="TUNEWIRE_DATASET_ADDRESS", help="the dataset service, host:port"
)
TRAINING = typer.Option(
    sdk.DEFAULT_TRAINING_ADDRESS, "--training-address", envvar="TUNEWIRE_TRAINING_ADDRESS", help="the training service, host:port"
)
INFERENCE = typer.Option(
    sdk.DEFAULT_INFERENCE_ADDRESS, "--inference-address", envvar="TUNEWIRE_INFERENCE_ADDRESS", help="the inference service, host:port"
)


@contextlib.contextmanager
def _api_errors() -> Iterator[None]:
    """A failed call prints its status code, message and the fields at fault
    on stderr, and exits with the code EXIT_CODES gives it (else 1)."""
    try:
        yield
    except sdk.ApiError as error:
        errors.print(f"[red]{error.code.name}[/red]: {escape(error.message)}")
        for v in error.violations:
            errors.print(f"  {escape(v.field)}: {escape(v.description)}")
        if error.code.name == "UNAVAILABLE":
            errors.print("is the service running, and is its address right? (the --*-address options, TUNEWIRE_*_ADDRESS)")
        raise typer.Exit(EXIT_CODES.get(error.code.name, 1)) from None


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """An export the adapter cannot take (ValueError), or files that cannot
    be read or written (OSError), prints why on stderr and exits 1."""
    try:
        yield
    except (ValueError, OSError) as error:
        errors.print(f"[red]error:[/red] {escape(str(error))}")
        raise typer.Exit(1) from None


def _print_json(message) -> None:
    """A result as JSON on stdout (for scripts: `... --json | python -m json.tool`)."""
    from google.protobuf.json_format import MessageToJson

    print(MessageToJson(message, preserving_proto_field_name=True, indent=2))


JSON = typer.Option(False, "--json", help="print the result as JSON")

# How every command reaches the services: set once, before the command
# (`tunewire --api-key tw_… jobs list`), or from the environment as the SDK reads it.
CREDENTIALS: dict = {}


@app.callback()
def _connection(
    api_key: str = typer.Option(None, "--api-key", envvar="TUNEWIRE_API_KEY", help="the API key every call sends", show_default=False),
    project: str = typer.Option(None, "--project", envvar="TUNEWIRE_PROJECT", help="the project to act for (operator keys only)"),
    tls_ca_file: Path = typer.Option(None, envvar="TUNEWIRE_TLS_CA_FILE", help="CA that signed the services' certificates: speak TLS"),
    tls_client_cert_file: Path = typer.Option(
        None, envvar="TUNEWIRE_TLS_CLIENT_CERT_FILE", help="this client's certificate, for mutual TLS"
    ),
    tls_client_key_file: Path = typer.Option(None, envvar="TUNEWIRE_TLS_CLIENT_KEY_FILE", help="the key of that certificate"),
) -> None:
    CREDENTIALS.clear()
    CREDENTIALS.update(
        api_key=api_key,
        project=project,
        tls_ca_file=tls_ca_file,
        tls_client_cert_file=tls_client_cert_file,
        tls_client_key_file=tls_client_key_file,
    )


def _needs_server_stack(what: str, modules: tuple[str, ...] = ("torch", "ray", "transformers", "peft")) -> None:
    """Exits with what to install when a command needs the services' stack
    and this is a client-only install (pip install tunewire)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        install = escape('pip install "tunewire[server]"')
        errors.print(f"[red]error:[/red] {what} needs the server stack ({', '.join(missing)} missing): {install}")
        raise typer.Exit(1)


@app.command()
def serve(service: str = typer.Argument("all", help="all, dataset, training or inference")) -> None:
    """Run the services on this machine until Ctrl-C (each its own process)."""
    _needs_server_stack("tunewire serve")
    from tunewire.clients.local_stack import SERVICES, LocalStack
    from tunewire.services.common.settings import load_settings

    if service != "all" and service not in SERVICES:
        raise typer.BadParameter(f"unknown service {service!r}: use all, {', '.join(SERVICES)}")
    stack = LocalStack(services=SERVICES if service == "all" else (service,))
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    stack.start()
    try:
        stack.wait_until_serving()
        console.print("[green]serving:[/green] " + ", ".join(f"{s} {stack.address(s)}" for s in stack.services))
        settings = load_settings()
        if "inference" in stack.services and (http_port := settings.inference_http_port):
            host = stack.address("inference").rpartition(":")[0]
            scheme = "https" if settings.tls_cert_file else "http"
            console.print(f"[green]OpenAI-compatible API:[/green] {scheme}://{host}:{http_port}/v1")
        while not stopping.is_set():
            if not all(p.poll() is None for p in stack.processes.values()):
                console.print("[red]a service exited; stopping the others")
                raise typer.Exit(1)
            stopping.wait(1)
        console.print("stopping")
    finally:
        stack.stop()


FORMATS = {"auto": 0, "prompt-completion": 1, "chat": 2, "classification": 3, "summarization": 4, "text": 5}


def _upload_options(format, column, label, validation, test, seed, no_stratify, drop_invalid, token_stats_model) -> dict:
    if format not in FORMATS:
        raise typer.BadParameter(f"use one of {', '.join(FORMATS)}", param_hint="--format")
    mapping = {}
    for item in column:
        ours, sep, theirs = item.partition("=")
        if not sep:
            raise typer.BadParameter("use FIELD=COLUMN, e.g. prompt=question", param_hint="--column")
        mapping[ours] = theirs
    split = {"seed": seed, "no_stratify": no_stratify}
    for name, value in (("validation", validation), ("test", test)):
        if value is not None:
            split[f"{name}_count" if value >= 1 else f"{name}_fraction"] = int(value) if value >= 1 else value
    return dict(
        column_mapping=mapping, labels=list(label), split=split, drop_invalid_rows=drop_invalid, token_stats_model=token_stats_model
    ), FORMATS[format]


def _print_upload(response) -> None:
    d = response.dataset
    note = " (already uploaded)" if response.already_existed else ""
    console.print(f"dataset [bold]{d.id}[/bold]{note}: {d.row_count} rows {dict(d.split_row_counts)}")
    _print_report(response.report)


def _print_report(report) -> None:
    table = Table("field", "chars min/p50/p95/max", "tokens min/p50/p95/max", "empty rows", title="quality report")
    for f in report.fields:
        tokens = f"{f.tokens.min:.0f}/{f.tokens.p50:.0f}/{f.tokens.p95:.0f}/{f.tokens.max:.0f}" if f.HasField("tokens") else "-"
        table.add_row(f.field, f"{f.chars.min:.0f}/{f.chars.p50:.0f}/{f.chars.p95:.0f}/{f.chars.max:.0f}", tokens, str(f.empty_rows))
    console.print(table)
    console.print(
        f"exact duplicates {report.exact_duplicate_rows}, near duplicates {report.near_duplicate_rows}, dropped {report.dropped_rows}"
    )
    if report.label_counts:
        console.print(f"labels {dict(report.label_counts)} (imbalance {report.imbalance_ratio:.1f}x)")
    if report.token_model:
        console.print(f"{report.rows_over_context} rows over {report.token_model}'s context of {report.token_context} tokens")
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")


COLUMN = typer.Option([], "--column", help="map a tunewire field to your column: FIELD=COLUMN (repeatable)")
LABEL = typer.Option([], "--label", help="classification: an allowed label (repeatable)")
VALIDATION = typer.Option(None, "--validation", help="validation rows: a fraction (<1) or a count")
TEST = typer.Option(None, "--test", help="test rows: a fraction (<1) or a count")


@datasets_app.command("upload")
def datasets_upload(
    path: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL, CSV or Parquet, optionally .gz"),
    name: str = typer.Option("", help="dataset name (default: the file's name without its extensions)"),
    format: str = typer.Option("auto", help=", ".join(FORMATS)),
    column: list[str] = COLUMN,
    label: list[str] = LABEL,
    validation: float | None = VALIDATION,
    test: float | None = TEST,
    seed: int = typer.Option(0, help="split seed"),
    no_stratify: bool = typer.Option(False, help="do not stratify classification splits by label"),
    drop_invalid: bool = typer.Option(False, help="store the good rows, report the bad ones"),
    token_stats: str = typer.Option("", help="also count tokens with this base model's tokenizer"),
    address: str = DATASET,
) -> None:
    """Upload a file; it is validated row by row and stored whole or not at all."""
    options, fmt = _upload_options(format, column, label, validation, test, seed, no_stratify, drop_invalid, token_stats)
    name = name or path.name.split(".")[0]
    with sdk.DatasetClient(address, **CREDENTIALS) as client, _api_errors():
        _print_upload(client.upload(path, name=name, format=fmt, **options))


@datasets_app.command("import")
def datasets_import(
    source: str = typer.Argument(..., help="a path or URL the dataset service may read (TUNEWIRE_IMPORT_ROOTS)"),
    name: str = typer.Option(..., help="dataset name"),
    format: str = typer.Option("auto", help=", ".join(FORMATS)),
    column: list[str] = COLUMN,
    label: list[str] = LABEL,
    validation: float | None = VALIDATION,
    test: float | None = TEST,
    seed: int = typer.Option(0, help="split seed"),
    no_stratify: bool = typer.Option(False, help="do not stratify classification splits by label"),
    drop_invalid: bool = typer.Option(False, help="store the good rows, report the bad ones"),
    token_stats: str = typer.Option("", help="also count tokens with this base model's tokenizer"),
    address: str = DATASET,
) -> None:
    """Have the dataset service read a file itself (a path or fsspec URL)."""
    options, fmt = _upload_options(format, column, label, validation, test, seed, no_stratify, drop_invalid, token_stats)
    with sdk.DatasetClient(address, **CREDENTIALS) as client, _api_errors():
        _print_upload(client.import_dataset(source, name=name, format=fmt, **options))


@datasets_app.command("list")
def datasets_list(name: str = typer.Option("", help="only versions of this name"), address: str = DATASET) -> None:
    """Dataset versions, newest first."""
    with sdk.DatasetClient(address, **CREDENTIALS) as client, _api_errors():
        table = Table(Column("id", no_wrap=True), "name", "format", "rows", "splits", "created")
        for d in client.list(name):
            fmt = dataset_format_name(d.format)
            table.add_row(d.id, d.name, fmt, str(d.row_count), json.dumps(dict(d.split_row_counts)), d.create_time.ToJsonString())
        console.print(table)


@datasets_app.command("get")
def datasets_get(dataset_id: str, json_output: bool = JSON, address: str = DATASET) -> None:
    """One dataset version: name, format, rows per split, where it is stored."""
    with sdk.DatasetClient(address, **CREDENTIALS) as client, _api_errors():
        dataset = client.get(dataset_id)
    if json_output:
        _print_json(dataset)
        return
    splits = json.dumps(dict(dataset.split_row_counts))
    console.print(
        f"{dataset.id}: {escape(dataset.name)}, {dataset_format_name(dataset.format)}, {dataset.row_count} rows {splits}", highlight=False
    )


@datasets_app.command("report")
def datasets_report(dataset_id: str, address: str = DATASET) -> None:
    """The quality report computed at upload."""
    with sdk.DatasetClient(address, **CREDENTIALS) as client, _api_errors():
        _print_report(client.report(dataset_id))


@datasets_app.command("rows")
def datasets_rows(
    dataset_id: str,
    split: str = typer.Option("", help="train, validation or test (default: all)"),
    limit: int = typer.Option(10, help="rows to show"),
    address: str = DATASET,
) -> None:
    """Print rows as JSON lines."""
    with sdk.DatasetClient(address, **CREDENTIALS) as client, _api_errors():
        for i, row in enumerate(client.rows(dataset_id, split)):
            if i >= limit:
                break
            print(json.dumps(row, ensure_ascii=False))


@datasets_app.command("delete")
def datasets_delete(dataset_id: str, address: str = DATASET) -> None:
    """Delete a dataset version (refused while a job uses it)."""
    with sdk.DatasetClient(address, **CREDENTIALS) as client, _api_errors():
        client.delete(dataset_id)
    console.print(f"deleted {dataset_id}")


def dataset_format_name(value: int) -> str:
    return {v: k for k, v in FORMATS.items()}.get(value, "?")


METHODS = {"lora": 1, "full": 2, "qlora": 3}


def _method(name: str) -> int:
    if name not in METHODS:
        raise typer.BadParameter(f"use one of {', '.join(METHODS)}", param_hint="--method")
    return METHODS[name]


SEARCH_MODES = {"auto": 0, "on": 1, "off": 2}


def _hyperparameters(**given) -> dict:
    return {k: v for k, v in given.items() if v is not None}


def _numbers(value: str, kind, option: str) -> list:
    try:
        return [kind(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"a comma-separated list of numbers, got {value!r}", param_hint=option) from None


def _search(mode: str, max_trials: int, seconds: int, learning_rates: str, lora_ranks: str) -> dict:
    if mode not in SEARCH_MODES:
        raise typer.BadParameter(f"use one of {', '.join(SEARCH_MODES)}", param_hint="--search")
    search = {"mode": SEARCH_MODES[mode], "max_trials": max_trials, "max_seconds": seconds}
    search["learning_rates"] = _numbers(learning_rates, float, "--search-learning-rates")
    search["lora_ranks"] = _numbers(lora_ranks, int, "--search-lora-ranks")
    return search


BASE_MODEL = typer.Option("smollm2-135m-instruct", help="bundled name, model directory or Hugging Face id")
LEARNING_RATE = typer.Option(None, help="unset: searched on Ray Tune (a search's candidates: --search-learning-rates)")
EPOCHS = typer.Option(None, help="passes over the training rows (unset: from the dataset's size)")
BATCH_SIZE = typer.Option(None, help="rows per step and worker (unset: 8)")
WORKERS = typer.Option(1, help="Ray Train workers (data parallel)")
GPU = typer.Option(False, help="train on GPU workers")
SEARCH_SECONDS = typer.Option(
    0,
    help=f"the search's time in seconds, a bound on every trial (0: a second per training row a trial sees, at least {DEFAULT_SEARCH_SECONDS}, which bounds only the trials after the first)",
)


@jobs_app.command("create")
def jobs_create(
    dataset_id: str = typer.Option(..., "--dataset", help="dataset id"),
    base_model: str = BASE_MODEL,
    method: str = typer.Option("lora", help="lora, full or qlora (CUDA GPUs)"),
    learning_rate: float | None = LEARNING_RATE,
    epochs: int | None = EPOCHS,
    batch_size: int | None = BATCH_SIZE,
    max_seq_length: int | None = typer.Option(None, help="tokens a row is cut to (unset: 512)"),
    lora_rank: int | None = typer.Option(None, help="LoRA rank (unset: 16)"),
    eval_every_steps: int | None = typer.Option(None, help="validate every N steps (default: each epoch)"),
    early_stopping_patience: int | None = typer.Option(None, help="validations without a better score before training stops (unset: 3)"),
    precision: str | None = typer.Option(None, help="auto (bfloat16 where the hardware computes it natively), float32 or bfloat16"),
    forgetting_budget: float | None = typer.Option(
        None, help="share of the base model's correct general answers that may be lost (default 0.1)"
    ),
    retention_weight: float | None = typer.Option(None, help="weight of the penalty that keeps general answers (default 3; 0: off)"),
    prompt_word_dropout: float | None = typer.Option(
        None, help="share of prompt words left out at random in training (default 0.1; 0: off)"
    ),
    ema_decay: float | None = typer.Option(
        None, help="decay of the published average of the weights (default 0.9; full fine-tuning 0; 0: off)"
    ),
    search: str = typer.Option("auto", help="auto (search when --learning-rate is unset), on or off"),
    max_trials: int = typer.Option(0, help=f"search trials at most (0: {DEFAULT_MAX_TRIALS})"),
    search_seconds: int = SEARCH_SECONDS,
    search_learning_rates: str = typer.Option("", help="learning rates to try, comma-separated (default: tunewire's)"),
    search_lora_ranks: str = typer.Option("", help="LoRA ranks to try, comma-separated (default: the job's)"),
    workers: int = WORKERS,
    gpu: bool = GPU,
    idempotency_key: str = typer.Option("", help="a retried create with the same key returns the same job"),
    follow: bool = typer.Option(True, help="show progress until the job ends"),
    plot: Path | None = typer.Option(None, help="save the loss curve to this PNG when the job ends"),
    address: str = TRAINING,
) -> None:
    """Queue a fine-tuning job (unset hyperparameters are chosen for you)."""
    method_number = _method(method)
    given = _hyperparameters(
        learning_rate=learning_rate,
        epochs=epochs,
        batch_size=batch_size,
        max_seq_length=max_seq_length,
        lora_rank=lora_rank,
        eval_every_steps=eval_every_steps,
        early_stopping_patience=early_stopping_patience,
        precision=precision,
        forgetting_budget=forgetting_budget,
        retention_weight=retention_weight,
        prompt_word_dropout=prompt_word_dropout,
        ema_decay=ema_decay,
    )
    plan = _search(search, max_trials, search_seconds, search_learning_rates, search_lora_ranks)
    with sdk.TrainingClient(address, **CREDENTIALS) as client, _api_errors():
        job = client.create_job(base_model, dataset_id, given, workers, gpu, method_number, idempotency_key, plan)
        searched = " (the learning rate by a search)" if "learning_rate" in job.auto_hyperparameters and search != "off" else ""
        console.print(f"job [bold]{job.id}[/bold] queued; chosen for you{searched}: {', '.join(job.auto_hyperparameters) or 'nothing'}")
        if follow:
            _follow(client, job.id, plot)


@jobs_app.command("estimate")
def jobs_estimate(
    dataset_id: str = typer.Option(..., "--dataset", help="dataset id"),
    base_model: str = BASE_MODEL,
    method: str = typer.Option("lora", help="lora, full or qlora"),
    epochs: int | None = EPOCHS,
    batch_size: int | None = BATCH_SIZE,
    learning_rate: float | None = LEARNING_RATE,
    search: str = typer.Option("auto", help="auto, on or off"),
    max_trials: int = typer.Option(0, help=f"search trials at most (0: {DEFAULT_MAX_TRIALS})"),
    search_seconds: int = SEARCH_SECONDS,
    workers: int = WORKERS,
    gpu: bool = GPU,
    address: str = TRAINING,
) -> None:
    """Tokens, steps, memory and time a job would take (its search included), before running it."""
    method_number = _method(method)
    given = _hyperparameters(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate)
    plan = _search(search, max_trials, search_seconds, "", "")
    with sdk.TrainingClient(address, **CREDENTIALS) as client, _api_errors():
        e = client.estimate(base_model, dataset_id, given, workers, gpu, method_number, search=plan)
    runs = f"; a search of {e.trials} trials of up to that many steps each, its time {e.search_max_seconds:,} s" if e.trials > 1 else ""
    console.print(
        f"{e.train_rows:,} training rows, {e.train_tokens:,} tokens; {e.steps:,} steps of {e.resolved_hyperparameters.batch_size} rows x {workers} worker(s){runs}"
    )
    console.print(
        f"{e.parameters:,} parameters, {e.trainable_parameters:,} trained; about {e.memory_bytes_per_worker / 2**30:.1f} GiB per worker"
    )
    console.print(f"ETA {e.eta_seconds:,.0f}s ({e.eta_basis})" if e.eta_seconds else f"ETA unknown: {e.eta_basis}")


def _follow(client: sdk.TrainingClient, job_id: str, plot: Path | None = None):
    from tunewire.clients.progress import follow_job, print_evaluation, save_loss_plot, state_name

    if plot is not None:
        _needs_server_stack("--plot", ("matplotlib",))

    job = follow_job(client, job_id, console)
    console.print(f"job {job.id}: {state_name(job.state)}" + (f", adapter [bold]{job.adapter_id}" if job.adapter_id else ""))
    if job.HasField("evaluation"):
        print_evaluation(job.evaluation, console)
    if plot is not None:
        save_loss_plot(client, job_id, plot)
        console.print(f"loss curve saved to {plot}")
    if job.error:
        console.print(f"[red]{job.error}")
        raise typer.Exit(1)
    return job


@jobs_app.command("watch")
def jobs_watch(
    job_id: str, plot: Path | None = typer.Option(None, help="save the loss curve to this PNG"), address: str = TRAINING
) -> None:
    """Follow a job's progress until it ends (history first)."""
    with sdk.TrainingClient(address, **CREDENTIALS) as client, _api_errors():
        _follow(client, job_id, plot)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, address: str = TRAINING) -> None:
    """Cancel a queued or running job (a running one stops at its next step)."""
    from tunewire.clients.progress import state_name

    with sdk.TrainingClient(address, **CREDENTIALS) as client, _api_errors():
        job = client.cancel_job(job_id)
    console.print(f"job {job.id}: {state_name(job.state)}")


@jobs_app.command("checkpoints")
def jobs_checkpoints(job_id: str, address: str = TRAINING) -> None:
    """A job's checkpoints, with their validation loss."""
    with sdk.TrainingClient(address, **CREDENTIALS) as client, _api_errors():
        checkpoints = client.list_checkpoints(job_id)
    table = Table("step", "validation loss", Column("uri", no_wrap=True))
    for c in checkpoints:
        table.add_row(str(c.step), f"{c.validation_loss:.4f}", c.uri)
    console.print(table)


@jobs_app.command("list")
def jobs_list(json_output: bool = JSON, address: str = TRAINING) -> None:
    """The project's jobs, newest first."""
    from tunewire.clients.progress import state_name
    from tunewire.v1 import training_pb2

    with sdk.TrainingClient(address, **CREDENTIALS) as client, _api_errors():
        jobs = client.list_jobs()
    if json_output:
        _print_json(training_pb2.ListJobsResponse(jobs=jobs))
        return
    table = Table(Column("id", no_wrap=True), "state", "base model", "dataset", Column("adapter", no_wrap=True), "error")
    for j in jobs:
        table.add_row(j.id, state_name(j.state), j.spec.base_model, j.spec.dataset_id, j.adapter_id, escape(j.error))
    console.print(table)


@jobs_app.command("get")
def jobs_get(job_id: str, json_output: bool = JSON, address: str = TRAINING) -> None:
    """One job: its state, spec, latest step and evaluation report."""
    from tunewire.clients.progress import state_name

    with sdk.TrainingClient(address, **CREDENTIALS) as client, _api_errors():
        job = client.get_job(job_id)
    if json_output:
        _print_json(job)
        return
    console.print(f"{job.id}: {state_name(job.state)}, {job.spec.base_model} on {job.spec.dataset_id}", highlight=False)
    if job.latest_step.total_steps:
        console.print(f"step {job.latest_step.step}/{job.latest_step.total_steps}, loss {job.latest_step.loss:.4f}", highlight=False)
    if job.adapter_id:
        console.print(f"adapter {job.adapter_id}", highlight=False)
    if job.error:
        console.print(f"error: {escape(job.error)}", highlight=False)


@app.command()
def generate(
    prompt: str,
    adapter: str = typer.Option("", help="adapter id; empty for the base model"),
    max_new_tokens: int = typer.Option(128, help="tokens to generate at most"),
    temperature: float = typer.Option(0.0, help="0: greedy; higher samples more freely"),
    address: str = INFERENCE,
) -> None:
    """Generate from the served model, streaming the answer."""
    with sdk.InferenceClient(address, **CREDENTIALS) as client, _api_errors():
        for part in client.generate_stream(prompt, adapter=adapter, max_new_tokens=max_new_tokens, temperature=temperature):
            # Verbatim: model text is not markup ("[/INST]" is text).
            sys.stdout.write(part.text_delta)
            sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
def classify(
    text: str,
    adapter: str = typer.Option(..., help="a SEQ_CLS adapter id"),
    address: str = INFERENCE,
) -> None:
    """Classify a text with a classifier adapter: every label with its probability."""
    with sdk.InferenceClient(address, **CREDENTIALS) as client, _api_errors():
        response = client.classify(text, adapter=adapter)
    table = Table("label", "probability")
    for score in response.scores:
        table.add_row(score.label, f"{score.score:.4f}")
    console.print(table)


@adapters_app.command("list")
def adapters_list(address: str = INFERENCE) -> None:
    with sdk.InferenceClient(address, **CREDENTIALS) as client, _api_errors():
        response = client.loaded_adapters()
    table = Table(
        Column("id", no_wrap=True),
        "task",
        "rank",
        "resident",
        "in flight",
        "load s",
        "published→servable s",
        Column("source", overflow="fold"),
    )
    for a in response.adapters:
        servable = f"{a.publish_to_servable_seconds:.2f}" if a.publish_to_servable_seconds else "-"
        table.add_row(
            a.id,
            a.task_type,
            str(a.rank),
            "yes" if a.resident else "no",
            str(a.requests_in_flight),
            f"{a.load_seconds:.2f}",
            servable,
            a.source_uri,
        )
    console.print(f"base model: {response.base_model}")
    console.print(table)


@adapters_app.command("load")
def adapters_load(
    adapter_id: str,
    source: str = typer.Argument(..., help="PEFT adapter directory (path or URL) under the artifact store or TUNEWIRE_IMPORT_ROOTS"),
    address: str = INFERENCE,
) -> None:
    with sdk.InferenceClient(address, **CREDENTIALS) as client, _api_errors():
        adapter = client.load_adapter(adapter_id, source)
    console.print(f"loaded {adapter.id}: {adapter.task_type}, rank {adapter.rank}, in {adapter.load_seconds:.2f}s")


@adapters_app.command("unload")
def adapters_unload(adapter_id: str, address: str = INFERENCE) -> None:
    """New requests for the adapter are refused; those running finish first."""
    with sdk.InferenceClient(address, **CREDENTIALS) as client, _api_errors():
        client.unload_adapter(adapter_id)
    console.print(f"unloaded {adapter_id}")


@adapters_app.command("published")
def adapters_published(address: str = TRAINING) -> None:
    """The project's published adapters, with the bytes each counts against its quota."""
    with sdk.TrainingClient(address, **CREDENTIALS) as client, _api_errors():
        adapters = client.list_adapters()
    table = Table(Column("id", no_wrap=True), Column("job", no_wrap=True), "base model", "MB", "held back", "published")
    for a in adapters:
        published = a.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M")
        table.add_row(a.id, a.job_id, a.base_model, f"{a.size_bytes / 1e6:.1f}", "yes" if a.held_back else "no", published)
    console.print(table)
    console.print(f"{len(adapters)} adapters, {sum(a.size_bytes for a in adapters) / 1e6:.1f} MB")


@adapters_app.command("merge")
def adapters_merge(
    adapter_id: str,
    out: Path = typer.Option(..., "--out", help="directory to create for the merged model"),
    address: str = TRAINING,
) -> None:
    """Downloads a published adapter and merges it into its base model
    (merge_and_unload): a plain transformers model for tools without PEFT."""
    import tempfile

    _needs_server_stack("tunewire adapters merge", ("torch", "transformers", "peft"))
    from tunewire.clients.export import merge_adapter
    from tunewire.services.common.settings import load_settings

    if out.exists():
        errors.print(f"[red]error:[/red] {escape(str(out))} exists: give a new directory for the merged model")
        raise typer.Exit(1)
    with tempfile.TemporaryDirectory(prefix="tunewire-merge-") as tmp, sdk.TrainingClient(address, **CREDENTIALS) as client, _api_errors():
        adapter_dir = client.download_adapter(adapter_id, Path(tmp) / adapter_id)
        with console.status(f"merging {adapter_id} into its base model"), _refusals():
            merge_adapter(adapter_dir, out, load_settings().model_cache)
    console.print(f"merged {adapter_id} into {out}")


@adapters_app.command("gguf")
def adapters_gguf(
    adapter_id: str,
    out: Path = typer.Option(..., "--out", help="GGUF file to create, e.g. adapter.gguf"),
    address: str = TRAINING,
) -> None:
    """Downloads a published LoRA adapter of a Llama-family model and writes it
    as a GGUF LoRA file: `llama-server -m BASE.gguf --lora FILE`, or Ollama's
    ADAPTER. The base model itself converts with llama.cpp's convert_hf_to_gguf.py."""
    import tempfile

    _needs_server_stack("tunewire adapters gguf", ("torch", "peft", "gguf", "safetensors"))
    from tunewire.clients.export import adapter_to_gguf
    from tunewire.services.common.settings import load_settings

    if out.exists():
        errors.print(f"[red]error:[/red] {escape(str(out))} exists: give a new file name for the GGUF adapter")
        raise typer.Exit(1)
    with tempfile.TemporaryDirectory(prefix="tunewire-gguf-") as tmp, sdk.TrainingClient(address, **CREDENTIALS) as client, _api_errors():
        adapter_dir = client.download_adapter(adapter_id, Path(tmp) / adapter_id)
        with _refusals():
            adapter_to_gguf(adapter_dir, out, load_settings().model_cache)
    console.print(f"wrote {adapter_id} to {out} (GGUF LoRA for llama.cpp)")


@adapters_app.command("get")
def adapters_get(adapter_id: str, json_output: bool = JSON, address: str = TRAINING) -> None:
    """One of the project's published adapters: its job, base model, size and where it is stored."""
    with sdk.TrainingClient(address, **CREDENTIALS) as client, _api_errors():
        adapter = next((a for a in client.list_adapters() if a.id == adapter_id), None)
    if adapter is None:
        errors.print(f"[red]NOT_FOUND[/red]: adapter {escape(adapter_id)} is not one of the project's published adapters")
        raise typer.Exit(EXIT_CODES["NOT_FOUND"])
    if json_output:
        _print_json(adapter)
        return
    held = ", held back (over its forgetting budget)" if adapter.held_back else ""
    console.print(f"{adapter.id}: job {adapter.job_id}, {adapter.base_model}, {adapter.size_bytes / 1e6:.1f} MB{held}", highlight=False)
    console.print(adapter.uri, highlight=False)


@adapters_app.command("download")
def adapters_download(
    adapter_id: str,
    out: Path = typer.Option(None, "--out", help="directory to create (default: ./<adapter id>)"),
    address: str = TRAINING,
) -> None:
    """Downloads a published adapter: a PEFT directory that
    AutoPeftModelForCausalLM.from_pretrained(dir) loads, its model card and evaluation beside it."""
    out = out or Path(adapter_id)
    with sdk.TrainingClient(address, **CREDENTIALS) as client, _api_errors():
        total = next((a.size_bytes for a in client.list_adapters() if a.id == adapter_id), None)
        with Progress(*Progress.get_default_columns(), DownloadColumn(), console=console, transient=True) as progress:
            task = progress.add_task(f"downloading {adapter_id}", total=total)
            try:
                client.download_adapter(adapter_id, out, on_bytes=lambda n: progress.advance(task, n))
            except (FileExistsError, OSError) as error:
                errors.print(f"[red]error:[/red] {escape(str(error))}")
                raise typer.Exit(1) from None
    console.print(f"downloaded {adapter_id} to {out}")


@adapters_app.command("delete")
def adapters_delete(adapter_id: str, address: str = TRAINING) -> None:
    """Deletes a published adapter: its files and its share of the quota. Servers stop serving it."""
    with sdk.TrainingClient(address, **CREDENTIALS) as client, _api_errors():
        adapter = client.delete_adapter(adapter_id)
    console.print(f"deleted {adapter.id} ({adapter.size_bytes / 1e6:.1f} MB freed)")


KEYS_FILE = typer.Option(..., "--file", envvar="TUNEWIRE_API_KEYS_FILE", help="the keys file the services read")


def _read_keys(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"keys": []}


def _write_keys(path: Path, keys: dict) -> None:
    """Replaces the file whole (a reader never sees half of it), readable by its owner only."""
    staged = path.with_name(path.name + ".tmp")
    staged.touch(mode=0o600)
    staged.write_text(json.dumps(keys, indent=2) + "\n")
    staged.replace(path)


@keys_app.command("create")
def keys_create(
    project: str = typer.Option(..., help="the project (tenant) the key belongs to"),
    role: str = typer.Option(
        "member", help="member; admin (also loads its project's adapters); or operator (every project's: the services' key)"
    ),
    service: str = typer.Option(
        "", "--for", help="a service's key, limited to the RPCs it calls: orchestrator or inference (with --role operator)"
    ),
    rpcs: list[str] = typer.Option([], "--rpc", help="limit the key to this RPC (package.Service/Method); repeatable"),
    file: Path = KEYS_FILE,
) -> None:
    """Adds a new key to the file and prints it: the only time it is shown."""
    from tunewire.services.common.auth import SERVICE_RPCS, new_key
    from tunewire.services.common.errors import InvalidArgument

    if service and service not in SERVICE_RPCS:
        raise typer.BadParameter(f"--for {service!r}: use one of {', '.join(SERVICE_RPCS)}")
    try:
        key, entry = new_key(project, role, tuple(rpcs) + SERVICE_RPCS.get(service, ()))
    except InvalidArgument as error:
        raise typer.BadParameter(str(error)) from None
    keys = _read_keys(file)
    keys["keys"].append(entry)
    _write_keys(file, keys)
    limited = f", only {', '.join(entry['rpcs'])}" if entry.get("rpcs") else ""
    console.print(
        f"key {entry['id']} ({role} of {project}{limited}) added to {file}; give it to its user as TUNEWIRE_API_KEY:", style="green"
    )
    print(key)


@keys_app.command("list")
def keys_list(file: Path = KEYS_FILE) -> None:
    """The keys in the file (ids, projects, roles and the RPCs a key is limited to; keys themselves are not stored)."""
    table = Table("id", "project", "role", "rpcs")
    for entry in _read_keys(file)["keys"]:
        table.add_row(entry["id"], entry["project"], entry["role"], ", ".join(entry.get("rpcs", [])) or "all its role may")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, file: Path = KEYS_FILE) -> None:
    """Removes a key: the services refuse it from their next call on."""
    keys = _read_keys(file)
    kept = [entry for entry in keys["keys"] if entry["id"] != key_id]
    if len(kept) == len(keys["keys"]):
        console.print(f"[red]no key {key_id} in {file}")
        raise typer.Exit(1)
    _write_keys(file, {**keys, "keys": kept})
    console.print(f"revoked {key_id}")


@app.command()
def demo(
    workers: int = typer.Option(1, help="Ray Train workers per trial (on 2 cores one is as fast as two)"),
    home: Path = typer.Option(Path(".tunewire"), envvar="TUNEWIRE_HOME", help="where the services keep their data"),
) -> None:
    """Upload a bundled fact-teaching dataset, fine-tune SmolLM2 on it with no
    hyperparameters set (searched on Ray Tune, forgetting guarded), wait for the
    inference service to hot-load the adapter, and compare answers."""
    _needs_server_stack("tunewire demo")
    from tunewire.clients.demo import run_demo

    raise typer.Exit(run_demo(console, home=home, workers=workers))


def main() -> None:
    app()
