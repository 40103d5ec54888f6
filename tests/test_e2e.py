"""The whole flow over real processes and sockets: three services, local Ray,
the bundled SmolLM2 model, two Ray Train workers. Minutes, not seconds."""

import pytest

from tunewire.clients.demo import HELD_OUT_PROMPTS, HYPERPARAMETERS, demo_dataset
from tunewire.clients.local_stack import LocalStack
from tunewire.clients.sdk import DatasetClient, InferenceClient, TrainingClient
from tunewire.v1 import training_pb2

pytestmark = pytest.mark.e2e


def test_upload_finetune_hotload_generate(tmp_path):
    home = tmp_path / "home"
    ports = {"TUNEWIRE_DATASET_PORT": "50151", "TUNEWIRE_TRAINING_PORT": "50152", "TUNEWIRE_INFERENCE_PORT": "50153"}
    with LocalStack(env={"TUNEWIRE_HOME": str(home), **ports}, log_dir=home / "logs") as stack:
        with (
            DatasetClient(stack.address("dataset")) as datasets,
            TrainingClient(stack.address("training")) as training,
            InferenceClient(stack.address("inference")) as inference,
        ):
            dataset = datasets.upload(demo_dataset(), name="pirate").dataset
            assert dataset.row_count == 100

            job = training.create_job("smollm2-135m-instruct", dataset.id, HYPERPARAMETERS, num_workers=2)
            events = list(training.stream_events(job.id, timeout=900))
            job = training.get_job(job.id)
            assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
            losses = [e.step.loss for e in events if e.WhichOneof("event") == "step"]
            assert len(losses) == job.latest_step.total_steps and losses[-1] < losses[0] / 2

            adapter_dir = home / "artifacts" / "adapters" / job.adapter_id
            assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter_dir.iterdir()}

            loaded = inference.wait_for_adapter(job.adapter_id, timeout=120)
            assert loaded.publish_to_servable_seconds > 0
            prompt = HELD_OUT_PROMPTS[0]
            base = inference.generate(prompt, max_new_tokens=40).text
            tuned = inference.generate(prompt, adapter=job.adapter_id, max_new_tokens=40).text
            assert tuned != base
            assert tuned.startswith("Arr") and "Arr" not in base
