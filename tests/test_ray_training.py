"""Real Ray Train runs of the training loop on tiny models: two CPU workers,
Ray Data shards from Parquet, evaluation, checkpoints, early stopping,
cancellation, resumption, a killed worker, every task and method."""

import asyncio
import json
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunewire.services.common.artifacts import ArtifactStore
from tunewire.services.training.config import resolve_config
from tunewire.services.training.ray_runner import RayTrainRunner
from tunewire.services.training.recipe import RecipeConfig, validation_score
from tunewire.services.training.scheduler import JobCancelled, JobFailed
from tunewire.services.training.store import Job

from conftest import build_tiny_bert


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    runner = RayTrainRunner(ray_address="", num_cpus=4, artifacts=ArtifactStore(str(root / "artifacts")), model_cache=root / "models")
    runner.start()
    yield runner
    runner.shutdown()


def sums(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?", "completion": f"Arr, {2 * i}."} for i in range(n)]


def make_job(
    tmp_path,
    model_dir,
    rows: list[dict],
    fmt: str = "prompt_completion",
    workers: int = 2,
    method: str = "lora",
    labels=(),
    search: dict | None = None,
    **hyperparameters,
) -> Job:
    splits = ["validation" if i % 5 == 0 else "test" if i % 5 == 1 else "train" for i in range(len(rows))]
    table = pa.Table.from_pylist([{**r, "split": s} for r, s in zip(rows, splits, strict=True)])
    pq.write_table(table, tmp_path / "data.parquet")
    count = {s: splits.count(s) for s in ("train", "validation", "test")}
    # A hyperparameter given as None is left unset (a search chooses it).
    given = {k: v for k, v in {"epochs": 2, "batch_size": 4, "learning_rate": 5e-3, **hyperparameters}.items() if v is not None}
    config = resolve_config(given, count["train"], method)
    return Job(
        id=f"job-{tmp_path.name}",  # one per test: checkpoints are found by job id
        state="RUNNING",
        spec={
            "base_model": str(model_dir),
            "num_workers": workers,
            "use_gpu": False,
            "method": method,
            "hyperparameters": given,
            "search": search or {},
        },
        config=config.to_dict(),
        dataset={
            "id": "ds-test",
            "uri": str(tmp_path / "data.parquet"),
            "format": fmt,
            "labels": list(labels),
            "train_rows": count["train"],
            "validation_rows": count["validation"],
            "test_rows": count["test"],
        },
    )


async def train(runner, job, cancel_when=None, events=None):
    """Runs a job to its end: (events, the published directory's files). A
    list passed as `events` keeps them when the job fails or is cancelled."""
    events, cancel = ([] if events is None else events), asyncio.Event()

    async def emit(kind, data):
        events.append((kind, data))
        if cancel_when and cancel_when(kind, data):
            cancel.set()

    async with runner.run(job, emit, cancel) as out:
        files = {p.name: p.read_bytes() for p in out.iterdir()}
    return events, files


def of(events, kind):
    return [d for k, d in events if k == kind]


def best_validation(evals: list[dict]) -> dict:
    """The validation checkpoints are chosen by (the earliest of equals), with
    the forgetting guard off (forgetting_budget=1); with it on, what each
    forgot also breaks near-ties."""
    return min(evals, key=lambda e: (validation_score(e["loss"], e.get("answer_recall")), e["step"]))


def test_two_workers_wait_for_room_then_train_evaluate_and_checkpoint_a_lora_adapter(runner, tiny_model_dir, tmp_path):
    import ray
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    @ray.remote(num_cpus=3)
    class Holder:  # other work on the cluster: 3 of its 4 CPUs, released once the job says it waits
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote())

    def release(kind, data) -> bool:
        if kind == "log" and data["message"].startswith("waiting for"):
            ray.kill(holder)
        return False

    job = make_job(tmp_path, tiny_model_dir, sums(60))
    try:
        events, files = asyncio.run(train(runner, job, cancel_when=release))
    finally:
        ray.kill(holder)
    waiting = [d["message"] for d in of(events, "log") if d["message"].startswith("waiting for")]
    assert len(waiting) == 1 and waiting[0].startswith("waiting for 2 CPU (1 free now): other work holds the rest of the Ray cluster")
    steps = of(events, "step")
    # 36 training rows, 18 per worker, batches of 4: 5 steps an epoch.
    assert [s["step"] for s in steps] == list(range(1, 11))
    assert all(s["total_steps"] == 10 and s["tokens_per_second"] > 0 for s in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert [e["step"] for e in of(events, "eval")] == [5, 10]
    # Prompt/completion: the validation prompts are answered, and scored, at each validation.
    assert all(0 <= e["answer_recall"] <= 1 for e in of(events, "eval"))
    assert of(events, "checkpoint") and len(runner.checkpoints(job.id)) >= 1
    [evaluation] = of(events, "evaluation")
    assert evaluation["test_rows"] == 12 and evaluation["task"] == "sft"
    assert {"loss", "perplexity", "exact_match"} <= set(evaluation["tuned_metrics"]) == set(evaluation["base_metrics"])
    assert evaluation["tuned_metrics"]["loss"] < evaluation["base_metrics"]["loss"]
    assert evaluation["reference_perplexity_before"] > 0 and evaluation["reference_perplexity_after"] > 0
    assert json.loads(files["evaluation.json"]) == evaluation

    config = json.loads(files["adapter_config.json"])
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(tiny_model_dir)
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    for name, data in files.items():
        (adapter_dir / name).write_bytes(data)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter_dir))
    assert any(float(p.abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)  # trained, not the zero init


@pytest.mark.timeout(120, method="thread")  # the job would wait for ever: stop the run
def test_a_job_cancelled_while_it_waits_for_room_stops_and_lets_its_placement_group_go(runner, tiny_model_dir, tmp_path):
    import ray
    from ray.util import placement_group_table

    @ray.remote(num_cpus=3)
    class Holder:  # other work holds 3 of the cluster's 4 CPUs for the whole test
        def ready(self) -> bool:
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote())
    job, cancel = make_job(tmp_path, tiny_model_dir, sums(20)), asyncio.Event()

    async def emit(kind, data):
        if kind == "log" and data["message"].startswith("waiting for"):
            # Cancelled while Ray Train waits for the room (its workers not started).
            asyncio.get_running_loop().call_later(3, cancel.set)

    async def run():
        async with runner.run(job, emit, cancel):
            pass

    try:
        with pytest.raises(JobCancelled):
            asyncio.run(run())
        # Nothing of the job holds or asks for the cluster's room any more.
        assert all(group["state"] == "REMOVED" for group in placement_group_table().values())
        assert ray.available_resources().get("CPU") == 1.0
    finally:
        ray.kill(holder)
    assert not runner.checkpoints(job.id)


