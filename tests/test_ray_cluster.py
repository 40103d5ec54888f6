"""The training service on a Ray cluster started apart from it, as an
operator runs one: a head and a worker node (`ray start`, on loopback), Ray's
token authentication on as Ray 2.60 defaults. The service connects with the
cluster's token, taken where Ray's own clients take it, and fails naming the
cause without it, or where no cluster answers; a two-worker job runs across
both nodes and survives its orchestrator killed mid-job."""

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tunewire.clients.local_stack import LocalStack
from tunewire.clients.sdk import DatasetClient, TrainingClient
from tunewire.services.training.ray_runner import RayConnectionError, check_reachable
from tunewire.v1 import training_pb2

from conftest import free_port, prompt_completion_jsonl

# The service's start-up, in a process of its own (a process joins one Ray cluster).
CONNECT = """
import sys, ray
from tunewire.services.common.artifacts import ArtifactStore
from tunewire.services.training.ray_runner import RayTrainRunner
runner = RayTrainRunner(sys.argv[1], 1, ArtifactStore(sys.argv[2]), None)
runner.start()
print("connected, CPUs:", ray.cluster_resources().get("CPU"))
runner.shutdown()
"""


def _connect(address: str, env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CONNECT, address, str(tmp_path / "artifacts")], env=env, capture_output=True, text=True, timeout=180
    )


def _without_ray_auth(home: Path) -> dict:
    """The environment with none of Ray's token settings (and a home without ~/.ray/auth_token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return env | {"HOME": str(home)}


def test_a_ray_client_address_is_refused_at_start_saying_what_to_use():
    from tunewire.services.common.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match=r"RAY_ADDRESS='ray://head:10001': .*does not run Ray Train or Ray Tune.*<head>:6379"):
        load_settings(ray_address="ray://head:10001")


def test_an_address_where_nothing_answers_is_named_at_once():
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(RayConnectionError, match=f"no Ray cluster answers at RAY_ADDRESS={address}"):
        check_reachable(address)
    assert time.monotonic() - started < 10


def _ray_node(env: dict, *args: str) -> subprocess.Popen:
    """`ray start ... --block`: a Ray node in a process group of its own."""
    # Ray's socket paths must stay short: each node's session directory goes under /tmp.
    temp = tempfile.mkdtemp(prefix="tw-ray-")
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", *args, "--num-cpus=1", f"--temp-dir={temp}", "--block"],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_started(node: subprocess.Popen) -> subprocess.Popen:
    for line in node.stdout:
        if "Ray runtime started" in line:
            threading.Thread(target=node.stdout.read, daemon=True).start()  # its later output, read so it never blocks
            return node
    raise AssertionError(f"the Ray node exited with code {node.wait()} before it started")


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    """A Ray cluster of a head and a worker node (1 CPU each) with token
    authentication, stopped at the end."""
    token = secrets.token_hex(16)
    port = free_port()
    home = tmp_path_factory.mktemp("home")
    # The nodes run where tunewire is installed: Ray Jobs start its job drivers on the head.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = _without_ray_auth(home) | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PATH": path}
    cluster = SimpleNamespace(address=f"127.0.0.1:{port}", token=token, home=home, nodes={}, env=env)
    cluster.add_worker = lambda: _wait_started(_ray_node(env, f"--address={cluster.address}"))
    try:
        # The head's dashboard serves Ray's state API, which Ray Train's placement group cleaner asks.
        dashboard_port = free_port()
        cluster.dashboard = f"http://127.0.0.1:{dashboard_port}"
        cluster.nodes["head"] = _wait_started(_ray_node(env, "--head", f"--port={port}", f"--dashboard-port={dashboard_port}"))
        cluster.nodes["worker"] = cluster.add_worker()
        check_reachable(cluster.address)
        yield cluster
    finally:
        for node in reversed(cluster.nodes.values()):  # each node and every Ray process it started
            with contextlib.suppress(ProcessLookupError):  # a node a test killed
                os.killpg(node.pid, signal.SIGKILL)
            node.wait()


def test_the_service_connects_with_the_clusters_token_from_the_environment(token_cluster, tmp_path):
    address, token, home = token_cluster.address, token_cluster.token, token_cluster.home
    done = _connect(address, _without_ray_auth(home) | {"RAY_AUTH_TOKEN": token}, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "connected, CPUs: 2.0" in done.stdout


def test_the_service_connects_with_the_token_in_a_mounted_file(token_cluster, tmp_path):
    address, token, home = token_cluster.address, token_cluster.token, token_cluster.home
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "token").write_text(token)
    done = _connect(address, _without_ray_auth(home) | {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "secret" / "token")}, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "connected, CPUs: 2.0" in done.stdout


def test_without_the_token_the_service_says_the_cluster_wants_one(token_cluster, tmp_path):
    address, home = token_cluster.address, token_cluster.home
    started = time.monotonic()
    done = _connect(address, _without_ray_auth(home), tmp_path)
    assert done.returncode != 0
    assert f"the Ray cluster at RAY_ADDRESS={address} answers but refused this service" in done.stderr
    assert "requires Ray's token authentication (Ray 2.60's default) and no token was given: set RAY_AUTH_TOKEN" in done.stderr
    assert time.monotonic() - started < 120


def _service_env(cluster, tmp_path: Path, tiny_model_dir: Path) -> dict:
    """The services' environment, as the README tells an operator: RAY_ADDRESS and RAY_AUTH_TOKEN."""
    return _without_ray_auth(cluster.home) | {
        "RAY_ADDRESS": cluster.address,
        "RAY_AUTH_TOKEN": cluster.token,
        "TUNEWIRE_HOME": str(tmp_path / "home"),
        "TUNEWIRE_DATASET_PORT": str(free_port()),
        "TUNEWIRE_TRAINING_PORT": str(free_port()),
        "TUNEWIRE_MODEL_ROOTS": str(tiny_model_dir),
    }


