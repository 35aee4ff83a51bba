"""Several prompts prefilled as one packed sequence past the shared prefix.

Padding a group to its longest prompt wasted the GEMMs' time on pad tokens: a burst of 32
prompts of 50-250 tokens was 8,000 positions for 4,600 real ones, and every row carried its
own copy of the 1,200-token prefix KV (``torch.cat`` per layer). Packed, the prompts' own
tokens follow each other in one row, each at its own positions, and a prepared mask lets a
token see the shared prefix (one copy for all) and the earlier tokens of its own prompt only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from engine.serving.sampling import on_device

KV = list[tuple[torch.Tensor, torch.Tensor]]
# Tokens per packed forward: the mask is dense (tokens x tokens), so attention's cost grows
# with the square of a pack; past a few thousand tokens the GEMMs are busy enough anyway.
PACK_TOKENS = 2048


@dataclass(frozen=True)
class Packed:
    """One forward's inputs for prompts packed past ``covered`` shared tokens."""

    ids: torch.Tensor  # [1, tokens]: every prompt's own tokens, one after the other
    positions: torch.Tensor  # [1, tokens]: each token's position in its own prompt
    mask: torch.Tensor  # [1, 1, tokens, covered + tokens], True = attend
    ends: torch.Tensor  # [prompts]: where each prompt's last token sits in ``ids``


@dataclass(frozen=True)
class PackedKV:
    """A packed prefill's KV per layer (``[1, heads, covered + sum(lengths), dim]``: the
    shared tokens, then each prompt's own ``lengths[i]`` tokens in turn)."""

    layers: KV
    lengths: list[int]


def split(rests: list[list[int]], limit: int | None = None) -> list[list[list[int]]]:
    """Consecutive groups of prompts of at most ``limit`` tokens (a longer prompt alone)."""
    limit = PACK_TOKENS if limit is None else limit
    groups: list[list[list[int]]] = []
    size = 0
    for rest in rests:
        if not groups or size + len(rest) > limit:
            groups.append([])
            size = 0
        groups[-1].append(rest)
        size += len(rest)
    return groups


def pack(rests: list[list[int]], covered: int, device: torch.device) -> Packed:
    """Pack ``rests`` (each prompt past its first ``covered`` tokens, none empty). One copy
    from the host, the rest computed on ``device``: nothing waits for the GPU, so the next
    pack is queued while this one runs."""
    lengths_list = [len(rest) for rest in rests]
    tokens = sum(lengths_list)
    sent = on_device([token for rest in rests for token in rest] + lengths_list, device)
    ids, lengths = sent[:tokens], sent[tokens:]
    starts = torch.cumsum(lengths, 0) - lengths
    prompt_of = _repeat(torch.arange(len(rests), device=device), lengths, tokens)
    index = torch.arange(tokens, device=device)
    positions = covered + index - starts[prompt_of]
    own = (prompt_of[:, None] == prompt_of[None, :]) & (index[:, None] >= index[None, :])
    mask = torch.cat([own.new_ones((tokens, covered)), own], dim=1)
    return Packed(ids[None], positions[None], mask[None, None], starts + lengths - 1)


def placement(lengths: list[int], covered: int, first_row: int, end: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each packed prompt's KV goes in the slots: rows ``first_row`` on, each prompt
    (its ``covered`` shared tokens, then its own ``lengths[i]``) ending just before column
    ``end``. Returns the slot rows, slot columns and packed source columns, one per token."""
    count = sum(lengths) + covered * len(lengths)
    own = on_device(lengths, device)
    totals = own + covered
    rows = _repeat(torch.arange(first_row, first_row + len(lengths), device=device), totals,
                   count)
    # Column within its own prompt, 0 .. total - 1, for every token of every prompt.
    within = (torch.arange(count, device=device)
              - _repeat(torch.cumsum(totals, 0) - totals, totals, count))
    columns = end - _repeat(totals, totals, count) + within
    own_starts = covered + torch.cumsum(own, 0) - own
    source = torch.where(within < covered, within,
                         _repeat(own_starts, totals, count) + within - covered)
    return rows, columns, source


def _repeat(values: torch.Tensor, times: torch.Tensor, total: int) -> torch.Tensor:
    """``values[i]`` ``times[i]`` times; ``total`` given, so the host needs no count back."""
    return torch.repeat_interleave(values, times, output_size=total)


def cache_of(prefix: KV | None, covered: int) -> DynamicCache:
    """A one-row cache holding ``prefix``'s first ``covered`` tokens (a packed prefill
    shares them between its prompts)."""
    cache = DynamicCache()
    if prefix is None or covered == 0:
        return cache
    for layer, (keys, values) in enumerate(prefix):
        # ``update`` concatenates into new tensors: the prefix itself is never written.
        cache.update(keys[:, :, :covered], values[:, :, :covered], layer)
    return cache
