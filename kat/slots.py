"""A slot KV cache: a fixed number of rows (slots) per model, each with its own write position.

`SlotCache` is a transformers `Cache` whose layers (`SlotLayer`, in the manner of transformers'
StaticLayer) hold keys and values of shape (S, H, capacity, D), allocated once and never grown.
A forward through it is planned first (`SlotCache.plan`): which slots the forward's rows are and
how many new positions each row writes; the plan returns the (rows, 1, q, capacity) attention
mask the forward must be given. Each layer then writes the new keys and values of row b at
columns length[slot_b] .. length[slot_b] + q - 1 of its slot (one index_put, no host sync) and
hands attention the whole capacity; the mask lets each query see only its slot's valid columns
up to itself. Nothing outside the planned slots is read or written, so one slot can be emptied
(`reset`) and refilled with a new prompt while the others keep decoding.

Columns that hold a real token (prompt tokens, generated tokens up to a row's end) are marked in
`valid` (S, capacity); left padding, tokens after an EOS and whatever an earlier occupant of the
slot left behind are not. A query always sees its own column too, so a query on a pad or on an
empty slot attends to something and stays finite; its output is never read.

The model must be given explicit `position_ids` (the cache keeps no positions: with left padding
a row's position is not its column) and the 4D mask from `plan` as `attention_mask`; transformers'
mask builder passes a 4D mask through unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin


class _Plan:
    """The write plan of the next forward, shared by all layers of one cache."""

    def __init__(self) -> None:
        self.rows: Tensor | None = None  # (b,) slots written by the forward's rows; None: all slots in order
        self.columns: Tensor | None = None  # (b, q) cache column of each new position


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values for S slots of `capacity` columns each (allocated on first use)."""

    is_compileable = True
    is_sliding = False

    def __init__(self, slots: int, capacity: int, plan: _Plan):
        super().__init__()
        self.slots, self.capacity, self.plan = slots, capacity, plan

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        heads = key_states.shape[1]
        self.keys = key_states.new_zeros(self.slots, heads, self.capacity, key_states.shape[-1])
        self.values = value_states.new_zeros(self.slots, heads, self.capacity, value_states.shape[-1])
        if not torch.compiler.is_compiling():  # fixed addresses: CUDA graphs may capture the buffers
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.values)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Write (b, H, q, D) at the planned columns; return the planned slots' whole buffers."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        rows, columns = self.plan.rows, self.plan.columns
        slot_ix = (torch.arange(self.slots, device=self.device) if rows is None else rows)[:, None]  # (b, 1)
        # advanced indices around a slice put the indexed dims first: the target is (b, q, H, D)
        self.keys[slot_ix, :, columns] = key_states.transpose(1, 2).to(self.keys.dtype)
        self.values[slot_ix, :, columns] = value_states.transpose(1, 2).to(self.values.dtype)
        if rows is None:
            return self.keys, self.values  # (S, H, capacity, D)
        return self.keys[rows], self.values[rows]  # (b, H, capacity, D)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.capacity, 0

    def get_seq_length(self) -> int:
        return self.capacity

    def get_max_length(self) -> int:
        return self.capacity


class SlotCache(Cache):
    """S slots of `capacity` columns for a model of `layers` attention layers (see the module docstring).

    length (S,) long: each slot's write position (columns used so far).
    valid (S, capacity) bool: columns holding a real token of the slot's current row.
    """

    def __init__(self, layers: int, slots: int, capacity: int, device: torch.device | str = "cpu"):
        self._plan = _Plan()
        super().__init__(layers=[SlotLayer(slots, capacity, self._plan) for _ in range(layers)])
        self.slots, self.capacity = slots, capacity
        self.length = torch.zeros(slots, dtype=torch.long, device=device)
        self.valid = torch.zeros(slots, capacity, dtype=torch.bool, device=device)
        if not torch.compiler.is_compiling():  # mutated inside a compiled decode step: fixed addresses
            torch._dynamo.mark_static_address(self.length)
            torch._dynamo.mark_static_address(self.valid)

    @classmethod
    def for_model(cls, model, slots: int, capacity: int) -> SlotCache:
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return cls(cfg.num_hidden_layers, slots, capacity, device=model.device)

    def reset(self, slots: Tensor | None = None) -> None:
        """Empty `slots` (all when None): length 0, no valid column. The buffers keep their contents,
        which the mask hides until a new row overwrites them."""
        if slots is None:
            self.length.zero_()
            self.valid.zero_()
        else:
            self.length[slots] = 0
            self.valid[slots] = False

    def plan(self, rows: Tensor | None, new_valid: Tensor, dtype: torch.dtype, advance: Tensor | None = None) -> Tensor:
        """Plan the next forward: row b of it writes q new positions into slot rows[b] (all slots in
        order when rows is None), at the slot's write position; new_valid (b, q) says which of them
        are real tokens. advance (b,) bool: rows whose write position moves on (default all); a row
        that does not advance rewrites the same columns each time (an empty slot).

        Returns the additive (b, 1, q, capacity) attention mask in `dtype` (0 seen, min hidden).
        """
        b, q = new_valid.shape
        length = self.length if rows is None else self.length[rows]  # (b,)
        columns = length[:, None] + torch.arange(q, device=length.device)  # (b, q)
        valid = self.valid if rows is None else self.valid[rows]  # (b, capacity)
        valid = valid.scatter(1, columns, new_valid)  # (b, capacity) with the new columns
        if rows is None:
            self.valid.copy_(valid)
        else:
            self.valid[rows] = valid
        step = q if advance is None else advance.long() * q  # (b,) or int
        if rows is None:
            self.length.add_(step)
        else:
            self.length[rows] = length + step
        self._plan.rows, self._plan.columns = rows, columns
        key = torch.arange(self.capacity, device=length.device)  # (capacity,)
        seen = (valid[:, None, :] & (key <= columns[..., None])) | (key == columns[..., None])  # (b, q, capacity)
        mask = torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, torch.finfo(dtype).min)
        return mask[:, None]  # (b, 1, q, capacity)
