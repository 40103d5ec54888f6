"""DatasetService over gRPC: proto in, DatasetManager call, proto out."""

from __future__ import annotations

from collections.abc import AsyncIterator

from tunewire.services.common.convert import to_timestamp
from tunewire.services.common.errors import InvalidArgument
from tunewire.services.dataset import validation
from tunewire.services.dataset.core import DatasetManager, UploadRequest
from tunewire.services.dataset.store import DatasetInfo
from tunewire.v1 import dataset_pb2, dataset_pb2_grpc

FORMAT_TO_PROTO = {
    validation.PROMPT_COMPLETION: dataset_pb2.DATASET_FORMAT_PROMPT_COMPLETION,
    validation.CHAT: dataset_pb2.DATASET_FORMAT_CHAT,
}
FORMAT_FROM_PROTO = {v: k for k, v in FORMAT_TO_PROTO.items()}


def dataset_to_proto(info: DatasetInfo) -> dataset_pb2.Dataset:
    return dataset_pb2.Dataset(
        id=info.id,
        name=info.name,
        format=FORMAT_TO_PROTO[info.format],
        row_count=info.row_count,
        split_row_counts=info.split_row_counts,
        uri=info.uri,
        size_bytes=info.size_bytes,
        create_time=to_timestamp(info.created_at),
    )


class DatasetServicer(dataset_pb2_grpc.DatasetServiceServicer):
    def __init__(self, manager: DatasetManager):
        self.manager = manager

    async def UploadDataset(self, request_iterator: AsyncIterator[dataset_pb2.UploadDatasetRequest], context):
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("metadata"):
            raise InvalidArgument.field("metadata", "the first message of an upload must carry the metadata")
        meta = first.metadata
        request = UploadRequest(
            name=meta.name,
            format=FORMAT_FROM_PROTO.get(meta.format),
            validation_fraction=meta.validation_fraction if meta.HasField("validation_fraction") else None,
            split_seed=meta.split_seed,
        )

        async def chunks() -> AsyncIterator[bytes]:
            async for message in request_iterator:
                if message.HasField("metadata"):
                    raise InvalidArgument.field("metadata", "sent twice: only the first message carries metadata")
                yield message.chunk

        result = await self.manager.upload(request, chunks())
        return dataset_pb2.UploadDatasetResponse(dataset=dataset_to_proto(result.dataset), already_existed=result.already_existed)

    async def GetDataset(self, request: dataset_pb2.GetDatasetRequest, context):
        return dataset_pb2.GetDatasetResponse(dataset=dataset_to_proto(self.manager.get(request.id)))

    async def ListDatasets(self, request: dataset_pb2.ListDatasetsRequest, context):
        return dataset_pb2.ListDatasetsResponse(datasets=[dataset_to_proto(d) for d in self.manager.list(request.name)])