def test_early_stopping_publishes_the_best_checkpoint(runner, tiny_model_dir, tmp_path):
    # Validation answers contradict training answers: the better the model
    # fits train, the worse validation gets.
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": "Arr, yes." if i % 5 else "No, never, nothing."} for i in range(60)]
    job = make_job(
        tmp_path, tiny_model_dir, rows, epochs=6, eval_every_steps=1, early_stopping_patience=2, learning_rate=2e-2, forgetting_budget=1.0
    )
    events, files = asyncio.run(train(runner, job))
    evals = of(events, "eval")
    [evaluation] = of(events, "evaluation")
    best = best_validation(evals)
    assert evaluation["stopped_early"] and len(evals) < 30
    assert evaluation["best_step"] == best["step"] < evals[-1]["step"]
    assert evaluation["best_validation_loss"] == pytest.approx(best["loss"])


def test_classification_on_an_encoder(runner, tmp_path):
    bert = build_tiny_bert(tmp_path / "bert")
    rows = [
        {"text": f"review number {i} was {'great good' if i % 2 else 'awful bad'}", "label": "pos" if i % 2 else "neg"} for i in range(80)
    ]
    job = make_job(tmp_path, bert, rows, fmt="classification", labels=["neg", "pos"], epochs=4, learning_rate=1e-2)
    events, files = asyncio.run(train(runner, job))
    [evaluation] = of(events, "evaluation")
    assert evaluation["task"] == "classification"
    assert evaluation["tuned_metrics"]["accuracy"] == 1.0 and evaluation["tuned_metrics"]["macro_f1"] == 1.0
    assert set(evaluation["base_metrics"]) == {"accuracy", "macro_f1"}
    assert json.loads(files["adapter_config.json"])["task_type"] == "SEQ_CLS"
    assert of(events, "eval") and all("answer_recall" not in e for e in of(events, "eval"))  # classes, not answers


