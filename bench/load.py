"""Load test: for a fixed time, many concurrent generation streams and dataset
uploads while adapters are loaded and unloaded under them, against the
dataset and inference services as processes on loopback (SmolLM2-135M).

What must hold: no request that should succeed fails (streams to the adapters
that stay loaded, and to the base model; every upload), and the services'
memory stays bounded (resident set sampled every second). Streams to the
adapter being swapped in and out may be refused NOT_FOUND while it is
unloaded; they are counted apart. The report gives requests, errors and
p50/p99 latency per kind, and the memory figures.

    .venv/bin/python -m bench.load --seconds 120
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import grpc
import psutil

from bench.common import write_results
from bench.inference import BASE_MODEL, PROMPTS, make_adapters
from tunewire.clients.local_stack import LocalStack
from tunewire.clients.sdk import ApiError, DatasetClient, InferenceClient
from tunewire.services.common.models import resolve_model

STABLE = ["stable-0", "stable-1"]
SWAPPED = "swapped"


class Tally:
    """Latencies and outcomes per kind of request, from many threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.failures: dict[str, list[str]] = defaultdict(list)
        self.expected_refusals = 0

    def ok(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.latencies[kind].append(seconds)

    def failed(self, kind: str, error: str) -> None:
        with self.lock:
            self.failures[kind].append(error)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path(".tunewire"), help="TUNEWIRE_HOME (reuses its converted model)")
    parser.add_argument("--seconds", type=float, default=120.0, help="how long the load runs")
    parser.add_argument("--streams", type=int, default=12, help="concurrent generation streams")
    parser.add_argument("--uploaders", type=int, default=2, help="concurrent upload loops")
    parser.add_argument("--upload-pause", type=float, default=1.0, help="seconds each upload loop waits between uploads")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    home = args.home.resolve()
    model_path = resolve_model(BASE_MODEL, home / "models")
    tally = Tally()
    with tempfile.TemporaryDirectory(dir=home) as tmp:
        tmp = Path(tmp)
        adapters = dict(zip([*STABLE, SWAPPED], make_adapters(model_path, tmp, 3, 8), strict=True))
        env = {
            "TUNEWIRE_HOME": str(tmp / "home"),
            "TUNEWIRE_MODEL_CACHE": str(home / "models"),
            "TUNEWIRE_DATASET_PORT": "50291",
            "TUNEWIRE_INFERENCE_PORT": "50293",
            "TUNEWIRE_IMPORT_ROOTS": str(tmp),
        }
        with LocalStack(env=env, services=("dataset", "inference"), log_dir=tmp / "logs") as stack:
            processes = {name: psutil.Process(p.pid) for name, p in stack.processes.items()}
            with InferenceClient(stack.address("inference"), timeout=300) as admin:
                for name in STABLE:
                    admin.load_adapter(name, str(adapters[name]))
                admin.generate(PROMPTS[0], max_new_tokens=2)
            stop = threading.Event()
            memory: dict[str, list[float]] = defaultdict(list)
            swaps = itertools.count()
            uploads = itertools.count()

            def stream_loop(worker: int) -> None:
                targets = ["", *STABLE, SWAPPED]
                with InferenceClient(stack.address("inference"), timeout=300) as client:
                    for i in itertools.count(worker):
                        if stop.is_set():
                            return
                        adapter = targets[i % len(targets)]
                        start = time.perf_counter()
                        try:
                            parts = list(
                                client.generate_stream(PROMPTS[i % len(PROMPTS)], adapter=adapter, max_new_tokens=args.max_new_tokens)
                            )
                            assert parts[-1].completion_tokens > 0
                            tally.ok("generate (stream)", time.perf_counter() - start)
                        except ApiError as error:
                            if adapter == SWAPPED and error.code == grpc.StatusCode.NOT_FOUND:
                                with tally.lock:
                                    tally.expected_refusals += 1
                            else:
                                tally.failed("generate (stream)", f"{adapter or 'base'}: {error}")

            def upload_loop(worker: int) -> None:
                with DatasetClient(stack.address("dataset"), timeout=300) as client:
                    while not stop.is_set():
                        n = next(uploads)
                        rows = "".join(
                            json.dumps({"prompt": f"load {worker}-{n}: what is {i} plus {i}?", "completion": f"{2 * i}"}) + "\n"
                            for i in range(2000)
                        ).encode()
                        start = time.perf_counter()
                        try:
                            client.upload(rows, name=f"load-{worker}")
                            tally.ok("upload (2,000 rows)", time.perf_counter() - start)
                        except ApiError as error:
                            tally.failed("upload (2,000 rows)", str(error))
                        stop.wait(args.upload_pause)

            def swap_loop() -> None:
                with InferenceClient(stack.address("inference"), timeout=300) as client:
                    while not stop.wait(2.0):
                        start = time.perf_counter()
                        try:
                            client.load_adapter(SWAPPED, str(adapters[SWAPPED]))
                            tally.ok("LoadAdapter", time.perf_counter() - start)
                            stop.wait(3.0)
                            start = time.perf_counter()
                            client.unload_adapter(SWAPPED)
                            tally.ok("UnloadAdapter", time.perf_counter() - start)
                            next(swaps)
                        except ApiError as error:
                            tally.failed("Load/UnloadAdapter", str(error))

            def sample_memory() -> None:
                while not stop.wait(1.0):
                    for name, process in processes.items():
                        memory[name].append(process.memory_info().rss / 2**20)

            threads = [threading.Thread(target=stream_loop, args=(w,)) for w in range(args.streams)]
            threads += [threading.Thread(target=upload_loop, args=(w,)) for w in range(args.uploaders)]
            threads += [threading.Thread(target=swap_loop), threading.Thread(target=sample_memory)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            stop.wait(args.seconds)
            stop.set()
            for thread in threads:
                thread.join(600)
            elapsed = time.perf_counter() - started

    rows = []
    for kind in sorted(set(tally.latencies) | set(tally.failures)):
        done = tally.latencies[kind]
        rows.append(
            {
                "requests": kind,
                "succeeded": len(done),
                "failed": len(tally.failures[kind]),
                "per second": len(done) / elapsed,
                "p50 s": statistics.median(done) if done else 0.0,
                "p99 s": percentile(done, 0.99),
            }
        )
    # Resident memory each half minute (samples are a second apart): bounded
    # memory levels off instead of climbing with the requests served.
    memory_notes = "; ".join(
        f"{name} RSS (MiB) every 30 s: {', '.join(f'{v:.0f}' for v in values[::30])}; max {max(values):.0f}"
        for name, values in memory.items()
        if values
    )
    failures = [f"{kind}: {error}" for kind, errors in tally.failures.items() for error in errors[:3]]
    write_results(
        "load",
        rows,
        notes=(
            f"{elapsed:.0f} s of load: {args.streams} concurrent generation streams ({args.max_new_tokens} tokens; base, "
            f"{len(STABLE)} resident adapters and one loaded and unloaded every ~5 s: {next(swaps)} swaps), "
            f"{args.uploaders} upload loops ({args.upload_pause:g} s between uploads). Streams to the swapped adapter refused NOT_FOUND while it was unloaded "
            f"(expected): {tally.expected_refusals}. Memory: {memory_notes}."
            + (f" Failures: {failures}" if failures else " No request that should have succeeded failed.")
        ),
    )
    if any(tally.failures.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
