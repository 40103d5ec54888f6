"""The tunewire Python SDK: one client per service, over gRPC, with deadlines.

    from tunewire.clients.sdk import DatasetClient, TrainingClient, InferenceClient

    with DatasetClient("127.0.0.1:50051") as datasets:
        dataset = datasets.upload("data.jsonl", name="support-answers")

Every call has a deadline (the client's `timeout`, or `timeout=` per call).
Errors are raised as ApiError, with the gRPC status code, the message and,
for INVALID_ARGUMENT, each field violation (field, reason).

Credentials: `api_key=` (default: the TUNEWIRE_API_KEY variable) goes with
every call; `tls_ca_file=` (TUNEWIRE_TLS_CA_FILE) switches to TLS, verifying
the server against that CA, and `tls_client_cert_file=`/`tls_client_key_file=`
present a client certificate (mutual TLS). An admin acts for another project
with `project=` (TUNEWIRE_PROJECT).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from tunewire.v1 import common_pb2, dataset_pb2, dataset_pb2_grpc, inference_pb2, inference_pb2_grpc, training_pb2, training_pb2_grpc

DEFAULT_DATASET_ADDRESS = "127.0.0.1:50051"
DEFAULT_TRAINING_ADDRESS = "127.0.0.1:50052"
DEFAULT_INFERENCE_ADDRESS = "127.0.0.1:50053"
CHUNK_BYTES = 1 << 20
# Where each client connects when no address is given: the environment
# first (as the CLI reads it), then the local defaults.
ADDRESS_VARIABLES = {
    "dataset": ("TUNEWIRE_DATASET_ADDRESS", DEFAULT_DATASET_ADDRESS),
    "training": ("TUNEWIRE_TRAINING_ADDRESS", DEFAULT_TRAINING_ADDRESS),
    "inference": ("TUNEWIRE_INFERENCE_ADDRESS", DEFAULT_INFERENCE_ADDRESS),
}

# Calls gRPC may send again when they end UNAVAILABLE (nothing was done:
# the service was unreachable or shutting down): reads, streams before their
# first message, and generation, whose request never ran. Uploads, job
# creation and deletions are not retried here: only their caller knows
# whether to send them again.
RETRIED_METHODS = {
    "tunewire.v1.DatasetService": ("GetDataset", "ListDatasets", "GetDatasetReport", "ListRows", "StreamRows"),
    "tunewire.v1.TrainingService": (
        "GetJob",
        "ListJobs",
        "ListCheckpoints",
        "EstimateJob",
        "StreamJobEvents",
        "ListAdapters",
        "DownloadAdapter",
        "WatchAdapters",
    ),
    "tunewire.v1.InferenceService": ("Generate", "GenerateStream", "Classify", "ListLoadedAdapters"),
}
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": service, "method": method} for service, methods in RETRIED_METHODS.items() for method in methods],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", SERVICE_CONFIG),
    # Hours-long streams (a job's events, generation) through proxies and
    # load balancers that drop idle connections: a ping each minute.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.max_pings_without_data", 0),  # a stream waiting for its next event sends no data
]
FINAL_JOB_STATES = (training_pb2.JOB_STATE_SUCCEEDED, training_pb2.JOB_STATE_FAILED, training_pb2.JOB_STATE_CANCELLED)


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class ApiError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, violations: list[FieldViolation]):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.violations = violations

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> ApiError:
        """The error as the ApiError subclass of its status code."""
        violations = []
        status = rpc_status.from_call(error)
        for detail in status.details if status else []:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
        kind = _ERRORS_BY_CODE.get(error.code(), ApiError)
        return kind(error.code(), error.details() or "", violations)


class NotFoundError(ApiError):
    """The id is not there (or is another project's)."""


class InvalidArgumentError(ApiError):
    """The request is wrong: `violations` name each field at fault and why."""


class FailedPreconditionError(ApiError):
    """The request is right but the thing is in the wrong state for it."""


class ResourceExhaustedError(ApiError):
    """A quota or a full queue: send it again later (`retry_after_seconds` is a sensible wait)."""

    retry_after_seconds = 5.0


class UnavailableError(ApiError):
    """The service could not be reached or is shutting down; the request did not run."""


class AuthError(ApiError):
    """No key, an unknown one, or one that may not do this."""


_ERRORS_BY_CODE = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.PERMISSION_DENIED: AuthError,
}


