"""Several prompts prefilled as one packed sequence, each past the tokens it already has.

Padding a group to its longest prompt wasted the GEMMs' time on pad tokens: a burst of 32
prompts of 50-250 tokens was 8,000 positions for 4,600 real ones, and every row carried its
own copy of the 1,200-token prefix KV (``torch.cat`` per layer). Packed, the prompts' own
tokens follow each other in one row, each at its own positions, and a prepared mask lets a
token see its prefix and the earlier tokens of its own prompt only.

A prefix is either shared (the persona's system turn: one copy of its KV for every prompt of
the pack) or each prompt's own (a returning viewer's kept start: the prefixes' KV one after
the other, each visible to its own prompt only), so returning viewers who arrive together
are prefilled in one forward, not one each.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
from transformers import DynamicCache

from engine.serving.sampling import on_device

KV = list[tuple[torch.Tensor, torch.Tensor]]
# Tokens per packed forward: the mask is dense (tokens x tokens), so attention's cost grows
# with the square of a pack; past a few thousand tokens the GEMMs are busy enough anyway.
PACK_TOKENS = 2048
# Prefix columns of a pack of own prefixes: each token attends over all of them (masked), so
# they bound the attention a pack wastes (~a fifth of an 8B's GEMMs at this size).
PACK_PREFIX_COLUMNS = 6144


@dataclass(frozen=True)
class Packed:
    """One forward's inputs for prompts packed past their prefixes."""

    ids: torch.Tensor  # [1, tokens]: every prompt's own tokens, one after the other
    positions: torch.Tensor  # [1, tokens]: each token's position in its own prompt
    mask: torch.Tensor  # [1, 1, tokens, prefix columns + tokens], True = attend
    ends: torch.Tensor  # [prompts]: where each prompt's last token sits in ``ids``


@dataclass(frozen=True)
class PackedKV:
    """A packed prefill's KV per layer (``[1, heads, columns, dim]``): the prefix columns
    (one prefix of ``covered[0]`` tokens if ``shared``, else each prompt's ``covered[i]`` in
    turn), then each prompt's own ``lengths[i]`` tokens in turn."""

    layers: KV
    lengths: list[int]
    covered: list[int]
    shared: bool = True

    @property
    def prefix_columns(self) -> int:
        if not self.covered:
            return 0
        return self.covered[0] if self.shared else sum(self.covered)

    def prefix_starts(self) -> list[int]:
        """The column where each prompt's prefix starts."""
        if self.shared:
            return [0] * len(self.covered)
        return [0, *accumulate(self.covered)][:-1]

    def own_starts(self) -> list[int]:
        """The column where each prompt's own tokens start."""
        return [self.prefix_columns + start for start in [0, *accumulate(self.lengths)][:-1]]


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


def split_own(rests: list[list[int]], covered: list[int]) -> list[range]:
    """Consecutive groups (index ranges) of prompts past prefixes of their own, each within
    ``PACK_TOKENS`` own tokens and ``PACK_PREFIX_COLUMNS`` prefix columns (one prompt over
    either goes alone)."""
    groups: list[range] = []
    first = tokens = columns = 0
    for index, (rest, prefix) in enumerate(zip(rests, covered, strict=True)):
        if index > first and (tokens + len(rest) > PACK_TOKENS
                              or columns + prefix > PACK_PREFIX_COLUMNS):
            groups.append(range(first, index))
            first, tokens, columns = index, 0, 0
        tokens += len(rest)
        columns += prefix
    if rests:
        groups.append(range(first, len(rests)))
    return groups


def pack(rests: list[list[int]], covered: list[int], shared: bool,
         device: torch.device) -> Packed:
    """Pack ``rests`` (each prompt past its first ``covered[i]`` tokens, none empty; with
    ``shared`` one prefix for all, so ``covered`` is the same for each). One copy from the
    host, the rest computed on ``device``: nothing waits for the GPU, so the next pack is
    queued while this one runs."""
    count = len(rests)
    lengths_list = [len(rest) for rest in rests]
    tokens = sum(lengths_list)
    sent = on_device([token for rest in rests for token in rest] + lengths_list + covered,
                     device)
    ids, lengths, prefixes = sent[:tokens], sent[tokens:tokens + count], sent[tokens + count:]
    starts = torch.cumsum(lengths, 0) - lengths
    prompt_of = _repeat(torch.arange(count, device=device), lengths, tokens)
    index = torch.arange(tokens, device=device)
    positions = prefixes[prompt_of] + index - starts[prompt_of]
    own = (prompt_of[:, None] == prompt_of[None, :]) & (index[:, None] >= index[None, :])
    if shared:
        seen_prefix = own.new_ones((tokens, covered[0] if covered else 0))
    else:
        prefix_of = _repeat(torch.arange(count, device=device), prefixes, sum(covered))
        seen_prefix = prompt_of[:, None] == prefix_of[None, :]
    mask = torch.cat([seen_prefix, own], dim=1)
    return Packed(ids[None], positions[None], mask[None, None], starts + lengths - 1)


def placement(packed: PackedKV, first_row: int, end: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each packed prompt's KV goes in the slots: rows ``first_row`` on, each prompt
    (its prefix's tokens, then its own) ending just before column ``end``. Returns the slot
    rows, slot columns and packed source columns, one per token."""
    count = len(packed.lengths)
    total = sum(packed.lengths) + sum(packed.covered)
    sent = on_device([*packed.lengths, *packed.covered, *packed.prefix_starts(),
                      *packed.own_starts()], device)
    own, covered, prefix_starts, own_starts = sent.view(4, count)
    totals = own + covered
    rows = _repeat(torch.arange(first_row, first_row + count, device=device), totals, total)
    # Column within its own prompt, 0 .. total - 1, for every token of every prompt.
    within = (torch.arange(total, device=device)
              - _repeat(torch.cumsum(totals, 0) - totals, totals, total))
    columns = end - _repeat(totals, totals, total) + within
    prefix_tokens = _repeat(covered, totals, total)
    source = torch.where(within < prefix_tokens, _repeat(prefix_starts, totals, total) + within,
                         _repeat(own_starts, totals, total) + within - prefix_tokens)
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


def cache_of_own(prefixes: list[KV]) -> DynamicCache:
    """A one-row cache holding each prompt's own prefix KV, one after the other."""
    cache = DynamicCache()
    for layer in range(len(prefixes[0])):
        cache.update(torch.cat([prefix[layer][0] for prefix in prefixes], dim=2),
                     torch.cat([prefix[layer][1] for prefix in prefixes], dim=2), layer)
    return cache
