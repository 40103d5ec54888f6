"""The orchestrator killed (SIGKILL) in the middle of its jobs: after a
restart each resumes from its last checkpoint and succeeds; none is left
RUNNING or starts over."""

import json
import re
import threading

import psutil

from tunewire.clients.local_stack import LocalStack
from tunewire.clients.sdk import DatasetClient, TrainingClient
from tunewire.v1 import training_pb2

from conftest import free_port


def _ray_processes_of(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _is_training(process: psutil.Process) -> bool:
    """A live Ray process that could still be training (workers, raylet, GCS)."""
    try:
        name = " ".join(process.cmdline())
        return process.status() != psutil.STATUS_ZOMBIE and any(
            k in name for k in ("RayTrainWorker", "raylet", "gcs_server", "TrainController")
        )
    except psutil.NoSuchProcess:
        return False


# 60 prompt/completion rows (48 in training with the default splits).
_SUMS = "".join(json.dumps({"prompt": f"What is {i} plus {i}?", "completion": f"Arr, {2 * i}."}) + "\n" for i in range(60)).encode()


def _stack_env(tmp_path, tiny_model_dir, dataset_port: int, training_port: int) -> dict:
    return {
        "TUNEWIRE_HOME": str(tmp_path / "home"),
        "TUNEWIRE_DATASET_PORT": str(dataset_port),
        "TUNEWIRE_TRAINING_PORT": str(training_port),
        "TUNEWIRE_MODEL_ROOTS": str(tiny_model_dir),
    }


def _first_checkpoint(training: TrainingClient, job_id: str, run: str, reached: dict) -> None:
    """Follows a job's events until its `run` saves a checkpoint of step 4 or later."""
    for event in training.stream_events(job_id, timeout=300):
        if event.WhichOneof("event") == "checkpoint" and event.checkpoint.run == run and event.checkpoint.step >= 4:
            reached[job_id] = event.checkpoint.step
            return


def _resumed(events: list, run: str, restart: int, pattern: str) -> tuple[int, list, list]:
    """(the step resumed from, `run`'s steps before the restart, and after it)."""
    logs = [e.log for e in events[restart:] if e.WhichOneof("event") == "log"]
    resumed_at = [int(m.group(1)) for line in logs if (m := re.search(pattern, line))]
    assert resumed_at, logs
    before = [e.step for e in events[:restart] if e.WhichOneof("event") == "step" and e.step.run == run]
    after = [e.step for e in events[restart:] if e.WhichOneof("event") == "step" and e.step.run == run]
    return resumed_at[0], before, after


def test_orchestrator_killed_mid_job_and_mid_search_resumes_both_after_restart(tmp_path, tiny_model_dir):
    """Two jobs side by side, one trained once and one whose learning rate is
    searched (Ray Tune's saved state restored, the interrupted trial resumed
    from its checkpoint; one candidate: that the next trial runs after a
    resume is test_ray_training's cancelled search). The orchestrator is
    killed once both have a checkpoint."""
    env = _stack_env(tmp_path, tiny_model_dir, dataset_port=free_port(), training_port=free_port()) | {"TUNEWIRE_MAX_CONCURRENT_JOBS": "2"}
    # 60 rows, 48 in training: 12 steps an epoch in batches of 4. The plain job
    # trains 4 epochs: still training when the search, slower to start, saves its first checkpoint.
    hyperparameters = {"epochs": 2, "batch_size": 4, "eval_every_steps": 4, "early_stopping_patience": 0, "warmup_fraction": 0.0}
    with LocalStack(env=env, services=("dataset",), log_dir=tmp_path / "logs") as datasets:
        with DatasetClient(datasets.address("dataset")) as client:
            dataset = client.upload(_SUMS, name="sums").dataset
        first = LocalStack(env=env, services=("training",), log_dir=tmp_path / "logs")
        with first, TrainingClient(first.address("training")) as training:
            plain = training.create_job(str(tiny_model_dir), dataset.id, hyperparameters | {"epochs": 4, "learning_rate": 1e-2})
            search = training.create_job(str(tiny_model_dir), dataset.id, hyperparameters, search={"learning_rates": [1e-2]})
            reached: dict[str, int] = {}
            followers = [
                threading.Thread(target=_first_checkpoint, args=(training, job.id, run, reached))
                for job, run in ((plain, "train"), (search, "trial-1"))
            ]
            for follower in followers:
                follower.start()
            for follower in followers:
                follower.join()
            children = _ray_processes_of(first.processes["training"].pid)
            first.processes["training"].kill()  # SIGKILL: no chance to clean up
            first.processes["training"].wait()
        assert set(reached) == {plain.id, search.id}
        # Ray's processes share the orchestrator's fate: nothing trains on unseen.
        psutil.wait_procs([p for p in children if _is_training(p)], timeout=60)
        assert not [p for p in children if _is_training(p)]

        with (
            LocalStack(env=env, services=("training",), log_dir=tmp_path / "logs") as second,
            TrainingClient(second.address("training")) as training,
        ):
            events = {job.id: list(training.stream_events(job.id, timeout=600)) for job in (plain, search)}
            plain, search = training.get_job(plain.id), training.get_job(search.id)

    for job in (plain, search):
        assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
        logs = [e.log for e in events[job.id] if e.WhichOneof("event") == "log"]
        assert any("orchestrator running this job stopped" in line for line in logs), logs
        states = [training_pb2.JobState.Name(e.state) for e in events[job.id] if e.WhichOneof("event") == "state"]
        assert states[-3:] == ["JOB_STATE_QUEUED", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"]

    # From the latest checkpoint written before the kill (the stream may lag
    # the workers); its epoch again from the first batch (nothing skipped),
    # with the trained weights: not a start from scratch.
    job_events = events[plain.id]
    restart = max(i for i, e in enumerate(job_events) if e.WhichOneof("event") == "log" and "resuming" in e.log)
    resumed_at, before, after = _resumed(job_events, "train", restart, r"resuming from the checkpoint of step (\d+)")
    assert resumed_at >= reached[plain.id]
    assert after[0].step == (resumed_at // 12) * 12 + 1 and after[-1].step == plain.latest_step.total_steps == 48
    assert after[0].loss < before[0].loss - 0.2

    job_events = events[search.id]
    restart = max(
        i for i, e in enumerate(job_events) if e.WhichOneof("event") == "log" and "orchestrator running this job stopped" in e.log
    )
    resumed_at, before, after = _resumed(job_events, "trial-1", restart, r"resumed from the checkpoint of step (\d+)")
    assert resumed_at >= reached[search.id]
    assert after[0].step == (resumed_at // 12) * 12 + 1 and after[0].loss < before[0].loss - 0.2
    assert [t.run for t in search.evaluation.trials] == ["trial-1"]


def test_what_a_crash_leaves_in_the_store_and_caches_is_swept(tmp_path):
    """A publish killed between copy and move leaves a staging copy; a
    download killed mid-way leaves a partial one. Old leftovers go; young ones
    (another replica's publish in progress) stay."""
    import os
    import time

    from tunewire.services.common.artifacts import ArtifactStore, sweep_partial_downloads

    store = ArtifactStore(str(tmp_path / "store"))
    staging = tmp_path / "store" / ".staging"
    for name in ("crashed", "in-progress"):
        (staging / name / "sub").mkdir(parents=True)
        (staging / name / "sub" / "data.parquet").write_bytes(b"x")
    hours_ago = time.time() - 2 * 3600
    for path in (staging / "crashed", staging / "crashed" / "sub", staging / "crashed" / "sub" / "data.parquet"):
        os.utime(path, (hours_ago, hours_ago))
    assert store.sweep_staging() == 1
    assert sorted(p.name for p in staging.iterdir()) == ["in-progress"]

    cache = tmp_path / "adapter-cache"
    for name in ("ad-1.partial-aaaa", "ad-2.partial-bbbb", "ad-3"):
        (cache / name).mkdir(parents=True)
    os.utime(cache / "ad-1.partial-aaaa", (hours_ago, hours_ago))
    sweep_partial_downloads(cache)
    assert sorted(p.name for p in cache.iterdir()) == ["ad-2.partial-bbbb", "ad-3"]
