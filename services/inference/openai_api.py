"""The OpenAI-compatible HTTP API, beside gRPC: `POST /v1/chat/completions`,
`POST /v1/completions` (streamed as server-sent events when asked) and
`GET /v1/models`, so the `openai` client and what is built on it (LangChain,
LiteLLM, eval harnesses) reach tunewire with `base_url` and an API key.

A thin layer, as the gRPC servicer is: JSON in, InferenceManager call (the
same engine, batching, per-project limits), JSON out. `model` is an adapter
id or the base model's name. Callers authenticate as on gRPC
(`Authorization: Bearer <tunewire API key>`), and errors come in OpenAI's
shape (`{"error": {"message", "type", "param", "code"}}`) with its status codes.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunewire.services.common import auth, errors, telemetry
from tunewire.services.common.grpc_server import MAX_MESSAGE_BYTES, AddressInUse
from tunewire.services.inference.adapters import CAUSAL_LM
from tunewire.services.inference.core import InferenceManager
from tunewire.services.inference.engine import GenerationRequest, GenerationResult
from tunewire.services.inference.output import LENGTH

log = logging.getLogger(__name__)

MAX_CHOICES = 8
MAX_STOP_SEQUENCES = 4  # as OpenAI's API


# Requests: OpenAI's fields and defaults; fields tunewire does not use
# (logprobs, penalties, user, ...) are accepted and ignored, as clients send them.


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # None: as many as the model's positions leave
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(ge=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1 - MAX_CHOICES)] | None = None  # choice i samples with seed + i
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise errors.InvalidArgument.field("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
        return tuple(stops)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_TextPart]

    def as_turn(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_Request):
    messages: Annotated[list[_Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's newer name for max_tokens


class CompletionRequest(_Request):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# Errors


_HTTP_ERRORS: dict[type[errors.TunewireError], tuple[int, str]] = {
    errors.InvalidArgument: (400, "invalid_request_error"),
    errors.FailedPrecondition: (400, "invalid_request_error"),
    errors.Unauthenticated: (401, "authentication_error"),
    errors.PermissionDenied: (403, "permission_error"),
    errors.NotFound: (404, "not_found_error"),
    errors.ResourceExhausted: (429, "rate_limit_error"),
    errors.Unavailable: (503, "service_unavailable"),
}


def error_response(status: int, kind: str, message: str, param: str | None = None, code: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}}, status=status)


def _from_tunewire(error: errors.TunewireError, model: str | None) -> web.Response:
    status, kind = next((_HTTP_ERRORS[k] for k in type(error).__mro__ if k in _HTTP_ERRORS), (500, "server_error"))
    if isinstance(error, errors.NotFound) and model is not None:
        # What OpenAI answers for a model that is not there (or not the caller's).
        return error_response(404, "invalid_request_error", f"The model `{model}` does not exist: {error}", "model", "model_not_found")
    violations = getattr(error, "violations", None)
    return error_response(status, kind, str(error), _openai_field(violations[0].field) if violations else None)


def _openai_field(field: str) -> str:
    """An engine field's name as the OpenAI request names it."""
    return {"sampling.max_new_tokens": "max_tokens", "sampling.temperature": "temperature", "sampling.top_p": "top_p"}.get(
        field, field.removeprefix("sampling.")
    )


def _from_validation(error: ValidationError) -> web.Response:
    first = error.errors()[0]
    param = ".".join(str(part) for part in first["loc"])
    details = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors()[:5])
    return error_response(400, "invalid_request_error", f"invalid request: {details}", param or None)


# The API


