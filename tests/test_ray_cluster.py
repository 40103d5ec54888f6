"""The training service's connection to a Ray cluster started apart from it,
as an operator runs one (`ray start --head`, Ray's token authentication on):
it connects with the cluster's token, taken where Ray's own clients take it,
and fails naming the cause without it, or where no cluster answers."""

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tunewire.services.training.ray_runner import RayConnectionError, check_reachable

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connect(address: str, env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CONNECT, address, str(tmp_path / "artifacts")], env=env, capture_output=True, text=True, timeout=180
    )


def _without_ray_auth(home: Path) -> dict:
    """The environment with none of Ray's token settings (and a home without ~/.ray/auth_token)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return env | {"HOME": str(home)}


def test_an_address_where_nothing_answers_is_named_at_once():
    address = f"127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(RayConnectionError, match=f"no Ray cluster answers at RAY_ADDRESS={address}"):
        check_reachable(address)
    assert time.monotonic() - started < 10


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    """A one-node Ray cluster with token authentication, stopped at the end."""
    token = secrets.token_hex(16)
    port = _free_port()
    home = tmp_path_factory.mktemp("home")
    # Ray's socket paths must stay short: its session directory goes under /tmp.
    temp = tempfile.mkdtemp(prefix="tw-ray-")
    env = _without_ray_auth(home) | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    ray = Path(sys.executable).with_name("ray")
    head = subprocess.Popen(
        [str(ray), "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false", f"--temp-dir={temp}", "--block"],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            check_reachable(address, timeout=1)
            break
        except RayConnectionError:
            assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(1)
    try:
        yield address, token, home
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # the head and every Ray process it started
        head.wait()


def test_the_service_connects_with_the_clusters_token_from_the_environment(token_cluster, tmp_path):
    address, token, home = token_cluster
    done = _connect(address, _without_ray_auth(home) | {"RAY_AUTH_TOKEN": token}, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "connected, CPUs: 1.0" in done.stdout


def test_the_service_connects_with_the_token_in_a_mounted_file(token_cluster, tmp_path):
    address, token, home = token_cluster
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "token").write_text(token)
    done = _connect(address, _without_ray_auth(home) | {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "secret" / "token")}, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "connected, CPUs: 1.0" in done.stdout


def test_without_the_token_the_service_says_the_cluster_wants_one(token_cluster, tmp_path):
    address, _, home = token_cluster
    started = time.monotonic()
    done = _connect(address, _without_ray_auth(home), tmp_path)
    assert done.returncode != 0
    assert f"the Ray cluster at RAY_ADDRESS={address} answers but refused this service" in done.stderr
    assert "requires Ray's token authentication (Ray 2.60's default) and no token was given: set RAY_AUTH_TOKEN" in done.stderr
    assert time.monotonic() - started < 120
