"""Multi-adapter inference throughput of the inference service (over gRPC, a
service process) on the bundled SmolLM2-135M, against plain PEFT baselines
in the same run:

- 8 concurrent requests over 4 adapters (a mixed batch), on 1 adapter, and
  on the base model alone;
- PEFT's mixed-adapter batch (`generate(adapter_names=...)`) and its
  single-adapter batch of 8;
- the same 8 requests one at a time, through the service and with plain
  PEFT `generate`; and on the base model (a single stream) through the
  service and with plain transformers `model.generate`;
- LoadAdapter: the wall time until a new adapter is servable;
- many adapters (S-LoRA's case): 64 adapters over the service's 8 slots,
  8 concurrent clients sending 64 requests each naming one adapter, spread
  uniformly and Zipf-like (s = 1): throughput, p50/p99 latency, and how long
  an evicted adapter took to come back (from the service's log);
- a long prompt (4,000 tokens) admitted while a stream decodes: the
  stream's gaps between tokens meanwhile against its gaps alone (chunked,
  paced prefill; target: the mean at most 2×), its longest pause, and the
  long prompt's own time to its first token;
- llama.cpp's llama-server (bench/llama_cpp.py) on the same requests, where
  `make llama-server` built it: the same base model converted to GGUF at the
  same precision, the same adapters exported by `tunewire adapters gguf`;
  a second table (inference-vs-llama-cpp-*) puts each against tunewire with
  the target ratio. `--no-llama-cpp` leaves those rows out.

All engines are up at once and every row is measured once a round, in
turns, each keeping its best of --repeats rounds: on a machine whose speed
drifts through a run, every row gets the same moments of it, and the
ratios between rows hold.

Throughput counts real completion tokens (up to each row's end of turn or
max_new_tokens), so padding and finished rows count for nothing.

    .venv/bin/python -m bench.inference
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import random
import re
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import write_results
from tunewire.clients.local_stack import LocalStack
from tunewire.clients.sdk import InferenceClient
from tunewire.services.common.models import resolve_model
from tunewire.services.common.text import prompt_text
from tunewire.services.inference.engine import serving_dtype

BASE_MODEL = "smollm2-135m-instruct"
# The scenarios tunewire and llama-server both run, with tunewire's target
# against llama-server (≥ 3× on mixed adapters, ≥ 1× batched,
# ≥ 0.8× a single stream, which the machine's memory bandwidth bounds).
MIXED, SINGLE, BASE, ONE_AT_A_TIME, STREAM = (
    "8 concurrent, 4 adapters",
    "8 concurrent, 1 adapter",
    "8 concurrent, base model",
    "8 one at a time, 4 adapters",
    "single stream, base model",
)
TARGETS_VS_LLAMA_CPP = {MIXED: 3.0, SINGLE: 1.0, BASE: 1.0, ONE_AT_A_TIME: None, STREAM: 0.8}
PROMPTS = [
    "Write a long story about a dragon who learns to cook.",
    "Explain how rain forms, in detail.",
    "List twenty fruits and describe each one.",
    "Tell me about the history of Rome.",
    "Describe a day at the beach from morning to night.",
    "Write a poem about the sea and the wind.",
    "How do computers store numbers?",
    "Explain photosynthesis step by step.",
]


def make_adapters(model_path: str, out: Path, count: int, rank: int) -> list[Path]:
    """LoRA adapters like tunewire's jobs produce (all linear layers), with
    small random weights so outputs stay fluent but differ."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    model = AutoModelForCausalLM.from_pretrained(model_path)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False))
    peft_model.peft_config["default"].base_model_name_or_path = BASE_MODEL
    for i in range(count):
        torch.manual_seed(i)
        with torch.no_grad():
            for module in peft_model.modules():
                if hasattr(module, "reset_lora_parameters") and "default" in getattr(module, "lora_A", {}):
                    module.reset_lora_parameters("default", False)
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.mul_(0.01)
        peft_model.save_pretrained(out / f"adapter-{i}")
        paths.append(out / f"adapter-{i}")
    return paths