def test_full_fine_tuning_of_a_summarization_task_publishes_a_whole_model(runner, tiny_model_dir, tmp_path):
    # Each causal task is trained and scored by its own metric somewhere in
    # this file: summarization (ROUGE) here, plain text (perplexity) in the
    # forgetting-budget test, chat below, prompt/completion everywhere else.
    rows = [{"document": f"the quick brown fox number {i} jumps over the lazy dog", "summary": f"fox {i} jumps"} for i in range(40)]
    job = make_job(tmp_path, tiny_model_dir, rows, fmt="summarization", workers=1, method="full", learning_rate=1e-3)
    events, files = asyncio.run(train(runner, job))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files) and "adapter_config.json" not in files
    [evaluation] = of(events, "evaluation")
    assert "rougeL" in evaluation["tuned_metrics"] and evaluation["tuned_metrics"]["loss"] < evaluation["base_metrics"]["loss"]


def test_a_chat_task_is_scored_by_exact_match(runner, tiny_model_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "Arr!"}]} for i in range(40)]
    job = make_job(tmp_path, tiny_model_dir, rows, fmt="chat", workers=1)
    events, _ = asyncio.run(train(runner, job))
    [evaluation] = of(events, "evaluation")
    assert "exact_match" in evaluation["tuned_metrics"] and evaluation["tuned_metrics"]["loss"] < evaluation["base_metrics"]["loss"]


class ListQueue:
    """Stands in for a Ray queue: what was put, nothing to get."""

    def __init__(self):
        self.items = []

    def put(self, item):
        self.items.append(item)

    async def get_async(self, block=True, timeout=None):
        from ray.util.queue import Empty

        await asyncio.sleep(timeout or 0)
        raise Empty


def test_workers_are_told_to_stop_when_the_orchestrator_stops_following_their_run():
    """The job's task cancelled, as when this replica loses the job's lease
    to another (or shuts down): the workers get the cancel at once, rather
    than train on beside the new owner's run."""
    from types import SimpleNamespace

    from tunewire.services.training.ray_runner import _Phases

    control, told = ListQueue(), threading.Event()
    phases = _Phases(None, SimpleNamespace(job_id="job-x"), lambda kind, data: None, asyncio.Event(), ListQueue(), control)

    async def follow_then_stop():
        task = asyncio.create_task(phases._relaying(lambda: told.wait(10), {}, on_cancel=told.set))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(follow_then_stop())
    assert control.items == ["cancel"] and phases.stop.is_set() and told.is_set()


