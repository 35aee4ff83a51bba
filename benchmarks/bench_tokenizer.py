"""A benchmark tokenizer with Qwen3-8B's vocabulary size (151,936 ids), built offline.

A small test vocabulary hides part of every decode step (the output head and sampling over
151,936 logits) and makes prompts a different length than a deployment would see. The real
tokenizer cannot be downloaded here, so this one is built to match it where a benchmark can
tell: the same number of ids, every id decoding to text, and about the real rate on the text
this project meets — each CJK character one token (some common pairs one token: ~1-1.3
characters a token, Qwen's rate on Traditional Chinese) and English words whole where they
are common (MiniLM's WordPiece list, the embedded embedder's, in four casings), else pieces.

A SentencePiece-style unigram model (``tokenizers.models.Unigram``): every piece scores about
the same, so a text is cut into the fewest pieces, like BPE on frequent text. Ids 0-2 are the
ChatML control tokens the benchmarks' model configs expect (pad 0, ``<|im_end|>`` 2).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

from tests.tiny_model import CHATML, SPECIALS

VOCAB_SIZE = 151_936
SPACE = "\u2581"  # SentencePiece's visible space
CJK = range(0x4E00, 0xA000)  # CJK Unified Ideographs
CJK_EXTRA = (range(0x3000, 0x3040), range(0x3040, 0x3100), range(0xFF00, 0xFFF0))
_HAN = re.compile(r"[\u4e00-\u9fff]")
_PERSONAS = Path(__file__).resolve().parents[1] / "engine" / "personas"


def _english_words(vocab_txt: Path) -> tuple[list[str], list[str]]:
    """Whole words and word endings (``##ing``) from a WordPiece vocabulary."""
    words, endings = [], []
    for line in vocab_txt.read_text(encoding="utf-8").splitlines():
        if line.startswith("##") and line[2:].isascii() and line[2:].isalpha():
            endings.append(line[2:])
        elif line.isascii() and line.isalpha():
            words.append(line)
    return words, endings


def _han_pairs(texts: Iterable[str]) -> list[str]:
    """Pairs of Han characters seen together more than once in the bundled persona's texts
    (its common words; every pair would make the persona unrealistically short)."""
    seen: Counter[str] = Counter()
    for text in texts:
        for first, second in pairwise(text):
            if _HAN.match(first) and _HAN.match(second):
                seen[first + second] += 1
    return [pair for pair, count in seen.items() if count > 1]


def _persona_texts() -> Iterator[str]:
    for path in sorted(_PERSONAS.rglob("*")):
        if path.suffix in {".yaml", ".md"}:
            yield path.read_text(encoding="utf-8")


def _pieces(vocab_txt: Path, seed: int) -> list[str]:
    """Every piece after the control tokens, most useful first, exactly filling the vocab."""
    words, endings = _english_words(vocab_txt)
    pieces: dict[str, None] = {}

    def add(items: Iterable[str]) -> None:
        for item in items:
            pieces.setdefault(item, None)

    add(f"<0x{byte:02X}>" for byte in range(256))  # byte fallback: no text is ever unknown
    add(SPACE * run for run in (1, 2, 4, 8))  # indentation
    add(chr(code) for code in range(0x21, 0x7F))
    add(SPACE + chr(code) for code in range(0x21, 0x7F))
    add(chr(code) for code in CJK)
    add(chr(code) for block in CJK_EXTRA for code in block)
    add(_han_pairs(_persona_texts()))
    for word in words:
        add((SPACE + word, word, SPACE + word.capitalize(), word.capitalize()))
    add(endings)
    rng = random.Random(seed)  # the rest: Han pairs no text here uses, as in a real vocab
    room = VOCAB_SIZE - len(SPECIALS) - 1
    while len(pieces) < room:
        pieces.setdefault(chr(rng.choice(CJK)) + chr(rng.choice(CJK)), None)
    return list(pieces)[:room]


def build_bench_tokenizer(target: Path, vocab_txt: Path | None = None, seed: int = 0) -> Any:
    """Write a ``PreTrainedTokenizerFast`` of ``VOCAB_SIZE`` ids with the ChatML template to
    ``target`` and return it. ``vocab_txt``: a WordPiece list of English words (default: the
    embedded embedder's)."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    if vocab_txt is None:
        from engine.model_loader import embedded_embedder_dir

        vocab_txt = embedded_embedder_dir() / "vocab.txt"
    # The longest cut (fewest pieces) wins: a piece costs 10, ties go to the earlier piece.
    pieces = [*SPECIALS, "<unk>", *_pieces(vocab_txt, seed)]
    scored = [(piece, -10.0 - index * 1e-6) for index, piece in enumerate(pieces)]
    raw = Tokenizer(models.Unigram(scored, unk_id=len(SPECIALS), byte_fallback=True))
    raw.normalizer = normalizers.Replace(" ", SPACE)
    raw.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<unk>", bos_token=None, additional_special_tokens=SPECIALS[1:2],
    )
    tokenizer.chat_template = CHATML
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"built {len(tokenizer)} ids, wanted {VOCAB_SIZE}")
    target.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(target)
    return tokenizer
