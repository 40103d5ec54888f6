"""What every tunewire server shares: the aio server with health and
reflection, the one mapping from domain errors to gRPC status codes, and the
SIGTERM-aware serve loop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from tunewire.services.common import auth, errors, telemetry

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_STATUS_CODES: dict[type[errors.TunewireError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def status_code_for(error: errors.TunewireError) -> grpc.StatusCode:
    for kind in type(error).__mro__:
        if kind in _STATUS_CODES:
            return _STATUS_CODES[kind]
    return grpc.StatusCode.UNKNOWN


async def abort_with(context: grpc.aio.ServicerContext, error: errors.TunewireError) -> None:
    """Ends the RPC with the error's status code; field violations travel as a
    google.rpc.BadRequest in the standard grpc-status-details-bin trailer."""
    code = status_code_for(error)
    status = status_pb2.Status(code=code.value[0], message=str(error))
    violations = getattr(error, "violations", None)
    if violations:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.BadRequest(
                field_violations=[error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description) for v in violations]
            )
        )
        status.details.append(detail)
    await context.abort(code, str(error), trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),))


async def _abort_internal(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    log.exception("unexpected error in %s", method)
    # The exception's text may hold paths, SQL or another tenant's names: it
    # stays in the log, which the request id finds.
    await context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error in {method} (request id {telemetry.request_id() or 'none'}): the service logged the details; "
        "retry, and if it persists report it with the request id",
    )


# Open to every caller: Kubernetes probes and load balancers check health without keys.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler of the server: authenticates the caller (keys from
    the KeyRing; with none, every caller is the local admin) and makes it the
    handler's `auth.caller()`, sets the request id for logs and onward calls,
    maps TunewireError to its status code, and counts and times the RPC."""

    def __init__(self, keys: auth.KeyRing | None):
        self.keys = keys

    def identify(self, metadata: dict[str, str]) -> auth.Caller:
        return auth.identify(self.keys, metadata)

    @contextlib.asynccontextmanager
    async def _handling(self, method: str, metadata: dict[str, str], context):
        started, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            telemetry.set_request_id(metadata.get(telemetry.REQUEST_ID_HEADER, ""))
            if not method.startswith(OPEN_METHOD_PREFIXES):
                who = self.identify(metadata)
                who.require_rpc(method)
                auth.set_caller(who)
            yield
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED  # the caller went away
            raise
        except (grpc.aio.AbortError, grpc.RpcError):
            code = _code_of(context)  # the handler ended the RPC itself
            raise
        except (errors.TunewireError, DecodeError) as exc:
            if isinstance(exc, DecodeError):
                exc = errors.InvalidArgument(f"a request message of {method} is not valid protobuf: {exc}")
            code = status_code_for(exc)
            await abort_with(context, exc)
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            await _abort_internal(context, method, exc)
        finally:
            telemetry.RPCS.labels(method, code.name).inc()
            telemetry.RPC_SECONDS.labels(method).observe(time.perf_counter() - started)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        metadata = {k: v for k, v in handler_call_details.invocation_metadata or () if isinstance(v, str)}
        handling = functools.partial(self._handling, method, metadata)
        kwargs = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        # A unary request is parsed inside the handler, so that bytes which are
        # no valid message get INVALID_ARGUMENT (gRPC's own parsing says UNKNOWN).
        parse = handler.request_deserializer or (lambda raw: raw)
        raw_kwargs = dict(request_deserializer=None, response_serializer=handler.response_serializer)
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(raw, context):
                async with handling(context):
                    return await inner_uu(parse(raw), context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, **raw_kwargs)
        if handler.stream_unary:
            inner_su = handler.stream_unary

            async def stream_unary(request_iterator, context):
                async with handling(context):
                    return await inner_su(request_iterator, context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(raw, context):
                async with handling(context):
                    async for response in inner_us(parse(raw), context):
                        yield response

            return grpc.unary_stream_rpc_method_handler(unary_stream, **raw_kwargs)
        inner_ss = handler.stream_stream

        async def stream_stream(request_iterator, context):
            async with handling(context):
                async for response in inner_ss(request_iterator, context):
                    yield response

        return grpc.stream_stream_rpc_method_handler(stream_stream, **kwargs)


def _code_of(context) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)


@dataclass
class ServerHandle:
    """A created server, the port it bound, and its health. start() runs the
    on_start hooks (loading what the service needs) before it reports SERVING."""

    server: grpc.aio.Server
    port: int
    health: HealthServicer
    service_names: list[str]
    on_start: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Run after the server stops (background tasks, stores).
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Run beside the gRPC server's grace period (other listeners draining the same way).
    on_stopping: list[Callable[[float], Awaitable[None]]] = field(default_factory=list)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def start(self) -> None:
        await self.server.start()
        for hook in self.on_start:
            await hook()
        await self.set_serving(True)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(self.server.stop(grace), *(stopping(grace) for stopping in self.on_stopping))
        for close in self.on_stop:
            await close()