def _ray_job_status(cluster, submission: str) -> str:
    done = subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "job", "status", submission, f"--address={cluster.dashboard}"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout + done.stderr


def test_a_cancel_stops_the_jobs_ray_job_on_the_cluster(token_cluster, tmp_path, tiny_model_dir):
    """A job on a cluster runs as a Ray Job; cancelled mid-training, that Ray
    Job is stopped and the job ends CANCELLED, its CPUs free for the next."""
    env = _service_env(token_cluster, tmp_path, tiny_model_dir)
    hyperparameters = {"epochs": 50, "batch_size": 4, "learning_rate": 1e-2}
    with (
        LocalStack(env=env, services=("dataset", "training"), log_dir=tmp_path / "logs") as stack,
        DatasetClient(stack.address("dataset")) as datasets,
        TrainingClient(stack.address("training")) as training,
    ):
        dataset = datasets.upload(prompt_completion_jsonl(60), name="sums").dataset
        job = training.create_job(str(tiny_model_dir), dataset.id, hyperparameters, num_workers=1)
        for event in training.stream_events(job.id, timeout=300):
            if event.WhichOneof("event") == "step":
                training.cancel_job(job.id)
                break
        for _ in training.stream_events(job.id, timeout=120):
            pass
        job = training.get_job(job.id)
    assert job.state == training_pb2.JOB_STATE_CANCELLED, job.error
    assert f"Job 'tunewire-{job.id}-1' was stopped" in _ray_job_status(token_cluster, f"tunewire-{job.id}-1")


