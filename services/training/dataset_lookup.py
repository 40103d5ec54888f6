"""The orchestrator's view of the dataset service: a gRPC client that turns
its answers and errors into domain terms."""

from __future__ import annotations

import grpc

from tunewire.services.common.errors import InvalidArgument, NotFound, Unavailable
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
    def __init__(self, address: str, timeout: float = 10.0):
        self.address = address
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = dataset_pb2_grpc.DatasetServiceStub(self._channel)

    async def acquire(self, dataset_id: str, holder: str) -> DatasetRef:
        try:
            # Pinned first: from here on the dataset cannot be deleted under the job.
            await self._stub.PinDataset(dataset_pb2.PinDatasetRequest(dataset_id=dataset_id, holder=holder), timeout=self.timeout)
            response = await self._stub.GetDataset(dataset_pb2.GetDatasetRequest(id=dataset_id), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"spec.dataset_id: {exc.details()}") from None
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument.field("spec.dataset_id", exc.details() or "invalid") from None
            raise Unavailable(f"dataset service at {self.address}: {exc.code().name}: {exc.details()}; retry when it is up") from None
        d = response.dataset
        return DatasetRef(
            id=d.id,
            format=FORMATS[d.format],
            uri=d.uri,
            train_rows=d.split_row_counts.get("train", 0),
            validation_rows=d.split_row_counts.get("validation", 0),
        )

    async def close(self) -> None:
        await self._channel.close()