def many_adapters_run(client: InferenceClient, names: list[str], requests: int, max_new_tokens: int, zipf: bool) -> dict:
    """`requests` requests from 8 concurrent clients, each naming one of
    `names`, drawn uniformly or Zipf-like (the k-th name with weight 1/k):
    tokens, seconds, latency percentiles and how many adapters were used."""

    def one(adapter: str) -> tuple[int, float]:
        start = time.perf_counter()
        tokens = client.generate(PROMPTS[hash(adapter) % len(PROMPTS)], adapter=adapter, max_new_tokens=max_new_tokens).completion_tokens
        return tokens, time.perf_counter() - start

    weights = [1 / (k + 1) for k in range(len(names))] if zipf else [1.0] * len(names)
    draws = random.Random(0).choices(names, weights=weights, k=requests)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, draws))
    latencies = sorted(seconds for _, seconds in results)
    return {
        "tokens": sum(tokens for tokens, _ in results),
        "seconds": time.perf_counter() - start,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "adapters": len(set(draws)),
    }


# A text the model goes on counting from (no chat turn to end): the stream
# must outlast the long prompt's prefill.
ENDLESS_PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


def token_times(stream, times: list[float], stop: threading.Event | None = None) -> None:
    """Appends the arrival time of each text delta of a GenerateStream; ends
    the stream once `stop` is set (closing it cancels the call)."""
    for message in stream:
        if message.text_delta:
            times.append(time.perf_counter())
        if stop is not None and stop.is_set():
            stream.close()
            return


def long_prompt_latency(client: InferenceClient, tokenizer, prompt_tokens: int) -> dict:
    """A base-model stream's mean gap between tokens alone, and while a
    prompt of `prompt_tokens` tokens is prefilled (from its submission to its
    first token): the mean and longest gap then, and that prompt's wait."""
    words = " ".join(PROMPTS * 200)
    long_prompt = tokenizer.decode(tokenizer(words, add_special_tokens=False)["input_ids"][:prompt_tokens])
    alone: list[float] = []
    token_times(client.generate_stream(ENDLESS_PROMPT, raw_prompt=True, max_new_tokens=96), alone)
    if len(alone) < 10:
        raise RuntimeError(f"the stream alone ended after {len(alone)} tokens: too few to time")
    usual = statistics.mean(b - a for a, b in zip(alone[1:], alone[2:], strict=False))
    during: list[float] = []
    failed: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            token_times(client.generate_stream(ENDLESS_PROMPT, raw_prompt=True, max_new_tokens=2048), during, stop)
        except BaseException as error:  # re-raised below
            failed.append(error)

    reader = threading.Thread(target=read)
    reader.start()
    started = time.perf_counter()
    while len(during) < 8 and reader.is_alive() and time.perf_counter() - started < 120:
        time.sleep(0.01)
    if len(during) < 8:
        stop.set()
        reader.join()
        raise RuntimeError(f"the running stream gave {len(during)} tokens before the long prompt: {failed or 'it ended'}")
    submitted = time.perf_counter()
    client.generate(long_prompt, raw_prompt=True, max_new_tokens=1)
    answered = time.perf_counter()
    outlasted = reader.is_alive()
    stop.set()
    reader.join()
    if failed or not outlasted:
        raise RuntimeError(f"the running stream ended before the long prompt was answered: {failed or 'it finished'}")
    gaps = [b - a for a, b in zip(during, during[1:], strict=False) if submitted < b <= answered]
    return {"usual": usual, "mean": statistics.mean(gaps), "longest": max(gaps), "gaps": len(gaps), "wait": answered - submitted}


def reload_times(log_path: Path) -> list[float]:
    """Milliseconds each evicted adapter took to come back, from the service's log."""
    return [float(ms) for ms in re.findall(r"reloaded into slot \d+ from host memory in ([\d.]+) ms", log_path.read_text())]


def timed_requests(one, count: int, concurrent_requests: bool) -> tuple[int, float]:
    """Requests 0..count-1 (`one(i)` returns its completion tokens), all at
    once or one at a time: (tokens, seconds)."""
    start = time.perf_counter()
    if concurrent_requests:
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            tokens = sum(pool.map(one, range(count)))
    else:
        tokens = sum(one(i) for i in range(count))
    return tokens, time.perf_counter() - start