def test_a_running_job_says_when_the_cluster_loses_the_room_it_needs_and_when_it_is_back(monkeypatch):
    import ray

    from tunewire.services.training.ray_runner import RoomWatch

    totals = iter([{"CPU": 2.0}, {"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 3.0}])  # a node leaves, another joins
    monkeypatch.setattr(ray, "cluster_resources", lambda: next(totals))
    watch = RoomWatch({"CPU": 2.0}, every=0)
    said = [watch.check() for _ in range(4)]
    assert said[0] == said[2] == ""  # nothing changed
    assert said[1].startswith(
        "the Ray cluster no longer has the room for this job, which needs 2 CPU (the cluster has 1 in all now) at once"
    )
    assert "waits for the room to come back" in said[1] and "cancel it to stop waiting" in said[1]
    assert said[3].startswith("the Ray cluster has the room for this job again")


def test_a_killed_worker_is_replaced_and_training_resumes(runner, tiny_model_dir, tmp_path):
    job = make_job(tmp_path, tiny_model_dir, sums(60), epochs=4)
    killed = []

    def kill_a_worker_after_the_first_checkpoint():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(c["step"] >= 5 for c in runner.checkpoints(job.id)):
            time.sleep(0.2)
        for process in psutil.process_iter(["cmdline"]):
            if "RayTrainWorker" in " ".join(process.info["cmdline"] or []):
                process.kill()
                killed.append(process.pid)
                return

    threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True).start()
    events, files = asyncio.run(train(runner, job))
    assert killed
    assert any("resumed from the checkpoint" in d["message"] for d in of(events, "log"))
    assert of(events, "step")[-1]["step"] == 20 and "adapter_model.safetensors" in files


def test_gpu_job_without_gpus_fails_clearly(runner, tiny_model_dir, tmp_path):
    job = make_job(tmp_path, tiny_model_dir, sums(10), workers=1)
    job = Job(**{**job.__dict__, "spec": {**job.spec, "use_gpu": True}})
    with pytest.raises(JobFailed) as caught:
        asyncio.run(train(runner, job))
    assert caught.value.user_error and "1 GPU (the Ray cluster has 0 in all)" in str(caught.value)
    assert "use_gpu=false" in str(caught.value)


def test_a_job_the_cluster_can_never_hold_fails_at_once_naming_what_is_missing(runner, tiny_model_dir, tmp_path):
    job = make_job(tmp_path, tiny_model_dir, sums(10), workers=5)  # the runner's local Ray has 4 CPUs
    started = time.monotonic()
    with pytest.raises(JobFailed) as caught:
        asyncio.run(train(runner, job))
    assert time.monotonic() - started < 10, "it failed at once, rather than wait for CPUs that never come"
    assert caught.value.user_error and "5 CPU (the Ray cluster has 4 in all)" in str(caught.value)
    assert "lower num_workers" in str(caught.value)


def test_what_a_run_needs_of_the_cluster(monkeypatch):
    from tunewire.services.training import ray_runner

    def _recipe(workers: int, train_rows: int = 100, use_gpu: bool = False) -> RecipeConfig:
        training = resolve_config({}, train_rows)
        return RecipeConfig(
            "job-x", "model", "sft", "lora", "data.parquet", train_rows, 10, workers, use_gpu, "models", "artifacts", training
        )

    assert ray_runner.run_needs(_recipe(workers=2)) == {"CPU": 2.0}
    # A split too large to keep in memory streams through Ray Data, whose reading tasks need a CPU of their own.
    assert ray_runner.run_needs(_recipe(workers=2, train_rows=10**6)) == {"CPU": 3.0}
    assert ray_runner.run_needs(_recipe(workers=2, use_gpu=True)) == {"GPU": 2.0}
    assert ray_runner.shortfall({"CPU": 3.0}, {"CPU": 2.0, "GPU": 1.0}) == {"CPU": (3.0, 2.0)}
    assert ray_runner.shortfall({"CPU": 2.0}, {"CPU": 2.0}) == {}
    with pytest.raises(JobFailed) as caught:
        ray_runner.check_fits(_recipe(workers=2, train_rows=10**6), {"CPU": 2.0})
    assert "its 2 worker(s) and Ray Data's reading of its splits need 3 CPU" in str(caught.value)

    # Trials side by side on a cluster of one's own: as many runs as its resources hold at once.
    import ray

    cluster = ray_runner.RayTrainRunner("head:6379", 0, None, Path("models"))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 7.0, "GPU": 4.0})
    assert cluster._room_for_trials(_recipe(workers=2)) == 3
    assert cluster._room_for_trials(_recipe(workers=2, train_rows=10**6)) == 2
    assert cluster._room_for_trials(_recipe(workers=3, use_gpu=True)) == 1
    assert cluster._room_for_trials(_recipe(workers=8)) == 1  # it waits for the room, one trial at a time
    assert ray_runner.RayTrainRunner("", 4, None, Path("models"))._room_for_trials(_recipe(workers=2)) == 1


def test_an_unloadable_model_is_the_users_error(runner, tmp_path):
    job = make_job(tmp_path, tmp_path / "missing-model", sums(10), workers=1)
    with pytest.raises(JobFailed) as caught:
        asyncio.run(train(runner, job))
    assert caught.value.user_error and "cannot load base model" in str(caught.value) and "missing-model" in str(caught.value)


def test_rows_truncated_to_nothing_are_the_users_error(runner, tiny_model_dir, tmp_path):
    rows = [{"prompt": "the quick brown fox " * 20, "completion": "Arr."} for _ in range(10)]
    job = make_job(tmp_path, tiny_model_dir, rows, workers=1, max_seq_length=16)
    with pytest.raises(JobFailed) as caught:
        asyncio.run(train(runner, job))
    assert caught.value.user_error and "max_seq_length=16" in str(caught.value)


