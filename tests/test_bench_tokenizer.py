"""The benchmarks' real-vocabulary tokenizer: Qwen3-8B's 151,936 ids, every id text, and about
a real tokenizer's rate on the bundled persona and on English chat."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from benchmarks.bench_tokenizer import VOCAB_SIZE, build_bench_tokenizer
from engine.persona import load_persona


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder: Path = tmp_path_factory.mktemp("bench-tokenizer")
    build_bench_tokenizer(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)  # as a benchmark loads it: from its folder


def _rate(tokenizer: Any, text: str) -> float:
    return len(text) / len(tokenizer.encode(text, add_special_tokens=False))


def test_the_vocabulary_is_qwen3s_size_with_chatml_control_tokens(tokenizer: Any) -> None:
    assert len(tokenizer) == VOCAB_SIZE == 151_936
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 2)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_every_id_decodes_to_text_and_text_round_trips(tokenizer: Any) -> None:
    ids = random.Random(0).sample(range(3, VOCAB_SIZE), 2000)
    assert all(tokenizer.decode([i]) for i in ids)
    persona = (Path(__file__).parents[1] / "engine" / "personas" / "pell.yaml").read_text(
        encoding="utf-8")
    for text in (persona, "  indented:\n\tand tabs 🌟 emoji", "The sky is so clear tonight!"):
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_chinese_and_english_cost_about_what_a_real_tokenizer_charges(tokenizer: Any) -> None:
    persona = load_persona().system_prompt("zh")
    assert 1.0 <= _rate(tokenizer, persona) <= 1.6
    assert 1.0 <= _rate(tokenizer, "我明天要去爬山，有什麼要帶的嗎") <= 1.6
    assert 3.5 <= _rate(tokenizer, "Do you ever get lonely up in the lighthouse?") <= 5.5
