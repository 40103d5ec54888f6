"""The orchestrator's view of the dataset service: a gRPC client that turns
its answers and errors into domain terms."""

from __future__ import annotations

import functools

import grpc

from tunewire.services.common.channels import call_metadata, open_channel
from tunewire.services.common.errors import InvalidArgument, NotFound, Unavailable
from tunewire.services.common.settings import Settings
from tunewire.services.training.jobs import DatasetRef
from tunewire.v1 import dataset_pb2, dataset_pb2_grpc

FORMATS = {
    dataset_pb2.DATASET_FORMAT_PROMPT_COMPLETION: "prompt_completion",
    dataset_pb2.DATASET_FORMAT_CHAT: "chat",
    dataset_pb2.DATASET_FORMAT_CLASSIFICATION: "classification",
    dataset_pb2.DATASET_FORMAT_SUMMARIZATION: "summarization",
    dataset_pb2.DATASET_FORMAT_TEXT: "text",
}


class GrpcDatasetLookup:
    """Calls the dataset service with the service key, acting for the job's
    project: a project's job sees only the project's datasets."""

    def __init__(self, address: str, settings: Settings, timeout: float = 10.0):
        self.address = address
        self.settings = settings
        self.timeout = timeout
        # Opened at the first call, not here: the orchestrator starts Ray
        # before any gRPC channel or server of its own runs (server.py).
        self._channel = None

    @functools.cached_property
    def _stub(self) -> dataset_pb2_grpc.DatasetServiceStub:
        self._channel = open_channel(self.address, self.settings)
        return dataset_pb2_grpc.DatasetServiceStub(self._channel)

    async def get(self, project: str, dataset_id: str) -> DatasetRef:
        return await self._call(self._get, project, dataset_id)

    async def acquire(self, project: str, dataset_id: str, holder: str) -> DatasetRef:
        async def pin_then_get(project: str, dataset_id: str) -> DatasetRef:
            # Pinned first: from here on the dataset cannot be deleted under the job.
            await self._stub.PinDataset(
                dataset_pb2.PinDatasetRequest(dataset_id=dataset_id, holder=holder),
                timeout=self.timeout,
                metadata=call_metadata(self.settings, project),
            )
            return await self._get(project, dataset_id)

        return await self._call(pin_then_get, project, dataset_id)

    async def release(self, project: str, dataset_id: str, holder: str) -> None:
        try:
            await self._stub.UnpinDataset(
                dataset_pb2.UnpinDatasetRequest(dataset_id=dataset_id, holder=holder),
                timeout=self.timeout,
                metadata=call_metadata(self.settings, project),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # a dataset already gone holds no pin
                raise Unavailable(f"dataset service at {self.address}: {exc.code().name}: {exc.details()}; retry when it is up") from None

    async def _get(self, project: str, dataset_id: str) -> DatasetRef:
        request = dataset_pb2.GetDatasetRequest(id=dataset_id)
        d = (await self._stub.GetDataset(request, timeout=self.timeout, metadata=call_metadata(self.settings, project))).dataset
        splits = d.split_row_counts
        return DatasetRef(
            id=d.id,
            format=FORMATS[d.format],
            uri=d.uri,
            train_rows=splits.get("train", 0),
            validation_rows=splits.get("validation", 0),
            test_rows=splits.get("test", 0),
            labels=tuple(d.labels),
        )

    async def _call(self, fn, project: str, dataset_id: str) -> DatasetRef:
        try:
            return await fn(project, dataset_id)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"spec.dataset_id: {exc.details()}") from None
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument.field("spec.dataset_id", exc.details() or "invalid") from None
            raise Unavailable(f"dataset service at {self.address}: {exc.code().name}: {exc.details()}; retry when it is up") from None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