def test_no_checkpoint_within_the_budget_publishes_the_least_forgetting_and_says_so(runner, tiny_model_dir, tmp_path):
    # One token over and over, learnt by full fine-tuning at a high learning
    # rate with no retention penalty: the model comes to predict little else,
    # so the reference text's perplexity rises far over a budget of zero.
    rows = [{"text": "zq " * 24 + str(i)} for i in range(60)]
    job = make_job(
        tmp_path,
        tiny_model_dir,
        rows,
        fmt="text",
        workers=1,
        method="full",
        epochs=3,
        learning_rate=5e-2,
        warmup_fraction=0.0,
        precision="float32",
        forgetting_budget=0.0,
        retention_weight=0.0,
    )
    events, files = asyncio.run(train(runner, job))
    [evaluation] = of(events, "evaluation")
    assert evaluation["within_forgetting_budget"] is False and "perplexity" in evaluation["tuned_metrics"]
    assert any(d["kind"] == "over_budget" for d in of(events, "diagnostic"))
    assert any(e.get("within_forgetting_budget") is False for e in of(events, "eval"))
    over = [c for c in runner.checkpoints(job.id)]
    assert over and not any(c["within_budget"] for c in over)


def test_a_search_runs_its_trials_on_ray_tune_resumes_them_after_a_cancel_and_publishes_the_best(runner, tiny_model_dir, tmp_path):
    # The learning rate left unset: a search of two candidates, one of which cannot learn.
    job = make_job(
        tmp_path,
        tiny_model_dir,
        sums(60),
        workers=1,
        epochs=4,
        learning_rate=None,
        forgetting_budget=1.0,
        search={"learning_rates": [5e-3, 1e-6]},
    )
    cancelled: list = []
    with pytest.raises(JobCancelled):
        asyncio.run(train(runner, job, cancel_when=lambda kind, data: kind == "checkpoint" and data["step"] >= 10, events=cancelled))
    saved = {c["run"]: c["step"] for c in runner.checkpoints(job.id)}
    assert saved.get("trial-1", 0) >= 10
    # Run again (as a resume after a cancel, or an orchestrator's restart:
    # test_recovery kills one): the interrupted trial goes on from its
    # checkpoint (Tune's record of the trials it stopped, which would end
    # them, is not restored), to its last step; then the next trial runs.
    events, files = asyncio.run(train(runner, job))
    steps = [s["step"] for s in of(events, "step") if s["run"] == "trial-1"]
    assert steps and steps[0] == saved["trial-1"] + 1 and steps[-1] == 36  # 4 epochs of 9 steps
    trials = of(events, "trial")
    assert {t["run"] for t in trials} == {"trial-1", "trial-2"}
    assert [t["learning_rate"] for t in trials if t["run"] == "trial-2"][0] == 1e-6
    assert {t["state"] for t in trials} >= {"RUNNING", "DONE"}
    assert all("best_validation_loss" in t for t in trials if t["state"] == "DONE")
    assert {e["run"] for e in of(events, "eval")} == {s["run"] for s in of(events, "step")} == {"trial-1", "trial-2"}
    [evaluation] = of(events, "evaluation")
    assert evaluation["run"] == "trial-1" and evaluation["learning_rate"] == 5e-3
    assert [t["run"] for t in evaluation["trials"]] == ["trial-1", "trial-2"]
    best = best_validation([e for e in of(cancelled + events, "eval") if e["run"] == "trial-1"])
    assert evaluation["best_step"] == best["step"] and evaluation["best_validation_loss"] == pytest.approx(best["loss"])
    assert evaluation["best_answer_recall"] == pytest.approx(best["answer_recall"])
    assert json.loads(files["evaluation.json"]) == evaluation
    assert json.loads(files["tunewire_adapter.json"])["run"] == "trial-1"
    assert "adapter_model.safetensors" in files
    assert {c["run"] for c in runner.checkpoints(job.id)} == {"trial-1", "trial-2"}


def test_a_search_ends_a_trial_started_when_its_time_left_cannot_take_it_through_a_quarter_of_its_epochs():
    from tunewire.services.training import search

    channels = search._Channels(search.TrialEvents(), threading.Event())
    search._CHANNELS["job-x"] = channels
    try:
        stop = search.StopSearch("job-x", max_seconds=300, grace_epochs=2, max_epochs=12)
        channels.running["t1"] = channels.started
        assert not stop("t1", {"epoch": 1.0, "time_total_s": 60.0}) and stop.epoch_seconds is None
        assert not stop("t1", {"epoch": 2.0, "time_total_s": 100.0}) and stop.epoch_seconds == 50.0
        channels.started -= 160  # 140 s left: a trial needs 150 s for 3 of its 12 epochs
        channels.running["t1"] = channels.started  # (the clock moved on with it)
        assert not stop.stop_all(), "a trial started in time goes on (Tune's own budget ends it)"
        # Tune starts the next trial as the first ends: that one is not worth running.
        del channels.running["t1"]
        channels.running["t2"] = time.monotonic()
        assert stop.stop_all()
        channels.started += 20  # 160 s left at t2's start (and now)
        channels.running["t2"] = time.monotonic()
        assert not stop.stop_all()
        channels.running.clear()
        assert not stop.stop_all(), "with no trial running, the next could still start"
        # Short schedules need their first comparison at least: 2 epochs of 6.
        assert search.StopSearch("job-x", 300, grace_epochs=2, max_epochs=6).needed_epochs == 2
        channels.started -= 200  # the search's time is up, and no trial reached its first comparison
        stop.epoch_seconds = None
        assert stop.stop_all()
        channels.cancel.set()
        assert stop.stop_all() and stop("t2", {"epoch": 0.0})
    finally:
        search._CHANNELS.pop("job-x")


