"""The batch sampler against transformers' own warpers, and the decode step's grouped-head
attention against transformers' SDPA attention."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine.serving.sampling import TOPK_CANDIDATES, candidates
from engine.types import SamplingParams

VOCAB = 3000


def _reference(params: SamplingParams, scores: torch.Tensor) -> torch.Tensor:
    """What ``generate()`` samples from for one row (after the repetition penalty)."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    warped = warpers(torch.zeros((1, 1), dtype=torch.long), scores[None].clone())
    return torch.softmax(warped, dim=-1)[0]


def _ours(params: list[SamplingParams], scores: torch.Tensor) -> torch.Tensor:
    probabilities, order = candidates(params, scores)
    dense = torch.zeros_like(scores).scatter_(1, order, probabilities)
    return dense / dense.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("rows", [
    [SamplingParams()],  # the defaults: top-k 50, top-p 0.9
    [SamplingParams(top_k=0, top_p=0.8)],  # no top-k: the whole vocabulary is sorted
    [SamplingParams(top_k=TOPK_CANDIDATES + 1, temperature=1.3)],  # too wide for top-k
    [SamplingParams(top_k=5, top_p=1.0), SamplingParams(top_k=200, top_p=0.5),
     SamplingParams(temperature=0.3)],  # rows with their own settings, one call
])
def test_rows_sample_from_what_generate_samples_from(rows: list[SamplingParams]) -> None:
    generator = torch.Generator().manual_seed(len(rows))
    scores = torch.randn((len(rows), VOCAB), generator=generator) * 3
    ours = _ours(rows, scores)
    for index, params in enumerate(rows):
        expected = _reference(params, scores[index])
        assert torch.equal(ours[index] > 0, expected > 0), params
        assert torch.allclose(ours[index], expected, atol=1e-5), params


def _attention_inputs(rows: int, columns: int) -> tuple[Any, ...]:
    generator = torch.Generator().manual_seed(rows)
    heads, kv_heads, dim = 8, 2, 16
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads  # type: ignore[assignment]
    query = torch.randn((rows, heads, 1, dim), generator=generator)
    key = torch.randn((rows, kv_heads, columns, dim), generator=generator)
    value = torch.randn((rows, kv_heads, columns, dim), generator=generator)
    mask = torch.rand((rows, 1, 1, columns), generator=generator) > 0.3
    mask[:, ..., -1] = True  # the new token's own column
    return module, query, key, value, mask


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("kind", ["grouped", "packed"])
def test_decode_attention_equals_transformers_sdpa(rows: int, kind: str) -> None:
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    from engine.serving.decode_attention import grouped_decode_attention, packed_decode_attention

    attention = grouped_decode_attention if kind == "grouped" else packed_decode_attention
    module, query, key, value, mask = _attention_inputs(rows, 40)
    ours, _ = attention(module, query, key, value, mask, scaling=0.25)
    # The reference with every KV head repeated, as transformers does when compiled.
    groups = module.num_key_value_groups
    expected, _ = sdpa_attention_forward(torch.nn.Module(), query, repeat_kv(key, groups),
                                         repeat_kv(value, groups), mask, scaling=0.25)
    assert ours.shape == expected.shape == (rows, 1, query.shape[1], query.shape[3])
    assert torch.allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["grouped", "packed"])
def test_decode_attention_leaves_what_it_does_not_compute_to_transformers(kind: str) -> None:
    """A soft cap is not in the packed attention: it goes to transformers' SDPA, which
    refuses it loudly rather than the step computing something else."""
    from engine.serving.decode_attention import grouped_decode_attention, packed_decode_attention

    attention = grouped_decode_attention if kind == "grouped" else packed_decode_attention
    module, query, key, value, mask = _attention_inputs(1, 8)
    with pytest.raises(ValueError, match="softcap"):
        attention(module, query, key, value, mask, scaling=0.25, softcap=30.0)
