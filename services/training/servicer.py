"""TrainingService over gRPC: proto in, JobManager call, proto out."""

from __future__ import annotations

import asyncio

from google.protobuf import json_format

from tunewire.services.common.auth import caller
from tunewire.services.common.convert import to_timestamp
from tunewire.services.common.errors import InvalidArgument
from tunewire.services.training import config as training_config
from tunewire.services.training.jobs import JobManager, JobSpec
from tunewire.services.training.store import Adapter, Job, JobEvent
from tunewire.v1 import training_pb2, training_pb2_grpc

METHOD_FROM_PROTO = {
    training_pb2.TRAINING_METHOD_UNSPECIFIED: training_config.LORA,
    training_pb2.TRAINING_METHOD_LORA: training_config.LORA,
    training_pb2.TRAINING_METHOD_FULL: training_config.FULL,
    training_pb2.TRAINING_METHOD_QLORA: training_config.QLORA,
}
METHOD_TO_PROTO = {v: k for k, v in METHOD_FROM_PROTO.items() if k}


def state_to_proto(state: str) -> int:
    return training_pb2.JobState.Value(f"JOB_STATE_{state}")


def state_from_proto(state: int) -> str:
    if state == training_pb2.JOB_STATE_UNSPECIFIED:
        return ""
    if state not in training_pb2.JobState.values():
        raise InvalidArgument.field("state", f"{state} is not a JobState")
    return training_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


def _enum_name(enum, number: int) -> str:
    return enum.Name(number) if number in enum.values() else f"unknown ({number})"


SEARCH_MODE_FROM_PROTO = {
    training_pb2.SEARCH_MODE_UNSPECIFIED: training_config.SEARCH_AUTO,
    training_pb2.SEARCH_MODE_ON: training_config.SEARCH_ON,
    training_pb2.SEARCH_MODE_OFF: training_config.SEARCH_OFF,
}
SEARCH_MODE_TO_PROTO = {v: k for k, v in SEARCH_MODE_FROM_PROTO.items()}


def _set_fields(message) -> dict:
    return {f.name: (list(v) if f.is_repeated else v) for f, v in message.ListFields()}


def spec_from_proto(spec: training_pb2.JobSpec, project: str, idempotency_key: str = "") -> JobSpec:
    # An unknown number becomes a name the method check refuses with the field.
    method = METHOD_FROM_PROTO.get(spec.method) or _enum_name(training_pb2.TrainingMethod, spec.method)
    search = _set_fields(spec.search)
    if "mode" in search:
        search["mode"] = SEARCH_MODE_FROM_PROTO.get(spec.search.mode) or _enum_name(training_pb2.SearchMode, spec.search.mode)
    return JobSpec(
        base_model=spec.base_model,
        dataset_id=spec.dataset_id,
        method=method,
        hyperparameters=_set_fields(spec.hyperparameters),
        search=search,
        num_workers=spec.compute.num_workers,
        use_gpu=spec.compute.use_gpu,
        idempotency_key=idempotency_key,
        project=project,
    )


def job_to_proto(job: Job) -> training_pb2.Job:
    spec = job.spec
    resolved = {k: v for k, v in job.config.items() if k != "auto"}
    return training_pb2.Job(
        id=job.id,
        spec=training_pb2.JobSpec(
            base_model=spec["base_model"],
            dataset_id=spec["dataset_id"],
            method=METHOD_TO_PROTO[spec["method"]],
            hyperparameters=training_pb2.Hyperparameters(**spec["hyperparameters"]),
            compute=training_pb2.ComputeConfig(num_workers=spec["num_workers"], use_gpu=spec["use_gpu"]),
            search=_search_to_proto(spec.get("search") or {}),
        ),
        state=state_to_proto(job.state),
        resolved_hyperparameters=training_pb2.Hyperparameters(**resolved),
        auto_hyperparameters=job.config.get("auto", []),
        error=job.error,
        adapter_id=job.adapter_id,
        latest_step=from_dict(training_pb2.StepMetrics, job.latest_step) if job.latest_step else None,
        create_time=to_timestamp(job.created_at),
        start_time=to_timestamp(job.started_at),
        end_time=to_timestamp(job.ended_at),
        evaluation=from_dict(training_pb2.EvaluationReport, job.evaluation) if job.evaluation else None,
        task=training_config.TASK_OF_FORMAT.get(job.dataset.get("format", ""), ""),
    )


def _search_to_proto(search: dict) -> training_pb2.SearchConfig:
    fields = {k: v for k, v in search.items() if k != "mode"}
    return training_pb2.SearchConfig(mode=SEARCH_MODE_TO_PROTO.get(search.get("mode", ""), 0), **fields)


def from_dict(message_class, data: dict):
    """A message from a dict of its fields, as events and reports are stored;
    keys it has no field for (written by another version) are left out, and
    trial states are named as in TrialState."""
    return json_format.ParseDict(_with_trial_states(data), message_class(), ignore_unknown_fields=True)


def _with_trial_states(data):
    if isinstance(data, list):
        return [_with_trial_states(d) for d in data]
    if not isinstance(data, dict):
        return data
    out = {k: _with_trial_states(v) for k, v in data.items() if v is not None}
    if isinstance(out.get("state"), str) and not out["state"].startswith("TRIAL_STATE_") and "run" in out:
        out["state"] = f"TRIAL_STATE_{out['state']}"
    return out


