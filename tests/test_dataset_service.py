"""DatasetService over a real gRPC server on port 0, through the SDK."""

import json

import grpc
import pyarrow.parquet as pq
import pytest

from tunewire.clients.sdk import ApiError, DatasetClient
from tunewire.services.common.settings import load_settings
from tunewire.services.dataset.server import DatasetDeps, create_server
from tunewire.v1 import dataset_pb2

from conftest import ServerThread, prompt_completion_jsonl


@pytest.fixture
def service(tmp_path):
    settings = load_settings(home=tmp_path / "home", max_upload_bytes=200_000)

    async def make():
        return await create_server(settings, DatasetDeps.from_settings(settings), port=0)

    with ServerThread(make) as server, DatasetClient(server.address, timeout=30) as client:
        yield client, settings


def test_upload_stores_parquet_with_splits(service):
    client, settings = service
    response = client.upload(prompt_completion_jsonl(50), name="sums", validation_fraction=0.2)
    d = response.dataset
    assert d.id.startswith("ds-") and not response.already_existed
    assert d.format == dataset_pb2.DATASET_FORMAT_PROMPT_COMPLETION
    assert d.row_count == 50 and sum(d.split_row_counts.values()) == 50
    assert 0 < d.split_row_counts["validation"] < 50
    table = pq.read_table(d.uri)
    assert table.num_rows == 50
    assert set(table.column_names) == {"prompt", "completion", "split"}
    assert client.get(d.id) == d
    assert [x.id for x in client.list("sums")] == [d.id]


def test_same_content_gets_the_same_version(service):
    client, _ = service
    first = client.upload(prompt_completion_jsonl(30), name="a")
    # The same rows sent in other chunks: the same version.
    again = client.upload(iter([prompt_completion_jsonl(30)[:7], prompt_completion_jsonl(30)[7:]]), name="a")
    assert again.dataset.id == first.dataset.id and again.already_existed
    other = client.upload(prompt_completion_jsonl(31), name="a")
    assert other.dataset.id != first.dataset.id


def test_chat_upload(service):
    client, _ = service
    row = {
        "messages": [
            {"role": "system", "content": "be a pirate"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "arr"},
        ]
    }
    d = client.upload((json.dumps(row) + "\n").encode() * 3, name="chat").dataset
    assert d.format == dataset_pb2.DATASET_FORMAT_CHAT
    assert pq.read_table(d.uri).column("messages").to_pylist()[0][2] == {"role": "assistant", "content": "arr"}


def test_bad_file_is_rejected_whole_naming_lines(service):
    client, settings = service
    data = prompt_completion_jsonl(5) + b'{"prompt": "x"}\nnot json\n' + prompt_completion_jsonl(2)
    with pytest.raises(ApiError) as caught:
        client.upload(data, name="bad")
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "line 6: completion: missing required field" in error.message
    assert [(v.field, v.description.split(":")[0]) for v in error.violations] == [
        ("line 6.completion", "missing required field"),
        ("line 7", "invalid JSON"),
    ]
    assert client.list() == []
    datasets_dir = settings.home / "artifacts" / "datasets"
    assert not datasets_dir.exists() or not any(datasets_dir.iterdir())


def test_empty_file_is_invalid(service):
    client, _ = service
    with pytest.raises(ApiError) as caught:
        client.upload(b"\n\n", name="empty")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "empty" in caught.value.message


def test_upload_over_the_size_limit_is_resource_exhausted(service):
    client, _ = service
    with pytest.raises(ApiError) as caught:
        client.upload(prompt_completion_jsonl(5000), name="big")
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.list() == []


def test_bad_name_and_unknown_id(service):
    client, _ = service
    with pytest.raises(ApiError) as caught:
        client.upload(prompt_completion_jsonl(3), name="../etc")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.violations[0].field == "metadata.name"
    with pytest.raises(ApiError) as caught:
        client.get("ds-missing")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_health_and_reflection(service):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    client, _ = service
    health = health_pb2_grpc.HealthStub(client.channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest(service="tunewire.v1.DatasetService")).status == health_pb2.HealthCheckResponse.SERVING
    )
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert "tunewire.v1.DatasetService" in names
