"""Properties of uploads: any bytes give a dataset or a clear INVALID_ARGUMENT
(never a crash, never a partial dataset), and memory stays bounded however
large the file."""

import json
import os
import random

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunewire.clients.local_stack import LocalStack
from tunewire.clients.sdk import ApiError, DatasetClient
from tunewire.services.common.settings import load_settings
from tunewire.services.dataset.server import DatasetDeps, create_server

from conftest import ServerThread, free_port


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    config = load_settings(home=home)

    async def make():
        return await create_server(config, DatasetDeps.from_settings(config), port=0)

    with ServerThread(make) as server, DatasetClient(server.address, timeout=60) as client:
        yield client, home


values = st.one_of(st.text(max_size=20), st.integers(), st.none(), st.booleans(), st.lists(st.text(max_size=5), max_size=2))
rows = st.dictionaries(
    st.sampled_from(["prompt", "completion", "messages", "text", "label", "document", "summary", "split", "x"]), values, max_size=4
)
jsonl_files = st.lists(rows, max_size=8).map(lambda rs: "".join(json.dumps(r) + "\n" for r in rs).encode())
any_bytes = st.one_of(
    st.binary(max_size=300),
    jsonl_files,
    st.binary(max_size=40).map(lambda b: b"\x1f\x8b" + b),
    st.binary(max_size=40).map(lambda b: b"PAR1" + b),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=any_bytes, file_name=st.sampled_from(["", "x.jsonl", "x.csv", "x.parquet", "x.csv.gz"]))
def test_any_bytes_give_a_dataset_or_invalid_argument(service, data, file_name):
    client, home = service
    before = {d.id for d in client.list()}
    try:
        response = client.upload(data, name="fuzz", file_name=file_name)
    except ApiError as error:
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
        assert error.message
        assert {d.id for d in client.list()} == before
        staging = home / "artifacts" / ".staging"
        assert not staging.exists() or not any(staging.iterdir())
        return
    d = response.dataset
    assert d.row_count >= 1 and sum(d.split_row_counts.values()) == d.row_count
    assert (home / "artifacts" / "datasets" / d.id / "data.parquet").exists()


def _peak_rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _generated_jsonl(megabytes: int, seed: int):
    """A JSONL file produced chunk by chunk: never whole in this process either."""
    rng = random.Random(seed)
    target, sent = megabytes << 20, 0
    while sent < target:
        chunk = "".join(
            json.dumps(
                {"prompt": f"question {rng.random()} " + "words " * rng.randint(5, 60), "completion": "answer " * rng.randint(1, 20)}
            )
            + "\n"
            for _ in range(500)
        ).encode()
        sent += len(chunk)
        yield chunk


def test_upload_memory_does_not_grow_with_the_file(tmp_path):
    env = {"TUNEWIRE_HOME": str(tmp_path), "TUNEWIRE_DATASET_PORT": str(free_port()), "TUNEWIRE_MAX_UPLOAD_BYTES": str(1 << 30)}
    with LocalStack(env=env, services=("dataset",), log_dir=tmp_path / "logs") as stack:
        pid = stack.processes["dataset"].pid
        with DatasetClient(stack.address("dataset"), timeout=600) as client:
            client.upload(_generated_jsonl(4, seed=1), name="small")
            after_small = _peak_rss_mb(pid)
            big = client.upload(_generated_jsonl(48, seed=2), name="big").dataset
            after_big = _peak_rss_mb(pid)
    assert big.size_bytes > 0 and big.row_count > 20_000
    # 12x the data: the peak may grow by a small part of the extra 44 MB, not by the file.
    assert after_big - after_small < 30, (after_small, after_big)
    assert os.path.exists(tmp_path / "artifacts" / "datasets" / big.id / "data.parquet")
