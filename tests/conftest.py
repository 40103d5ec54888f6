"""Shared fixtures: tiny randomly initialised models built from a config (no
download, seconds to build) and helpers to run servers on port 0."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

from tunewire.clients.local_stack import free_port
from tunewire.services.common import layout

# Servers started by the tests (in-process and as processes) open no
# OpenAI-compatible HTTP listener unless a test sets a port: two of them on
# the default port would collide.
os.environ["TUNEWIRE_INFERENCE_HTTP_PORT"] = "0"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "Arr, matey! The capital of France be Paris. Yo ho ho!",
    "What is the capital of Spain? What is 2 plus 2?",
    "user assistant system hello world answer question",
] * 20


def build_tiny_causal_lm(path: Path, chat_template: bool = True, seed: int = 0, hidden_size: int = 32) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer trained on CORPUS."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def write_lora_adapter(
    model_dir: Path,
    out: Path,
    rank: int = 4,
    seed: int = 1,
    base_name: str | None = None,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    classes: int = 0,
) -> Path:
    """A PEFT LoRA adapter for model_dir with non-zero (random) B, so it
    changes outputs; with `classes`, a SEQ_CLS adapter with its head."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if classes:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=classes)
        model.config.pad_token_id = model.config.pad_token_id or 0
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=list(targets),
            init_lora_weights=False,
            task_type=TaskType.SEQ_CLS if classes else TaskType.CAUSAL_LM,
        ),
    )
    peft_model.peft_config["default"].base_model_name_or_path = base_name or str(model_dir)
    peft_model.save_pretrained(out)
    return out


