"""Prompt starts kept on the device between requests: a returning viewer's next prompt
prefills only what is new since their last one.

A viewer's prompt is the persona, their history, then this message (``build_messages``), so
their next prompt starts with everything their last one held up to its last message. Each
joined prompt's KV is kept here (up to a memory budget, least recently used first out); a
new prompt takes the KV of the longest start it shares with a kept one, and that kept entry
is dropped (the new prompt's own entry holds all of it and more).

Lookup is by chained hashes of ``BLOCK``-token blocks (as vLLM's prefix caching keys its KV
blocks), then the exact token count is taken against the entry's ids, so a hash collision
costs a miss, never a wrong KV. KV at a position depends only on the tokens up to it
(causal attention, absolute positions), so a shared start's KV is the same in any prompt.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from engine.serving.packed_prefill import PackedKV

log = logging.getLogger(__name__)

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: [1, kv_heads, tokens, head_dim]
BLOCK = 32


@dataclass(eq=False)
class Entry:
    ids: list[int]
    layers: KV
    nbytes: int
    hashes: list[int] = field(default_factory=list)


class PrefixCache:
    """Not thread-safe: the decode loop owns it."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # id(entry) → entry, LRU first
        # chained block hash → the entries holding that start (any of them will do)
        self._by_hash: dict[int, dict[int, Entry]] = {}
        self.hits = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, prompt_ids: list[int]) -> tuple[Entry | None, int]:
        """The kept entry sharing the longest start with ``prompt_ids``, and how many tokens
        (at most all but the prompt's last, which must be prefilled for its logits)."""
        found: Entry | None = None
        for block_hash in _block_hashes(prompt_ids[:-1]):
            holders = self._by_hash.get(block_hash)
            if not holders:
                break
            found = next(reversed(holders.values()))  # the newest
        if found is None:
            return None, 0
        shared = common_prefix(prompt_ids[:-1], found.ids)
        return (found, shared) if shared else (None, 0)

    def use(self, entry: Entry, tokens: int) -> KV:
        """``entry``'s KV for its first ``tokens`` tokens (views: never written)."""
        self.hits += 1
        self.reused_tokens += tokens
        self._entries.move_to_end(id(entry))
        return [(keys[:, :, :tokens], values[:, :, :tokens]) for keys, values in entry.layers]

    def keep(self, ids: list[int], layers: KV) -> None:
        """Keep ``layers`` (the KV of ``ids``, owned by the cache from now on), making room by
        dropping the least recently used; one larger than the whole budget is not kept."""
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                     for k, v in layers)
        if not self.max_bytes or nbytes > self.max_bytes or len(ids) < BLOCK:
            return
        while self.used_bytes + nbytes > self.max_bytes and self._entries:
            self._drop(next(iter(self._entries.values())))
        entry = Entry(list(ids), layers, nbytes, list(_block_hashes(ids)))
        self._entries[id(entry)] = entry
        self.used_bytes += nbytes
        for block_hash in entry.hashes:
            self._by_hash.setdefault(block_hash, {})[id(entry)] = entry

    def keep_packs(self, prompts: list[list[int]], packs: list[PackedKV]) -> None:
        """``keep`` each prompt of ``packs`` (packed prefills), in order. Out of memory only
        empties the cache: the prompts' rows have joined their batch already."""
        if not self.max_bytes:
            return
        index = 0
        try:
            for packed in packs:
                for prefix_start, covered, own_start, length in zip(
                        packed.prefix_starts(), packed.covered, packed.own_starts(),
                        packed.lengths, strict=True):
                    layers = [(_prompt_kv(keys, prefix_start, covered, own_start, length),
                               _prompt_kv(values, prefix_start, covered, own_start, length))
                              for keys, values in packed.layers]
                    self.keep(prompts[index], layers)
                    index += 1
        except torch.OutOfMemoryError:
            log.warning("no memory left to keep prompt starts; the prefix cache is emptied")
            self.clear()

    def clear(self) -> None:
        self._entries.clear()
        self._by_hash.clear()
        self.used_bytes = 0

    def _drop(self, entry: Entry) -> None:
        if self._entries.pop(id(entry), None) is None:
            return
        self.used_bytes -= entry.nbytes
        for block_hash in entry.hashes:
            holders = self._by_hash.get(block_hash)
            if holders is not None:
                holders.pop(id(entry), None)
                if not holders:
                    del self._by_hash[block_hash]


def _block_hashes(ids: list[int]) -> Iterator[int]:
    """One hash per whole block, each chained to the blocks before it."""
    chained = 0
    for start in range(0, len(ids) - BLOCK + 1, BLOCK):
        chained = hash((chained, *ids[start:start + BLOCK]))
        yield chained


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


def _prompt_kv(packed: torch.Tensor, prefix_start: int, covered: int, start: int,
               length: int) -> torch.Tensor:
    """One prompt's KV out of a pack (``[1, heads, columns, dim]``): its ``covered`` prefix
    tokens from column ``prefix_start``, then its own ``length`` from column ``start``; a
    copy (a captured prefill's pack is overwritten by the next)."""
    return torch.cat([packed[:, :, prefix_start:prefix_start + covered],
                      packed[:, :, start:start + length]], dim=2)