def service_run(client: InferenceClient, adapters: list[str], max_new_tokens: int, concurrent_requests: bool) -> tuple[int, float]:
    def one(i: int) -> int:
        return client.generate(PROMPTS[i], adapter=adapters[i], max_new_tokens=max_new_tokens).completion_tokens

    return timed_requests(one, len(adapters), concurrent_requests)


class LlamaCppBaseline:
    """llama-server (bench/llama_cpp.py) serving the same base model,
    converted to GGUF at the same precision, with the same adapters exported
    by `tunewire adapters gguf`; a context manager (the server's process)."""

    def __init__(self, model_path: str, adapter_dirs: list[Path], home: Path, work: Path, dtype_name: str, max_new_tokens: int):
        from transformers import AutoTokenizer

        from bench.llama_cpp import LlamaServer, convert_base
        from tunewire.clients.export import adapter_to_gguf

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.prompts = [prompt_text(tokenizer, None, p, False) for p in PROMPTS]
        self.max_new_tokens = max_new_tokens
        base = convert_base(model_path, home / "llama-cpp", dtype_name)
        loras = [adapter_to_gguf(path, work / f"{path.name}.gguf", home / "models") for path in adapter_dirs]
        # Each slot holds a prompt (under 100 tokens here) and its answer.
        self.server = LlamaServer(base, loras, work / "llama-server.log", context_per_slot=max_new_tokens + 256)

    def __enter__(self) -> LlamaCppBaseline:
        self.server.__enter__()
        self.server.generate(self.prompts[0], 0, 4)  # warm-up
        return self

    def __exit__(self, *exc) -> None:
        self.server.__exit__(*exc)

    def timed(self, adapters: list[int | None], concurrent_requests: bool) -> tuple[int, float]:
        """The prompts, prompt i with adapters[i] (None: the base model)."""
        return timed_requests(
            lambda i: self.server.generate(self.prompts[i], adapters[i], self.max_new_tokens)[0], len(self.prompts), concurrent_requests
        )

    def answers(self) -> list[str]:
        """Greedy answers to the first four prompts, prompt i with adapter i."""
        return [self.server.generate(self.prompts[i], i, self.max_new_tokens)[1] for i in range(4)]


def best_of_rounds(measures: list[tuple[str, Callable[[], tuple[int, float]]]], rounds: int) -> list[tuple[str, int, float]]:
    """Runs the measures one after another, `rounds` times over, and keeps
    each one's fastest (what, tokens, seconds). Each measure so samples the
    whole run rather than a few minutes of it: a machine whose speed drifts
    during the run moves them all alike, and their ratios hold."""
    best: dict[str, tuple[int, float]] = {}
    for _ in range(rounds):
        for what, measure in measures:
            tokens, seconds = measure()
            if what not in best or tokens / seconds > best[what][0] / best[what][1]:
                best[what] = (tokens, seconds)
    return [(what, *best[what]) for what, _ in measures]


class PeftBaseline:
    """Plain PEFT + transformers generate, as one would serve without
    tunewire; with no adapters, plain transformers `model.generate`."""

    def __init__(self, model_path: str, adapter_dirs: list[Path], dtype):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
        if adapter_dirs:
            self.model = PeftModel.from_pretrained(self.model, str(adapter_dirs[0]), adapter_name="adapter-0").eval()
        for i, path in enumerate(adapter_dirs[1:], start=1):
            self.model.load_adapter(str(path), adapter_name=f"adapter-{i}")
        self.eos = self.model.generation_config.eos_token_id

    def run(self, prompts: list[str], adapter_names: list[str] | None, max_new_tokens: int) -> int:
        texts = [prompt_text(self.tokenizer, None, p, False) for p in prompts]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        options = {"adapter_names": adapter_names} if adapter_names is not None and len(set(adapter_names)) > 1 else {}
        if adapter_names is not None and len(set(adapter_names)) == 1:
            self.model.set_adapter(adapter_names[0])
        with self.torch.inference_mode():
            out = self.model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id, **options
            )
        return sum(_real_tokens(row.tolist(), self.eos) for row in out[:, batch["input_ids"].shape[1] :])

    def timed(self, prompts, adapter_names, max_new_tokens, one_at_a_time=False) -> tuple[int, float]:
        start = time.perf_counter()
        if one_at_a_time:
            names = adapter_names or [None] * len(prompts)
            tokens = sum(self.run([p], None if a is None else [a], max_new_tokens) for p, a in zip(prompts, names, strict=True))
        else:
            tokens = self.run(prompts, adapter_names, max_new_tokens)
        return tokens, time.perf_counter() - start


