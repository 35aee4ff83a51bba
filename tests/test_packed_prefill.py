"""Packing prompts for one prefill: what each token may see, and where each KV goes."""

from __future__ import annotations

import pytest
import torch

from engine.serving.packed_prefill import PackedKV, pack, placement, split, split_own


def test_a_packed_token_sees_the_prefix_and_its_own_prompt_only() -> None:
    packed = pack([[5, 6], [7, 8, 9]], [2, 2], shared=True, device=torch.device("cpu"))
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
    packed = PackedKV([], lengths=[2, 3], covered=[2, 2])
    rows, columns, source = placement(packed, first_row=1, end=10, device=torch.device("cpu"))
    assert rows.tolist() == [1] * 4 + [2] * 5
    assert columns.tolist() == [6, 7, 8, 9, 5, 6, 7, 8, 9]
    # both copy the shared columns 0-1; then the first prompt's 2-3, the second's 4-6
    assert source.tolist() == [0, 1, 2, 3, 0, 1, 4, 5, 6]


def test_packs_stay_under_the_token_limit_and_keep_the_order() -> None:
    rests = [[1] * 3, [2] * 3, [3] * 5, [4] * 9]
    assert split(rests, limit=6) == [rests[:2], rests[2:3], rests[3:]]


def test_packed_past_own_prefixes_each_token_sees_its_own_prefix_only() -> None:
    packed = pack([[5, 6], [7]], [3, 1], shared=False, device=torch.device("cpu"))
    assert packed.positions.tolist() == [[3, 4, 1]]
    assert packed.ends.tolist() == [1, 2]
    # columns: the first prompt's 3 prefix tokens, the second's 1, then the 3 packed tokens
    assert packed.mask[0, 0].int().tolist() == [[1, 1, 1, 0, 1, 0, 0],
                                                 [1, 1, 1, 0, 1, 1, 0],
                                                 [0, 0, 0, 1, 0, 0, 1]]


def test_prompts_past_own_prefixes_land_with_their_own_prefix() -> None:
    packed = PackedKV([], lengths=[2, 1], covered=[3, 1], shared=False)
    assert packed.prefix_starts() == [0, 3] and packed.own_starts() == [4, 6]
    rows, columns, source = placement(packed, first_row=0, end=8, device=torch.device("cpu"))
    assert rows.tolist() == [0] * 5 + [1] * 2
    assert columns.tolist() == [3, 4, 5, 6, 7, 6, 7]
    assert source.tolist() == [0, 1, 2, 4, 5, 3, 6]


def test_packs_past_own_prefixes_bound_their_prefix_columns(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.serving import packed_prefill

    monkeypatch.setattr(packed_prefill, "PACK_PREFIX_COLUMNS", 10)
    monkeypatch.setattr(packed_prefill, "PACK_TOKENS", 6)
    groups = split_own([[1] * 2, [2] * 2, [3] * 2, [4] * 9], [4, 4, 4, 1])
    assert groups == [range(0, 2), range(2, 3), range(3, 4)]