@dataclass(frozen=True)
class ServerSecurity:
    """Who may call (keys; None: anyone, as the local admin) and the TLS the
    server speaks (none, TLS, or mutual TLS with a client CA)."""

    keys: auth.KeyRing | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_client_ca: bytes | None = None

    @classmethod
    def from_settings(cls, settings) -> ServerSecurity:
        def read(path):
            return path.read_bytes() if path is not None else None

        keys = auth.KeyRing(settings.api_keys_file) if settings.api_keys_file is not None else None
        return cls(keys, read(settings.tls_cert_file), read(settings.tls_key_file), read(settings.tls_client_ca_file))

    def bind(self, server: grpc.aio.Server, address: str) -> int:
        if self.tls_cert is None:
            return server.add_insecure_port(address)
        credentials = grpc.ssl_server_credentials(
            [(self.tls_key, self.tls_cert)],
            root_certificates=self.tls_client_ca,
            require_client_auth=self.tls_client_ca is not None,
        )
        return server.add_secure_port(address, credentials)


class AddressInUse(OSError):
    """The service cannot listen where its settings say: most often another
    process (a second copy of the service) holds the port."""

    def __init__(self, address: str, setting: str = ""):
        where = f"; set {setting} to a free port, or stop the other process" if setting else ""
        super().__init__(f"cannot listen on {address}: the port is in use by another process, or the host is not this machine's{where}")
        self.address = address


async def create_grpc_server(
    address: str,
    register: Callable[[grpc.aio.Server], None],
    service_names: list[str],
    security: ServerSecurity | None = None,
    min_ping_interval_ms: int = 30_000,
) -> ServerHandle:
    """Builds an aio server with health (NOT_SERVING until set_serving(True))
    and reflection, and binds `address` ("host:0" picks a free port).
    Clients may ping every `min_ping_interval_ms`, even on a stream that has
    sent nothing for that long: the SDK pings each minute."""
    security = security or ServerSecurity()
    server = grpc.aio.server(
        interceptors=[ServiceInterceptor(security.keys)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Clients ping each minute to keep long streams open (the SDK's
            # keepalive): allowed, even while a stream has nothing to send.
            # (gRPC's default, 5 minutes, answers the fourth ping of a quiet
            # stream with GOAWAY "too_many_pings" and ends the stream.)
            ("grpc.http2.min_ping_interval_without_data_ms", min_ping_interval_ms),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
    )
    register(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    try:
        port = security.bind(server, address)
    except RuntimeError as error:  # grpc's "Failed to bind", with no reason given
        raise AddressInUse(address) from error
    if port == 0:
        raise AddressInUse(address)
    handle = ServerHandle(server=server, port=port, health=health, service_names=service_names)
    await handle.set_serving(False)
    return handle


async def serve_until_signal(handle: ServerHandle, grace: float) -> None:
    """Starts the server; on SIGTERM or SIGINT (even during start-up) reports
    NOT_SERVING and stops with a grace period for RPCs in flight."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("listening on port %d: %s", handle.port, ", ".join(handle.service_names))
    start = asyncio.create_task(handle.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({start, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if start.done():
        if start.exception() is not None:
            await handle.stop(0)
            raise start.exception()
        log.info("serving")
        await stopping
    else:
        start.cancel()
    log.info("stopping (grace %.1fs)", grace)
    await handle.stop(grace)


def run_service(service: str, create_server, make_deps) -> None:
    """The body of each service process: settings from the environment, logs
    and the metrics endpoint, then create_server(settings, make_deps(settings))
    served until SIGTERM."""
    from tunewire.services.common.settings import SettingsError, load_settings

    async def main() -> None:
        settings = load_settings()
        telemetry.configure_logging(settings.log_level, settings.log_format)
        metrics_port = getattr(settings, f"{service}_metrics_port")
        try:
            telemetry.start_metrics_server(metrics_port, settings.host)
        except OSError as error:
            if error.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                raise
            raise AddressInUse(f"{settings.host}:{metrics_port}", f"TUNEWIRE_{service.upper()}_METRICS_PORT") from error
        try:
            handle = await create_server(settings, make_deps(settings))
        except AddressInUse as error:
            raise AddressInUse(error.address, f"TUNEWIRE_{service.upper()}_PORT") from error
        await serve_until_signal(handle, settings.grace_period_seconds)

    try:
        asyncio.run(main())
    except (AddressInUse, SettingsError) as error:
        # A setting to change, not a crash: one line, no traceback.
        log.error("the %s service cannot start: %s", service, error)
        raise SystemExit(1) from None