class _AddMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the credentials' metadata to every call of the channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self.metadata = metadata

    def _details(self, details):
        return details._replace(metadata=(*(details.metadata or ()), *self.metadata))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def _read(path) -> bytes | None:
    return Path(path).read_bytes() if path else None


def service_address(service: str, address: str | None) -> str:
    """The address given, else the service's variable, else the local default."""
    variable, default = ADDRESS_VARIABLES[service]
    return address or os.environ.get(variable) or default


def call_metadata(api_key: str | None, project: str | None) -> tuple[tuple[str, str], ...]:
    """The key (TUNEWIRE_API_KEY unless given) and the project to act for
    (TUNEWIRE_PROJECT unless given) every call sends."""
    api_key = os.environ.get("TUNEWIRE_API_KEY", "") if api_key is None else api_key
    project = os.environ.get("TUNEWIRE_PROJECT", "") if project is None else project
    return ((("authorization", f"Bearer {api_key}"),) if api_key else ()) + ((("x-tunewire-project", project),) if project else ())


def channel_credentials(tls_ca_file, tls_client_cert_file, tls_client_key_file) -> grpc.ChannelCredentials | None:
    """TLS (with a client certificate for mutual TLS) when a CA (or
    TUNEWIRE_TLS_CA_FILE) or a certificate is given; None: plaintext."""
    tls_ca_file = tls_ca_file or os.environ.get("TUNEWIRE_TLS_CA_FILE")
    if not (tls_ca_file or tls_client_cert_file):
        return None
    return grpc.ssl_channel_credentials(_read(tls_ca_file), _read(tls_client_key_file), _read(tls_client_cert_file))


