"""One base model in memory, many LoRA adapters beside it.

All model work (generation, adapter loads) happens on one dedicated thread,
so loading an adapter never races a generation in flight: it waits for the
current generation step to finish and is visible to the next request.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tunewire.services.common.errors import InvalidArgument, NotFound
from tunewire.services.common.models import resolve_model
from tunewire.services.common.text import prompt_text

log = logging.getLogger(__name__)

STOP, LENGTH = "stop", "length"
DEFAULT_MAX_NEW_TOKENS = 128
MAX_NEW_TOKENS_LIMIT = 4096


@dataclass(frozen=True)
class GenerationRequest:
    adapter: str = ""  # "" for the base model
    prompt: str | None = None
    messages: list[dict] | None = None
    raw_prompt: bool = False
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def check(self) -> None:
        if self.prompt is None and not self.messages:
            raise InvalidArgument.field("input", "set prompt or messages")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise InvalidArgument.field("sampling.max_new_tokens", f"must be in [1, {MAX_NEW_TOKENS_LIMIT}], got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 5:
            raise InvalidArgument.field("sampling.temperature", f"must be in [0, 5], got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise InvalidArgument.field("sampling.top_p", f"must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument.field("sampling.top_k", f"must be >= 0, got {self.top_k}")
        for i, message in enumerate(self.messages or []):
            if message["role"] not in ("system", "user", "assistant"):
                raise InvalidArgument.field(f"messages[{i}].role", f"unknown role {message['role']!r}")


@dataclass
class GenerationResult:
    text: str = ""
    finish_reason: str = STOP
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Progress:
    """Incremental detokenisation with stop strings; runs on the model thread."""

    tokenizer: object
    stop: tuple[str, ...]
    on_text: Callable[[str], None]
    ids: list[int] = field(default_factory=list)
    sent: int = 0
    stopped_at: int | None = None  # character index of a stop string

    def add(self, token_ids: list[int]) -> None:
        self.ids.extend(token_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            index = text.find(s)
            if index != -1 and (self.stopped_at is None or index < self.stopped_at):
                self.stopped_at = index
        if self.stopped_at is not None:
            text = text[: self.stopped_at]
            safe = len(text)
        else:
            # Hold back what could still become a stop string or a whole character.
            safe = len(text) - max((len(s) - 1 for s in self.stop), default=0)
            if text.endswith("\ufffd"):
                safe = min(safe, len(text) - 1)
        if safe > self.sent:
            self.on_text(text[self.sent : safe])
            self.sent = safe

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stopped_at is not None:
            text = text[: self.stopped_at]
        if len(text) > self.sent:
            self.on_text(text[self.sent :])
            self.sent = len(text)
        return text


class GenerationEngine:
    def __init__(self, base_model_name: str, model_cache: Path):
        self.base_model_name = base_model_name
        self.model_cache = model_cache
        self.model_path = ""  # set by load()
        self.model = None  # a PeftModel once the first adapter is loaded
        self.tokenizer = None
        self.adapters: dict[str, str] = {}  # id -> source

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # May convert a bundled model the first time (tens of seconds).
        self.model_path = resolve_model(self.base_model_name, self.model_cache)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).eval()
        log.info("base model %s loaded from %s", self.base_model_name, self.model_path)

    # Adapters

    def check_adapter(self, adapter_dir: Path) -> dict:
        """Refuses what cannot be one of our LoRA adapters before touching the model."""
        config_path = adapter_dir / "adapter_config.json"
        if not config_path.exists():
            raise InvalidArgument.field("source", f"{adapter_dir} has no adapter_config.json: not a PEFT adapter")
        if not (adapter_dir / "adapter_model.safetensors").exists():
            raise InvalidArgument.field("source", f"{adapter_dir} has no adapter_model.safetensors (only safetensors weights are loaded)")
        config = json.loads(config_path.read_text())
        if config.get("peft_type") != "LORA":
            raise InvalidArgument.field("source", f"adapter type {config.get('peft_type')!r} is not LORA")
        if config.get("task_type") not in (None, "CAUSAL_LM"):
            raise InvalidArgument.field("source", f"a {config['task_type']} adapter: this service generates text with CAUSAL_LM adapters")
        base = config.get("base_model_name_or_path")
        if base and base not in (self.base_model_name, self.model_path):
            raise InvalidArgument.field("source", f"adapter was trained on {base!r}, this service serves {self.base_model_name!r}")
        return config

    def load_adapter(self, adapter_id: str, adapter_dir: Path) -> None:
        from peft import PeftModel

        self.check_adapter(adapter_dir)
        if adapter_id in self.adapters:
            return
        try:
            if not isinstance(self.model, PeftModel):
                self.model = PeftModel.from_pretrained(self.model, str(adapter_dir), adapter_name=adapter_id).eval()
            else:
                self.model.load_adapter(str(adapter_dir), adapter_name=adapter_id)
        except Exception as exc:
            # Leave nothing half-loaded behind.
            if isinstance(self.model, PeftModel) and adapter_id in self.model.peft_config:
                self.model.delete_adapter(adapter_id)
            raise InvalidArgument.field("source", f"adapter {adapter_id} does not fit {self.base_model_name}: {exc}") from exc
        self.adapters[adapter_id] = str(adapter_dir)
        log.info("adapter %s loaded from %s", adapter_id, adapter_dir)

    # Generation

    def generate(self, request: GenerationRequest, on_text: Callable[[str], None], cancelled: threading.Event) -> GenerationResult:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        request.check()
        if request.adapter and request.adapter not in self.adapters:
            raise NotFound(f"adapter {request.adapter!r} is not loaded here: ListLoadedAdapters shows those served")
        text = prompt_text(self.tokenizer, request.messages, request.prompt, request.raw_prompt)
        input_ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        progress = _Progress(self.tokenizer, tuple(request.stop), on_text)
        prompt_length = input_ids.shape[1]

        class Stream(StoppingCriteria):
            def __call__(self, ids, scores, **kwargs):
                progress.add(ids[0, prompt_length + len(progress.ids) :].tolist())
                return torch.tensor([cancelled.is_set() or progress.stopped_at is not None])

        options = dict(max_new_tokens=request.max_new_tokens, stopping_criteria=StoppingCriteriaList([Stream()]))
        if request.temperature > 0:
            options.update(do_sample=True, temperature=request.temperature)
            if request.top_p:
                options["top_p"] = request.top_p
            if request.top_k:
                options["top_k"] = request.top_k
        else:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if request.seed is not None:
            torch.manual_seed(request.seed)
        with torch.inference_mode(), self._adapter(request.adapter):
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                **options,
            )
        new_ids = output[0, prompt_length:].tolist()
        completion = progress.finish()
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        ended = progress.stopped_at is not None or (new_ids and new_ids[-1] in eos_ids)
        return GenerationResult(
            text=completion,
            finish_reason=STOP if ended or len(new_ids) < request.max_new_tokens else LENGTH,
            prompt_tokens=prompt_length,
            completion_tokens=len(new_ids),
        )

    def _adapter(self, adapter_id: str):
        import contextlib

        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            return contextlib.nullcontext()
        if not adapter_id:
            return self.model.disable_adapter()
        self.model.set_adapter(adapter_id)
        return contextlib.nullcontext()
