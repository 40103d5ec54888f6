"""The artifact store on an S3 API (moto's server on loopback, spoken to over
HTTP by s3fs as any S3-compatible store would be): publishing, reading back,
interrupted uploads leaving nothing visible, and the services on it."""

from __future__ import annotations

import json

import pytest

from tunewire.clients.sdk import DatasetClient, InferenceClient
from tunewire.services.common import layout
from tunewire.services.common.artifacts import COMPLETE_MARKER, ArtifactStore

from conftest import free_port, prompt_completion_jsonl, three_services, write_lora_adapter

BUCKET = "tunewire-test"


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_root(s3_endpoint, monkeypatch, request):
    """A fresh prefix in the bucket; credentials and endpoint as an operator sets them."""
    import boto3

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    return f"s3://{BUCKET}/{request.node.name.replace('[', '-').replace(']', '')}"


def objects(store: ArtifactStore, *parts: str) -> set[str]:
    path = store.path(*parts)
    store.fs.invalidate_cache()
    return {p.removeprefix(path + "/") for p in store.fs.find(path)}


def test_publish_and_read_back(s3_root, tmp_path):
    store = ArtifactStore(s3_root)
    artifact = tmp_path / "adapter"
    artifact.mkdir()
    (artifact / "adapter_config.json").write_text("{}")
    (artifact / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    uri = store.publish_dir(artifact, "adapters", "ad-1")
    assert uri == f"{s3_root}/adapters/ad-1" and store.exists("adapters", "ad-1")
    assert objects(store, "adapters", "ad-1") == {"adapter_config.json", "adapter_model.safetensors", COMPLETE_MARKER}
    assert objects(store, ".staging") == set()  # nothing left behind
    local = store.local_copy(uri, tmp_path / "cache")
    assert (local / "adapter_model.safetensors").read_bytes() == b"\0" * 1000
    store.delete("adapters", "ad-1")
    assert not store.exists("adapters", "ad-1") and objects(store, "adapters") == set()


def test_an_interrupted_upload_leaves_nothing_visible(s3_root, tmp_path, monkeypatch):
    store = ArtifactStore(s3_root)
    artifact = tmp_path / "dataset"
    artifact.mkdir()
    for i in range(3):
        (artifact / f"part-{i}").write_bytes(bytes([i]) * 100)

    # The connection drops after the first object of the upload (s3fs's
    # uploads go through its async _put_file).
    real_put_file = store.fs._put_file
    sent = []

    async def flaky_put_file(local, remote, *args, **kwargs):
        if sent:
            raise ConnectionError("connection reset")
        sent.append(remote)
        return await real_put_file(local, remote, *args, **kwargs)

    monkeypatch.setattr(store.fs, "_put_file", flaky_put_file)
    with pytest.raises(ConnectionError):
        store.publish_dir(artifact, "datasets", "ds-1")
    assert sent and not store.exists("datasets", "ds-1") and objects(store, "datasets") == set()
    assert objects(store, ".staging") == set()  # the part that went up was removed

    # A move cut short: the objects arrived, the marker did not. Not present;
    # the next publish replaces it whole.
    monkeypatch.setattr(store.fs, "_put_file", real_put_file)
    store.fs.pipe_file(store.path("datasets", "ds-1", "part-0"), b"stale")
    assert not store.exists("datasets", "ds-1")
    store.publish_dir(artifact, "datasets", "ds-1")
    assert store.exists("datasets", "ds-1")
    assert store.fs.cat_file(store.path("datasets", "ds-1", "part-0")) == bytes([0]) * 100


def test_services_on_an_s3_artifact_store(s3_root, tmp_path, tiny_model_dir):
    (tmp_path / "own").mkdir()
    with three_services(tmp_path, tiny_model_dir, artifact_root=s3_root) as servers:
        with DatasetClient(servers["dataset"].address) as datasets:
            dataset = datasets.upload(prompt_completion_jsonl(30), name="on-s3").dataset
            assert dataset.uri.startswith(s3_root + "/datasets/")
            assert len(list(datasets.rows(dataset.id))) == 30
            datasets.delete(dataset.id)
        store = ArtifactStore(s3_root)
        assert not store.exists("datasets", dataset.id)
        # An adapter published in the S3 store (its metadata names its project) is loaded from there.
        adapter = write_lora_adapter(tiny_model_dir, tmp_path / "adapter", seed=3)
        (adapter / layout.ADAPTER_METADATA).write_text(json.dumps({"project": "default"}))
        published = store.publish_dir(adapter, "adapters", "ad-s3")
        with InferenceClient(servers["inference"].address) as inference:
            assert inference.load_adapter("ad-s3", published).rank == 4
            assert inference.generate("hello", adapter="ad-s3", max_new_tokens=3).completion_tokens > 0
