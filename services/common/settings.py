"""Deployment wiring, read from environment variables and checked at start-up.

Every variable is TUNEWIRE_<FIELD> (for example TUNEWIRE_TRAINING_PORT), except
RAY_ADDRESS, which keeps Ray's own name. A bad value stops the service with a
message naming the variable.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tunewire.services.common.errors import InvalidArgument
from tunewire.services.common.sources import parse_source

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEWIRE_", extra="ignore")

    # Where the embedded defaults keep everything: databases, artifacts, models.
    home: Path = Path(".tunewire")
    # Root of the artifact store: a local directory or an fsspec URL.
    artifact_root: str = ""
    # Converted copies of bundled models (see services/common/models.py).
    model_cache: Path | None = None

    host: str = "127.0.0.1"
    dataset_port: int = Field(50051, ge=0, le=65535)
    training_port: int = Field(50052, ge=0, le=65535)
    inference_port: int = Field(50053, ge=0, le=65535)
    # The inference service's OpenAI-compatible HTTP API (/v1/...); 0 turns it off.
    inference_http_port: int = Field(50054, ge=0, le=65535)
    # How the services reach each other; default: host and port above.
    dataset_address: str = ""
    training_address: str = ""

    dataset_database_url: str = ""
    training_database_url: str = ""

    # Address of an existing Ray cluster; empty starts a local one.
    ray_address: str = Field("", validation_alias=AliasChoices("RAY_ADDRESS", "TUNEWIRE_RAY_ADDRESS"))
    # Each job's curves as TensorBoard event files (tracking.py); and in MLflow
    # when its own variable names a tracking store.
    tensorboard: bool = True
    mlflow_tracking_uri: str = Field("", validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "TUNEWIRE_MLFLOW_TRACKING_URI"))
    # CPUs a local Ray cluster advertises. More than the cores so that Ray
    # Data's read tasks find a slot beside the training workers.
    ray_num_cpus: int = Field(0, ge=0)
    # Jobs the orchestrator runs at once.
    max_concurrent_jobs: int = Field(1, ge=1)
    # Orchestrator replicas sharing a database: each names itself in the leases
    # of the jobs it runs (default host:port) and renews them; a job whose
    # lease lapses for this long is taken over by another replica.
    replica_id: str = ""
    job_lease_seconds: float = Field(30.0, gt=0)

    # The model the inference service serves.
    base_model: str = DEFAULT_BASE_MODEL
    # Comma-separated directories whose models requests may name as
    # base_model or token_stats_model (bundled models and hub ids always).
    model_roots: str = ""
    # Inference batching: rows decoded together, requests waiting to join
    # (more get RESOURCE_EXHAUSTED), adapters held in LoRA slots (least
    # recently used ones are evicted and reloaded on demand), largest rank.
    max_batch_size: int = Field(16, ge=1)
    max_queued_requests: int = Field(64, ge=1)
    max_resident_adapters: int = Field(8, ge=1)
    # Evicted adapters' weights kept in host memory (a reload is then a copy,
    # not a disk read); 0 reads them from disk again.
    max_evicted_adapter_bytes: int = Field(2 << 30, ge=0)
    max_adapter_rank: int = Field(64, ge=1)
    # The built-in engine: a prompt longer than this is prefilled this many
    # tokens a step; while other streams decode, its chunks take about this
    # share of their decoding time (their mean inter-token latency: about
    # 1 + share times its usual). vLLM chunks prefill its own way.
    prefill_chunk_tokens: int = Field(256, ge=16, le=8192)
    prefill_share: float = Field(0.75, ge=0.05, le=100)
    # Where the served model runs: auto is the first CUDA GPU when one is
    # visible, else the CPU; or cpu, cuda, cuda:N by name.
    inference_device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # The served model's weights: auto is bfloat16 where the device computes
    # it natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else float16
    # on a GPU and float32 on a CPU.
    inference_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # The engine that runs the served model: builtin (CPU, or a GPU) or vllm
    # (CUDA GPUs, with the `vllm` extra installed), across this many GPUs.
    inference_engine: Literal["builtin", "vllm"] = "builtin"
    vllm_tensor_parallel_size: int = Field(1, ge=1)
    # The share of each GPU's memory vLLM takes (weights, then its KV cache).
    vllm_gpu_memory_utilization: float = Field(0.9, gt=0, le=1)

    max_upload_bytes: int = Field(1 << 30, gt=0)
    # Longer rows are invalid (bounds the memory one row may take).
    max_row_bytes: int = Field(1 << 20, gt=0)
    # Comma-separated paths or URL prefixes ImportDataset and LoadAdapter may
    # read (besides a project's own adapters in the artifact store); `{project}`
    # in a root stands for the caller's project. Empty disables dataset imports.
    import_roots: str = ""
    grace_period_seconds: float = Field(5.0, ge=0)
    log_level: str = "INFO"
    # JSON lines (with each RPC's request id), or text for people.
    log_format: Literal["json", "text"] = "json"
    # Prometheus /metrics of each service over HTTP; 0: not served.
    dataset_metrics_port: int = Field(0, ge=0, le=65535)
    training_metrics_port: int = Field(0, ge=0, le=65535)
    inference_metrics_port: int = Field(0, ge=0, le=65535)

    # Authentication: the keys file (see services/common/auth.py); without
    # one every caller is an admin, which only a loopback host allows.
    api_keys_file: Path | None = None
    # The admin key the services present to each other (acting for the caller's project).
    service_api_key: SecretStr = SecretStr("")
    # TLS: with a certificate and key the services serve TLS only; with a
    # client CA as well, callers must present a certificate it signed
    # (mutual TLS). tls_ca_file verifies the other services' certificates.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    tls_ca_file: Path | None = None
    # Quotas per project: queued and running jobs, bytes of datasets stored,
    # bytes of adapters stored, generation requests queued or running.
    project_max_active_jobs: int = Field(16, ge=1)
    project_max_dataset_bytes: int = Field(10 << 30, gt=0)
    project_max_adapter_bytes: int = Field(20 << 30, gt=0)
    # Half the queue by default: one project can never take all of it.
    project_max_generation_requests: int = Field(32, ge=1)

    @field_validator("ray_address")
    @classmethod
    def _not_ray_client(cls, value: str) -> str:
        # Ray Client connects, then every job fails at once (ray.util.queue.Empty):
        # Ray's documentation keeps Ray Train and Tune off it.
        if value.startswith("ray://"):
            raise ValueError(
                "Ray Client (ray://) does not run Ray Train or Ray Tune: run the training service on a node of the "
                "cluster (`ray start --address=<head>:6379` there) and set RAY_ADDRESS to the head's GCS address, <head>:6379"
            )
        return value

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        self.home = self.home.expanduser().resolve()
        if not self.artifact_root:
            self.artifact_root = str(self.home / "artifacts")
        elif "://" not in self.artifact_root:
            self.artifact_root = str(Path(self.artifact_root).expanduser().resolve())
        if self.model_cache is None:
            self.model_cache = self.home / "models"
        self.model_cache = self.model_cache.expanduser().resolve()
        if not self.dataset_address:
            self.dataset_address = f"{self.host}:{self.dataset_port}"
        if not self.replica_id:
            self.replica_id = f"{socket.gethostname()}:{self.training_port}"
        if not self.training_address:
            self.training_address = f"{self.host}:{self.training_port}"
        if not self.dataset_database_url:
            self.dataset_database_url = f"sqlite:///{self.home / 'dataset.db'}"
        if not self.training_database_url:
            self.training_database_url = f"sqlite:///{self.home / 'training.db'}"
        if not self.ray_num_cpus:
            self.ray_num_cpus = max(4, 2 * (os.cpu_count() or 1))
        if self.api_keys_file is None and not _is_loopback(self.host):
            raise ValueError(
                f"host {self.host} accepts connections from other machines, and no API keys are configured: "
                "create keys with `tunewire keys create --project ops --role operator --for orchestrator --file keys.json` (and "
                "`--for inference`: the services' keys) and one per project and set "
                "TUNEWIRE_API_KEYS_FILE=keys.json, or serve on 127.0.0.1"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS needs both TUNEWIRE_TLS_CERT_FILE and TUNEWIRE_TLS_KEY_FILE")
        if self.project_max_generation_requests >= self.max_queued_requests + self.max_batch_size:
            raise ValueError(
                f"TUNEWIRE_PROJECT_MAX_GENERATION_REQUESTS={self.project_max_generation_requests} lets one project fill the whole "
                f"queue ({self.max_queued_requests} waiting + {self.max_batch_size} decoding): keep it below, so other projects "
                "always find room"
            )
        for root in self.import_root_list:
            try:
                parse_source(root, "TUNEWIRE_IMPORT_ROOTS")
            except InvalidArgument as exc:
                raise ValueError(str(exc)) from None
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("TUNEWIRE_TLS_CLIENT_CA_FILE (mutual TLS) needs TUNEWIRE_TLS_CERT_FILE and TUNEWIRE_TLS_KEY_FILE")
        return self

    @property
    def import_root_list(self) -> tuple[str, ...]:
        return _comma_list(self.import_roots)

    @property
    def model_root_list(self) -> tuple[str, ...]:
        return _comma_list(self.model_roots)


def _comma_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class SettingsError(ValueError):
    pass


def load_settings(**overrides) -> Settings:
    """Reads the environment; overrides win (tests pass ports and paths here)."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            if not error["loc"]:  # a check across several settings
                problems.append(error["msg"].removeprefix("Value error, "))
                continue
            field = str(error["loc"][0])
            variable = "RAY_ADDRESS" if field == "ray_address" else f"TUNEWIRE_{field.upper()}"
            problems.append(f"{variable}={error.get('input')!r}: {error['msg']}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
