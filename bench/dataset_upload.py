"""Upload throughput of the dataset service, over gRPC to a service process,
against a baseline in the same run: reading and json-parsing the same file in
one process (the least any upload must do).

    .venv/bin/python -m bench.dataset_upload --megabytes 100
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from bench.common import write_results
from tunewire.clients.local_stack import LocalStack
from tunewire.clients.sdk import DatasetClient


def make_file(path: Path, megabytes: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    rows = 0
    with path.open("w") as f:
        while f.tell() < megabytes << 20:
            words = " ".join(rng.choice(("tune", "wire", "model", "data", "train", "adapter", "loss")) for _ in range(rng.randint(5, 80)))
            f.write(json.dumps({"prompt": f"Question {rows}: {words}?", "completion": f"Answer: {words[::-1]}"}) + "\n")
            rows += 1
    return rows


def parse_only(path: Path) -> float:
    start = time.perf_counter()
    with path.open("rb") as f:
        for line in f:
            json.loads(line)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--megabytes", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "upload.jsonl"
        rows = make_file(data, args.megabytes)
        size_mb = data.stat().st_size / 2**20
        baseline = parse_only(data)
        env = {"TUNEWIRE_HOME": str(tmp / "home"), "TUNEWIRE_DATASET_PORT": "50191", "TUNEWIRE_MAX_UPLOAD_BYTES": str(4 << 30)}
        with (
            LocalStack(env=env, services=("dataset",), log_dir=tmp / "logs") as stack,
            DatasetClient(stack.address("dataset"), timeout=3600) as client,
        ):
            start = time.perf_counter()
            dataset = client.upload(data, name="bench").dataset
            upload = time.perf_counter() - start
        assert dataset.row_count == rows
    write_results(
        "dataset_upload",
        [
            {
                "what": "tunewire UploadDataset (gRPC, validate, split, report, Parquet)",
                "MB": size_mb,
                "rows": rows,
                "seconds": upload,
                "MB/s": size_mb / upload,
                "rows/s": rows / upload,
                "x baseline": baseline / upload,
            },
            {
                "what": "baseline: read + json.loads in one process",
                "MB": size_mb,
                "rows": rows,
                "seconds": baseline,
                "MB/s": size_mb / baseline,
                "rows/s": rows / baseline,
                "x baseline": 1.0,
            },
        ],
    )


if __name__ == "__main__":
    main()
