"""TrainingService over a real gRPC server on port 0, with a fake runner and
dataset lookup (Ray Train itself is tested in test_ray_training.py)."""

import asyncio
import base64
import contextlib
import datetime
import tempfile
import time
from pathlib import Path

import grpc
import pytest

from tunewire.clients.sdk import ApiError, TrainingClient
from tunewire.services.common.artifacts import ArtifactStore
from tunewire.services.common.errors import NotFound
from tunewire.services.common.settings import load_settings
from tunewire.services.training.jobs import DatasetRef
from tunewire.services.training.scheduler import JobCancelled, JobFailed
from tunewire.services.training.server import TrainingDeps, create_server
from tunewire.services.training.store import RUNNING, JobStore
from tunewire.v1 import training_pb2

from conftest import DATABASES, ServerThread

DATASET = DatasetRef(id="ds-1", format="prompt_completion", uri="unused", train_rows=40, validation_rows=4)

# Every test here runs on SQLite and on PostgreSQL.
pytestmark = pytest.mark.parametrize("database_env", DATABASES, indirect=True)


@pytest.fixture(autouse=True)
def _database(database_env):
    return database_env


class FakeDatasets:
    def __init__(self, latency: float = 0.0):
        self.pins = []
        self.latency = latency  # of a pin, as over the network: other requests run meanwhile

    async def get(self, project, dataset_id):
        if dataset_id == "ds-broken":  # a fault of the service's own, with words no caller should see
            raise RuntimeError("connection to postgresql://tunewire:hunter2@db.internal/prod refused")
        if dataset_id != DATASET.id or project != "default":
            raise NotFound(f"dataset {dataset_id!r} not found")
        return DATASET

    async def acquire(self, project, dataset_id, holder):
        dataset = await self.get(project, dataset_id)
        await asyncio.sleep(self.latency)
        self.pins.append((dataset_id, holder))
        return dataset

    async def release(self, project, dataset_id, holder):
        # As the dataset service: dropping a pin it does not hold is no error
        # (replicas sharing a database each release every ended job's pin).
        if (dataset_id, holder) in self.pins:
            self.pins.remove((dataset_id, holder))


class FakeRunner:
    """Emits two steps, then yields a directory with adapter files (or fails)."""

    def __init__(self, fail: JobFailed | None = None, hold: bool = False):
        self.fail = fail
        self.hold = hold
        self.ran: list[str] = []

    def checkpoints(self, job_id):
        return [
            {
                "step": 2,
                "validation_loss": 0.5,
                "uri": f"/store/ray/{job_id}.1/checkpoint_0",
                "modified": datetime.datetime.now(datetime.UTC),
            }
        ]

    @contextlib.asynccontextmanager
    async def run(self, job, emit, cancel):
        self.ran.append(job.id)
        for step in (1, 2):
            await emit("step", {"step": step, "total_steps": 2, "loss": 1.0 / step})
        if self.hold:
            # Stands for a long run: only a cancellation ends it.
            await cancel.wait()
            raise JobCancelled()
        if self.fail:
            raise self.fail
        await emit("eval", {"split": "validation", "loss": 0.5, "perplexity": 1.6, "step": 2})
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "adapter_config.json").write_text('{"peft_type": "LORA"}')
            Path(tmp, "adapter_model.safetensors").write_bytes(b"")
            yield Path(tmp)


def make_service(tmp_path, runner, datasets=None, **overrides):
    settings = load_settings(home=tmp_path / "home", **overrides)

    async def make():
        deps = TrainingDeps(
            store=JobStore(settings.training_database_url),
            artifacts=ArtifactStore(settings.artifact_root),
            datasets=datasets or FakeDatasets(),
            runner=runner,
        )
        return await create_server(settings, deps, port=0)

    return ServerThread(make), settings


def states(events):
    return [training_pb2.JobState.Name(e.state) for e in events if e.WhichOneof("event") == "state"]