EVENT_MESSAGES = {
    "step": training_pb2.StepMetrics,
    "eval": training_pb2.EvalMetrics,
    "checkpoint": training_pb2.Checkpoint,
    "evaluation": training_pb2.EvaluationReport,
    "trial": training_pb2.TrialUpdate,
    "diagnostic": training_pb2.Diagnostic,
}


def event_to_proto(event: JobEvent) -> training_pb2.StreamJobEventsResponse:
    message = training_pb2.StreamJobEventsResponse(job_id=event.job_id, sequence=event.sequence, time=to_timestamp(event.time))
    data = event.data
    if event.kind == "state":
        message.state = state_to_proto(data["state"])
        message.error = data.get("error", "")
    elif event.kind in EVENT_MESSAGES:
        getattr(message, event.kind).CopyFrom(from_dict(EVENT_MESSAGES[event.kind], data))
    else:
        message.log = data.get("message", "")
    return message


def adapter_to_proto(adapter: Adapter) -> training_pb2.Adapter:
    return training_pb2.Adapter(
        id=adapter.id,
        job_id=adapter.job_id,
        base_model=adapter.base_model,
        uri=adapter.uri,
        create_time=to_timestamp(adapter.created_at),
        sequence=adapter.sequence,
        project=adapter.project,
        held_back=adapter.held_back,
        deleted=adapter.deleted,
        size_bytes=adapter.size_bytes,
    )


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, jobs: JobManager):
        self.jobs = jobs

    async def CreateJob(self, request: training_pb2.CreateJobRequest, context):
        job = await self.jobs.create(spec_from_proto(request.spec, caller().project, request.idempotency_key))
        return training_pb2.CreateJobResponse(job=job_to_proto(job))

    async def CancelJob(self, request: training_pb2.CancelJobRequest, context):
        return training_pb2.CancelJobResponse(job=job_to_proto(await self.jobs.cancel(caller().project, request.id)))

    async def ListCheckpoints(self, request: training_pb2.ListCheckpointsRequest, context):
        checkpoints = [
            training_pb2.Checkpoint(
                step=c["step"],
                validation_loss=c["validation_loss"],
                uri=c["uri"],
                create_time=to_timestamp(c["modified"]),
                run=c.get("run", ""),
                within_forgetting_budget=c.get("within_budget", True),
            )
            for c in await asyncio.to_thread(self.jobs.checkpoints, caller().project, request.job_id)
        ]
        return training_pb2.ListCheckpointsResponse(checkpoints=checkpoints)

    async def EstimateJob(self, request: training_pb2.EstimateJobRequest, context):
        estimate, config = await self.jobs.estimate(spec_from_proto(request.spec, caller().project))
        resolved = {k: v for k, v in config.to_dict().items() if k != "auto"}
        return training_pb2.EstimateJobResponse(resolved_hyperparameters=training_pb2.Hyperparameters(**resolved), **estimate)

    async def GetJob(self, request: training_pb2.GetJobRequest, context):
        return training_pb2.GetJobResponse(job=job_to_proto(await asyncio.to_thread(self.jobs.get, caller().project, request.id)))

    async def ListJobs(self, request: training_pb2.ListJobsRequest, context):
        jobs, token = await asyncio.to_thread(
            self.jobs.list, caller().project, state_from_proto(request.state), request.page_size, request.page_token
        )
        return training_pb2.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs], next_page_token=token)

    async def StreamJobEvents(self, request: training_pb2.StreamJobEventsRequest, context):
        async for event in self.jobs.events(caller().project, request.job_id, request.after_sequence):
            yield event_to_proto(event)

    async def ListAdapters(self, request: training_pb2.ListAdaptersRequest, context):
        adapters = await asyncio.to_thread(self.jobs.list_adapters, caller().project)
        return training_pb2.ListAdaptersResponse(adapters=[adapter_to_proto(a) for a in adapters])

    async def DeleteAdapter(self, request: training_pb2.DeleteAdapterRequest, context):
        who = caller()
        who.require_admin("DeleteAdapter")
        if not request.adapter_id:
            raise InvalidArgument.field("adapter_id", "required: the id ListAdapters shows")
        adapter = await asyncio.to_thread(self.jobs.delete_adapter, who.project, request.adapter_id)
        return training_pb2.DeleteAdapterResponse(adapter=adapter_to_proto(adapter))

    async def DownloadAdapter(self, request: training_pb2.DownloadAdapterRequest, context):
        if not request.adapter_id:
            raise InvalidArgument.field("adapter_id", "required: the id ListAdapters shows")
        chunks = self.jobs.adapter_chunks(caller().project, request.adapter_id)
        # Each chunk is read off the event loop.
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            path, size, data = chunk
            yield training_pb2.DownloadAdapterResponse(path=path, file_size_bytes=size, data=data)

    async def WatchAdapters(self, request: training_pb2.WatchAdaptersRequest, context):
        caller().require_operator("WatchAdapters (every project's adapters)")
        async for adapter in self.jobs.adapters(request.after_sequence):
            yield training_pb2.WatchAdaptersResponse(adapter=adapter_to_proto(adapter))
