"""InferenceService over real gRPC: generation, NOT_FOUND, and hot-loading of
an adapter that a real TrainingService publishes, while requests run."""

import concurrent.futures
import json
import time
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from tunewire.clients.cli import app
from tunewire.clients.sdk import ApiError, InferenceClient, TrainingClient
from tunewire.services.common.artifacts import ArtifactStore
from tunewire.services.common.settings import load_settings
from tunewire.services.inference.core import InferenceManager
from tunewire.services.inference.engine import BatchEngine, EngineLimits
from tunewire.services.inference.server import InferenceDeps
from tunewire.services.inference.server import create_server as create_inference_server
from tunewire.services.training.server import TrainingDeps
from tunewire.services.training.server import create_server as create_training_server
from tunewire.services.training.store import JobStore
from tunewire.v1 import inference_pb2, training_pb2

from conftest import CopyAdapterRunner, OneDataset, ServerThread, write_lora_adapter


@pytest.fixture
def services(tmp_path, tiny_model_dir):
    settings = load_settings(home=tmp_path / "home", base_model=str(tiny_model_dir), model_roots=str(tiny_model_dir))
    adapter = write_lora_adapter(tiny_model_dir, tmp_path / "prepared")

    async def make_training():
        deps = TrainingDeps(
            JobStore(settings.training_database_url), ArtifactStore(settings.artifact_root), OneDataset(), CopyAdapterRunner(adapter)
        )
        return await create_training_server(settings, deps, port=0)

    with ServerThread(make_training) as training:

        async def make_inference():
            engine = BatchEngine(settings.base_model, settings.model_cache, EngineLimits(max_queued_requests=48))
            manager = InferenceManager(engine, ArtifactStore(settings.artifact_root), tmp_path / "adapter-cache", (str(tmp_path / "own"),))
            return await create_inference_server(settings, InferenceDeps(manager, training.address), port=0)

        with (
            ServerThread(make_inference) as inference,
            TrainingClient(training.address) as tc,
            InferenceClient(inference.address, timeout=60) as ic,
        ):
            yield tc, ic, str(tiny_model_dir), tmp_path


def test_unary_and_stream_agree_and_unknown_adapter_is_not_found(services):
    _, client, _, _ = services
    unary = client.generate("hello", max_new_tokens=8)
    streamed = list(client.generate_stream("hello", max_new_tokens=8))
    assert "".join(s.text_delta for s in streamed) == unary.text
    assert streamed[-1].completion_tokens == unary.completion_tokens > 0
    assert streamed[-1].finish_reason == unary.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED
    chat = client.generate(messages=[{"role": "user", "content": "hello"}], max_new_tokens=8)
    assert chat.text == unary.text  # a prompt is one user turn
    with pytest.raises(ApiError) as caught:
        client.generate("hello", adapter="ad-nope")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ApiError) as caught:
        client.generate("hello", max_new_tokens=100000)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.violations[0].field == "sampling.max_new_tokens"


def test_published_adapter_is_hot_loaded_while_requests_run(services):
    training, inference, model_dir, _ = services
    base = inference.generate("the quick brown fox", max_new_tokens=10).text
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        # Streams keep arriving while the job runs and its adapter is loaded.
        inflight = [pool.submit(_streamed_text, inference, "the quick brown fox", 10) for _ in range(40)]
        job = training.create_job(model_dir, "ds-1")
        events = list(training.stream_events(job.id, timeout=60))
        job = training.get_job(job.id)
        loaded = inference.wait_for_adapter(job.adapter_id, timeout=60)
        results = [f.result(timeout=120) for f in inflight]
    assert results == [base] * 40  # none failed, none changed
    assert events[-1].state == training_pb2.JOB_STATE_SUCCEEDED
    assert loaded.publish_to_servable_seconds > 0
    tuned = inference.generate("the quick brown fox", max_new_tokens=10, adapter=job.adapter_id).text
    assert tuned != base
    assert inference.generate("the quick brown fox", max_new_tokens=10).text == base
    assert [a.id for a in inference.loaded_adapters().adapters] == [job.adapter_id]


def test_a_deleted_adapter_is_unloaded(services):
    training, inference, model_dir, _ = services
    job = training.create_job(model_dir, "ds-1")
    list(training.stream_events(job.id, timeout=60))
    adapter_id = training.get_job(job.id).adapter_id
    inference.wait_for_adapter(adapter_id, timeout=60)
    training.delete_adapter(adapter_id)
    deadline = time.monotonic() + 30
    while inference.loaded_adapters().adapters and time.monotonic() < deadline:
        time.sleep(0.05)
    assert inference.loaded_adapters().adapters == []
    with pytest.raises(ApiError) as caught:
        inference.generate("hello", adapter=adapter_id)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def _streamed_text(client, prompt, max_new_tokens, adapter=""):
    return "".join(part.text_delta for part in client.generate_stream(prompt, max_new_tokens=max_new_tokens, adapter=adapter))


