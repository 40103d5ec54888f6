"""The SDK's channel: addresses from the environment, retries of calls that
did nothing (UNAVAILABLE) on the methods safe to send again."""

from __future__ import annotations

from google.protobuf import descriptor_pool

from tunewire.clients import sdk
from tunewire.services.common.settings import load_settings
from tunewire.services.dataset.server import DatasetDeps, create_server
from tunewire.v1 import dataset_pb2, inference_pb2, training_pb2  # noqa: F401 (registers the services)

from conftest import ServerThread


def test_every_retried_method_exists_and_none_that_changes_state_is_retried():
    pool = descriptor_pool.Default()
    for service, methods in sdk.RETRIED_METHODS.items():
        known = {m.name for m in pool.FindServiceByName(service).methods}
        assert set(methods) <= known, set(methods) - known
    retried = {m for methods in sdk.RETRIED_METHODS.values() for m in methods}
    assert not retried & {"UploadDataset", "CreateJob", "CancelJob", "DeleteDataset", "DeleteAdapter", "LoadAdapter", "PinDataset"}


def test_clients_take_their_address_from_the_environment(monkeypatch):
    monkeypatch.setenv("TUNEWIRE_TRAINING_ADDRESS", "training.internal:443")
    monkeypatch.delenv("TUNEWIRE_DATASET_ADDRESS", raising=False)
    with sdk.TrainingClient() as training, sdk.DatasetClient() as datasets, sdk.TrainingClient("here:1") as given:
        assert (training.address, datasets.address, given.address) == ("training.internal:443", sdk.DEFAULT_DATASET_ADDRESS, "here:1")


def test_a_read_answered_unavailable_is_sent_again_and_a_write_is_not():
    """A service that answers UNAVAILABLE twice (as one shutting down does)."""
    from concurrent import futures

    import grpc
    import pytest

    from tunewire.v1 import dataset_pb2_grpc

    calls = {"ListDatasets": 0, "DeleteDataset": 0}

    class Flaky(dataset_pb2_grpc.DatasetServiceServicer):
        def ListDatasets(self, request, context):
            calls["ListDatasets"] += 1
            if calls["ListDatasets"] <= 2:
                context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down: retry on another replica")
            return dataset_pb2.ListDatasetsResponse()

        def DeleteDataset(self, request, context):
            calls["DeleteDataset"] += 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "shutting down: retry on another replica")

    server = grpc.server(futures.ThreadPoolExecutor(2))
    dataset_pb2_grpc.add_DatasetServiceServicer_to_server(Flaky(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with sdk.DatasetClient(f"127.0.0.1:{port}", timeout=30) as client:
            assert client.list() == [] and calls["ListDatasets"] == 3
            with pytest.raises(sdk.UnavailableError):
                client.delete("ds-1")
            assert calls["DeleteDataset"] == 1
    finally:
        server.stop(0)


def test_errors_are_raised_as_the_class_of_their_status_code(tmp_path):
    import pytest

    settings = load_settings(home=tmp_path / "home")

    async def make():
        return await create_server(settings, DatasetDeps.from_settings(settings), port=0)

    with ServerThread(make) as server, sdk.DatasetClient(server.address) as client:
        with pytest.raises(sdk.NotFoundError) as caught:
            client.get("ds-" + "0" * 24)
        assert isinstance(caught.value, sdk.ApiError) and caught.value.code.name == "NOT_FOUND"
        with pytest.raises(sdk.InvalidArgumentError) as caught:
            client.upload(b'{"prompt": "a"}\n', name="bad")
        assert caught.value.violations and caught.value.violations[0].field.startswith("row 1")


def test_a_stream_quiet_for_many_keepalive_pings_stays_open():
    """The SDK's keepalive pings a stream that has nothing to send; the
    server allows pings that often (scaled down here: a ping each second, a
    server that allows one each 0.2 s, 8 s of silence). With gRPC's default
    allowance (5 minutes) the fourth ping of the silence would end the
    stream UNAVAILABLE "too many pings"."""
    import asyncio

    import grpc

    from tunewire.services.common.grpc_server import create_grpc_server

    async def quiet_then_answer(request, context):
        await asyncio.sleep(8)
        yield b"done"

    def register(server):
        handler = grpc.unary_stream_rpc_method_handler(quiet_then_answer)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Quiet", {"Wait": handler}),))

    async def make():
        return await create_grpc_server("127.0.0.1:0", register, ["test.Quiet"], min_ping_interval_ms=200)

    options = [(k, v) for k, v in sdk.CHANNEL_OPTIONS if k != "grpc.keepalive_time_ms"] + [("grpc.keepalive_time_ms", 1000)]
    with ServerThread(make) as server, grpc.insecure_channel(server.address, options=options) as channel:
        assert list(channel.unary_stream("/test.Quiet/Wait")(b"", timeout=30)) == [b"done"]
