"""Metrics and logs, the same way in every service.

Prometheus metrics live in prometheus_client's default registry; each service
process serves them over HTTP on its metrics port (TUNEWIRE_<SERVICE>_METRICS_PORT).
Logs are JSON lines carrying the request id of the RPC being handled: the
`x-request-id` metadata a caller sent, or a new one. Services pass it on when
they call each other, so one id follows a request across services.

No grpc here: the server interceptor records RPCs and sets the request id.
"""

from __future__ import annotations

import contextvars
import logging
import uuid

from prometheus_client import Counter, Gauge, Histogram, start_http_server

REQUEST_ID_HEADER = "x-request-id"

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("tunewire_request_id", default="")

# Every service
RPCS = Counter("tunewire_rpc_requests", "RPCs handled, by method and status code", ["method", "code"])
RPC_SECONDS = Histogram(
    "tunewire_rpc_duration_seconds",
    "Time from an RPC's start to its status (whole streams for streaming RPCs)",
    ["method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
)

# Training
TRAINING_JOBS = Gauge("tunewire_training_jobs", "Jobs by state", ["state"])
TRAINING_TOKENS = Counter("tunewire_training_tokens", "Real (non-padding) tokens trained")
TRAINING_TOKENS_PER_SECOND = Gauge("tunewire_training_tokens_per_second", "Real tokens per second of the latest step")
TRAINING_STEP_SECONDS = Histogram(
    "tunewire_training_step_seconds", "Time of one optimizer step", buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
)

# Inference
INFERENCE_QUEUE_DEPTH = Gauge("tunewire_inference_queue_depth", "Generation requests waiting for a batch row")
INFERENCE_BATCH_SIZE = Histogram("tunewire_inference_batch_size", "Rows decoded together per step", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
INFERENCE_TOKENS = Counter("tunewire_inference_tokens", "Tokens generated")
INFERENCE_TIME_TO_FIRST_TOKEN = Histogram(
    "tunewire_inference_time_to_first_token_seconds",
    "From a request's arrival at the engine to its first generated token",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
INFERENCE_ADAPTERS_LOADED = Gauge("tunewire_inference_adapters_loaded", "Adapters servable")
INFERENCE_ADAPTER_LOAD_SECONDS = Histogram(
    "tunewire_inference_adapter_load_seconds",
    "Reading, validating and placing an adapter",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


def request_id() -> str:
    """The id of the request being handled ('' outside one)."""
    return _request_id.get()


def set_request_id(value: str) -> str:
    """Makes `value` (or a new id, for '') the current request's id; returns it."""
    value = value[:128] or uuid.uuid4().hex
    _request_id.set(value)
    return value


def start_metrics_server(port: int, host: str) -> None:
    """Serves /metrics on `host`:`port` (port 0: not at all) from a daemon
    thread: on the address the service's gRPC binds, so a service kept to
    loopback keeps its metrics there too."""
    if port:
        start_http_server(port, addr=host)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get()
        return True


def configure_logging(level: str, log_format: str = "json") -> None:
    """Logs to stderr, one JSON object per line (time, level, logger,
    message, request_id, and any `extra=` fields) or, with "text", a line
    for people."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