def test_under_the_default_search_time_the_first_trial_trains_past_it_and_no_later_one_starts():
    from types import SimpleNamespace

    from tunewire.services.training import search
    from tunewire.services.training.config import resolve_search

    assert search.unbounded_run(resolve_search({}, {}, "lora", 38)) == "trial-1"
    assert search.unbounded_run(resolve_search({"max_seconds": 456}, {}, "lora", 38)) == ""
    channels = search._Channels(search.TrialEvents(), threading.Event())
    search._CHANNELS["job-z"] = channels
    try:
        report = search.ReportTrials("job-z", max_epochs=12, unbounded_run="trial-1")
        stop = search.StopSearch("job-z", max_seconds=456, grace_epochs=2, max_epochs=12)
        candidate = {"run": "trial-1", "learning_rate": 2e-3, "lora_rank": 16}
        first = SimpleNamespace(trial_id="t1", status="RUNNING", last_result=None, config={"candidate": candidate})
        report.on_trial_start(0, [], first)
        assert not stop("t1", {"epoch": 2.0, "time_total_s": 400.0})  # a slow machine: 200 s an epoch
        channels.started -= 600  # the search's time is past
        assert not stop.stop_all(), "the first trial trains on"
        channels.unbounded.clear()
        assert stop.stop_all(), "a trial the time bounds would end here"
        channels.running.clear()  # the first trial ended: no time for another
        assert stop.stop_all()
    finally:
        search._CHANNELS.pop("job-z")


def test_each_trial_ends_once_on_the_event_stream_a_budget_cut_one_as_stopped():
    from types import SimpleNamespace

    from tunewire.services.training import search

    def trial(trial_id, status, last_result):
        candidate = {"run": trial_id, "learning_rate": 1e-3, "lora_rank": 16}
        return SimpleNamespace(trial_id=trial_id, status=status, last_result=last_result, config={"candidate": candidate})

    channels = search._Channels(search.TrialEvents(), threading.Event())
    search._CHANNELS["job-y"] = channels
    try:
        report = search.ReportTrials("job-y", max_epochs=10)
        done = trial("trial-1", "TERMINATED", {"epoch": 9.0, "finished": True, "stopped_early": True, "objective": 0.1})
        cut = trial("trial-2", "TERMINATED", {"epoch": 3.0, "objective": 0.5})
        report.on_trial_start(0, [], done)
        report.on_trial_start(0, [], cut)
        report.on_trial_complete(0, [], done)
        # Tune's time budget marks a running trial terminated with no completion callback.
        never = trial("trial-3", "PENDING", None)
        # Started as trial-1 ended, too late to be worth running: stopped before its first result.
        late = trial("trial-4", "TERMINATED", None)
        report.on_trial_start(0, [], late)
        report.on_experiment_end([done, cut, never, late])
        ends = [(e["run"], e["state"], e["message"]) for e in channels.events.drain() if e["state"] != "RUNNING"]
        assert [(run, state) for run, state, _ in ends] == [
            ("trial-1", "DONE"),
            ("trial-2", "STOPPED"),
            ("trial-3", "STOPPED"),
            ("trial-4", "STOPPED"),
        ]
        assert ends[3][2] == search.NOT_STARTED and not channels.running
    finally:
        search._CHANNELS.pop("job-y")


