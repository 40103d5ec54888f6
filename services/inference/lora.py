"""Many LoRA adapters on one base model, each batch row with its own.

Each linear layer that some adapter targets is wrapped in a SlottedLoRALinear
holding a table of LoRA weights with one slot per resident adapter; slot 0 is
all zeros and stands for the base model alone. A forward pass reads every
row's slot from RowSlots and adds x·A[slot]·B[slot] for the whole batch in two
batched matmuls over the gathered weights (as S-LoRA and Punica do), so a
batch that mixes adapters costs one pass, not one pass per adapter. Each
layer keeps the weights gathered for the batch's rows while they stay the
same, as they do from one decoding step to the next (up to the batch size
times an adapter's weights, in float32).

Ranks differ between adapters; the table's rank is the largest loaded, and
smaller adapters are zero-padded, which leaves their product unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tunewire.services.common import layout
from tunewire.services.common.errors import InvalidArgument
from tunewire.services.inference.adapters import CAUSAL_LM, SEQ_CLS

_PEFT_PREFIX = "base_model.model."
UNSUPPORTED_LORA_OPTIONS = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
}


class RowSlots:
    """The adapter slot of each row of the batch being run, shared by every
    SlottedLoRALinear of a model. `uniform` is set when all rows share one
    slot, which takes a plain matmul instead of the gathered one. `gathered`
    holds each layer's weights gathered for these rows; it goes when the
    rows change, and with it their memory."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.rows: torch.Tensor | None = None
        self.uniform: int | None = 0
        self.gathered: dict[SlottedLoRALinear, tuple[torch.Tensor, torch.Tensor]] = {}
        self._slots: list[int] = []

    def set(self, slots: list[int]) -> None:
        if slots == self._slots:  # the next decoding step of the same rows
            return
        self._slots = list(slots)
        self.gathered = {}
        first = slots[0]
        if all(s == first for s in slots):
            self.uniform, self.rows = first, None
        else:
            self.uniform, self.rows = None, torch.tensor(slots, dtype=torch.long, device=self.device)


class SlottedLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, row_slots: RowSlots, capacity: int):
        super().__init__()
        self.base = base
        self.row_slots = row_slots
        device = base.weight.device
        # A stored transposed (in, r) and B (r, out) with the LoRA scale folded
        # in, so the update is x @ a @ b; in float32 whatever the base model's
        # dtype (the update is small, its precision is cheap).
        self.register_buffer("a", torch.zeros(capacity + 1, base.in_features, 0, device=device))
        self.register_buffer("b", torch.zeros(capacity + 1, 0, base.out_features, device=device))
        self.active = [False] * (capacity + 1)

    @property
    def rank(self) -> int:
        return self.a.shape[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        slots = self.row_slots
        if slots.uniform is not None and not self.active[slots.uniform]:
            return y
        x = x.float()
        if slots.uniform is not None:
            update = (x @ self.a[slots.uniform]) @ self.b[slots.uniform]
        else:
            # x: (batch, tokens, in); gathered a: (batch, in, r), b: (batch, r, out).
            a, b = self._rows_weights()
            update = torch.bmm(torch.bmm(x, a), b)
        return y + update.to(y.dtype)

    def _rows_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's a and b, gathered once and kept while the batch's rows
        and the weights stay the same (copying them every decoding step was
        the larger part of a mixed batch's LoRA cost)."""
        gathered = self.row_slots.gathered.get(self)
        if gathered is None:
            rows = self.row_slots.rows
            # index_select gathers far faster than advanced indexing on CPU.
            gathered = self.row_slots.gathered[self] = (self.a.index_select(0, rows), self.b.index_select(0, rows))
        return gathered

    def set_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """a: (in, r), b: (r, out), scale already applied."""
        self.row_slots.gathered.pop(self, None)
        rank = a.shape[1]
        if rank > self.rank:
            self._grow(rank)
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.a[slot, :, :rank] = a
        self.b[slot, :rank, :] = b
        self.active[slot] = True

    def clear_slot(self, slot: int) -> None:
        self.row_slots.gathered.pop(self, None)
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.active[slot] = False

    def _grow(self, rank: int) -> None:
        a = self.a.new_zeros(self.a.shape[0], self.a.shape[1], rank)
        b = self.b.new_zeros(self.b.shape[0], rank, self.b.shape[2])
        a[:, :, : self.rank] = self.a
        b[:, : self.rank, :] = self.b
        self.a, self.b = a, b


@dataclass
class AdapterWeights:
    """A validated LoRA adapter, read from disk, not yet placed in a slot."""

    task_type: str
    rank: int
    # Module name in the served model -> (a (in, r), b (r, out) scaled).
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    # SEQ_CLS: the classification head's weights ("weight", optional "bias").
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)

    @property
    def num_bytes(self) -> int:
        tensors = [t for pair in self.modules.values() for t in pair] + list(self.head.values())
        return sum(t.numel() * t.element_size() for t in tensors)


def read_adapter(
    adapter_dir: Path, linears: dict[str, nn.Linear], model_prefix: str, base_names: set[str], max_rank: int, head_names: tuple[str, ...]
) -> AdapterWeights:
    """Reads and checks a PEFT LoRA adapter against the served model: its base
    model, rank, and every tensor's module and shape. Raises InvalidArgument
    (field `source`) naming what does not fit; touches nothing served."""
    from peft.utils.other import get_pattern_key
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path, weights_path = adapter_dir / layout.ADAPTER_CONFIG, adapter_dir / layout.ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise InvalidArgument.field("source", f"no {layout.ADAPTER_CONFIG}: not a PEFT adapter directory")
    if not weights_path.is_file():
        raise InvalidArgument.field("source", f"no {layout.ADAPTER_WEIGHTS}: only safetensors weights are loaded")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument.field("source", f"{layout.ADAPTER_CONFIG} is not valid JSON: {exc}") from None
    if config.get("peft_type") != "LORA":
        raise InvalidArgument.field("source", f"adapter type {config.get('peft_type')!r}: only LORA adapters are served")
    task_type = config.get("task_type") or CAUSAL_LM
    if task_type not in (CAUSAL_LM, SEQ_CLS):
        raise InvalidArgument.field("source", f"task type {task_type!r}: served are CAUSAL_LM (generation) and SEQ_CLS (classification)")
    for option, name in UNSUPPORTED_LORA_OPTIONS.items():
        if config.get(option):
            raise InvalidArgument.field("source", f"{name} ({option}) adapters are not supported")
    base = config.get("base_model_name_or_path")
    if base and base not in base_names:
        raise InvalidArgument.field("source", f"adapter was trained on {base!r}; this service serves {sorted(base_names)[0]!r}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise InvalidArgument.field("source", f"{layout.ADAPTER_WEIGHTS} is unreadable: {exc}") from None

    alpha_default = config.get("lora_alpha", 8)
    alpha_pattern = config.get("alpha_pattern") or {}
    prefixes = ("", f"{model_prefix}.")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    head: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(_PEFT_PREFIX)
        if ".lora_A." in name or ".lora_B." in name:
            module_name, part = name.rsplit(".lora_", 1)
            module = _find(linears, module_name, prefixes)
            if module is None:
                raise InvalidArgument.field("source", f"tensor {key}: {module_name} is not a linear layer of the served model")
            pairs.setdefault(module, {})[part.split(".")[0]] = tensor
        elif task_type == SEQ_CLS and name.split(".")[0] in head_names:
            head[name.rsplit(".", 1)[1]] = tensor
        else:
            raise InvalidArgument.field(
                "source", f"tensor {key}: not a LoRA weight (full weights such as saved embeddings or heads are not applied)"
            )
    if not pairs:
        raise InvalidArgument.field("source", "the adapter has no LoRA weights")
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rank = 0
    for module_name, pair in pairs.items():
        a, b = pair.get("A"), pair.get("B")
        if a is None or b is None:
            raise InvalidArgument.field("source", f"{module_name}: lora_A and lora_B must both be present")
        linear = linears[module_name]
        r = a.shape[0]
        if a.shape != (r, linear.in_features) or b.shape != (linear.out_features, r):
            raise InvalidArgument.field(
                "source",
                f"{module_name}: LoRA shapes {tuple(a.shape)} and {tuple(b.shape)} do not fit a "
                f"{linear.in_features}->{linear.out_features} layer: the adapter is for another model",
            )
        if r > max_rank:
            raise InvalidArgument.field(
                "source", f"{module_name}: rank {r} is over the maximum {max_rank}: raise TUNEWIRE_MAX_ADAPTER_RANK"
            )
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module_name), alpha_default) if alpha_pattern else alpha_default
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise InvalidArgument.field("source", f"{module_name}: weights contain NaN or infinity")
        modules[module_name] = (a.float().t().contiguous(), (b.float() * scale).t().contiguous())
        rank = max(rank, r)
    labels: list[str] = []
    if task_type == SEQ_CLS:
        if "weight" not in head:
            raise InvalidArgument.field("source", f"a SEQ_CLS adapter needs its classification head ({' or '.join(head_names)}) saved")
        num_labels = head["weight"].shape[0]
        labels = _labels(adapter_dir, num_labels)
    return AdapterWeights(task_type, rank, modules, {k: v.float() for k, v in head.items()}, labels)