def test_job_runs_streams_and_publishes(tmp_path):
    server, settings = make_service(tmp_path, FakeRunner())
    with server, TrainingClient(server.address) as client:
        job = client.create_job("smollm2-135m-instruct", "ds-1", {"learning_rate": 1e-3})
        assert job.state == training_pb2.JOB_STATE_QUEUED
        assert job.resolved_hyperparameters.learning_rate == 1e-3
        assert "epochs" in job.auto_hyperparameters
        events = list(client.stream_events(job.id, timeout=30))
        assert states(events) == ["JOB_STATE_QUEUED", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"]
        assert [e.step.step for e in events if e.WhichOneof("event") == "step"] == [1, 2]
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        job = client.get_job(job.id)
        assert job.state == training_pb2.JOB_STATE_SUCCEEDED and job.adapter_id.startswith("ad-")
        assert job.latest_step.step == 2
        adapter_dir = Path(settings.artifact_root) / "adapters" / job.adapter_id
        assert (adapter_dir / "adapter_config.json").exists()
        [adapter] = client.list_adapters()
        assert adapter.id == job.adapter_id and adapter.uri == str(adapter_dir) and adapter.sequence == 1
        # A late subscriber gets the whole history; a resumed one only what follows.
        assert [e.sequence for e in client.stream_events(job.id, timeout=10)] == [e.sequence for e in events]
        assert [e.sequence for e in client.stream_events(job.id, after_sequence=3, timeout=10)] == [e.sequence for e in events[3:]]
        watch = client.stub.WatchAdapters(training_pb2.WatchAdaptersRequest(after_sequence=0), timeout=10)
        assert next(iter(watch)).adapter.id == job.adapter_id
        watch.cancel()


def test_invalid_jobs_are_refused_naming_the_field(tmp_path):
    server, _ = make_service(tmp_path, FakeRunner())
    with server, TrainingClient(server.address) as client:
        with pytest.raises(ApiError) as caught:
            client.create_job("smollm2-135m-instruct", "ds-1", {"learning_rate": 0.0, "lora_rank": 0})
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert {v.field for v in caught.value.violations} == {"spec.hyperparameters.learning_rate", "spec.hyperparameters.lora_rank"}
        with pytest.raises(ApiError) as caught:
            client.create_job("no such model!", "ds-1")
        assert caught.value.violations[0].field == "spec.base_model"
        with pytest.raises(ApiError) as caught:
            client.create_job("smollm2-135m-instruct", "ds-404")
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ApiError) as caught:
            client.create_job("smollm2-135m-instruct", "ds-1", num_workers=1000)
        assert caught.value.violations[0].field == "spec.compute.num_workers"
        with pytest.raises(ApiError) as caught:
            client.get_job("job-missing")
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        assert client.list_jobs() == []
        with pytest.raises(ApiError) as caught:
            client.create_job("smollm2-135m-instruct", "ds-1", method=training_pb2.TRAINING_METHOD_QLORA)
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION and "CUDA" in caught.value.message
        with pytest.raises(ApiError) as caught:
            client.create_job("smollm2-135m-instruct", "ds-1", {"lora_rank": 8}, method=training_pb2.TRAINING_METHOD_FULL)
        assert caught.value.violations[0].field == "spec.hyperparameters.lora_rank"


def test_a_bad_search_is_refused_naming_its_field(tmp_path):
    server, _ = make_service(tmp_path, FakeRunner())
    with server, TrainingClient(server.address) as client:
        with pytest.raises(ApiError) as caught:
            client.create_job("smollm2-135m-instruct", "ds-1", search={"max_trials": 1000, "max_seconds": 5})
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert {v.field for v in caught.value.violations} == {"spec.search.max_trials", "spec.search.max_seconds"}
        with pytest.raises(ApiError) as caught:
            client.create_job("smollm2-135m-instruct", "ds-1", {"forgetting_budget": 2.0})
        assert [v.field for v in caught.value.violations] == ["spec.hyperparameters.forgetting_budget"]
        assert client.list_jobs() == []


def test_failed_job_carries_its_reason(tmp_path):
    server, _ = make_service(tmp_path, FakeRunner(fail=JobFailed("sequence too long for the model", user_error=True)))
    with server, TrainingClient(server.address) as client:
        job = client.create_job("smollm2-135m-instruct", "ds-1")
        events = list(client.stream_events(job.id, timeout=30))
        assert states(events)[-1] == "JOB_STATE_FAILED"
        assert events[-1].error == "user error: sequence too long for the model"
        assert client.get_job(job.id).error == "user error: sequence too long for the model"
        assert client.list_adapters() == []


