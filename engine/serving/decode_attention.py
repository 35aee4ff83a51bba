"""Attention for a decode step (one new token per row) over grouped KV heads, compiled or not.

transformers' SDPA path repeats every KV head for its query heads (``repeat_kv``) when the
attention is compiled: for Qwen3-8B (32 query heads, 8 KV heads) each layer of a one-row step
then writes four copies of the row's whole KV slot before reading them again, ~2.5 GB a step
at 2,112 columns. With one query per row the query heads of a group can instead stand in the
query-length dimension: ``[rows, kv_heads, group, dim]`` against the KV as stored, with the
row's mask broadcast over them. Same arithmetic, no copies. It is written out (two matrix
products and a softmax) rather than handed to SDPA: for one row, cuDNN's kernel spreads a
packed query over 8 thread blocks and took 47 us a layer on an H200, against ~12 us for the
repeated heads it replaces (docs/performance-history.md).

Above one row SDPA on the packed queries is the faster (``packed_decode_attention``): the same
packing handed to ``scaled_dot_product_attention``. transformers does this itself from 5.24
on, but only there; with an older one every bucket above one row repeated the KV heads, ~3x
the step time at 26 rows on an H100 (docs/PERFORMANCE.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _groups(module: torch.nn.Module, query: torch.Tensor, kwargs: dict[str, Any]) -> int:
    """Query heads per KV head when this is a decode step the packing computes; else 0."""
    groups = int(getattr(module, "num_key_value_groups", 1))
    other_terms = kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
    return 0 if query.shape[2] != 1 or groups == 1 or other_terms else groups


def _transformers_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, attention_mask: torch.Tensor | None,
                       scaling: float | None, dropout: float,
                       kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask,
                                  scaling=scaling, dropout=dropout, **kwargs)


Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
                   float | None], torch.Tensor]


def _on_packed_heads(kernel: Kernel) -> Callable[..., tuple[torch.Tensor, None]]:
    """An attention function with transformers' signature: ``query`` [rows, heads, 1, dim],
    ``key``/``value`` [rows, kv_heads, columns, dim], a boolean ``attention_mask``
    [rows, 1, 1, columns]; returns [rows, 1, heads, dim]. ``kernel`` gets the query heads of
    each KV head packed as [rows, kv_heads, group, dim]. Anything else (a prefill, no
    grouping, a position bias or soft cap) goes to transformers' own SDPA function."""

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, attention_mask: torch.Tensor | None,
                  scaling: float | None = None, dropout: float = 0.0,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
        groups = _groups(module, query, kwargs)
        if not groups:
            return _transformers_sdpa(module, query, key, value, attention_mask, scaling,
                                      dropout, kwargs)
        rows, heads, _, dim = query.shape
        packed = query.reshape(rows, heads // groups, groups, dim)
        out = kernel(packed, key, value, attention_mask, scaling)
        return out.reshape(rows, 1, heads, dim), None

    attention.__doc__ = kernel.__doc__
    return attention


def _written_out(packed: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 mask: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
    """Two matrix products and a softmax over the KV heads as stored (one row's fastest)."""
    scores = torch.matmul(packed, key.transpose(-1, -2)).float() * (
        scaling or packed.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(weights, value)  # [rows, kv_heads, group, dim]


def _sdpa_kernels(packed: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  mask: torch.Tensor | None, scaling: float | None) -> torch.Tensor:
    """SDPA's kernels on the packed heads (the faster above one row)."""
    return torch.nn.functional.scaled_dot_product_attention(
        packed, key, value, attn_mask=mask, scale=scaling)


grouped_decode_attention = _on_packed_heads(_written_out)
packed_decode_attention = _on_packed_heads(_sdpa_kernels)