class OpenAIApi:
    def __init__(self, manager: InferenceManager, keys: auth.KeyRing | None):
        self.manager = manager
        self.keys = keys

    # The RPC each endpoint stands for, for keys limited to some RPCs.
    RPCS = {
        "/v1/chat/completions": "/tunewire.v1.InferenceService/Generate",
        "/v1/completions": "/tunewire.v1.InferenceService/Generate",
        "/v1/models": "/tunewire.v1.InferenceService/ListLoadedAdapters",
        "/v1/models/{model}": "/tunewire.v1.InferenceService/ListLoadedAdapters",
    }

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_MESSAGE_BYTES, middlewares=[self._handling])
        app.add_routes(
            [
                web.post("/v1/chat/completions", self.chat_completions),
                web.post("/v1/completions", self.completions),
                web.get("/v1/models", self.models),
                web.get("/v1/models/{model}", self.model),
            ]
        )
        return app

    @web.middleware
    async def _handling(self, request: web.Request, handler) -> web.StreamResponse:
        """Authenticates the caller, sets the request id, turns errors into
        OpenAI's shape, and counts and times the request as RPCs are."""
        started, route = time.perf_counter(), request.match_info.route.resource
        path = route.canonical if route is not None else "unknown"
        method = f"{request.method} {path}"
        response: web.StreamResponse | None = None
        try:
            telemetry.set_request_id(request.headers.get(telemetry.REQUEST_ID_HEADER, ""))
            who = auth.identify(self.keys, {k.lower(): v for k, v in request.headers.items()})
            if path in self.RPCS:
                who.require_rpc(self.RPCS[path])
            auth.set_caller(who)
            response = await handler(request)
        except errors.TunewireError as error:
            response = _from_tunewire(error, request.get("model"))
        except ValidationError as error:
            response = _from_validation(error)
        except web.HTTPException as error:
            response = error_response(error.status, "invalid_request_error", error.reason)
        except (asyncio.CancelledError, ConnectionResetError):
            raise  # the caller went away: its request has left the batch
        except Exception:
            log.exception("unexpected error in %s", method)
            response = error_response(
                500,
                "server_error",
                f"internal error (request id {telemetry.request_id() or 'none'}): the service logged the details; retry, "
                "and if it persists report it with the request id",
            )
        finally:
            status = str(response.status) if response is not None else "cancelled"
            telemetry.RPCS.labels(method, status).inc()
            telemetry.RPC_SECONDS.labels(method).observe(time.perf_counter() - started)
        return response

    # Models

    def _model_list(self) -> list[dict]:
        project = auth.caller().project
        base = {"id": self.manager.base_model, "object": "model", "created": 0, "owned_by": "tunewire"}
        adapters = [
            {
                "id": a.id,
                "object": "model",
                "created": int(a.loaded_at.timestamp()) if a.loaded_at else 0,
                "owned_by": a.project,
                "parent": self.manager.base_model,
            }
            for a in self.manager.loaded(project)
            if a.task_type == CAUSAL_LM
        ]
        return [base, *adapters]

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self._model_list()})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        found = next((m for m in self._model_list() if m["id"] == name), None)
        if found is None:
            request["model"] = name
            raise errors.NotFound(f"no adapter {name!r} is served to project {auth.caller().project}")
        return web.json_response(found)

    # Completions

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = ChatCompletionRequest.model_validate(await _json(request))
        request["model"] = body.model
        messages = [m.as_turn() for m in body.messages]
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await self._complete(request, body, "chat.completion", "chatcmpl", max_tokens, messages=messages)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = CompletionRequest.model_validate(await _json(request))
        request["model"] = body.model
        return await self._complete(request, body, "text_completion", "cmpl", body.max_tokens, prompt=body.text())

    async def _complete(
        self, request: web.Request, body: _Request, kind: str, id_prefix: str, max_tokens: int | None, **text
    ) -> web.StreamResponse:
        adapter = "" if body.model == self.manager.base_model else body.model
        stops = body.stops()
        generations = [
            GenerationRequest(
                adapter=adapter,
                raw_prompt="prompt" in text,  # completions continue the text as given; chat gets the model's template
                max_new_tokens=max_tokens,
                temperature=body.temperature if body.top_p > 0 else 0.0,  # no tokens left to sample from: greedy
                top_p=body.top_p if body.top_p < 1 else 0.0,  # 0: the engine's "all tokens"
                seed=None if body.seed is None else body.seed + i,
                stop=stops,
                **text,
            )
            for i in range(body.n)
        ]
        project = auth.caller().project
        head = {"id": f"{id_prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        chat = kind == "chat.completion"
        if body.stream:
            return await self._stream(request, project, generations, head | {"object": f"{kind}.chunk" if chat else kind}, chat, body)
        results = await _all_or_none([self.manager.generate(project, g) for g in generations])
        choices = [
            {"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None, "finish_reason": _finish_reason(r)}
            if chat
            else {"index": i, "text": r.text, "logprobs": None, "finish_reason": _finish_reason(r)}
            for i, r in enumerate(results)
        ]
        return web.json_response(head | {"object": kind, "choices": choices, "usage": _usage(results)})

    async def _stream(
        self, request: web.Request, project: str, generations: list[GenerationRequest], head: dict, chat: bool, body: _Request
    ) -> web.StreamResponse:
        """Server-sent events: a chunk per text delta of each choice, one with
        its finish reason, the usage when asked (`stream_options`), then
        `data: [DONE]`. An error before the first byte is an HTTP error; after
        it, an `error` event ends the stream."""
        merged = _merged([self.manager.generate_stream(project, g) for g in generations])
        try:
            return await self._send_events(request, merged, len(generations), head, chat, body)
        finally:
            await merged.aclose()  # a caller gone mid-stream: its requests leave the batch now

    async def _send_events(
        self, request: web.Request, merged: AsyncIterator, choices: int, head: dict, chat: bool, body: _Request
    ) -> web.StreamResponse:
        first = await anext(merged)  # errors in the request itself (unknown model, ...) answer as HTTP errors
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(payload: dict | str) -> None:
            await response.write(f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode())

        def chunk(index: int, delta: str | None, finish: str | None = None) -> dict:
            if chat:
                choice = {"index": index, "delta": {} if delta is None else {"content": delta}, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return head | {"choices": [choice]}

        if chat:
            for index in range(choices):
                await send(
                    head
                    | {
                        "choices": [
                            {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                        ]
                    }
                )
        results: list[GenerationResult] = []
        try:
            item = first
            while item is not None:
                index, value = item
                if isinstance(value, GenerationResult):
                    results.append(value)
                    await send(chunk(index, None, _finish_reason(value)))
                else:
                    await send(chunk(index, value))
                item = await anext(merged, None)
        except Exception as error:  # noqa: BLE001 - the response is under way: an error event ends it
            if not isinstance(error, errors.TunewireError):
                log.exception("stream ended by an unexpected error")
            message = (
                str(error) if isinstance(error, errors.TunewireError) else f"internal error (request id {telemetry.request_id() or 'none'})"
            )
            await send({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
            await response.write_eof()
            return response
        if body.include_usage():
            await send(head | {"choices": [], "usage": _usage(results)})
        await send("[DONE]")
        await response.write_eof()
        return response


async def _all_or_none(coroutines: list) -> list:
    """Their results; when one fails (or the caller goes away), the others
    are cancelled, so no choice runs on unobserved."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _json(request: web.Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise errors.InvalidArgument(f"the request body is not JSON: {error}") from None


async def _merged(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, Any]]:
    """The items of several streams as they come, each with its stream's
    index. Closing it cancels the streams still running."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((index, item))
        except Exception as error:
            await queue.put((index, error))
        finally:
            await queue.put((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is done:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


def _finish_reason(result: GenerationResult) -> str:
    return "length" if result.finish_reason == LENGTH else "stop"


def _usage(results: list[GenerationResult]) -> dict:
    """As OpenAI counts: the prompt once, every choice's completion."""
    prompt = results[0].prompt_tokens if results else 0
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# The listener


def ssl_context(settings) -> ssl.SSLContext | None:
    """The gRPC server's TLS for the HTTP listener too (mutual when it has a client CA)."""
    if settings.tls_cert_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    if settings.tls_client_ca_file is not None:
        context.load_verify_locations(settings.tls_client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def start_http(api: OpenAIApi, settings, port: int) -> tuple[web.AppRunner, int]:
    """Serves the API on the service's host and `port` (0 picks a free
    port), with its TLS; returns the runner (cleanup() stops it) and the port bound."""
    # handler_cancellation: a caller that disconnects cancels its handler, so its request leaves the batch.
    runner = web.AppRunner(api.app(), handler_cancellation=True, access_log=None, shutdown_timeout=settings.grace_period_seconds)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, port, ssl_context=ssl_context(settings)).start()
    except OSError as error:
        await runner.cleanup()
        if error.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
            raise
        raise AddressInUse(f"{settings.host}:{port}", "TUNEWIRE_INFERENCE_HTTP_PORT") from error
    return runner, runner.addresses[0][1]