def test_load_unload_and_classify_over_grpc(services, tiny_model_dir):
    _, client, _, tmp_path = services
    own = tmp_path / "own"
    write_lora_adapter(tiny_model_dir, own / "mine", seed=7)
    write_lora_adapter(tiny_model_dir, own / "classifier", seed=8, classes=3)
    loaded = client.load_adapter("mine", str(own / "mine"))
    assert (loaded.task_type, loaded.rank, loaded.resident) == ("CAUSAL_LM", 4, True)
    assert client.load_adapter("mine", str(own / "mine")).load_time == loaded.load_time  # idempotent
    base = client.generate("hello", max_new_tokens=8).text
    assert client.generate("hello", max_new_tokens=8, adapter="mine").text != base

    classifier = client.load_adapter("sentiment", str(own / "classifier"))
    assert list(classifier.labels) == ["LABEL_0", "LABEL_1", "LABEL_2"]
    result = client.classify("the quick brown fox", adapter="sentiment")
    assert result.label == result.scores[0].label and len(result.scores) == 3
    assert sum(s.score for s in result.scores) == pytest.approx(1.0, abs=1e-5)

    def code(call, *args, **kwargs):
        with pytest.raises(ApiError) as caught:
            call(*args, **kwargs)
        return caught.value.code, caught.value.violations[0].field if caught.value.violations else ""

    assert code(client.classify, "hi", adapter="mine") == (grpc.StatusCode.INVALID_ARGUMENT, "adapter")
    assert code(client.generate, "hi", adapter="sentiment") == (grpc.StatusCode.INVALID_ARGUMENT, "adapter")
    assert code(client.load_adapter, "../x", str(own / "mine")) == (grpc.StatusCode.INVALID_ARGUMENT, "id")
    assert code(client.load_adapter, "other", "/etc") == (grpc.StatusCode.INVALID_ARGUMENT, "source_uri")
    assert code(client.load_adapter, "other", str(own / "absent")) == (grpc.StatusCode.NOT_FOUND, "")
    (own / "empty").mkdir()
    assert code(client.load_adapter, "other", str(own / "empty")) == (grpc.StatusCode.INVALID_ARGUMENT, "source")
    assert code(client.load_adapter, "mine", str(own / "classifier")) == (grpc.StatusCode.FAILED_PRECONDITION, "")
    assert sorted(a.id for a in client.loaded_adapters().adapters) == ["mine", "sentiment"]

    client.unload_adapter("mine")
    assert code(client.generate, "hi", adapter="mine") == (grpc.StatusCode.NOT_FOUND, "")
    assert code(client.unload_adapter, "mine") == (grpc.StatusCode.NOT_FOUND, "")
    assert [a.id for a in client.loaded_adapters().adapters] == ["sentiment"]


def test_a_cancelled_stream_leaves_the_batch(services, tiny_model_dir):
    _, client, _, tmp_path = services
    write_lora_adapter(tiny_model_dir, tmp_path / "own" / "slow", seed=9)
    client.load_adapter("slow", str(tmp_path / "own" / "slow"))
    stream = client.stub.GenerateStream(
        inference_pb2.GenerateStreamRequest(adapter="slow", prompt="hello", sampling=inference_pb2.SamplingParams(max_new_tokens=240))
    )
    next(stream)
    stream.cancel()
    in_flight = [a.requests_in_flight for a in client.loaded_adapters().adapters]
    assert in_flight in ([0], [1])
    deadline = time.monotonic() + 10
    while client.loaded_adapters().adapters[0].requests_in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.loaded_adapters().adapters[0].requests_in_flight == 0
    assert client.generate("hello", max_new_tokens=4, adapter="slow").completion_tokens == 4


def test_an_adapter_over_its_forgetting_budget_is_published_but_not_hot_loaded(services):
    training, inference, model_dir, tmp_path = services
    report = tmp_path / "prepared" / "evaluation.json"
    report.write_text(json.dumps({"within_forgetting_budget": False}))
    held = training.create_job(model_dir, "ds-1", {"learning_rate": 1e-3})
    list(training.stream_events(held.id, timeout=60))
    held = training.get_job(held.id)
    assert held.state == training_pb2.JOB_STATE_SUCCEEDED
    assert {a.id: a.held_back for a in training.list_adapters()} == {held.adapter_id: True}
    # The next adapter, within its budget, is hot-loaded: the held-back one was seen and passed over.
    report.write_text(json.dumps({"within_forgetting_budget": True}))
    kept = training.create_job(model_dir, "ds-1", {"learning_rate": 1e-3})
    list(training.stream_events(kept.id, timeout=60))
    kept = training.get_job(kept.id)
    inference.wait_for_adapter(kept.adapter_id, timeout=60)
    assert [a.id for a in inference.loaded_adapters().adapters] == [kept.adapter_id]
    # Asked for explicitly, the held-back adapter is served.
    uri = next(a.uri for a in training.list_adapters() if a.id == held.adapter_id)
    inference.load_adapter(held.adapter_id, uri)
    assert inference.generate("the quick brown fox", max_new_tokens=4, adapter=held.adapter_id).text


