"""DatasetService over gRPC: proto in, DatasetManager call, proto out."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from tunewire.services.common.auth import caller
from tunewire.services.common.convert import to_timestamp
from tunewire.services.common.errors import InvalidArgument
from tunewire.services.dataset import readers, validation
from tunewire.services.dataset.core import DatasetManager, UploadRequest, UploadResult
from tunewire.services.dataset.report import QualityReport
from tunewire.services.dataset.splits import SplitSpec
from tunewire.services.dataset.store import DatasetInfo
from tunewire.v1 import dataset_pb2, dataset_pb2_grpc

FORMAT_TO_PROTO = {
    validation.PROMPT_COMPLETION: dataset_pb2.DATASET_FORMAT_PROMPT_COMPLETION,
    validation.CHAT: dataset_pb2.DATASET_FORMAT_CHAT,
    validation.CLASSIFICATION: dataset_pb2.DATASET_FORMAT_CLASSIFICATION,
    validation.SUMMARIZATION: dataset_pb2.DATASET_FORMAT_SUMMARIZATION,
    validation.TEXT: dataset_pb2.DATASET_FORMAT_TEXT,
}
FORMAT_FROM_PROTO = {v: k for k, v in FORMAT_TO_PROTO.items()}
FILE_FORMAT_FROM_PROTO = {
    dataset_pb2.FILE_FORMAT_JSONL: readers.JSONL,
    dataset_pb2.FILE_FORMAT_CSV: readers.CSV,
    dataset_pb2.FILE_FORMAT_PARQUET: readers.PARQUET,
}


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
        labels=info.labels,
        project=info.project,
    )


def report_to_proto(report: QualityReport) -> dataset_pb2.QualityReport:
    return dataset_pb2.QualityReport(
        row_count=report.row_count,
        split_row_counts=report.split_row_counts,
        dropped_rows=report.dropped_rows,
        dropped_examples=[dataset_pb2.RowProblem(**e) for e in report.dropped_examples],
        exact_duplicate_rows=report.exact_duplicate_rows,
        near_duplicate_rows=report.near_duplicate_rows,
        rows_leaked_from_train=report.rows_leaked_from_train,
        label_counts=report.label_counts,
        imbalance_ratio=report.imbalance_ratio,
        fields=[
            dataset_pb2.FieldReport(
                field=f["field"],
                chars=dataset_pb2.LengthStats(**f["chars"]) if f["chars"] else None,
                tokens=dataset_pb2.LengthStats(**f["tokens"]) if f["tokens"] else None,
                empty_rows=f["empty_rows"],
            )
            for f in report.fields
        ],
        token_model=report.token_model,
        token_context=report.token_context,
        rows_over_context=report.rows_over_context,
        warnings=report.warnings,
    )


def request_from_metadata(meta: dataset_pb2.UploadMetadata) -> UploadRequest:
    split = meta.split

    def optional(name):
        return getattr(split, name) if split.HasField(name) else None

    if meta.format not in FORMAT_FROM_PROTO and meta.format != dataset_pb2.DATASET_FORMAT_UNSPECIFIED:
        raise InvalidArgument.field("metadata.format", f"unknown format {meta.format}")
    return UploadRequest(
        name=meta.name,
        format=FORMAT_FROM_PROTO.get(meta.format),
        file_format=FILE_FORMAT_FROM_PROTO.get(meta.file_format),
        file_name=meta.file_name,
        column_mapping=dict(meta.column_mapping),
        labels=tuple(meta.labels),
        split=SplitSpec(
            validation_fraction=optional("validation_fraction"),
            test_fraction=optional("test_fraction"),
            validation_count=optional("validation_count"),
            test_count=optional("test_count"),
            seed=split.seed,
            stratify=not split.no_stratify,
        ),
        drop_invalid_rows=meta.drop_invalid_rows,
        token_stats_model=meta.token_stats_model,
    )


def _rows_to_proto(rows: list[tuple[int, dict]]) -> list[dataset_pb2.DatasetRow]:
    out = []
    for index, row in rows:
        fields = {k: v for k, v in row.items() if k != "split"}
        out.append(dataset_pb2.DatasetRow(index=index, split=row["split"], json=json.dumps(fields, ensure_ascii=False)))
    return out


def _result(kind, result: UploadResult):
    return kind(dataset=dataset_to_proto(result.dataset), already_existed=result.already_existed, report=report_to_proto(result.report))


class DatasetServicer(dataset_pb2_grpc.DatasetServiceServicer):
    def __init__(self, manager: DatasetManager):
        self.manager = manager

    async def UploadDataset(self, request_iterator: AsyncIterator[dataset_pb2.UploadDatasetRequest], context):
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("metadata"):
            raise InvalidArgument.field("metadata", "the first message of an upload must carry the metadata")
        request = request_from_metadata(first.metadata)

        async def chunks() -> AsyncIterator[bytes]:
            async for message in request_iterator:
                if message.HasField("metadata"):
                    raise InvalidArgument.field("metadata", "sent twice: only the first message carries metadata")
                yield message.chunk

        return _result(dataset_pb2.UploadDatasetResponse, await self.manager.upload(caller().project, request, chunks()))

    async def ImportDataset(self, request: dataset_pb2.ImportDatasetRequest, context):
        result = await self.manager.import_from(caller().project, request_from_metadata(request.metadata), request.source_uri)
        return _result(dataset_pb2.ImportDatasetResponse, result)

    async def GetDataset(self, request: dataset_pb2.GetDatasetRequest, context):
        return dataset_pb2.GetDatasetResponse(
            dataset=dataset_to_proto(await asyncio.to_thread(self.manager.get, caller().project, request.id))
        )

    async def ListDatasets(self, request: dataset_pb2.ListDatasetsRequest, context):
        datasets = await asyncio.to_thread(self.manager.list, caller().project, request.name)
        return dataset_pb2.ListDatasetsResponse(datasets=[dataset_to_proto(d) for d in datasets])

    async def DeleteDataset(self, request: dataset_pb2.DeleteDatasetRequest, context):
        await asyncio.to_thread(self.manager.delete, caller().project, request.id)
        return dataset_pb2.DeleteDatasetResponse()

    async def GetDatasetReport(self, request: dataset_pb2.GetDatasetReportRequest, context):
        report = await asyncio.to_thread(self.manager.report, caller().project, request.id)
        return dataset_pb2.GetDatasetReportResponse(report=report_to_proto(report))

    async def ListRows(self, request: dataset_pb2.ListRowsRequest, context):
        rows, token = await asyncio.to_thread(
            self.manager.list_rows, caller().project, request.dataset_id, request.split, request.page_size, request.page_token
        )
        return dataset_pb2.ListRowsResponse(rows=_rows_to_proto(rows), next_page_token=token)

    async def StreamRows(self, request: dataset_pb2.StreamRowsRequest, context):
        batches = await asyncio.to_thread(self.manager.stream_rows, caller().project, request.dataset_id, request.split)
        done = object()
        # Each batch is read off the event loop (a Parquet read, maybe from S3).
        while (batch := await asyncio.to_thread(next, batches, done)) is not done:
            yield dataset_pb2.StreamRowsResponse(rows=_rows_to_proto(batch))

    # Pins are the orchestrator's (it calls with the services' key, an operator's):
    # a member could otherwise drop a running job's pin and delete its data.
    async def PinDataset(self, request: dataset_pb2.PinDatasetRequest, context):
        who = caller()
        who.require_operator("PinDataset")
        await asyncio.to_thread(self.manager.pin, who.project, request.dataset_id, request.holder)
        return dataset_pb2.PinDatasetResponse()

    async def UnpinDataset(self, request: dataset_pb2.UnpinDatasetRequest, context):
        who = caller()
        who.require_operator("UnpinDataset")
        await asyncio.to_thread(self.manager.unpin, who.project, request.dataset_id, request.holder)
        return dataset_pb2.UnpinDatasetResponse()
