"""llama.cpp's `llama-server` as bench.inference's baseline: the engine a CPU
user would pick instead (continuous batching, LoRA adapters per request).

It runs the same base model converted to GGUF at the precision tunewire
serves (llama.cpp's own convert_hf_to_gguf.py) with the same adapters
exported by tunewire (`tunewire adapters gguf`), on the same cores, 8 slots.
`scripts/build_llama_server.sh` builds it once into .tools/llama.cpp
(`make bench` does); without it the rows are skipped with a note.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tunewire.clients.local_stack import free_port

LLAMA_CPP = Path(__file__).resolve().parent.parent / ".tools" / "llama.cpp"
SERVER = LLAMA_CPP / "bin" / "llama-server"
GGUF_TYPES = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}


def convert_base(model_path: str, out_dir: Path, dtype_name: str) -> Path:
    """The base model as GGUF at `dtype_name`, converted once into `out_dir`."""
    out = out_dir / f"{Path(model_path).name}-{GGUF_TYPES[dtype_name]}.gguf"
    if not out.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        command = [
            sys.executable,
            str(LLAMA_CPP / "convert_hf_to_gguf.py"),
            model_path,
            "--outtype",
            GGUF_TYPES[dtype_name],
            "--outfile",
            str(partial),
        ]
        converted = subprocess.run(command, capture_output=True, text=True)
        if converted.returncode != 0:
            partial.unlink(missing_ok=True)
            raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{converted.stderr[-3000:]}")
        partial.rename(out)
    return out


class LlamaServer:
    """A llama-server process on loopback with the adapters loaded but not
    applied; each request names its adapter (`lora: [{id, scale}]`)."""

    def __init__(self, base: Path, adapters: list[Path], log: Path, context_per_slot: int, slots: int = 8):
        self.port = free_port()
        command = [str(SERVER), "-m", str(base), "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--parallel", str(slots), "--ctx-size", str(slots * context_per_slot), "--threads", str(os.cpu_count() or 1)]
        for adapter in adapters:
            command += ["--lora", str(adapter)]
        if adapters:
            command.append("--lora-init-without-apply")
        self.adapter_count = len(adapters)
        self.log = log.open("w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(log)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, log: Path, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}: see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"llama-server not ready in {timeout:.0f}s: see {log}")

    def generate(self, prompt: str, adapter: int | None, max_new_tokens: int) -> tuple[int, str]:
        """Greedy completion of an already templated prompt: (tokens, text)."""
        body = {
            "prompt": prompt,
            "n_predict": max_new_tokens,
            "temperature": 0.0,
            "cache_prompt": False,  # tunewire prefills every prompt too
            "lora": [{"id": i, "scale": 1.0 if i == adapter else 0.0} for i in range(self.adapter_count)],
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/completion", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=600) as reply:
            answer = json.load(reply)
        return answer["tokens_predicted"], answer["content"]

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