def test_a_two_worker_job_across_both_nodes_survives_its_orchestrator_and_a_node_killed(token_cluster, tmp_path, tiny_model_dir):
    """The services pointed at the cluster as the README tells an operator
    (RAY_ADDRESS, RAY_AUTH_TOKEN). Each node has one CPU: the job's two
    workers run one on each. Its orchestrator is killed mid-job: the job's
    Ray Job trains on, and the restarted orchestrator reattaches to it. Then
    the worker node is killed: the job goes on from its latest checkpoint."""
    cluster = token_cluster
    env = _service_env(cluster, tmp_path, tiny_model_dir)
    # 144 steps (6 an epoch: 24 training rows per worker, batches of 4), enough
    # that the Ray Job still trains when the restarted orchestrator reattaches.
    hyperparameters = {"epochs": 24, "batch_size": 4, "eval_every_steps": 4, "early_stopping_patience": 0, "learning_rate": 1e-2}
    with LocalStack(env=env, services=("dataset",), log_dir=tmp_path / "logs") as datasets:
        with DatasetClient(datasets.address("dataset")) as client:
            dataset = client.upload(prompt_completion_jsonl(60), name="sums").dataset
        first = LocalStack(env=env, services=("training",), log_dir=tmp_path / "logs")
        with first, TrainingClient(first.address("training")) as training:
            job = training.create_job(str(tiny_model_dir), dataset.id, hyperparameters, num_workers=2)
            for event in training.stream_events(job.id, timeout=300):
                if event.WhichOneof("event") == "checkpoint" and event.checkpoint.step >= 8:
                    break
            first.processes["training"].kill()  # SIGKILL: no chance to clean up
            first.processes["training"].wait()
        with (
            LocalStack(env=env, services=("training",), log_dir=tmp_path / "logs") as second,
            TrainingClient(second.address("training")) as training,
        ):
            events, reattached, node_killed = [], False, False
            for event in training.stream_events(job.id, timeout=600):
                events.append(event)
                kind = event.WhichOneof("event")
                reattached = reattached or (kind == "log" and "reattached to its Ray job" in event.log)
                if reattached and not node_killed:  # the driver trains on
                    os.killpg(cluster.nodes["worker"].pid, signal.SIGKILL)  # the node and its Ray worker
                    cluster.nodes["worker"].wait()
                    node_killed = True
                if kind == "log" and "no longer has the room" in event.log:
                    cluster.nodes["worker"] = cluster.add_worker()  # a node takes its place
            job = training.get_job(job.id)
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
    logs = [e.log for e in events if e.WhichOneof("event") == "log"]
    assert any("starting Ray Train (from the start): 2 worker(s)" in line for line in logs), logs
    # The job ran as one Ray Job, to which the restarted orchestrator reattached.
    submitted = next(line for line in logs if "submitted to the Ray cluster as Ray job" in line)
    submission = submitted.split("as Ray job ")[1].split()[0]
    assert submission == f"tunewire-{job.id}-1", submitted
    restart = max(i for i, e in enumerate(events) if e.WhichOneof("event") == "log" and "orchestrator running this job stopped" in e.log)
    after_restart = [e.log for e in events[restart:] if e.WhichOneof("event") == "log"]
    assert any(f"reattached to its Ray job {submission} (running)" in line for line in after_restart), logs
    # Its training went on through the restart, until the node was lost: no
    # step trained twice, and none missing from the job's events (one the killed
    # orchestrator read but had not recorded is relayed again).
    lost_at = next(i for i, e in enumerate(events) if e.WhichOneof("event") == "log" and "no longer has the room" in e.log)
    steps = [e.step.step for e in events[:lost_at] if e.WhichOneof("event") == "step"]
    assert steps == sorted(steps) and set(steps) == set(range(1, steps[-1] + 1)) and steps[-1] > 8, steps
    assert not any(e.WhichOneof("event") == "log" and "resuming from the checkpoint" in e.log for e in events[restart:lost_at]), logs
    assert job.latest_step.step == job.latest_step.total_steps == 144
    # The node lost: the job said so, waited, and went on from a checkpoint once a node took its place.
    lost = next(i for i, line in enumerate(logs) if "no longer has the room" in line)
    assert "needs 2 CPU (the cluster has 1 in all now)" in logs[lost]
    assert any("has the room for this job again" in line for line in logs[lost:]), logs
    assert any("resumed from the checkpoint of step" in line for line in logs[lost:]), logs
