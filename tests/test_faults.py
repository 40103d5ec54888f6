"""Faults: a service killed with SIGKILL during its busiest operation, then
restarted, still has everything it accepted, consistent; the inference
service's subscription to the orchestrator survives the orchestrator
restarting. (The orchestrator killed mid-training: tests/test_recovery.py.)"""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest

from tunewire.clients.local_stack import LocalStack
from tunewire.clients.sdk import ApiError, DatasetClient, InferenceClient, TrainingClient
from tunewire.services.common.artifacts import ArtifactStore
from tunewire.services.common.settings import load_settings
from tunewire.services.training.server import TrainingDeps
from tunewire.services.training.server import create_server as create_training_server
from tunewire.services.training.store import JobStore

from conftest import CopyAdapterRunner, OneDataset, ServerThread, free_port, prompt_completion_jsonl, write_lora_adapter


def kill(stack: LocalStack, service: str) -> None:
    process = stack.processes[service]
    process.kill()  # SIGKILL: no handler runs, nothing is flushed
    process.wait()


def test_dataset_service_killed_mid_upload_keeps_what_it_accepted(tmp_path):
    env = {"TUNEWIRE_HOME": str(tmp_path / "home"), "TUNEWIRE_DATASET_PORT": str(free_port())}
    accepted = prompt_completion_jsonl(50)
    big = prompt_completion_jsonl(400_000)  # ~33 MB: seconds to stream, validate and write
    first = LocalStack(env=env, services=("dataset",), log_dir=tmp_path / "logs")
    with first, DatasetClient(first.address("dataset"), timeout=120) as client:
        kept = client.upload(accepted, name="kept").dataset
        failure: list[BaseException] = []

        def upload_big() -> None:
            try:
                client.upload(big, name="interrupted")
            except ApiError as error:
                failure.append(error)

        uploading = threading.Thread(target=upload_big)
        uploading.start()
        time.sleep(1.5)  # mid-stream or mid-ingest
        kill(first, "dataset")
        uploading.join(60)
    assert failure and failure[0].code == grpc.StatusCode.UNAVAILABLE  # the caller learns it did not land

    with LocalStack(env=env, services=("dataset",), log_dir=tmp_path / "logs") as second:
        with DatasetClient(second.address("dataset")) as client:
            assert [(d.id, d.name, d.row_count) for d in client.list()] == [(kept.id, "kept", 50)]
            rows = list(client.rows(kept.id))
            assert [r["prompt"] for r in rows] == [json.loads(line)["prompt"] for line in accepted.decode().splitlines()]
            # Nothing of the interrupted upload is visible in the store.
            assert sorted(p.name for p in (tmp_path / "home" / "artifacts" / "datasets").iterdir()) == [kept.id]
            again = client.upload(accepted, name="kept")
            assert again.already_existed and again.dataset.id == kept.id
            assert client.upload(prompt_completion_jsonl(20, start=100), name="after").dataset.row_count == 20


@pytest.mark.timeout(600)
def test_inference_killed_mid_generation_and_orchestrator_restarts(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    training_port = free_port()
    settings = load_settings(home=home, training_port=training_port, model_roots=str(tiny_model_dir))
    runner = CopyAdapterRunner(write_lora_adapter(tiny_model_dir, tmp_path / "prepared", seed=4))

    def orchestrator() -> ServerThread:
        async def make():
            deps = TrainingDeps(JobStore(settings.training_database_url), ArtifactStore(settings.artifact_root), OneDataset(), runner)
            return await create_training_server(settings, deps)

        return ServerThread(make)

    env = {
        "TUNEWIRE_HOME": str(home),
        "TUNEWIRE_INFERENCE_PORT": str(free_port()),
        "TUNEWIRE_TRAINING_ADDRESS": f"127.0.0.1:{training_port}",
        "TUNEWIRE_BASE_MODEL": str(tiny_model_dir),
    }
    model = str(tiny_model_dir)
    with orchestrator() as training, TrainingClient(training.address) as jobs:
        first = jobs.create_job(model, "ds-1").id
        list(jobs.stream_events(first, timeout=60))
        adapter = jobs.get_job(first).adapter_id

        serving = LocalStack(env=env, services=("inference",), log_dir=tmp_path / "logs")
        with serving, InferenceClient(serving.address("inference"), timeout=60) as inference:
            inference.wait_for_adapter(adapter, timeout=60)
            expected = inference.generate("the quick brown fox", adapter=adapter, max_new_tokens=8).text
            outcomes: list[grpc.StatusCode] = []

            def stream() -> None:
                # Generates back to back until the service goes away under it.
                deadline = time.monotonic() + 60
                try:
                    while time.monotonic() < deadline:
                        for _ in inference.generate_stream("the quick brown fox", adapter=adapter, max_new_tokens=64):
                            pass
                    outcomes.append(grpc.StatusCode.OK)
                except ApiError as error:
                    outcomes.append(error.code)

            streams = [threading.Thread(target=stream) for _ in range(6)]
            for thread in streams:
                thread.start()
            time.sleep(1.0)
            kill(serving, "inference")
            for thread in streams:
                thread.join(60)
        # The requests in flight fail with a status saying the service is gone; none hangs.
        assert outcomes == [grpc.StatusCode.UNAVAILABLE] * 6, outcomes

        with (
            LocalStack(env=env, services=("inference",), log_dir=tmp_path / "logs") as restarted,
            InferenceClient(restarted.address("inference"), timeout=60) as inference,
        ):
            # Published before the kill: loaded again from the orchestrator's history.
            inference.wait_for_adapter(adapter, timeout=60)
            assert inference.generate("the quick brown fox", adapter=adapter, max_new_tokens=8).text == expected

            # The orchestrator restarts; the subscription reconnects and the
            # next published adapter is hot-loaded.
            training.__exit__(None, None, None)
            time.sleep(1.0)
            with orchestrator() as training_again, TrainingClient(training_again.address) as jobs_again:
                second = jobs_again.create_job(model, "ds-1").id
                list(jobs_again.stream_events(second, timeout=60))
                new_adapter = jobs_again.get_job(second).adapter_id
                loaded = inference.wait_for_adapter(new_adapter, timeout=60)
                assert loaded.publish_to_servable_seconds > 0
                assert {a.id for a in inference.loaded_adapters().adapters} == {adapter, new_adapter}