def _real_tokens(ids: list[int], eos: int | list[int]) -> int:
    ends = set(eos if isinstance(eos, list) else [eos])
    for i, token in enumerate(ids):
        if token in ends:
            return i + 1
    return len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path(".tunewire"), help="TUNEWIRE_HOME (reuses its converted model)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="rounds over every measurement; each keeps its best")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="for the service and the baselines alike")
    parser.add_argument("--many-adapters", type=int, default=64, help="adapters over the service's 8 slots (0: skip those rows)")
    parser.add_argument("--long-prompt", type=int, default=4000, help="tokens of the prompt admitted while a stream decodes (0: skip)")
    parser.add_argument(
        "--llama-cpp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="llama-server's rows, where it is built in .tools/llama.cpp",
    )
    args = parser.parse_args()
    dtype = serving_dtype(args.dtype, torch.device("cpu"))  # the service and the baselines run on the CPU
    dtype_name = str(dtype).removeprefix("torch.")
    home = args.home.resolve()
    model_path = resolve_model(BASE_MODEL, home / "models")
    n = len(PROMPTS)
    with tempfile.TemporaryDirectory(dir=home) as tmp:
        adapter_root = Path(tmp)
        adapter_dirs = make_adapters(model_path, adapter_root, max(5, args.many_adapters), args.rank)
        mixed = [f"adapter-{i % 4}" for i in range(n)]
        single = ["adapter-0"] * n
        rows = []
        by_scenario: dict[str, dict[str, float]] = {}  # scenario -> {engine: tokens/s}

        env = {
            "TUNEWIRE_HOME": str(home),
            "TUNEWIRE_INFERENCE_PORT": "50193",
            "TUNEWIRE_IMPORT_ROOTS": str(adapter_root),
            "TUNEWIRE_INFERENCE_DTYPE": dtype_name,
            "TUNEWIRE_INFERENCE_DEVICE": "cpu",
        }
        # Every engine is up at once, so that the rows can be measured in turns.
        with contextlib.ExitStack() as engines:
            stack = engines.enter_context(LocalStack(env=env, services=("inference",), log_dir=adapter_root / "logs"))
            client = engines.enter_context(InferenceClient(stack.address("inference"), timeout=600))
            for i in range(4):
                client.load_adapter(f"adapter-{i}", str(adapter_dirs[i]))
            client.generate(PROMPTS[0], adapter="adapter-0", max_new_tokens=4)  # warm-up
            llama = None
            if args.llama_cpp:
                from bench.llama_cpp import SERVER

                if not SERVER.exists():
                    print(f"no {SERVER}: llama-server rows skipped (make llama-server builds it)", flush=True)
                else:
                    try:
                        llama = engines.enter_context(
                            LlamaCppBaseline(model_path, adapter_dirs[:4], home, adapter_root, dtype_name, args.max_new_tokens)
                        )
                    except Exception as error:  # the other rows still count
                        print(f"llama-server rows skipped: {error}", flush=True)
            peft = PeftBaseline(model_path, adapter_dirs[:4], dtype)
            plain = PeftBaseline(model_path, [], dtype)
            tokens = args.max_new_tokens
            gguf = {"mixed": [i % 4 for i in range(n)], "single": [0] * n, "none": [None] * n}  # llama-server's adapters by index
            scenarios = {
                MIXED: [
                    ("tunewire: 8 concurrent, 4 adapters (mixed batch)", lambda: service_run(client, mixed, tokens, True)),
                    ("llama-server: 8 concurrent, 4 adapters", lambda: llama.timed(gguf["mixed"], True)),
                    ("PEFT generate: batch of 8, 4 adapters (adapter_names)", lambda: peft.timed(PROMPTS, mixed, tokens)),
                ],
                SINGLE: [
                    ("tunewire: 8 concurrent, 1 adapter", lambda: service_run(client, single, tokens, True)),
                    ("llama-server: 8 concurrent, 1 adapter", lambda: llama.timed(gguf["single"], True)),
                    ("PEFT generate: batch of 8, 1 adapter", lambda: peft.timed(PROMPTS, single, tokens)),
                ],
                BASE: [
                    ("tunewire: 8 concurrent, base model", lambda: service_run(client, [""] * n, tokens, True)),
                    ("llama-server: 8 concurrent, base model", lambda: llama.timed(gguf["none"], True)),
                ],
                ONE_AT_A_TIME: [
                    ("tunewire: the 8 one at a time, 4 adapters", lambda: service_run(client, mixed, tokens, False)),
                    ("llama-server: the 8 one at a time, 4 adapters", lambda: llama.timed(gguf["mixed"], False)),
                    ("PEFT generate: the 8 one at a time, 4 adapters", lambda: peft.timed(PROMPTS, mixed, tokens, True)),
                ],
                STREAM: [
                    ("tunewire: the 8 one at a time, base model (single stream)", lambda: service_run(client, [""] * n, tokens, False)),
                    ("llama-server: the 8 one at a time, base model (single stream)", lambda: llama.timed(gguf["none"], False)),
                    (
                        "plain model.generate: the 8 one at a time, base model (single stream)",
                        lambda: plain.timed(PROMPTS, None, tokens, True),
                    ),
                ],
            }
            # All rows in every round: each row is measured at several moments of the run, the
            # same for every engine and scenario.
            measures = [
                (scenario, what, measure)
                for scenario, engine_measures in scenarios.items()
                for what, measure in engine_measures
                if llama is not None or not what.startswith("llama-server")
            ]
            best = best_of_rounds([(what, measure) for _, what, measure in measures], args.repeats)
            for (scenario, _, _), (what, count, seconds) in zip(measures, best, strict=True):
                rows.append({"what": what, "tokens": count, "seconds": seconds, "tokens/s": count / seconds})
                print(f"{what}: {count} tokens in {seconds:.2f}s = {count / seconds:.1f} tokens/s", flush=True)
                by_scenario.setdefault(scenario, {})[what.split(":")[0]] = count / seconds
            # Greedy answers to compare with llama-server's (the same adapters, exported as GGUF).
            tunewire_answers = [client.generate(PROMPTS[i], adapter=f"adapter-{i}", max_new_tokens=tokens).text for i in range(4)]
            llama_answers = llama.answers() if llama is not None else []
            start = time.perf_counter()
            loaded = client.load_adapter("adapter-new", str(adapter_dirs[4]))
            load_wall = time.perf_counter() - start
            first = client.generate(PROMPTS[0], adapter="adapter-new", max_new_tokens=1)
            servable_wall = time.perf_counter() - start
            assert first.completion_tokens == 1
            many = []
            if args.many_adapters:
                names = [f"many-{i}" for i in range(args.many_adapters)]
                for name, path in zip(names, adapter_dirs, strict=False):
                    client.load_adapter(name, str(path))
                for label, zipf in (("uniformly", False), ("Zipf-like", True)):
                    # The best of the repeats, as every other row.
                    run = max(
                        (many_adapters_run(client, names, 64, args.max_new_tokens, zipf) for _ in range(args.repeats)),
                        key=lambda r: r["tokens"] / r["seconds"],
                    )
                    many.append(
                        {
                            "what": f"tunewire: 64 requests over {args.many_adapters} adapters ({run['adapters']} used), {label}, 8 slots",
                            **run,
                        }
                    )
                    print(
                        f"{many[-1]['what']}: {run['tokens'] / run['seconds']:.1f} tokens/s, p50 {run['p50']:.2f}s, p99 {run['p99']:.2f}s",
                        flush=True,
                    )
                reloads = reload_times(adapter_root / "logs" / "inference.log")
            latency = None
            if args.long_prompt:
                from transformers import AutoTokenizer

                latency = long_prompt_latency(client, AutoTokenizer.from_pretrained(model_path), args.long_prompt)
                print(
                    f"a stream while a {args.long_prompt}-token prompt is prefilled: mean gap {latency['mean'] * 1000:.0f} ms "
                    f"({latency['mean'] / latency['usual']:.2f}× its {latency['usual'] * 1000:.0f} ms alone), longest "
                    f"{latency['longest'] * 1000:.0f} ms; the long prompt's first token after {latency['wait']:.1f} s",
                    flush=True,
                )
    reference = rows[0]["tokens/s"]
    for row in rows:
        row["mixed batch ÷ this"] = reference / row["tokens/s"]
    for run in many:
        tokens_per_second = run["tokens"] / run["seconds"]
        rows.append(
            {
                "what": f"{run['what']} (p50 {run['p50']:.2f} s, p99 {run['p99']:.2f} s)",
                "tokens": run["tokens"],
                "seconds": run["seconds"],
                "tokens/s": tokens_per_second,
                "mixed batch ÷ this": reference / tokens_per_second,
            }
        )
    reloaded = ""
    if many and reloads:
        reloaded = f" Evicted adapters back from host memory: {len(reloads)} reloads, median {statistics.median(reloads):.1f} ms, max {max(reloads):.1f} ms."
        print(reloaded.strip())
    rows.append(
        {
            "what": f"LoadAdapter (rank {args.rank}, all linear layers) until servable; first token after it",
            "tokens": 1,
            "seconds": load_wall,
            "tokens/s": 0.0,
            "mixed batch ÷ this": servable_wall,
        }
    )
    write_results(
        f"inference-{dtype_name}",
        rows,
        notes=(
            f"SmolLM2-135M-Instruct, {dtype_name} weights for the service and the baselines, greedy, max_new_tokens={args.max_new_tokens}, LoRA rank {args.rank} on every linear "
            f"layer; best of {args.repeats}. Last row: seconds = LoadAdapter wall time (read, validate, place: "
            f"{loaded.load_seconds:.3f}s inside the service); last column = until the first generated token with it.{reloaded}"
        ),
    )
    if latency:
        write_results(
            f"inference-long-prompt-{dtype_name}",
            [
                {
                    "what": f"a base-model stream while a {args.long_prompt}-token prompt is prefilled",
                    "gap alone, ms": latency["usual"] * 1000,
                    "mean gap meanwhile, ms": latency["mean"] * 1000,
                    "mean ÷ alone": latency["mean"] / latency["usual"],
                    "target": "≤ 2×",
                    "longest gap, ms": latency["longest"] * 1000,
                    "long prompt's first token, s": latency["wait"],
                }
            ],
            notes=(
                f"Same run; {latency['gaps']} gaps of the stream while the long prompt was prefilled; "
                "its prefill chunked and paced (TUNEWIRE_PREFILL_CHUNK_TOKENS, TUNEWIRE_PREFILL_SHARE at their defaults)."
            ),
        )
    if llama_answers:
        same = sum(a == b for a, b in zip(tunewire_answers, llama_answers, strict=True))
        comparison = [
            {
                "requests": scenario,
                "tunewire tokens/s": engines["tunewire"],
                "llama-server tokens/s": engines["llama-server"],
                "tunewire ÷ llama-server": engines["tunewire"] / engines["llama-server"],
                "target": f"≥ {target}×" if target else "-",
            }
            for scenario, target in TARGETS_VS_LLAMA_CPP.items()
            if {"tunewire", "llama-server"} <= (engines := by_scenario.get(scenario, {})).keys()
        ]
        write_results(
            f"inference-vs-llama-cpp-{dtype_name}",
            comparison,
            notes=(
                f"Same machine and run, {dtype_name} weights on both, greedy, {args.max_new_tokens} tokens, 8 llama-server slots, "
                f"its threads = the cores; adapters exported by tunewire as GGUF LoRA. Greedy answers of the 4 adapters "
                f"identical to tunewire's: {same} of 4."
            ),
        )


if __name__ == "__main__":
    main()