def build_tiny_bert(path: Path) -> Path:
    """A 2-layer BERT encoder with a WordPiece tokenizer trained on CORPUS."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(
        CORPUS + ["great awful good bad review number was"] * 5, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials)
    )
    from tokenizers.processors import TemplateProcessing

    tokenizer.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama"))


class ServerThread:
    """Runs an aio server (from a create_server coroutine) on its own event
    loop in a thread, so tests can call it with the blocking SDK clients."""

    def __init__(self, make_handle):
        self.make_handle = make_handle
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.handle = None

    def run(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.handle.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()

        async def start():
            handle = await self.make_handle()
            await handle.start()
            return handle

        self.handle = self.run(start(), timeout=300)
        return self

    def __exit__(self, *exc) -> None:
        if not self.thread.is_alive():  # stopped already (a test restarting a server)
            return
        if self.handle is not None:
            self.run(self.handle.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def prompt_completion_jsonl(rows: int, start: int = 0) -> bytes:
    return "".join(
        json.dumps({"prompt": f"What is {i} plus {i}?", "completion": f"Arr, {i} plus {i} be {2 * i}."}) + "\n"
        for i in range(start, start + rows)
    ).encode()


class OneDataset:
    """A dataset lookup that knows one small dataset under any id."""

    async def get(self, project, dataset_id):
        from tunewire.services.training.jobs import DatasetRef

        return DatasetRef(id=dataset_id, format="prompt_completion", uri="unused", train_rows=10, validation_rows=0)

    async def acquire(self, project, dataset_id, holder):
        return await self.get(project, dataset_id)

    async def release(self, project, dataset_id, holder):
        pass


class CopyAdapterRunner:
    """Stands in for Ray Train: 'trains' by handing over a prepared adapter,
    once `release` is set (tests clear it to hold jobs RUNNING)."""

    def __init__(self, adapter_dir: Path):
        self.adapter_dir = adapter_dir
        self.release = threading.Event()
        self.release.set()

    def checkpoints(self, job_id):
        return []

    @contextlib.asynccontextmanager
    async def run(self, job, emit, cancel):
        await asyncio.to_thread(self.release.wait)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "adapter"
            shutil.copytree(self.adapter_dir, out)
            # As a real run does: the metadata names the job's project.
            metadata = out / layout.ADAPTER_METADATA
            written = json.loads(metadata.read_text()) if metadata.exists() else {}
            metadata.write_text(json.dumps(written | {"job_id": job.id, "project": job.project}))
            yield out


@contextlib.contextmanager
def three_services(tmp: Path, model_dir: Path, **overrides):
    """The dataset, training and inference services on port 0, wired to each
    other as in production (the orchestrator looks datasets up over gRPC; the
    inference service follows published adapters), with training done by a
    CopyAdapterRunner. Yields the servers, the runner and the settings."""
    from tunewire.services.common.artifacts import ArtifactStore
    from tunewire.services.common.settings import load_settings
    from tunewire.services.dataset.server import DatasetDeps
    from tunewire.services.dataset.server import create_server as create_dataset_server
    from tunewire.services.inference.core import InferenceManager
    from tunewire.services.inference.engine import BatchEngine, EngineLimits
    from tunewire.services.inference.server import InferenceDeps
    from tunewire.services.inference.server import create_server as create_inference_server
    from tunewire.services.training.dataset_lookup import GrpcDatasetLookup
    from tunewire.services.training.server import TrainingDeps
    from tunewire.services.training.server import create_server as create_training_server
    from tunewire.services.training.store import JobStore

    common = dict(home=tmp / "home", base_model=str(model_dir), import_roots=str(tmp / "own"), model_roots=str(model_dir), **overrides)
    settings = load_settings(**common)
    runner = CopyAdapterRunner(write_lora_adapter(model_dir, tmp / "prepared"))

    async def make_dataset():
        return await create_dataset_server(settings, DatasetDeps.from_settings(settings), port=0)

    with ServerThread(make_dataset) as dataset:
        settings = load_settings(**common, dataset_address=dataset.address)

        async def make_training():
            deps = TrainingDeps(
                JobStore(settings.training_database_url),
                ArtifactStore(settings.artifact_root),
                GrpcDatasetLookup(settings.dataset_address, settings),
                runner,
            )
            return await create_training_server(settings, deps, port=0)

        with ServerThread(make_training) as training:

            async def make_inference():
                engine = BatchEngine(settings.base_model, settings.model_cache, EngineLimits())
                manager = InferenceManager(
                    engine,
                    ArtifactStore(settings.artifact_root),
                    tmp / "adapter-cache",
                    settings.import_root_list,
                    max_requests_per_project=settings.project_max_generation_requests,
                )
                return await create_inference_server(settings, InferenceDeps(manager, training.address), port=0)

            with ServerThread(make_inference) as inference:
                yield {"dataset": dataset, "training": training, "inference": inference, "runner": runner, "settings": settings}


# PostgreSQL: the store-backed service tests run on SQLite and on a real
# PostgreSQL server, started once per session from the system's binaries.
DATABASES = ("sqlite", "postgresql")


class PostgresServer:
    """A throwaway PostgreSQL cluster on a free loopback port (trust auth).
    PostgreSQL refuses to run as root: as root, its commands run as the
    `postgres` user the system package created."""

    def __init__(self, bin_dir: Path):
        import pwd
        import tempfile

        self.bin_dir = bin_dir
        self.data = Path(tempfile.mkdtemp(prefix="tunewire-pg-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.data, owner.pw_uid, owner.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bin_dir / tool), *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data / "db"), "-U", "tunewire", "--auth=trust", "--no-sync")
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data / "db"), "-o", options, "-l", str(self.data / "log"), "-w", "start")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._run("pg_ctl", "-D", str(self.data / "db"), "-m", "immediate", "stop")
        shutil.rmtree(self.data, ignore_errors=True)

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="tunewire", dbname="postgres", autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://tunewire@127.0.0.1:{self.port}/{name}"


def postgres_bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, or the newest Debian/Ubuntu install."""
    import glob

    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += [Path(p).parent for p in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)]
    return next((c for c in candidates if (c / "pg_ctl").exists()), None)


@pytest.fixture(scope="session")
def postgres():
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.fail(
            "PostgreSQL is not installed, and the service tests run on it: `make install` installs it "
            "(scripts/install_postgres.sh), or install the `postgresql` package of your system"
        )
    server = PostgresServer(bin_dir)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def database_env(request, monkeypatch):
    """Points the services' settings at fresh databases of `request.param`
    (use with @pytest.fixture(params=DATABASES) or indirect parametrization)."""
    if request.param == "postgresql":
        server = request.getfixturevalue("postgres")
        suffix = uuid.uuid4().hex[:12]
        monkeypatch.setenv("TUNEWIRE_DATASET_DATABASE_URL", server.create_database(f"dataset_{suffix}"))
        monkeypatch.setenv("TUNEWIRE_TRAINING_DATABASE_URL", server.create_database(f"training_{suffix}"))
    return request.param
