"""The model runner: the base model, its adapter slots and the running
batch's cache on one device, and the forward passes the engine asks for.

It decides nothing: the engine (engine.py) tells it which rows to prefill,
decode, keep or classify. It runs on the device it is given (a CPU, with the
base weights packed for oneDNN, or a CUDA GPU) and is called from the model
thread alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tunewire.services.common.errors import FailedPrecondition
from tunewire.services.common.hardware import native_bfloat16
from tunewire.services.common.models import base_model_aliases, resolve_model
from tunewire.services.inference.decoder import LlamaDecoderPass
from tunewire.services.inference.kv_cache import BatchCache, new_cache
from tunewire.services.inference.lora import AdapterWeights, SlotTable, read_adapter
from tunewire.services.inference.packed import pack_linears

log = logging.getLogger(__name__)

# Heads of sequence classifiers, as PEFT saves them (modules_to_save).
CLASSIFIER_HEADS = ("score", "classifier")


def serving_dtype(name: str, device: torch.device) -> torch.dtype:
    """float32, bfloat16, float16, or auto: bfloat16 where the device computes
    it natively (`hardware.native_bfloat16`); else float16 on a GPU (every
    CUDA GPU computes it) and float32 on a CPU (which emulates both)."""
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if native_bfloat16(device.type):
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else torch.float32


class ModelRunner:
    def __init__(self, base_model_name: str, model_cache: Path, limits, device: torch.device, dtype: torch.dtype):
        self.base_model_name = base_model_name
        self.model_cache = model_cache
        self.limits = limits
        self.device = device
        self.dtype = dtype
        self.model = None
        self.tokenizer = None
        self.generative = True
        self.slots: SlotTable | None = None
        # The lean forward pass where the model's family has one (decoder.py).
        self.decoder_pass: LlamaDecoderPass | None = None
        self.base_names: set[str] = set()
        self.eos_ids: set[int] = set()
        self.max_positions = 0
        self._batch: BatchCache | None = None
        self._next_tokens = torch.zeros(0, dtype=torch.long, device=device)
        # A long prompt being prefilled a chunk at a time: (its request, its cache, tokens done).
        self._partial: tuple[object, object, int] | None = None

    def load(self) -> None:
        """Loads the base model (may convert a bundled one first: tens of seconds)."""
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

        path = resolve_model(self.base_model_name, self.model_cache)
        config = AutoConfig.from_pretrained(path)
        self.generative = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        loader = AutoModelForCausalLM if self.generative else AutoModel
        self.model = loader.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        self.base_names = base_model_aliases(self.base_model_name) | {path}
        self.max_positions = getattr(config.get_text_config(), "max_position_embeddings", 0) or 1 << 30
        if self.generative:
            eos = self.model.generation_config.eos_token_id
            self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
            if getattr(config.get_text_config(), "sliding_window", None):
                raise FailedPrecondition(f"{self.base_model_name}: sliding-window attention models are not served yet")
        # oneDNN's packed weights are a CPU kernel; a GPU runs the plain ones.
        packed = pack_linears(self.model, self.limits.max_batch_size) if self.device.type == "cpu" else 0
        self.slots = SlotTable(self.model, self.limits.max_resident_adapters)
        if self.generative:
            self.decoder_pass = LlamaDecoderPass.for_model(self.model)
        log.info(
            "base model %s loaded from %s (%s, %s on %s, %d linear layers packed for oneDNN, %s forward)",
            self.base_model_name,
            path,
            "generation" if self.generative else "classification",
            str(self.dtype).removeprefix("torch."),
            self.device,
            packed,
            "lean decoder" if self.decoder_pass else "transformers'",
        )

    def read_adapter(self, local_dir: Path) -> AdapterWeights:
        """Reads and validates an adapter without touching what is served."""
        return read_adapter(
            local_dir,
            self.slots.linears,
            getattr(self.model, "base_model_prefix", ""),
            self.base_names,
            self.limits.max_adapter_rank,
            CLASSIFIER_HEADS,
        )

    def prefill(self, sequences: list) -> list[int]:
        """Prefills the newcomers' prompts in one padded pass, merges their
        cache into the batch's, and gives each its first token."""
        pad = self.tokenizer.pad_token_id
        width = max(len(s.prompt_ids) for s in sequences)
        input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, width - len(sequence.prompt_ids) :] = torch.tensor(sequence.prompt_ids)
            mask[row, width - len(sequence.prompt_ids) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = new_cache(self.model.config.get_text_config().num_hidden_layers)
        self.slots.row_slots.set([_slot(s) for s in sequences])
        logits = self._last_logits(input_ids, mask, positions, cache)
        if self._batch is None:
            self._batch = BatchCache(len(cache.layers), self.device)
        self._batch.merge(cache, mask)
        tokens = self.sample(logits, sequences)
        self._next_tokens = torch.cat([self._next_tokens, tokens])
        return tokens.tolist()

    def decode(self, sequences: list) -> list[int]:
        """One token for every row of the batch, in one forward pass, each row
        with its own adapter; `sequences` are the rows in batch order."""
        mask = self._batch.extend_mask()
        positions = mask.sum(dim=1, keepdim=True) - 1
        self.slots.row_slots.set([_slot(s) for s in sequences])
        # Rows prefilled this step already have their first token; decode them too:
        # every row is one token ahead of its cache.
        logits = self._last_logits(self._next_tokens[:, None], mask, positions, self._batch.cache)
        tokens = self.sample(logits, sequences)
        self._next_tokens = tokens
        return tokens.tolist()

    def prefill_chunk(self, sequence, size: int) -> int | None:
        """Prefills the next `size` tokens of a long prompt into a cache of
        its own; at its last chunk, merges that cache into the batch's and
        gives the first token (None before)."""
        if self._partial is not None and self._partial[0] is sequence:
            _, cache, done = self._partial
        else:
            cache, done = new_cache(self.model.config.get_text_config().num_hidden_layers), 0
        ids = sequence.prompt_ids[done : done + size]
        end = done + len(ids)
        self.slots.row_slots.set([_slot(sequence)])
        logits = self._last_logits(
            torch.tensor([ids], device=self.device),
            torch.ones((1, end), dtype=torch.long, device=self.device),
            torch.arange(done, end, device=self.device)[None],
            cache,
        )
        if end < len(sequence.prompt_ids):
            self._partial = (sequence, cache, end)
            if self.device.type == "cuda":  # the chunk's time is its own, not the next pass's (the engine paces chunks by it)
                torch.cuda.synchronize(self.device)
            return None
        self._partial = None
        if self._batch is None:
            self._batch = BatchCache(len(cache.layers), self.device)
        self._batch.merge(cache, torch.ones((1, end), dtype=torch.long, device=self.device))
        tokens = self.sample(logits, [sequence])
        self._next_tokens = torch.cat([self._next_tokens, tokens])
        return tokens.item()

    def _last_logits(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """Each row's logits at its last position, its new keys and values
        appended to `cache`."""
        if self.decoder_pass is not None:
            return self.decoder_pass(input_ids, mask, positions, cache)
        return self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
        ).logits[:, -1]

    def drop_partial(self) -> None:
        """Forgets a chunked prefill in progress (its request ended)."""
        self._partial = None

    def keep(self, rows: list[int]) -> None:
        """Keeps these rows of the batch, in this order; the others leave it."""
        self._next_tokens = self._next_tokens[rows]
        self._batch.keep(rows)

    def reset(self) -> None:
        """Drops the whole batch (after a failed step)."""
        self._batch = None
        self._next_tokens = torch.zeros(0, dtype=torch.long, device=self.device)
        self._partial = None

    def sample(self, logits: torch.Tensor, sequences: list) -> torch.Tensor:
        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        for row, sequence in enumerate(sequences):
            if sequence.generator is not None:
                # Sampled on the CPU, whose generator the request's seed drives on any device.
                tokens[row] = _sample_row(logits[row].cpu(), sequence.request, sequence.generator)
        return tokens

    def classify(self, slots: list[int], texts: list[str]) -> list[list[float]]:
        """Each text's class probabilities under the head in its slot."""
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_positions, return_tensors="pt", padding_side="right"
        ).to(self.device)
        self.slots.row_slots.set(slots)
        if self.generative:
            # A decoder classifies from its last real token's hidden state.
            hidden = self.model.get_decoder()(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).last_hidden_state
            last = encoded["attention_mask"].sum(dim=1) - 1
            features = hidden[torch.arange(len(texts), device=self.device), last]
        else:
            output = self.model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
            features = output.pooler_output if getattr(output, "pooler_output", None) is not None else output.last_hidden_state[:, 0]
        features = features.float()
        probabilities = []
        for row, slot in enumerate(slots):
            head = self.slots.heads[slot]
            logits = features[row] @ head["weight"].t()
            if "bias" in head:
                logits = logits + head["bias"]
            probabilities.append(logits.softmax(dim=-1).tolist())
        return probabilities


def _slot(sequence) -> int:
    return sequence.adapter.slot if sequence.adapter is not None else 0


def _sample_row(logits: torch.Tensor, request, generator: torch.Generator) -> int:
    logits = logits / request.temperature
    if request.top_k:
        kth = torch.topk(logits, min(request.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probabilities = logits.softmax(dim=-1)
    if request.top_p and request.top_p < 1:
        ordered, order = probabilities.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always the first token).
        outside = ordered.cumsum(dim=-1) - ordered > request.top_p
        ordered = ordered.masked_fill(outside, 0)
        probabilities = torch.zeros_like(probabilities).scatter(0, order, ordered)
    return int(torch.multinomial(probabilities, 1, generator=generator))