class _Client:
    service = ""  # a key of ADDRESS_VARIABLES

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
        credentials = channel_credentials(tls_ca_file, tls_client_cert_file, tls_client_key_file)
        if credentials is not None:
            channel = grpc.secure_channel(self.address, credentials, options=CHANNEL_OPTIONS)
        else:
            channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        metadata = call_metadata(api_key, project)
        self.channel = grpc.intercept_channel(channel, _AddMetadata(metadata)) if metadata else channel

    def _call(self, method, request, timeout: float | None = None):
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as error:
            raise ApiError.from_rpc(error) from None

    def _stream(self, method, request, timeout: float | None = None) -> Iterator:
        try:
            yield from method(request, timeout=timeout)
        except grpc.RpcError as error:
            raise ApiError.from_rpc(error) from None

    def wait_until_serving(self, timeout: float = 120.0) -> None:
        """Blocks until the service's health check says SERVING."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.address} not SERVING after {timeout:.0f}s: is the service running?")
            time.sleep(0.5)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _chat(messages: list[dict] | None) -> inference_pb2.ChatMessages | None:
    if messages is None:
        return None
    return inference_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages])


class DatasetClient(_Client):
    service = "dataset"

    def __init__(self, address: str | None = None, timeout: float = 300.0, **credentials):
        super().__init__(address, timeout, **credentials)
        self.stub = dataset_pb2_grpc.DatasetServiceStub(self.channel)

    def upload(
        self,
        source: str | Path | bytes | Iterable[bytes],
        name: str,
        format: int = dataset_pb2.DATASET_FORMAT_UNSPECIFIED,
        *,
        file_name: str = "",
        file_format: int = dataset_pb2.FILE_FORMAT_UNSPECIFIED,
        column_mapping: dict[str, str] | None = None,
        labels: list[str] | None = None,
        split: dict | None = None,
        drop_invalid_rows: bool = False,
        token_stats_model: str = "",
        timeout: float | None = None,
    ) -> dataset_pb2.UploadDatasetResponse:
        """Uploads a file (a path, bytes, or an iterable of byte chunks) in chunks.

        split: SplitSpec fields, e.g. {"validation_fraction": 0.1, "test_count": 50, "seed": 1}.
        """
        if not file_name and isinstance(source, (str, Path)):
            file_name = Path(source).name
        metadata = self._metadata(name, format, file_name, file_format, column_mapping, labels, split, drop_invalid_rows, token_stats_model)

        def requests():
            yield dataset_pb2.UploadDatasetRequest(metadata=metadata)
            for chunk in _chunks(source):
                yield dataset_pb2.UploadDatasetRequest(chunk=chunk)

        return self._call(self.stub.UploadDataset, requests(), timeout)

    def import_dataset(
        self, source_uri: str, name: str, format: int = dataset_pb2.DATASET_FORMAT_UNSPECIFIED, timeout: float | None = None, **options
    ) -> dataset_pb2.ImportDatasetResponse:
        """Has the service read the file itself (a path or URL under its import
        roots); options are upload()'s keyword options."""
        request = dataset_pb2.ImportDatasetRequest(metadata=self._metadata(name, format, **options), source_uri=source_uri)
        return self._call(self.stub.ImportDataset, request, timeout)

    @staticmethod
    def _metadata(
        name: str,
        format: int,
        file_name: str = "",
        file_format: int = dataset_pb2.FILE_FORMAT_UNSPECIFIED,
        column_mapping: dict[str, str] | None = None,
        labels: list[str] | None = None,
        split: dict | None = None,
        drop_invalid_rows: bool = False,
        token_stats_model: str = "",
    ) -> dataset_pb2.UploadMetadata:
        return dataset_pb2.UploadMetadata(
            name=name,
            format=format,
            file_name=file_name,
            file_format=file_format,
            column_mapping=column_mapping or {},
            labels=labels or [],
            split=dataset_pb2.SplitSpec(**(split or {})),
            drop_invalid_rows=drop_invalid_rows,
            token_stats_model=token_stats_model,
        )

    def get(self, dataset_id: str) -> dataset_pb2.Dataset:
        return self._call(self.stub.GetDataset, dataset_pb2.GetDatasetRequest(id=dataset_id)).dataset

    def list(self, name: str = "") -> list[dataset_pb2.Dataset]:
        return list(self._call(self.stub.ListDatasets, dataset_pb2.ListDatasetsRequest(name=name)).datasets)

    def delete(self, dataset_id: str) -> None:
        self._call(self.stub.DeleteDataset, dataset_pb2.DeleteDatasetRequest(id=dataset_id))

    def report(self, dataset_id: str) -> dataset_pb2.QualityReport:
        return self._call(self.stub.GetDatasetReport, dataset_pb2.GetDatasetReportRequest(id=dataset_id)).report

    def list_rows(self, dataset_id: str, split: str = "", page_size: int = 100, page_token: str = "") -> dataset_pb2.ListRowsResponse:
        request = dataset_pb2.ListRowsRequest(dataset_id=dataset_id, split=split, page_size=page_size, page_token=page_token)
        return self._call(self.stub.ListRows, request)

    def rows(self, dataset_id: str, split: str = "") -> Iterator[dict]:
        """Every row (as a dict with its split), streamed."""
        for message in self._stream(self.stub.StreamRows, dataset_pb2.StreamRowsRequest(dataset_id=dataset_id, split=split), self.timeout):
            for row in message.rows:
                yield {**json.loads(row.json), "split": row.split}


def _chunks(source) -> Iterator[bytes]:
    if isinstance(source, bytes):
        for start in range(0, len(source), CHUNK_BYTES):
            yield source[start : start + CHUNK_BYTES]
    elif isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                yield chunk
    else:
        yield from source


