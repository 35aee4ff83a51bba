"""Packing prompts for one prefill: what each token may see, and where each KV goes."""

from __future__ import annotations

import torch

from engine.serving.packed_prefill import pack, placement, split


def test_a_packed_token_sees_the_prefix_and_its_own_prompt_only() -> None:
    packed = pack([[5, 6], [7, 8, 9]], covered=2, device=torch.device("cpu"))
    assert packed.ids.tolist() == [[5, 6, 7, 8, 9]]
    assert packed.positions.tolist() == [[2, 3, 2, 3, 4]]
    assert packed.ends.tolist() == [1, 4]
    seen = packed.mask[0, 0].int().tolist()
    # columns: 2 shared prefix tokens, then the 5 packed tokens
    assert seen == [[1, 1, 1, 0, 0, 0, 0],
                    [1, 1, 1, 1, 0, 0, 0],
                    [1, 1, 0, 0, 1, 0, 0],
                    [1, 1, 0, 0, 1, 1, 0],
                    [1, 1, 0, 0, 1, 1, 1]]


def test_each_prompt_lands_right_aligned_in_its_own_row() -> None:
    rows, columns, source = placement([2, 3], covered=2, first_row=1, end=10,
                                      device=torch.device("cpu"))
    assert rows.tolist() == [1] * 4 + [2] * 5
    assert columns.tolist() == [6, 7, 8, 9, 5, 6, 7, 8, 9]
    # both copy the shared columns 0-1; then the first prompt's 2-3, the second's 4-6
    assert source.tolist() == [0, 1, 2, 3, 0, 1, 4, 5, 6]


def test_packs_stay_under_the_token_limit_and_keep_the_order() -> None:
    rests = [[1] * 3, [2] * 3, [3] * 5, [4] * 9]
    assert split(rests, limit=6) == [rests[:2], rests[2:3], rests[3:]]
