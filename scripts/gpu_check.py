"""The GPU paths, end to end, in a few minutes on a CUDA machine (`make gpu-check`):

1. a LoRA job with use_gpu: Ray Train's worker on the GPU;
2. a QLoRA job (the base quantised to 4 bits by bitsandbytes);
3. the inference service on the GPU hot-loads both adapters and serves a batch
   that mixes them with the base model;
4. every answer of that batch equals plain PEFT's greedy answer on the same
   device (float32 on both sides, so only a real difference shows);
5. where vLLM is installed (`pip install -e ".[vllm]"`), a second inference
   service on the vLLM engine (TUNEWIRE_INFERENCE_ENGINE=vllm) hot-loads the
   same adapters from the orchestrator and answers the same batch. vLLM's
   LoRA kernels run in bfloat16 or float16, not float32, so its answers are
   compared with PEFT's float32 ones as a share: greedy answers in bfloat16
   drift from float32 ones after a few tokens now and then, and an adapter
   not applied would change nearly every one, so at least half must be
   identical.

Each check prints one line with its figures; the exit status is the number of
checks that failed. `--device cpu` runs the same on a machine without a GPU
(QLoRA needs CUDA and is skipped), which is how the script itself is tested.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

from tunewire.clients.demo import demo_data
from tunewire.clients.local_stack import LocalStack, free_port
from tunewire.clients.sdk import DatasetClient, InferenceClient, TrainingClient
from tunewire.services.common.models import resolve_model
from tunewire.services.common.text import prompt_text
from tunewire.services.inference.vllm_engine import INSTALL_HINT, vllm_available
from tunewire.v1 import training_pb2

BASE_MODEL = "smollm2-135m-instruct"
# The guard is not what is checked here: a budget of 1 publishes and hot-loads whatever the job learns.
HYPERPARAMETERS = {"learning_rate": 1e-3, "epochs": 2, "forgetting_budget": 1.0}
MAX_NEW_TOKENS = 24


class Checks:
    def __init__(self) -> None:
        self.failed = 0

    def report(self, name: str, ok: bool, figures: str) -> None:
        self.failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {figures}", flush=True)


def train(training: TrainingClient, dataset_id: str, method: int, use_gpu: bool, checks: Checks, name: str) -> str:
    """Runs one job to its end; the adapter id ('' if it failed)."""
    started = time.monotonic()
    job = training.create_job(BASE_MODEL, dataset_id, HYPERPARAMETERS, use_gpu=use_gpu, method=method)
    losses = [e.step.loss for e in training.stream_events(job.id, timeout=900) if e.WhichOneof("event") == "step"]
    job = training.get_job(job.id)
    ok = job.state == training_pb2.JOB_STATE_SUCCEEDED and len(losses) > 1 and losses[-1] < losses[0]
    figures = f"{training_pb2.JobState.Name(job.state)} in {time.monotonic() - started:.0f} s, {len(losses)} steps"
    if losses:
        perplexity = dict(job.evaluation.tuned_metrics).get("perplexity", float("nan"))
        figures += f", loss {losses[0]:.3f} -> {losses[-1]:.3f}, test perplexity {perplexity:.2f}"
    checks.report(name, ok, figures + (f"; {job.error}" if job.error else ""))
    return job.adapter_id if ok else ""


class PeftAnswers:
    """Plain transformers + PEFT greedy answers, one prompt at a time."""

    def __init__(self, model_path: str, adapter_dirs: dict[str, Path], device: torch.device):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
        names = list(adapter_dirs)
        self.model = PeftModel.from_pretrained(model, str(adapter_dirs[names[0]]), adapter_name=names[0]).eval()
        for name in names[1:]:
            self.model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
        self.device = device

    def answer(self, prompt: str, adapter: str) -> str:
        text = prompt_text(self.tokenizer, None, prompt, False)
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.device)
        with torch.inference_mode():
            if adapter:
                self.model.set_adapter(adapter)
                out = self.model.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
            else:
                with self.model.disable_adapter():
                    out = self.model.generate(**ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def serve_with_vllm(env: dict, log_dir: Path, adapters: list[str], batch: list[tuple[str, str]], checks: Checks) -> list:
    """A second inference service, on the vLLM engine: its answers to the
    batch once it has hot-loaded the adapters ([] if it could not)."""
    env = env | {
        "TUNEWIRE_INFERENCE_ENGINE": "vllm",
        "TUNEWIRE_INFERENCE_DTYPE": "bfloat16",
        "TUNEWIRE_INFERENCE_PORT": str(free_port()),
        # The built-in engine's service still holds its share of the GPU.
        "TUNEWIRE_VLLM_GPU_MEMORY_UTILIZATION": "0.5",
    }
    started = time.monotonic()
    try:
        with (
            LocalStack(env=env, services=("inference",), log_dir=log_dir / "vllm") as stack,
            InferenceClient(stack.address("inference"), timeout=300) as inference,
        ):
            for adapter in adapters:
                inference.wait_for_adapter(adapter, timeout=300)
            loaded = time.monotonic() - started
            with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
                results = list(pool.map(lambda qa: inference.generate(qa[0], adapter=qa[1], max_new_tokens=MAX_NEW_TOKENS), batch))
    except (RuntimeError, TimeoutError, grpc.RpcError) as error:
        checks.report("vLLM engine", False, str(error)[-2000:])
        return []
    tokens = sum(r.completion_tokens for r in results)
    checks.report(
        "vLLM engine",
        all(r.completion_tokens > 0 for r in results),
        f"served {len(adapters)} adapter(s) {loaded:.0f} s after start, {len(batch)} requests, {tokens} tokens",
    )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu: where training and serving run")
    parser.add_argument("--home", type=Path, default=Path(".tunewire"), help="TUNEWIRE_HOME (reuses its converted model)")
    args = parser.parse_args()
    device = torch.device(args.device)
    use_gpu = device.type == "cuda"
    if use_gpu and not torch.cuda.is_available():
        print("no CUDA device is visible to torch: run on a machine with a GPU, or pass --device cpu", file=sys.stderr)
        return 1
    checks = Checks()
    if use_gpu:
        properties = torch.cuda.get_device_properties(0)
        print(f"GPU: {properties.name}, {properties.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
    home = args.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home, prefix="gpu-check-") as tmp:
        env = {
            "TUNEWIRE_HOME": tmp,
            "TUNEWIRE_MODEL_CACHE": str(home / "models"),
            "TUNEWIRE_INFERENCE_DEVICE": args.device,
            "TUNEWIRE_INFERENCE_DTYPE": "float32",
            **{f"TUNEWIRE_{s}_PORT": str(free_port()) for s in ("DATASET", "TRAINING", "INFERENCE")},
            **{f"TUNEWIRE_{s}_METRICS_PORT": "0" for s in ("DATASET", "TRAINING", "INFERENCE")},
        }
        with (
            LocalStack(env=env, log_dir=Path(tmp) / "logs") as stack,
            DatasetClient(stack.address("dataset")) as datasets,
            TrainingClient(stack.address("training")) as training,
            InferenceClient(stack.address("inference"), timeout=300) as inference,
        ):
            dataset = datasets.upload(demo_data("facts.jsonl"), name="gpu-check").dataset
            adapters = {
                "lora": train(training, dataset.id, training_pb2.TRAINING_METHOD_LORA, use_gpu, checks, f"LoRA job on {device.type}")
            }
            if use_gpu:
                adapters["qlora"] = train(training, dataset.id, training_pb2.TRAINING_METHOD_QLORA, True, checks, "QLoRA job")
            adapters = {name: adapter for name, adapter in adapters.items() if adapter}
            if not adapters:
                return checks.failed
            started = time.monotonic()
            try:
                for adapter in adapters.values():
                    inference.wait_for_adapter(adapter, timeout=300)
            except TimeoutError as error:  # a failed check, not a crash: the rest still report
                checks.report("hot-load", False, str(error))
                return checks.failed
            checks.report(
                "hot-load", True, f"{len(adapters)} adapter(s) served {time.monotonic() - started:.1f} s after the last job ended"
            )

            questions = [json.loads(line)["prompt"] for line in demo_data("facts_heldout.jsonl").read_text().splitlines()[:8]]
            served = [*adapters.values(), ""]
            batch = [(q, served[i % len(served)]) for i, q in enumerate(questions)]
            started = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
                results = list(pool.map(lambda qa: inference.generate(qa[0], adapter=qa[1], max_new_tokens=MAX_NEW_TOKENS), batch))
            seconds = time.monotonic() - started
            tokens = sum(r.completion_tokens for r in results)
            checks.report(
                f"mixed batch on {args.device}",
                all(r.completion_tokens > 0 for r in results),
                f"{len(batch)} requests over {len(served) - 1} adapter(s) and the base model, {tokens} tokens in {seconds:.1f} s",
            )
            engines = {"built-in engine": results}
            if use_gpu and vllm_available():
                engines["vLLM engine"] = serve_with_vllm(env, Path(tmp) / "logs", list(adapters.values()), batch, checks)
            elif use_gpu:
                print(f"SKIP  vLLM engine: vLLM is not installed ({INSTALL_HINT})")

        adapter_dirs = {adapter: Path(tmp) / "artifacts" / "adapters" / adapter for adapter in adapters.values()}
        peft = PeftAnswers(resolve_model(BASE_MODEL, home / "models"), adapter_dirs, device)
        expected = [peft.answer(q, adapter) for q, adapter in batch]
        for engine, answers in engines.items():
            if not answers:
                continue
            same = [r.text.strip() == e.strip() for r, e in zip(answers, expected, strict=True)]
            if engine == "vLLM engine":
                figures = f"{sum(same)} of {len(same)} answers identical (greedy; bfloat16 against PEFT's float32)"
                checks.report(f"{engine} agrees with plain PEFT", 2 * sum(same) >= len(same), figures)
            else:
                checks.report(f"{engine} equal to plain PEFT", all(same), f"{sum(same)} of {len(same)} answers identical (greedy, float32)")
            for (q, adapter), r, e, ok in zip(batch, answers, expected, same, strict=True):
                if not ok:
                    print(f"      {adapter or 'base'} | {q}\n        tunewire: {r.text!r}\n        PEFT:     {e!r}")
    print(f"{checks.failed} check(s) failed" if checks.failed else "all checks passed")
    return checks.failed


if __name__ == "__main__":
    sys.exit(main())