def test_jobs_left_running_by_a_dead_orchestrator_run_again(tmp_path):
    runner = FakeRunner()
    settings = load_settings(home=tmp_path / "home")
    store = JobStore(settings.training_database_url)
    job, _ = store.create(
        "job-interrupted",
        {"base_model": "m", "dataset_id": "ds-1", "method": "lora", "hyperparameters": {}, "num_workers": 1, "use_gpu": False},
        {"seed": 0},
        {},
    )
    assert store.transition(job.id, RUNNING, from_states=("QUEUED",))
    store.close()
    server, _ = make_service(tmp_path, runner)
    with server, TrainingClient(server.address) as client:
        events = list(client.stream_events(job.id, timeout=30))
        assert states(events) == ["JOB_STATE_QUEUED", "JOB_STATE_RUNNING", "JOB_STATE_QUEUED", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"]
        assert any("orchestrator running this job stopped" in e.log for e in events)
        assert runner.ran == [job.id]


def test_cancel_a_queued_and_a_running_job(tmp_path):
    server, _ = make_service(tmp_path, FakeRunner(hold=True))
    with server, TrainingClient(server.address) as client:
        running = client.create_job("smollm2-135m-instruct", "ds-1")
        stream = client.stream_events(running.id, timeout=30)
        assert [next(stream).state for _ in range(2)] == [training_pb2.JOB_STATE_QUEUED, training_pb2.JOB_STATE_RUNNING]
        queued = client.create_job("smollm2-135m-instruct", "ds-1")  # waits: one job at a time
        assert client.cancel_job(queued.id).state == training_pb2.JOB_STATE_CANCELLED
        client.cancel_job(running.id)
        assert states(list(stream))[-1] == "JOB_STATE_CANCELLED"
        assert client.get_job(running.id).state == training_pb2.JOB_STATE_CANCELLED
        with pytest.raises(ApiError) as caught:
            client.cancel_job(running.id)
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION


class RunnerOfRayJobs(FakeRunner):
    """A FakeRunner whose runs outlive their orchestrator, as Ray Jobs on a cluster do."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.going: set[str] = set()
        self.abandoned: list[str] = []

    async def unfinished_job_ids(self):
        return set(self.going)

    async def abandon(self, job_id):
        self.abandoned.append(job_id)
        self.going.discard(job_id)


def test_a_run_left_going_for_a_job_that_ended_without_it_is_stopped(tmp_path):
    """A job on a Ray cluster requeued by a restart and cancelled while it
    waits: its Ray Job, which trained on, is stopped; a running job's is not."""
    runner = RunnerOfRayJobs(hold=True)
    server, _ = make_service(tmp_path, runner, job_lease_seconds=1.5)
    with server, TrainingClient(server.address) as client:
        running = client.create_job("smollm2-135m-instruct", "ds-1")
        stream = client.stream_events(running.id, timeout=30)
        assert [next(stream).state for _ in range(2)] == [training_pb2.JOB_STATE_QUEUED, training_pb2.JOB_STATE_RUNNING]
        queued = client.create_job("smollm2-135m-instruct", "ds-1")  # waits: one job at a time
        runner.going |= {running.id, queued.id}
        assert client.cancel_job(queued.id).state == training_pb2.JOB_STATE_CANCELLED
        deadline = time.monotonic() + 20
        while not runner.abandoned and time.monotonic() < deadline:
            time.sleep(0.2)
        assert runner.abandoned == [queued.id]
        client.cancel_job(running.id)


def test_a_retried_create_returns_the_same_job(tmp_path):
    server, _ = make_service(tmp_path, FakeRunner())
    with server, TrainingClient(server.address) as client:
        first = client.create_job("smollm2-135m-instruct", "ds-1", {"epochs": 2}, idempotency_key="k-1")
        again = client.create_job("smollm2-135m-instruct", "ds-1", {"epochs": 2}, idempotency_key="k-1")
        assert again.id == first.id and len(client.list_jobs()) == 1
        with pytest.raises(ApiError) as caught:
            client.create_job("smollm2-135m-instruct", "ds-1", {"epochs": 3}, idempotency_key="k-1")
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert client.create_job("smollm2-135m-instruct", "ds-1", idempotency_key="k-2").id != first.id
        # Wider than its column (on PostgreSQL a DataError, answered INTERNAL): named instead.
        with pytest.raises(ApiError) as caught:
            client.create_job("smollm2-135m-instruct", "ds-1", idempotency_key="k" * 250)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and caught.value.violations[0].field == "idempotency_key"


def test_a_job_holds_its_datasets_pin_until_it_ends(tmp_path):
    datasets = FakeDatasets()
    server, _ = make_service(tmp_path, FakeRunner(hold=True), datasets=datasets)
    with server, TrainingClient(server.address) as client:
        running = client.create_job("smollm2-135m-instruct", "ds-1")
        queued = client.create_job("smollm2-135m-instruct", "ds-1")
        assert sorted(datasets.pins) == sorted([("ds-1", running.id), ("ds-1", queued.id)])
        wait_for_state(client, running.id, training_pb2.JOB_STATE_RUNNING)
        client.cancel_job(queued.id)  # ends while queued
        client.cancel_job(running.id)  # ends through its runner
        deadline = time.monotonic() + 30
        while datasets.pins and time.monotonic() < deadline:
            time.sleep(0.1)
        assert datasets.pins == []


def test_an_ended_jobs_checkpoints_are_removed(tmp_path):
    server, settings = make_service(tmp_path, FakeRunner(hold=True))
    with server, TrainingClient(server.address) as client:
        job = client.create_job("smollm2-135m-instruct", "ds-1")
        wait_for_state(client, job.id, training_pb2.JOB_STATE_RUNNING)
        files = Path(settings.artifact_root) / "ray" / job.id
        (files / "train.0" / "checkpoint_000001").mkdir(parents=True)
        (files / "train.0" / "checkpoint_000001" / "training_state.json").write_text("{}")
        client.cancel_job(job.id)
        list(client.stream_events(job.id, timeout=30))
        deadline = time.monotonic() + 30
        while files.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not files.exists()


def test_the_adapter_quota_holds_until_an_adapter_is_deleted(tmp_path):
    # FakeRunner's adapter files take 21 bytes: one adapter fills the quota.
    server, settings = make_service(tmp_path, FakeRunner(), project_max_adapter_bytes=21)
    with server, TrainingClient(server.address) as client:
        job = client.create_job("smollm2-135m-instruct", "ds-1")
        list(client.stream_events(job.id, timeout=30))
        [adapter] = client.list_adapters()
        assert adapter.id == client.get_job(job.id).adapter_id and adapter.size_bytes == 21
        with pytest.raises(ApiError) as caught:
            client.create_job("smollm2-135m-instruct", "ds-1")
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "tunewire adapters delete" in caught.value.message

        deleted = client.delete_adapter(adapter.id)
        assert deleted.deleted and deleted.sequence > adapter.sequence
        assert client.list_adapters() == []
        assert not (Path(settings.artifact_root) / "adapters" / adapter.id).exists()
        with pytest.raises(ApiError) as caught:
            client.delete_adapter(adapter.id)
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        assert client.create_job("smollm2-135m-instruct", "ds-1").id


def test_an_internal_error_says_where_to_look_not_what_it_was(tmp_path):
    server, _ = make_service(tmp_path, FakeRunner())
    with server, TrainingClient(server.address) as client:
        with pytest.raises(ApiError) as caught:
            client.create_job("smollm2-135m-instruct", "ds-broken")
        assert caught.value.code == grpc.StatusCode.INTERNAL
        assert "request id" in caught.value.message
        assert "hunter2" not in caught.value.message and "postgresql" not in caught.value.message
        assert client.create_job("smollm2-135m-instruct", "ds-1").id  # still serving


def test_jobs_list_by_state_and_page(tmp_path):
    server, _ = make_service(tmp_path, FakeRunner())
    with server, TrainingClient(server.address) as client:
        ids = [client.create_job("smollm2-135m-instruct", "ds-1").id for _ in range(5)]
        for job_id in ids:
            list(client.stream_events(job_id, timeout=30))
        seen, token = [], ""
        while True:
            response = client.stub.ListJobs(training_pb2.ListJobsRequest(page_size=2, page_token=token))
            seen += [j.id for j in response.jobs]
            token = response.next_page_token
            if not token:
                break
        assert seen == ids[::-1]
        for token in ("2", "-1", "not base64!", base64.urlsafe_b64encode(b"9" * 30).decode()):
            with pytest.raises(grpc.RpcError) as caught:
                client.stub.ListJobs(training_pb2.ListJobsRequest(page_size=2, page_token=token))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, token
        assert len(client.list_jobs(training_pb2.JOB_STATE_SUCCEEDED)) == 5
        assert client.list_jobs(training_pb2.JOB_STATE_RUNNING) == []
        [checkpoint] = client.stub.ListCheckpoints(training_pb2.ListCheckpointsRequest(job_id=ids[0])).checkpoints
        assert checkpoint.step == 2 and checkpoint.validation_loss == 0.5


def wait_for_state(client, job_id, state, timeout=30.0):
    deadline = time.monotonic() + timeout
    while (job := client.get_job(job_id)).state != state:
        assert time.monotonic() < deadline, f"job {job_id} still {training_pb2.JobState.Name(job.state)}"
        time.sleep(0.05)
    return job


def test_two_replicas_on_one_database_run_each_job_once(tmp_path):
    runners = [FakeRunner(), FakeRunner()]
    (a, _), (b, _) = (make_service(tmp_path, r, replica_id=f"replica-{i}", job_lease_seconds=2) for i, r in enumerate(runners))
    with a, b, TrainingClient(a.address) as client_a, TrainingClient(b.address) as client_b:
        ids = [(client_a if i % 2 else client_b).create_job("smollm2-135m-instruct", "ds-1").id for i in range(8)]
        for job_id in ids:
            wait_for_state(client_a, job_id, training_pb2.JOB_STATE_SUCCEEDED)
    assert sorted(runners[0].ran + runners[1].ran) == sorted(ids)  # every job ran, none twice


def test_a_dead_replicas_job_is_taken_over_and_cancels_reach_the_replica_running_it(tmp_path):
    holding, other = FakeRunner(hold=True), FakeRunner()
    a, _ = make_service(tmp_path, holding, replica_id="replica-a", job_lease_seconds=1.5)
    b, _ = make_service(tmp_path, other, replica_id="replica-b", job_lease_seconds=1.5)
    with a, TrainingClient(a.address) as client_a:
        cancelled = client_a.create_job("smollm2-135m-instruct", "ds-1").id
        wait_for_state(client_a, cancelled, training_pb2.JOB_STATE_RUNNING)
        with b, TrainingClient(b.address) as client_b:
            # Cancelled through the replica that is not running it.
            client_b.cancel_job(cancelled)
            wait_for_state(client_b, cancelled, training_pb2.JOB_STATE_CANCELLED)
        orphan = client_a.create_job("smollm2-135m-instruct", "ds-1").id
        wait_for_state(client_a, orphan, training_pb2.JOB_STATE_RUNNING)
    # Replica a is gone, its lease on `orphan` unrenewed: b takes the job over.
    b, _ = make_service(tmp_path, other, replica_id="replica-b", job_lease_seconds=1.5)
    with b, TrainingClient(b.address) as client_b:
        events = list(client_b.stream_events(orphan, timeout=30))
    assert states(events)[-3:] == ["JOB_STATE_QUEUED", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"]
    assert any("orchestrator running this job stopped" in e.log for e in events)
    assert holding.ran == [cancelled, orphan] and other.ran == [orphan]


def test_events_two_replicas_write_at_once_take_distinct_sequence_numbers(tmp_path):
    """Replicas share the database: one renews a job's lease and records a
    cancel while the other writes its steps. max(sequence) + 1 let two
    writers take one number (an IntegrityError, answered INTERNAL)."""
    from concurrent.futures import ThreadPoolExecutor

    settings = load_settings(home=tmp_path / "home")
    replicas = [JobStore(settings.training_database_url) for _ in range(2)]
    replicas[0].create(job_id="job-shared", spec={}, config={}, dataset={})
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: replicas[i % 2].append_event("job-shared", "log", {"i": i}), range(120)))
    events = replicas[1].events_after("job-shared", 0)
    assert [e.sequence for e in events] == list(range(1, 122))  # the QUEUED state event, then 120 logs
    assert sorted(e.data["i"] for e in events[1:]) == list(range(120))


def test_the_active_jobs_quota_holds_for_creates_at_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    server, _ = make_service(tmp_path, FakeRunner(hold=True), datasets=FakeDatasets(latency=0.2), project_max_active_jobs=2)
    with server, TrainingClient(server.address) as client:

        def create(_):
            try:
                return client.create_job("smollm2-135m-instruct", "ds-1").id
            except ApiError as exc:
                return exc.code

        with ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(create, range(6)))
        assert sorted(map(str, outcomes)).count(str(grpc.StatusCode.RESOURCE_EXHAUSTED)) == 4
        assert len(client.list_jobs()) == 2
        for job in client.list_jobs():
            client.cancel_job(job.id)


def test_a_change_notified_from_another_thread_wakes_a_waiter_on_the_loop():
    from tunewire.services.training.jobs import ChangeNotifier

    async def main():
        notifier = ChangeNotifier()
        waiter = asyncio.create_task(notifier.wait(timeout=30))
        await asyncio.sleep(0.05)  # the waiter is waiting
        started = time.monotonic()
        await asyncio.to_thread(notifier.notify)
        await asyncio.wait_for(waiter, timeout=5)
        return time.monotonic() - started

    assert asyncio.run(main()) < 5  # woken by the notification, not the 30 s timeout
