"""The SDK for asyncio callers: the sync clients' calls, awaited on grpc.aio
channels, with the same addresses (TUNEWIRE_*_ADDRESS), credentials,
retries, keepalive and typed errors (sdk.ApiError and its subclasses).

    async with AsyncTrainingClient() as training, AsyncInferenceClient() as inference:
        job = await training.create_job("smollm2-135m-instruct", dataset_id)
        async for event in training.stream_events(job.id):
            ...
        async for part in inference.generate_stream("Hello", adapter=job.adapter_id):
            print(part.text_delta, end="")
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from tunewire.clients.sdk import (
    CHANNEL_OPTIONS,
    ApiError,
    InferenceClient,
    TrainingClient,
    call_metadata,
    channel_credentials,
    service_address,
)
from tunewire.v1 import (
    dataset_pb2,
    dataset_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)


class _AsyncClient:
    service = ""  # a key of sdk.ADDRESS_VARIABLES

    def __init__(
        self,
        address: str | None,
        timeout: float,
        api_key: str | None = None,
        project: str | None = None,
        tls_ca_file: str | Path | None = None,
        tls_client_cert_file: str | Path | None = None,
        tls_client_key_file: str | Path | None = None,
    ):
        self.address = service_address(self.service, address)
        self.timeout = timeout
        self.metadata = call_metadata(api_key, project)
        credentials = channel_credentials(tls_ca_file, tls_client_cert_file, tls_client_key_file)
        if credentials is not None:
            self.channel = grpc.aio.secure_channel(self.address, credentials, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)

    async def _call(self, method, request, timeout: float | None = None):
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as error:
            raise ApiError.from_rpc(error) from None

    async def _stream(self, method, request, timeout: float | None = None) -> AsyncIterator:
        call = method(request, timeout=timeout, metadata=self.metadata)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as error:
            raise ApiError.from_rpc(error) from None
        finally:
            call.cancel()  # a caller that stops reading ends the stream on the server too

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class AsyncDatasetClient(_AsyncClient):
    service = "dataset"

    def __init__(self, address: str | None = None, timeout: float = 300.0, **credentials):
        super().__init__(address, timeout, **credentials)
        self.stub = dataset_pb2_grpc.DatasetServiceStub(self.channel)

    async def get(self, dataset_id: str) -> dataset_pb2.Dataset:
        return (await self._call(self.stub.GetDataset, dataset_pb2.GetDatasetRequest(id=dataset_id))).dataset

    async def list(self, name: str = "") -> list[dataset_pb2.Dataset]:
        return list((await self._call(self.stub.ListDatasets, dataset_pb2.ListDatasetsRequest(name=name))).datasets)


class AsyncTrainingClient(_AsyncClient):
    service = "training"

    def __init__(self, address: str | None = None, timeout: float = 30.0, **credentials):
        super().__init__(address, timeout, **credentials)
        self.stub = training_pb2_grpc.TrainingServiceStub(self.channel)

    async def create_job(
        self,
        base_model: str,
        dataset_id: str,
        hyperparameters: dict | None = None,
        num_workers: int = 1,
        use_gpu: bool = False,
        method: int = training_pb2.TRAINING_METHOD_LORA,
        idempotency_key: str = "",
        search: dict | None = None,
    ) -> training_pb2.Job:
        """As TrainingClient.create_job."""
        spec = TrainingClient.spec(base_model, dataset_id, hyperparameters, num_workers, use_gpu, method, search)
        request = training_pb2.CreateJobRequest(spec=spec, idempotency_key=idempotency_key)
        return (await self._call(self.stub.CreateJob, request)).job

    async def get_job(self, job_id: str) -> training_pb2.Job:
        return (await self._call(self.stub.GetJob, training_pb2.GetJobRequest(id=job_id))).job

    async def cancel_job(self, job_id: str) -> training_pb2.Job:
        return (await self._call(self.stub.CancelJob, training_pb2.CancelJobRequest(id=job_id))).job

    def stream_events(
        self, job_id: str, after_sequence: int = 0, timeout: float | None = None
    ) -> AsyncIterator[training_pb2.StreamJobEventsResponse]:
        """The job's events, history first, until it ends (no deadline unless given)."""
        return self._stream(
            self.stub.StreamJobEvents, training_pb2.StreamJobEventsRequest(job_id=job_id, after_sequence=after_sequence), timeout
        )

    async def wait(self, job_id: str, timeout: float | None = None) -> training_pb2.Job:
        """Follows the job's events until it ends; returns the job."""
        async for _ in self.stream_events(job_id, timeout=timeout):
            pass
        return await self.get_job(job_id)

    async def list_adapters(self) -> list[training_pb2.Adapter]:
        return list((await self._call(self.stub.ListAdapters, training_pb2.ListAdaptersRequest())).adapters)


class AsyncInferenceClient(_AsyncClient):
    service = "inference"

    def __init__(self, address: str | None = None, timeout: float = 120.0, **credentials):
        super().__init__(address, timeout, **credentials)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        adapter: str = "",
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: list[str] | None = None,
        raw_prompt: bool = False,
        timeout: float | None = None,
    ) -> inference_pb2.GenerateResponse:
        request = InferenceClient._request(
            inference_pb2.GenerateRequest, prompt, messages, adapter, max_new_tokens, temperature, top_p, top_k, seed, stop, raw_prompt
        )
        return await self._call(self.stub.Generate, request, timeout)

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict] | None = None,
        adapter: str = "",
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: list[str] | None = None,
        raw_prompt: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        request = InferenceClient._request(
            inference_pb2.GenerateStreamRequest,
            prompt,
            messages,
            adapter,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop,
            raw_prompt,
        )
        return self._stream(self.stub.GenerateStream, request, timeout or self.timeout)

    async def classify(self, text: str, *, adapter: str, timeout: float | None = None) -> inference_pb2.ClassifyResponse:
        return await self._call(self.stub.Classify, inference_pb2.ClassifyRequest(adapter=adapter, text=text), timeout)

    async def loaded_adapters(self) -> inference_pb2.ListLoadedAdaptersResponse:
        return await self._call(self.stub.ListLoadedAdapters, inference_pb2.ListLoadedAdaptersRequest())

    async def wait_for_adapter(self, adapter_id: str, timeout: float = 120.0) -> inference_pb2.LoadedAdapter:
        """Waits until the service serves `adapter_id` (hot-loaded after its job)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            for adapter in (await self.loaded_adapters()).adapters:
                if adapter.id == adapter_id:
                    return adapter
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"adapter {adapter_id} not served after {timeout:.0f}s")
            await asyncio.sleep(0.2)
