"""InferenceService over gRPC: proto in, InferenceManager call, proto out."""

from __future__ import annotations

import time

from tunewire.services.common.auth import caller
from tunewire.services.common.convert import to_timestamp
from tunewire.services.inference.adapters import AdapterView
from tunewire.services.inference.core import InferenceManager
from tunewire.services.inference.engine import DEFAULT_MAX_NEW_TOKENS, LENGTH, STOP, GenerationRequest, GenerationResult
from tunewire.v1 import inference_pb2, inference_pb2_grpc

FINISH_REASONS = {STOP: inference_pb2.FINISH_REASON_STOP, LENGTH: inference_pb2.FINISH_REASON_LENGTH}


def request_from_proto(request: inference_pb2.GenerateRequest | inference_pb2.GenerateStreamRequest) -> GenerationRequest:
    sampling = request.sampling
    which = request.WhichOneof("input")
    return GenerationRequest(
        adapter=request.adapter,
        prompt=request.prompt if which == "prompt" else None,
        messages=[{"role": m.role, "content": m.content} for m in request.messages.messages] if which == "messages" else None,
        raw_prompt=request.raw_prompt,
        max_new_tokens=sampling.max_new_tokens if sampling.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        seed=sampling.seed if sampling.HasField("seed") else None,
        stop=tuple(sampling.stop),
    )


def _deadline(context) -> float | None:
    """The call's deadline on the monotonic clock, so a request whose caller
    has given up leaves the queue and the batch."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _finish_reason(result: GenerationResult) -> int:
    # CANCELLED only reaches a caller that is already gone: UNSPECIFIED.
    return FINISH_REASONS.get(result.finish_reason, inference_pb2.FINISH_REASON_UNSPECIFIED)


def loaded_to_proto(adapter: AdapterView) -> inference_pb2.LoadedAdapter:
    return inference_pb2.LoadedAdapter(
        id=adapter.id,
        source_uri=adapter.source_uri,
        load_time=to_timestamp(adapter.loaded_at),
        publish_to_servable_seconds=adapter.publish_to_servable_seconds or 0.0,
        task_type=adapter.task_type,
        rank=adapter.rank,
        resident=adapter.resident,
        requests_in_flight=adapter.requests_in_flight,
        load_seconds=adapter.load_seconds,
        labels=adapter.labels,
        project=adapter.project,
    )


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, manager: InferenceManager):
        self.manager = manager

    async def Generate(self, request: inference_pb2.GenerateRequest, context):
        result = await self.manager.generate(caller().project, request_from_proto(request), _deadline(context))
        return inference_pb2.GenerateResponse(
            text=result.text,
            finish_reason=_finish_reason(result),
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
        )

    async def GenerateStream(self, request: inference_pb2.GenerateStreamRequest, context):
        async for item in self.manager.generate_stream(caller().project, request_from_proto(request), _deadline(context)):
            if isinstance(item, GenerationResult):
                yield inference_pb2.GenerateStreamResponse(
                    finish_reason=_finish_reason(item),
                    prompt_tokens=item.prompt_tokens,
                    completion_tokens=item.completion_tokens,
                )
            else:
                yield inference_pb2.GenerateStreamResponse(text_delta=item)

    async def Classify(self, request: inference_pb2.ClassifyRequest, context):
        result = await self.manager.classify(caller().project, request.adapter, request.text)
        ranked = sorted(result.scores.items(), key=lambda item: -item[1])
        return inference_pb2.ClassifyResponse(
            label=result.label, scores=[inference_pb2.LabelScore(label=label, score=score) for label, score in ranked]
        )

    async def LoadAdapter(self, request: inference_pb2.LoadAdapterRequest, context):
        who = caller()
        who.require_admin("LoadAdapter")
        adapter = await self.manager.load_adapter(request.id, request.source_uri, project=who.project)
        return inference_pb2.LoadAdapterResponse(adapter=loaded_to_proto(adapter))

    async def UnloadAdapter(self, request: inference_pb2.UnloadAdapterRequest, context):
        who = caller()
        who.require_admin("UnloadAdapter")
        await self.manager.unload_adapter(request.id, project=None if who.is_operator else who.project)
        return inference_pb2.UnloadAdapterResponse()

    async def ListLoadedAdapters(self, request, context):
        # Operators, who run the service for every project, see every project's adapters.
        who = caller()
        adapters = self.manager.loaded(None if who.is_operator else who.project)
        return inference_pb2.ListLoadedAdaptersResponse(base_model=self.manager.base_model, adapters=[loaded_to_proto(a) for a in adapters])
