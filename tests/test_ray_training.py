"""Real Ray Train runs of the training loop on a tiny model: two CPU workers,
Ray Data shards from Parquet, a PEFT adapter at the end."""

import asyncio
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunewire.services.training.config import resolve_config
from tunewire.services.training.ray_runner import RayTrainRunner
from tunewire.services.training.scheduler import JobFailed
from tunewire.services.training.store import Job


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    runner = RayTrainRunner(ray_address="", num_cpus=4, storage_path=str(root / "runs"), model_cache=root / "models")
    runner.start()
    yield runner
    runner.shutdown()


def make_job(tmp_path, model_dir, rows: int, workers: int, **hyperparameters) -> Job:
    table = pa.table(
        {
            "prompt": [f"What is {i} plus {i}?" for i in range(rows)],
            "completion": [f"Arr, {2 * i}." for i in range(rows)],
            "split": ["validation" if i % 5 == 0 else "train" for i in range(rows)],
        }
    )
    pq.write_table(table, tmp_path / "data.parquet")
    train = sum(1 for s in table.column("split").to_pylist() if s == "train")
    config = resolve_config({"epochs": 2, "batch_size": 4, "learning_rate": 5e-3, **hyperparameters}, train)
    return Job(
        id="job-test",
        state="RUNNING",
        spec={"base_model": str(model_dir), "num_workers": workers, "use_gpu": False, "method": "lora"},
        config=config.to_dict(),
        dataset={"uri": str(tmp_path / "data.parquet"), "train_rows": train, "validation_rows": rows - train},
    )


async def train(runner, job):
    events = []
    async with runner.run(job, lambda kind, data: events.append((kind, data))) as adapter_dir:
        files = {p.name: p.read_bytes() for p in adapter_dir.iterdir()}
    return events, files


def test_two_workers_train_a_loadable_lora_adapter(runner, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job = make_job(tmp_path, tiny_model_dir, rows=40, workers=2)
    events, files = asyncio.run(train(runner, job))

    steps = [d for kind, d in events if kind == "step"]
    # 32 training rows, 16 per worker, batches of 4: 4 steps an epoch.
    assert [s["step"] for s in steps] == list(range(1, 9))
    assert all(s["total_steps"] == 8 and s["tokens_per_second"] > 0 for s in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    evals = [d for kind, d in events if kind == "eval"]
    assert [e["step"] for e in evals] == [4, 8] and evals[-1]["loss"] > 0

    assert {"adapter_config.json", "adapter_model.safetensors", "tunewire_adapter.json"} <= set(files)
    config = json.loads(files["adapter_config.json"])
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(tiny_model_dir)
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    for name, data in files.items():
        (adapter_dir / name).write_bytes(data)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter_dir))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b)  # trained, not the zero init


def test_gpu_job_without_gpus_fails_clearly(runner, tiny_model_dir, tmp_path):
    job = make_job(tmp_path, tiny_model_dir, rows=10, workers=1)
    job = Job(**{**job.__dict__, "spec": {**job.spec, "use_gpu": True}})
    with pytest.raises(JobFailed) as caught:
        asyncio.run(train(runner, job))
    assert caught.value.user_error and "GPU" in str(caught.value)


def test_a_worker_error_fails_the_job_with_its_message(runner, tmp_path):
    job = make_job(tmp_path, tmp_path / "missing-model", rows=10, workers=1)
    with pytest.raises(JobFailed) as caught:
        asyncio.run(train(runner, job))
    assert "missing-model" in str(caught.value)
