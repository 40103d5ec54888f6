"""InferenceService over gRPC: proto in, InferenceManager call, proto out."""

from __future__ import annotations

from tunewire.services.common.convert import to_timestamp
from tunewire.services.inference.core import InferenceManager, LoadedAdapter
from tunewire.services.inference.engine import DEFAULT_MAX_NEW_TOKENS, LENGTH, GenerationRequest, GenerationResult
from tunewire.v1 import inference_pb2, inference_pb2_grpc

FINISH_REASONS = {"stop": inference_pb2.FINISH_REASON_STOP, LENGTH: inference_pb2.FINISH_REASON_LENGTH}


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


def _loaded_to_proto(adapter: LoadedAdapter) -> inference_pb2.LoadedAdapter:
    return inference_pb2.LoadedAdapter(
        id=adapter.id,
        source_uri=adapter.source_uri,
        load_time=to_timestamp(adapter.loaded_at),
        publish_to_servable_seconds=adapter.publish_to_servable_seconds or 0.0,
    )


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, manager: InferenceManager):
        self.manager = manager

    async def Generate(self, request: inference_pb2.GenerateRequest, context):
        result = await self.manager.generate(request_from_proto(request))
        return inference_pb2.GenerateResponse(
            text=result.text,
            finish_reason=FINISH_REASONS[result.finish_reason],
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
        )

    async def GenerateStream(self, request: inference_pb2.GenerateStreamRequest, context):
        async for item in self.manager.generate_stream(request_from_proto(request)):
            if isinstance(item, GenerationResult):
                yield inference_pb2.GenerateStreamResponse(
                    finish_reason=FINISH_REASONS[item.finish_reason],
                    prompt_tokens=item.prompt_tokens,
                    completion_tokens=item.completion_tokens,
                )
            else:
                yield inference_pb2.GenerateStreamResponse(text_delta=item)

    async def ListLoadedAdapters(self, request, context):
        return inference_pb2.ListLoadedAdaptersResponse(
            base_model=self.manager.base_model, adapters=[_loaded_to_proto(a) for a in self.manager.loaded()]
        )
