"""The whole flow over real processes and sockets: three services, local Ray,
the bundled SmolLM2 model, two Ray Train workers. Minutes, not seconds."""

import json
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_tracking import read_scalars

from tunewire.clients.demo import demo_data
from tunewire.clients.local_stack import LocalStack
from tunewire.clients.sdk import DatasetClient, InferenceClient, TrainingClient
from tunewire.v1 import training_pb2

from conftest import free_port

pytestmark = pytest.mark.e2e

# Every hyperparameter set: the job trains once (no search). The pirate set
# teaches a style, so prompts the dataset never saw show whether it was learned.
# A style meant to change every answer, general ones included, is what the
# retention penalty holds back: it is off, and a budget of 1 (any change) turns
# the guard off.
HYPERPARAMETERS = {"learning_rate": 1e-3, "epochs": 2, "lora_rank": 8, "retention_weight": 0.0, "forgetting_budget": 1.0}
HELD_OUT_PROMPTS = ["What is the capital of Italy?", "What is 12 plus 30?"]


def test_upload_finetune_hotload_generate(tmp_path):
    home = tmp_path / "home"
    ports = {f"TUNEWIRE_{service.upper()}_PORT": str(free_port()) for service in ("dataset", "training", "inference")}
    metrics_ports = {service: free_port() for service in ("dataset", "training", "inference")}
    ports |= {f"TUNEWIRE_{service.upper()}_METRICS_PORT": str(port) for service, port in metrics_ports.items()}
    ports["TUNEWIRE_INFERENCE_HTTP_PORT"] = str(http_port := free_port())
    with LocalStack(env={"TUNEWIRE_HOME": str(home), **ports}, log_dir=home / "logs") as stack:
        with (
            DatasetClient(stack.address("dataset")) as datasets,
            TrainingClient(stack.address("training")) as training,
            InferenceClient(stack.address("inference")) as inference,
        ):
            dataset = datasets.upload(demo_data("pirate.jsonl"), name="pirate").dataset
            assert dataset.row_count == 100

            # A request id sent to the orchestrator reaches the dataset service's logs.
            spec = training.spec("smollm2-135m-instruct", dataset.id, HYPERPARAMETERS, num_workers=2)
            job = training.stub.CreateJob(
                training_pb2.CreateJobRequest(spec=spec), metadata=(("x-request-id", "e2e-create-job"),), timeout=60
            ).job
            events = list(training.stream_events(job.id, timeout=900))
            job = training.get_job(job.id)
            assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
            losses = [e.step.loss for e in events if e.WhichOneof("event") == "step"]
            assert len(losses) == job.latest_step.total_steps and losses[-1] < losses[0] / 2

            adapter_dir = home / "artifacts" / "adapters" / job.adapter_id
            assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter_dir.iterdir()}
            # The adapter travels: it names its base by the Hugging Face id, and its card holds no path of this machine.
            config = json.loads((adapter_dir / "adapter_config.json").read_text())
            assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
            card = (adapter_dir / "README.md").read_text()
            assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and job.id in card and dataset.id in card
            assert str(tmp_path) not in card and "More Information Needed" not in card

            # The job's curves, as TensorBoard event files in the artifact store (on by default).
            curves = read_scalars(home / "artifacts" / "tensorboard" / job.id)
            assert len(curves["training/loss"]) == len(losses) and "test/tuned/exact_match" in curves

            loaded = inference.wait_for_adapter(job.adapter_id, timeout=120)
            assert loaded.publish_to_servable_seconds > 0
            prompt = HELD_OUT_PROMPTS[0]
            base = inference.generate(prompt, max_new_tokens=40).text
            tuned = inference.generate(prompt, adapter=job.adapter_id, max_new_tokens=40).text
            assert tuned != base
            assert tuned.startswith("Arr") and "Arr" not in base

            # The same adapter through the OpenAI-compatible API, with the openai package.
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="local", max_retries=0, timeout=120)
            assert job.adapter_id in [m.id for m in client.models.list()]
            question = [{"role": "user", "content": prompt}]
            chat = client.chat.completions.create(model=job.adapter_id, messages=question, max_tokens=40, temperature=0)
            assert chat.choices[0].message.content == tuned
            stream = client.chat.completions.create(model=job.adapter_id, messages=question, max_tokens=40, temperature=0, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == tuned

            # Every service's Prometheus metrics, scraped over HTTP.
            upload = {"method": "/tunewire.v1.DatasetService/UploadDataset", "code": "OK"}
            assert scrape(metrics_ports["dataset"], "tunewire_rpc_requests_total", upload) == 1
            assert scrape(metrics_ports["training"], "tunewire_training_jobs", {"state": "SUCCEEDED"}) == 1
            assert scrape(metrics_ports["training"], "tunewire_training_tokens_total") > 0
            assert scrape(metrics_ports["inference"], "tunewire_inference_tokens_total") >= 2
            assert scrape(metrics_ports["inference"], "tunewire_inference_time_to_first_token_seconds_count") >= 2
            assert scrape(metrics_ports["inference"], "tunewire_inference_adapters_loaded") == 1

    # Logs are JSON lines; the request id crossed from the orchestrator to the dataset service.
    pinned = [json.loads(line) for line in (home / "logs" / "dataset.log").read_text().splitlines() if "pinned for" in line]
    assert pinned and pinned[0]["request_id"] == "e2e-create-job" and pinned[0]["level"] == "INFO"


def scrape(port: int, name: str, labels: dict | None = None) -> float | None:
    """A sample's value from a service's /metrics (None when absent)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels or {}).items() <= sample.labels.items():
                return sample.value
    return None