def _find(linears: dict[str, nn.Linear], name: str, prefixes: tuple[str, ...]) -> str | None:
    # A SEQ_CLS adapter names modules from the classifier model (e.g. "bert.encoder…"),
    # the served encoder may be the bare backbone ("encoder…").
    for prefix in prefixes:
        stripped = name.removeprefix(prefix) if prefix else name
        if stripped in linears:
            return stripped
    return None


def _labels(adapter_dir: Path, num_labels: int) -> list[str]:
    metadata = adapter_dir / layout.ADAPTER_METADATA
    if metadata.is_file():
        labels = json.loads(metadata.read_text()).get("labels") or []
        if len(labels) == num_labels:
            return [str(label) for label in labels]
    return [f"LABEL_{i}" for i in range(num_labels)]


class SlotTable:
    """The served model's LoRA slots: which adapter sits in which slot, and
    the layers to write when one is placed or removed. Used from the model
    thread only."""

    def __init__(self, model: nn.Module, capacity: int):
        self.model = model
        self.capacity = capacity
        # The served model's linear layers by name, as adapters name them.
        self.linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        self.row_slots = RowSlots(next(model.parameters()).device)
        self.layers: dict[str, SlottedLoRALinear] = {}
        self.heads: dict[int, dict[str, torch.Tensor]] = {}
        self.free = list(range(capacity, 0, -1))

    def place(self, weights: AdapterWeights) -> int:
        slot = self.free.pop()
        for name, (a, b) in weights.modules.items():
            self._layer(name).set_slot(slot, a, b)
        device = self.row_slots.device
        self.heads[slot] = {name: tensor.to(device) for name, tensor in weights.head.items()}
        return slot

    def copy_out(self, slot: int, task_type: str, rank: int, labels: list[str]) -> AdapterWeights:
        """A copy of the slot's weights in host memory, as read_adapter gives
        them: placing it again restores the slot exactly."""
        modules = {
            name: (layer.a[slot, :, :rank].to("cpu", copy=True), layer.b[slot, :rank, :].to("cpu", copy=True))
            for name, layer in self.layers.items()
            if layer.active[slot]
        }
        head = {name: tensor.to("cpu", copy=True) for name, tensor in self.heads.get(slot, {}).items()}
        return AdapterWeights(task_type, rank, modules, head, list(labels))

    def remove(self, slot: int) -> None:
        for layer in self.layers.values():
            if layer.active[slot]:
                layer.clear_slot(slot)
        self.heads.pop(slot, None)
        self.free.append(slot)

    def _layer(self, name: str) -> SlottedLoRALinear:
        layer = self.layers.get(name)
        if layer is None:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            layer = SlottedLoRALinear(self.linears[name], self.row_slots, self.capacity)
            setattr(parent, child, layer)
            self.layers[name] = layer
        return layer
