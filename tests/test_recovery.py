"""The orchestrator killed (SIGKILL) in the middle of a job: after a restart
the job resumes from its last checkpoint and succeeds; it is never left
RUNNING and does not start over."""

import json
import re

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


def test_orchestrator_killed_mid_job_resumes_after_restart(tmp_path, tiny_model_dir):
    env, rows = _stack_env(tmp_path, tiny_model_dir, dataset_port=free_port(), training_port=free_port()), _SUMS
    with LocalStack(env=env, services=("dataset",), log_dir=tmp_path / "logs") as datasets:
        with DatasetClient(datasets.address("dataset")) as client:
            dataset = client.upload(rows, name="sums").dataset
        first = LocalStack(env=env, services=("training",), log_dir=tmp_path / "logs")
        with first, TrainingClient(first.address("training")) as training:
            job = training.create_job(
                str(tiny_model_dir),
                dataset.id,
                {
                    "epochs": 2,
                    "batch_size": 4,
                    "eval_every_steps": 4,
                    "early_stopping_patience": 0,
                    "learning_rate": 1e-2,
                    "warmup_fraction": 0.0,
                },
            )
            checkpoint_step = None
            for event in training.stream_events(job.id, timeout=300):
                if event.WhichOneof("event") == "checkpoint" and event.checkpoint.step >= 4:
                    checkpoint_step = event.checkpoint.step
                    break
            children = _ray_processes_of(first.processes["training"].pid)
            first.processes["training"].kill()  # SIGKILL: no chance to clean up
            first.processes["training"].wait()
        assert checkpoint_step is not None
        # Ray's processes share the orchestrator's fate: nothing trains on unseen.
        psutil.wait_procs([p for p in children if _is_training(p)], timeout=60)
        assert not [p for p in children if _is_training(p)]

        with (
            LocalStack(env=env, services=("training",), log_dir=tmp_path / "logs") as second,
            TrainingClient(second.address("training")) as training,
        ):
            events = list(training.stream_events(job.id, timeout=600))
            job = training.get_job(job.id)
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
    logs = [e.log for e in events if e.WhichOneof("event") == "log"]
    assert any("orchestrator running this job stopped" in line for line in logs), logs
    # From the latest checkpoint written before the kill (the stream may lag the workers).
    resumed_at = [int(m.group(1)) for line in logs if (m := re.search(r"resuming from the checkpoint of step (\d+)", line))]
    assert resumed_at and resumed_at[0] >= checkpoint_step, logs
    states = [training_pb2.JobState.Name(e.state) for e in events if e.WhichOneof("event") == "state"]
    assert states[-3:] == ["JOB_STATE_QUEUED", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"]
    # After the restart the checkpoint's epoch runs again from its first batch
    # (nothing skipped), with the trained weights: not a start from scratch.
    restart = max(i for i, e in enumerate(events) if e.WhichOneof("event") == "log" and "resuming" in e.log)
    first_run = [e.step for e in events[:restart] if e.WhichOneof("event") == "step"]
    resumed = [e.step for e in events[restart:] if e.WhichOneof("event") == "step"]
    epoch_start = (resumed_at[0] // 12) * 12  # 48 training rows, batches of 4: 12 steps an epoch
    assert resumed[0].step == epoch_start + 1 and resumed[-1].step == job.latest_step.total_steps
    assert resumed[0].loss < first_run[0].loss - 0.2


def test_orchestrator_killed_mid_search_restores_the_search(tmp_path, tiny_model_dir):
    """The same for a job whose learning rate is searched: Ray Tune's saved
    state is restored, the interrupted trial resumes from its checkpoint and
    the search ends with it in the report. One candidate: that the next trial
    runs after a resume is test_ray_training's cancelled search."""
    env, rows = _stack_env(tmp_path, tiny_model_dir, dataset_port=free_port(), training_port=free_port()), _SUMS
    hyperparameters = {"epochs": 2, "batch_size": 4, "eval_every_steps": 4, "early_stopping_patience": 0, "warmup_fraction": 0.0}
    with LocalStack(env=env, services=("dataset",), log_dir=tmp_path / "logs") as datasets:
        with DatasetClient(datasets.address("dataset")) as client:
            dataset = client.upload(rows, name="sums").dataset
        first = LocalStack(env=env, services=("training",), log_dir=tmp_path / "logs")
        with first, TrainingClient(first.address("training")) as training:
            job = training.create_job(str(tiny_model_dir), dataset.id, hyperparameters, search={"learning_rates": [1e-2]})
            checkpoint_step = None
            for event in training.stream_events(job.id, timeout=300):
                if event.WhichOneof("event") == "checkpoint" and event.checkpoint.run == "trial-1" and event.checkpoint.step >= 4:
                    checkpoint_step = event.checkpoint.step
                    break
            first.processes["training"].kill()
            first.processes["training"].wait()
        assert checkpoint_step is not None
        with (
            LocalStack(env=env, services=("training",), log_dir=tmp_path / "logs") as second,
            TrainingClient(second.address("training")) as training,
        ):
            events = list(training.stream_events(job.id, timeout=600))
            job = training.get_job(job.id)
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
    restart = max(i for i, e in enumerate(events) if e.WhichOneof("event") == "log" and "orchestrator running this job stopped" in e.log)
    after = events[restart:]
    logs = [e.log for e in after if e.WhichOneof("event") == "log"]
    resumed_at = [int(m.group(1)) for line in logs if (m := re.search(r"resumed from the checkpoint of step (\d+)", line))]
    assert resumed_at and resumed_at[0] >= checkpoint_step, logs
    # trial-1 went on from its checkpoint: its epoch again from the first
    # batch (48 training rows, batches of 4: 12 steps an epoch), with the trained weights.
    first_run = [e.step for e in events[:restart] if e.WhichOneof("event") == "step" and e.step.run == "trial-1"]
    resumed = [e.step for e in after if e.WhichOneof("event") == "step" and e.step.run == "trial-1"]
    assert resumed[0].step == (resumed_at[0] // 12) * 12 + 1 and resumed[0].loss < first_run[0].loss - 0.2
    assert [t.run for t in job.evaluation.trials] == ["trial-1"]


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
