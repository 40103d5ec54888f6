"""The key/value cache of a running batch whose rows come and go.

Rows are left-padded to one length, so a decoding step is one forward pass
over (rows, 1) tokens. A new group of rows is prefilled on its own and then
merged in, padding whichever side is shorter on the left; finished rows are
dropped and padding columns that no row needs any more are cut off.

Each layer keeps its keys and values in a buffer with room to grow, so a
decoding step writes one column instead of copying the whole cache (as
transformers' DynamicLayer does with torch.cat).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class GrowingLayer(DynamicLayer):
    def __init__(self) -> None:
        super().__init__()
        self.length = 0
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self._keys is None or end > self._keys.shape[-2]:
            self._reserve(key_states, value_states, max(2 * end, 64))
        self._keys[..., self.length : end, :] = key_states
        self._values[..., self.length : end, :] = value_states
        self._set_length(end)
        return self.keys, self.values

    def _reserve(self, key_like: torch.Tensor, value_like: torch.Tensor, capacity: int) -> None:
        batch, heads, _, dim = key_like.shape
        keys = key_like.new_zeros(batch, heads, capacity, dim)
        values = value_like.new_zeros(batch, heads, capacity, value_like.shape[-1])
        if self._keys is not None and self.length:
            keys[..., : self.length, :] = self._keys[..., : self.length, :]
            values[..., : self.length, :] = self._values[..., : self.length, :]
        self._keys, self._values = keys, values

    def _set_length(self, length: int) -> None:
        self.length = length
        self.keys = self._keys[..., :length, :]
        self.values = self._values[..., :length, :]

    def get_seq_length(self) -> int:
        return self.length

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Sets the contents to (batch, heads, length, dim) tensors."""
        self.is_initialized = True
        self.device, self.dtype = keys.device, keys.dtype
        self._keys, self._values = None, None
        self.length = 0
        self._reserve(keys, values, keys.shape[-2] + 64)
        self._keys[..., : keys.shape[-2], :] = keys
        self._values[..., : values.shape[-2], :] = values
        self._set_length(keys.shape[-2])


def new_cache(num_layers: int) -> Cache:
    return Cache(layers=[GrowingLayer() for _ in range(num_layers)])


class BatchCache:
    """The cache plus the attention mask (rows, length) of the running batch."""

    def __init__(self, num_layers: int, device: torch.device | str = "cpu"):
        self.num_layers = num_layers
        self.device = torch.device(device)
        self.cache = new_cache(num_layers)
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def extend_mask(self) -> torch.Tensor:
        """The mask for a decoding step: one more real column for every row."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        return self.mask

    def merge(self, cache: Cache, mask: torch.Tensor) -> None:
        """Appends the rows of a freshly prefilled cache."""
        if self.rows == 0:
            self._set(list(_layer_tensors(cache)), mask)
            return
        length = max(self.length, mask.shape[1])
        tensors = []
        for (k1, v1), (k2, v2) in zip(_layer_tensors(self.cache), _layer_tensors(cache), strict=True):
            tensors.append(
                (torch.cat([_pad_left(k1, length), _pad_left(k2, length)]), torch.cat([_pad_left(v1, length), _pad_left(v2, length)]))
            )
        self._set(tensors, torch.cat([_pad_mask(self.mask, length), _pad_mask(mask, length)]))

    def keep(self, rows: list[int]) -> None:
        """Keeps only `rows` (indices into the batch), dropping padding columns no row needs."""
        if not rows:
            self.cache = new_cache(self.num_layers)
            self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        mask = self.mask[index]
        start = int((mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())  # leading all-padding columns
        self._set([(k[index, :, start:], v[index, :, start:]) for k, v in _layer_tensors(self.cache)], mask[:, start:])

    def _set(self, tensors: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        cache = new_cache(self.num_layers)
        padding = (mask == 0)[:, None, :, None]
        for layer, (keys, values) in zip(cache.layers, tensors, strict=True):
            # Padding positions hold zeros, never what a padded forward left there.
            layer.replace(keys.masked_fill(padding, 0), values.masked_fill(padding, 0))
        self.cache, self.mask = cache, mask


def _layer_tensors(cache: Cache):
    for layer in cache.layers:
        yield layer.keys, layer.values


def _pad_left(tensor: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - tensor.shape[-2]
    if missing == 0:
        return tensor
    return torch.cat([tensor.new_zeros(*tensor.shape[:-2], missing, tensor.shape[-1]), tensor], dim=-2)


def _pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - mask.shape[1]
    return mask if missing == 0 else torch.cat([mask.new_zeros(mask.shape[0], missing), mask], dim=1)