def test_a_downloaded_adapter_loads_with_plain_peft_and_answers_as_the_service_does(services, tmp_path):
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    training, inference, model_dir, _ = services
    job = training.create_job(model_dir, "ds-1")
    list(training.stream_events(job.id, timeout=60))
    adapter_id = training.get_job(job.id).adapter_id
    inference.wait_for_adapter(adapter_id, timeout=60)
    published = ArtifactStore(load_settings(home=tmp_path / "home").artifact_root).path("adapters", adapter_id)

    seen = []
    out = training.download_adapter(adapter_id, tmp_path / "downloaded" / adapter_id, on_bytes=seen.append)
    files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert files == {p.relative_to(published): p.read_bytes() for p in Path(published).rglob("*") if p.is_file()}
    assert sum(seen) == sum(len(b) for b in files.values()) and not list((tmp_path / "downloaded").glob(".*"))

    # The directory alone is enough for PEFT: it names its base model.
    model = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("the quick brown fox", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        greedy = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    served = inference.generate("the quick brown fox", max_new_tokens=10, adapter=adapter_id, raw_prompt=True).text
    assert tokenizer.decode(greedy[0, ids.shape[1] :], skip_special_tokens=True) == served

    # Merged into its base (merge_and_unload): a plain transformers model that answers the same.
    from transformers import AutoModelForCausalLM

    merged_dir = tmp_path / "merged"
    merging = CliRunner().invoke(app, ["adapters", "merge", adapter_id, "--out", str(merged_dir), "--training-address", training.address])
    assert merging.exit_code == 0, merging.output
    assert not (merged_dir / "adapter_config.json").exists() and (merged_dir / "config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.inference_mode():
        greedy = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    assert tokenizer.decode(greedy[0, ids.shape[1] :], skip_special_tokens=True) == served
    # As a GGUF LoRA file for llama.cpp (tests/test_gguf_export.py checks its contents).
    import gguf

    gguf_cli = ["adapters", "gguf", adapter_id, "--out", str(tmp_path / "adapter.gguf"), "--training-address", training.address]
    exporting = CliRunner().invoke(app, gguf_cli)
    assert exporting.exit_code == 0, exporting.output
    assert gguf.GGUFReader(tmp_path / "adapter.gguf").fields["adapter.type"].contents() == "lora"
    again = CliRunner().invoke(app, gguf_cli)
    assert again.exit_code == 1 and "exists" in again.stderr

    with pytest.raises(FileExistsError):
        training.download_adapter(adapter_id, out)
    # The CLI: the same files, and a clear error for a directory that exists.
    cli = ["adapters", "download", adapter_id, "--training-address", training.address]
    assert CliRunner().invoke(app, [*cli, "--out", str(tmp_path / "by-cli")]).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "by-cli").iterdir()) == sorted(p.name for p in out.iterdir())
    again = CliRunner().invoke(app, [*cli, "--out", str(tmp_path / "by-cli")])
    assert again.exit_code == 1 and "exists" in again.stderr
    # `get --json` for scripts: the job, and the adapter it published.
    address = ["--training-address", training.address, "--json"]
    job_json = json.loads(CliRunner().invoke(app, ["jobs", "get", job.id, *address]).stdout)
    assert job_json["id"] == job.id and job_json["adapter_id"] == adapter_id and job_json["state"] == "JOB_STATE_SUCCEEDED"
    adapter_json = json.loads(CliRunner().invoke(app, ["adapters", "get", adapter_id, *address]).stdout)
    assert adapter_json["job_id"] == job.id and int(adapter_json["size_bytes"]) == sum(len(b) for b in files.values())
    with pytest.raises(ApiError) as caught:
        training.download_adapter("ad-never", tmp_path / "never")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND and not (tmp_path / "never").exists()


def test_the_asyncio_client_runs_a_job_and_streams_from_its_adapter(services):
    import asyncio

    from tunewire.clients.aio import AsyncInferenceClient, AsyncTrainingClient
    from tunewire.clients.sdk import NotFoundError

    training, inference, model_dir, _ = services

    async def scenario():
        async with AsyncTrainingClient(training.address) as jobs, AsyncInferenceClient(inference.address) as serving:
            job = await jobs.create_job(model_dir, "ds-1")
            states = [e.state async for e in jobs.stream_events(job.id, timeout=60) if e.WhichOneof("event") == "state"]
            job = await jobs.get_job(job.id)
            await serving.wait_for_adapter(job.adapter_id, timeout=60)
            parts = serving.generate_stream("the quick brown fox", adapter=job.adapter_id, max_new_tokens=10, raw_prompt=True)
            streamed = "".join([p.text_delta async for p in parts])
            unary = await serving.generate("the quick brown fox", adapter=job.adapter_id, max_new_tokens=10, raw_prompt=True)
            with pytest.raises(NotFoundError):
                await serving.generate("hello", adapter="ad-never")
            return states, job, streamed, unary.text

    states, job, streamed, unary = asyncio.run(scenario())
    assert states[-1] == training_pb2.JOB_STATE_SUCCEEDED and job.adapter_id
    assert streamed == unary == inference.generate("the quick brown fox", adapter=job.adapter_id, max_new_tokens=10, raw_prompt=True).text