def test_a_worker_that_could_never_fit_the_largest_nodes_memory_fails_the_job_at_once(tiny_model_dir):
    from tunewire.services.training import ray_runner

    def _recipe(base_model: str, method: str) -> RecipeConfig:
        training = resolve_config({}, 100, method)
        return RecipeConfig("job-x", base_model, "sft", method, "data.parquet", 100, 10, 2, False, "models", "artifacts", training)

    lora = ray_runner.worker_memory_floor(_recipe(str(tiny_model_dir), "lora"))
    full = ray_runner.worker_memory_floor(_recipe(str(tiny_model_dir), "full"))
    from transformers import AutoModelForCausalLM

    parameters = AutoModelForCausalLM.from_pretrained(tiny_model_dir).num_parameters()
    # Full fine-tuning: float32 weights, gradients and Adam's two moments of every one. LoRA: the weights, and those of its own.
    assert full == 16 * parameters and 4 * parameters < lora < full
    assert ray_runner.worker_memory_floor(_recipe("example-org/some-model", "lora")) is None  # not on this machine: not judged

    recipe = _recipe(str(tiny_model_dir), "full")
    ray_runner.check_memory(recipe, full, largest_node=float(full))
    ray_runner.check_memory(recipe, None, largest_node=1.0)
    with pytest.raises(JobFailed) as caught:
        ray_runner.check_memory(recipe, 3 * 2**30, largest_node=2 * 2**30)
    assert caught.value.user_error
    message = str(caught.value)
    assert "each of its workers needs at least 3.0 GiB of memory" in message and "largest node has 2.0 GiB for tasks" in message
    assert "gradients and Adam's two moments" in message and "use LoRA" in message


def test_a_trial_tune_made_but_never_started_is_summarised_as_not_started():
    """Tune's result for a trial the time budget kept from starting has no
    config (it never reported): the search's summary still names every
    candidate, and each trial's end goes out once."""
    from ray.tune import Result

    from tunewire.services.training import search

    candidates = [{"run": f"trial-{i}", "learning_rate": lr, "lora_rank": 16} for i, lr in ((1, 2e-3), (2, 1e-3), (3, 4e-3))]
    # trial-1 finished when the search's time came (its schedule fitted to it).
    done = {"epoch": 6.0, "finished": True, "out_of_time": True, "objective": 0.1, "config": {"candidate": candidates[0]}}
    cut = {"epoch": 2.0, "objective": 0.6, "config": {"candidate": candidates[1]}}
    results = [Result(metrics=m, checkpoint=None, error=None, path="unused") for m in (done, cut, {})]
    events = search.TrialEvents()
    events.put(candidates[2] | {"state": "STOPPED", "message": search.NOT_STARTED})  # ReportTrials' end of the made one
    summaries, user_error = search.summarize_trials(results, candidates, 10, events, add_unstarted=True)
    assert user_error is None
    assert [(s["run"], s["state"], s["epoch"], s.get("out_of_time")) for s in summaries] == [
        ("trial-1", "DONE", 6.0, True),
        ("trial-2", "STOPPED", 2.0, False),
        ("trial-3", "STOPPED", 0.0, False),
    ]
    assert [e["run"] for e in events.drain()] == ["trial-3"]  # not announced twice

    never_made = search.TrialEvents()
    search.summarize_trials(results[:2], candidates, 10, never_made, add_unstarted=True)
    assert [(e["run"], e["message"]) for e in never_made.drain()] == [("trial-3", search.NOT_STARTED)]


def test_a_checkpoint_cut_short_is_not_resumed_from(tmp_path):
    """A crash or a full disk mid-copy leaves a torn state file or missing
    weights: such a checkpoint is skipped, so a resume takes the one before
    rather than failing on it every time."""
    from tunewire.services.common import layout
    from tunewire.services.training.recipe import list_checkpoints

    store = ArtifactStore(str(tmp_path / "store"))
    run = tmp_path / "store" / "ray" / "job-torn" / "train.1"

    def checkpoint(step, state_text=None, weights=b"w" * 10, listed=10):
        directory = run / f"checkpoint_{step:06d}"
        directory.mkdir(parents=True)
        if weights is not None:
            (directory / layout.ADAPTER_WEIGHTS).write_bytes(weights)
        state = {"step": step, "files": {layout.ADAPTER_WEIGHTS: listed}}
        (directory / layout.STATE_FILE).write_text(state_text if state_text is not None else json.dumps(state))

    checkpoint(5)
    checkpoint(10, state_text='{"step": 10, "fi')  # torn
    checkpoint(15, weights=b"w" * 4)  # weights cut short
    checkpoint(20, weights=None)  # weights never arrived
    assert [c["step"] for c in list_checkpoints(store, "job-torn")] == [5]