class TrainingClient(_Client):
    service = "training"

    def __init__(self, address: str | None = None, timeout: float = 30.0, **credentials):
        super().__init__(address, timeout, **credentials)
        self.stub = training_pb2_grpc.TrainingServiceStub(self.channel)

    def create_job(
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
        """Queues a job; a retry with the same idempotency_key returns the same
        job. Hyperparameters left unset are chosen for you (the learning rate
        by a search, unless `search` says otherwise: SearchConfig fields, e.g.
        {"max_trials": 2} or {"mode": training_pb2.SEARCH_MODE_OFF})."""
        spec = self.spec(base_model, dataset_id, hyperparameters, num_workers, use_gpu, method, search)
        return self._call(self.stub.CreateJob, training_pb2.CreateJobRequest(spec=spec, idempotency_key=idempotency_key)).job

    @staticmethod
    def spec(
        base_model,
        dataset_id,
        hyperparameters=None,
        num_workers=1,
        use_gpu=False,
        method=training_pb2.TRAINING_METHOD_LORA,
        search: dict | None = None,
    ) -> training_pb2.JobSpec:
        return training_pb2.JobSpec(
            base_model=base_model,
            dataset_id=dataset_id,
            method=method,
            hyperparameters=training_pb2.Hyperparameters(**(hyperparameters or {})),
            compute=training_pb2.ComputeConfig(num_workers=num_workers, use_gpu=use_gpu),
            search=training_pb2.SearchConfig(**(search or {})),
        )

    def estimate(
        self,
        base_model: str,
        dataset_id: str,
        hyperparameters: dict | None = None,
        num_workers: int = 1,
        use_gpu: bool = False,
        method: int = training_pb2.TRAINING_METHOD_LORA,
        timeout: float | None = 300,
        search: dict | None = None,
    ) -> training_pb2.EstimateJobResponse:
        """Tokens, steps, parameters, memory and ETA of a job (its search
        included), before running it."""
        spec = self.spec(base_model, dataset_id, hyperparameters, num_workers, use_gpu, method, search)
        return self._call(self.stub.EstimateJob, training_pb2.EstimateJobRequest(spec=spec), timeout)

    def cancel_job(self, job_id: str) -> training_pb2.Job:
        return self._call(self.stub.CancelJob, training_pb2.CancelJobRequest(id=job_id)).job

    def list_checkpoints(self, job_id: str) -> list[training_pb2.Checkpoint]:
        return list(self._call(self.stub.ListCheckpoints, training_pb2.ListCheckpointsRequest(job_id=job_id)).checkpoints)

    def get_job(self, job_id: str) -> training_pb2.Job:
        return self._call(self.stub.GetJob, training_pb2.GetJobRequest(id=job_id)).job

    def list_jobs(self, state: int = training_pb2.JOB_STATE_UNSPECIFIED) -> list[training_pb2.Job]:
        """Every job (all pages), newest first."""
        jobs, token = [], ""
        while True:
            response = self._call(self.stub.ListJobs, training_pb2.ListJobsRequest(state=state, page_size=500, page_token=token))
            jobs += response.jobs
            token = response.next_page_token
            if not token:
                return jobs

    def stream_events(
        self, job_id: str, after_sequence: int = 0, timeout: float | None = None
    ) -> Iterator[training_pb2.StreamJobEventsResponse]:
        """The job's events, history first, until it ends (no deadline unless given)."""
        request = training_pb2.StreamJobEventsRequest(job_id=job_id, after_sequence=after_sequence)
        return self._stream(self.stub.StreamJobEvents, request, timeout)

    def list_adapters(self) -> list[training_pb2.Adapter]:
        return list(self._call(self.stub.ListAdapters, training_pb2.ListAdaptersRequest()).adapters)

    def delete_adapter(self, adapter_id: str) -> training_pb2.Adapter:
        return self._call(self.stub.DeleteAdapter, training_pb2.DeleteAdapterRequest(adapter_id=adapter_id)).adapter

    def download_adapter(
        self, adapter_id: str, out_dir: str | Path, on_bytes: Callable[[int], None] | None = None, timeout: float | None = None
    ) -> Path:
        """Writes the adapter's directory (a PEFT adapter that loads anywhere)
        to `out_dir`, which must not exist yet, and returns it. The files go
        to a sibling directory first: `out_dir` appears only once every file
        arrived whole. `on_bytes` is called with each chunk's size (progress)."""
        out = Path(out_dir)
        if out.exists():
            raise FileExistsError(f"{out} exists: give a new directory to download into")
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        current, path = None, None
        try:
            sizes: dict[str, int] = {}
            request = training_pb2.DownloadAdapterRequest(adapter_id=adapter_id)
            # No deadline unless given: a whole model (full fine-tuning) over a slow link takes what it takes.
            for chunk in self._stream(self.stub.DownloadAdapter, request, timeout):
                if chunk.path != path:
                    if current is not None:
                        current.close()
                    path = chunk.path
                    target = (staging / path).resolve()
                    if staging.resolve() not in target.parents:
                        raise ValueError(f"the server sent a file outside the adapter's directory: {path!r}")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    current, sizes[path] = target.open("wb"), chunk.file_size_bytes
                current.write(chunk.data)
                if on_bytes is not None:
                    on_bytes(len(chunk.data))
            if current is not None:
                current.close()
                current = None
            short = [p for p, size in sizes.items() if (staging / p).stat().st_size != size]
            if short:
                raise OSError(f"the download of {adapter_id} was cut short ({', '.join(short)}): download it again")
            staging.rename(out)
            return out
        finally:
            if current is not None:
                current.close()
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


class InferenceClient(_Client):
    service = "inference"

    def __init__(self, address: str | None = None, timeout: float = 120.0, **credentials):
        super().__init__(address, timeout, **credentials)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)

    @staticmethod
    def _request(kind, prompt, messages, adapter, max_new_tokens, temperature, top_p, top_k, seed, stop, raw_prompt):
        sampling = inference_pb2.SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=stop or []
        )
        if seed is not None:
            sampling.seed = seed
        return kind(adapter=adapter, prompt=prompt, messages=_chat(messages), sampling=sampling, raw_prompt=raw_prompt)

    def generate(
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
        request = self._request(
            inference_pb2.GenerateRequest, prompt, messages, adapter, max_new_tokens, temperature, top_p, top_k, seed, stop, raw_prompt
        )
        return self._call(self.stub.Generate, request, timeout)

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
    ) -> Iterator[inference_pb2.GenerateStreamResponse]:
        request = self._request(
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

    def classify(self, text: str, *, adapter: str, timeout: float | None = None) -> inference_pb2.ClassifyResponse:
        return self._call(self.stub.Classify, inference_pb2.ClassifyRequest(adapter=adapter, text=text), timeout)

    def load_adapter(self, adapter_id: str, source_uri: str) -> inference_pb2.LoadedAdapter:
        """Validates the PEFT adapter directory at source_uri and serves it as adapter_id."""
        return self._call(self.stub.LoadAdapter, inference_pb2.LoadAdapterRequest(id=adapter_id, source_uri=source_uri)).adapter

    def unload_adapter(self, adapter_id: str) -> None:
        self._call(self.stub.UnloadAdapter, inference_pb2.UnloadAdapterRequest(id=adapter_id))

    def loaded_adapters(self) -> inference_pb2.ListLoadedAdaptersResponse:
        return self._call(self.stub.ListLoadedAdapters, inference_pb2.ListLoadedAdaptersRequest())

    def wait_for_adapter(self, adapter_id: str, timeout: float = 120.0) -> inference_pb2.LoadedAdapter:
        """Blocks until the service has hot-loaded the adapter."""
        deadline = time.monotonic() + timeout
        while True:
            for adapter in self.loaded_adapters().adapters:
                if adapter.id == adapter_id:
                    return adapter
            if time.monotonic() > deadline:
                raise TimeoutError(f"adapter {adapter_id} not loaded by {self.address} after {timeout:.0f}s")
            time.sleep(0.2)
