"""A preallocated KV cache for the continuous batch: one slot (row) per running request.

transformers' ``DynamicCache`` grows by ``torch.cat``: every decode step copied the whole
batch's keys and values (gigabytes at 32 rows of ~1.5k tokens), and every join or leave
copied them again. Here each layer owns buffers of ``[slots, kv_heads, width, head_dim]``; a
decode step writes one column in place and attention reads a view of the used columns.

Rows are right-aligned: every row's newest token is in column ``length - 1``, and a row's
prompt sits just left of the column where it joined (the mask hides the columns before it).
A row that leaves is replaced by the last row (one row copied, not the batch). When the
columns run out, the columns no row uses any more are cut from the left; buffers grow by
doubling when a prompt or the batch needs more.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from engine.errors import EngineError
from engine.serving.packed_prefill import PackedKV, placement


class SlotLayer(DynamicLayer):  # type: ignore[no-untyped-call]
    """One model layer's slots. ``keys``/``values`` are the whole buffers; ``length`` is the
    number of columns in use (the same for every layer, set by ``SlotCache``).

    With ``full_width`` (a captured decode graph), a step writes its column at the index held
    in the ``column`` tensor and attention reads every column (the mask hides the unused
    ones), so the shapes and addresses never change between steps."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, column: torch.Tensor) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.keys, self.values = keys, values
        self.device = keys.device
        self.is_initialized = True
        self.rows = 0
        self.length = 0
        self.full_width = False
        self.column = column.to(keys.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None
        if self.full_width:
            keys, values = self.keys[:self.rows], self.values[:self.rows]
            keys.index_copy_(2, self.column, key_states)
            values.index_copy_(2, self.column, value_states)
            return keys, values
        end = self.length + key_states.shape[-2]
        self.keys[:self.rows, :, self.length:end] = key_states
        self.values[:self.rows, :, self.length:end] = value_states
        return self.keys[:self.rows, :, :end], self.values[:self.rows, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1 if self.keys is None else int(self.keys.shape[2])


class SlotCache(Cache):
    """The batch's KV slots and which columns hold a real token (``mask``, per row)."""

    def __init__(self, like: list[tuple[torch.Tensor, torch.Tensor]], slots: int,
                 width: int) -> None:
        device = like[0][0].device
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        layers = [SlotLayer(_buffer(keys, slots, width), _buffer(values, slots, width),
                            self.column) for keys, values in like]
        super().__init__(layers=layers)  # type: ignore[arg-type]
        # True where a row has a real token (bool: passed to attention as a prepared mask).
        self.mask = torch.zeros((slots, width), dtype=torch.bool, device=device)
        self.rows = 0
        self.length = 0

    @property
    def slots(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def _slot_layers(self) -> list[SlotLayer]:
        return self.layers  # type: ignore[return-value]

    def _sync(self) -> None:
        if self.column.is_cuda and torch.cuda.is_current_stream_capturing():
            # The fill below would become part of the graph and reset the write column to
            # this moment's value at every replay (every token's KV in one column).
            raise EngineError("KV slots changed inside a CUDA graph capture")
        for layer in self._slot_layers():
            layer.rows, layer.length = self.rows, self.length
        if self._slot_layers()[0].full_width:
            for column in {id(layer.column): layer.column
                           for layer in self._slot_layers()}.values():
                column.fill_(self.length)

    def use_full_width(self, rows: int) -> None:
        """Static shapes for a captured step over ``rows`` slots (a bucket; the rows past the
        running ones compute nothing anyone reads)."""
        for layer in self._slot_layers():
            layer.full_width, layer.rows = True, rows
        self._sync()
        for layer in self._slot_layers():
            layer.rows = rows

    def clear(self) -> None:
        """No rows any more (the buffers, and graphs captured over them, stay)."""
        self.mask.zero_()
        self.rows = self.length = 0
        self._sync()

    def attention_mask(self, rows: int, columns: int) -> torch.Tensor:
        """A prepared 4-D mask (``[rows, 1, 1, columns]``, True = attend): transformers uses
        it as given instead of building one per step."""
        return self.mask[:rows, None, None, :columns]

    def grown(self, slots: int, width: int) -> SlotCache:
        """A larger copy (at least ``slots`` rows and ``width`` columns, doubling)."""
        slots = max(slots, self.slots if slots <= self.slots else 2 * self.slots)
        width = max(width, self.width if width <= self.width else 2 * self.width)
        bigger = SlotCache([(layer.keys, layer.values) for layer in self._slot_layers()
                            if layer.keys is not None and layer.values is not None],
                           slots, width)
        rows, length = self.rows, self.length
        for mine, theirs in zip(self._slot_layers(), bigger._slot_layers(), strict=True):
            assert mine.keys is not None and mine.values is not None
            assert theirs.keys is not None and theirs.values is not None
            theirs.keys[:rows, :, :length] = mine.keys[:rows, :, :length]
            theirs.values[:rows, :, :length] = mine.values[:rows, :, :length]
        bigger.mask[:rows, :length] = self.mask[:rows, :length]
        bigger.rows, bigger.length = rows, length
        bigger._sync()
        return bigger

    def shift_right(self, columns: int) -> None:
        """Move every row ``columns`` to the right (a longer prompt is joining)."""
        self._move_columns(0, columns, self.length)
        self.length += columns
        self._sync()

    def _move_columns(self, source: int, target: int, count: int) -> None:
        """Copy columns ``[source, source + count)`` of every row to ``target`` (ranges may
        overlap) and clear the mask outside the target. The one scratch buffer is taken
        first: running out of memory leaves the slots as they were."""
        rows = self.rows
        first = self._slot_layers()[0].keys
        assert first is not None
        scratch = first.new_empty((rows, first.shape[1], count, first.shape[3]))
        mask = self.mask[:rows, source:source + count].clone()
        for layer in self._slot_layers():
            for buffer in (layer.keys, layer.values):
                assert buffer is not None
                scratch.copy_(buffer[:rows, :, source:source + count])
                buffer[:rows, :, target:target + count] = scratch
        self.mask[:rows] = False
        self.mask[:rows, target:target + count] = mask

    def append_packed(self, prompts: PackedKV) -> None:
        """Add one row per packed prompt (its prefix's tokens, then its own), each ending at
        the newest column: one gather and one scatter per layer, whatever the number of
        rows. The caller made room."""
        rows, columns, source = placement(prompts, self.rows, self.length, self.mask.device)
        for layer, (keys, values) in zip(self._slot_layers(), prompts.layers, strict=True):
            assert layer.keys is not None and layer.values is not None
            # [tokens, heads, dim] on both sides: the advanced indices come first
            layer.keys[rows, :, columns] = keys[0].index_select(1, source).transpose(0, 1)
            layer.values[rows, :, columns] = values[0].index_select(1, source).transpose(0, 1)
        self.mask[self.rows:self.rows + len(prompts.lengths)] = False
        self.mask[rows, columns] = True
        self.rows += len(prompts.lengths)
        self._sync()

    def step_mask(self, rows: int | None = None) -> torch.Tensor:
        """The attention mask of the next decode step: every row's token in a new column
        (``rows`` past the running ones too: a bucket's idle slots attend to their own
        column, so nothing there is a softmax over nothing)."""
        self.mask[:rows or self.rows, self.length] = True
        return self.attention_mask(self.rows, self.length + 1)

    def advance(self) -> None:
        self.length += 1
        self._sync()

    def remove_row(self, row: int) -> None:
        """Free ``row``: the last row moves into it (the caller mirrors the move)."""
        last = self.rows - 1
        if row != last:
            for layer in self._slot_layers():
                for buffer in (layer.keys, layer.values):
                    assert buffer is not None
                    buffer[row, :, :self.length] = buffer[last, :, :self.length]
            self.mask[row, :self.length] = self.mask[last, :self.length]
        self.mask[last] = False
        self.rows = last
        if not self.rows:
            self.length = 0
        self._sync()

    def compact(self) -> int:
        """Cut the columns no row uses from the left; return how many were cut."""
        used = self.mask[:self.rows, :self.length].any(dim=0).nonzero()
        start = int(used[0]) if len(used) else self.length
        if start == 0:
            return 0
        self._move_columns(start, 0, self.length - start)
        self.length -= start
        self._sync()
        return start


def _buffer(like: torch.Tensor, slots: int, width: int) -> torch.Tensor:
    return like.new_zeros((slots, like.shape[1], width, like.shape[3]))
