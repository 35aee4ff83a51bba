"""Echoes of the prompt in a reply: runs of characters or words the reply shares with prompt
text the viewer did not write (the persona's system prompt, the viewer's state hint), found
in a folded form (NFKC, case, invisible characters and spaces between CJK characters, one
Chinese script) and removed from the reply as written. Part of the output stage
(docs/ARCHITECTURE.md, "The output stage")."""

from __future__ import annotations

import functools
import itertools
import re
import unicodedata
from collections.abc import Callable, Iterable

from engine.chinese import fold_script
from engine.prompt_text import INVISIBLE

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]")
ECHO_NGRAM = 12  # consecutive characters shared with the prompt that make an echo


_PLACEHOLDER = 0xE000  # private-use characters stand for the persona's own phrases


def _mask(text: str, allowed: tuple[str, ...]) -> tuple[str, list[tuple[int, int]] | None]:
    """``text`` with each allowed phrase as one placeholder character, and for every character
    of the result the span of ``text`` it stands for (None: no phrase occurs, each character
    stands for itself). At each position the first phrase of ``allowed`` that starts there
    wins (longest first, as callers order them)."""
    pattern, number = _phrase_pattern(allowed)
    if pattern is None or pattern.search(text) is None:
        return text, None
    masked: list[str] = []
    spans: list[tuple[int, int]] = []
    index = 0
    for found in pattern.finditer(text):
        masked.extend(text[index:found.start()])
        spans.extend((i, i + 1) for i in range(index, found.start()))
        masked.append(chr(_PLACEHOLDER + number[found.group().casefold()]))
        spans.append(found.span())
        index = found.end()
    masked.extend(text[index:])
    spans.extend((i, i + 1) for i in range(index, len(text)))
    return "".join(masked), spans


@functools.lru_cache(maxsize=8)
def _phrase_pattern(allowed: tuple[str, ...]) -> tuple[re.Pattern[str] | None, dict[str, int]]:
    """One alternation of the phrases, in their order (so at a position the same phrase wins
    as trying them one by one), and each phrase's placeholder number. The scan runs in the
    regex engine: phrase by phrase in Python it took ~5 ms for a 300-character reply against
    256 phrases, on the event loop, for every preview."""
    number: dict[str, int] = {}
    for k, phrase in enumerate(allowed):
        if phrase:
            number.setdefault(phrase.casefold(), k)
    if not number:
        return None, number
    # In any case: "PELL LANTERNWICK" is the persona's name as much as "Pell Lanternwick".
    return re.compile("|".join(re.escape(phrase) for phrase in number), re.I), number


def _echo_weight(run: str) -> int:
    return sum(1 for char in run if _CJK.match(char) or ord(char) >= _PLACEHOLDER)


@functools.lru_cache(maxsize=32)
def _prompt_ngrams(prompt: str, allowed: tuple[str, ...], n: int) -> frozenset[str]:
    """The prompt's n-character runs that are mostly CJK (so punctuation or a common English
    phrase never counts as an echo), the persona's own phrases as single placeholders."""
    masked, _ = _mask(prompt, allowed)
    return frozenset(masked[i:i + n] for i in range(len(masked) - n + 1)
                     if _echo_weight(masked[i:i + n]) >= n * 2 // 3)


Fold = Callable[[str], tuple[str, tuple[int, ...]]]


@functools.lru_cache(maxsize=64)  # a reply is compared with several prompts in a row
def fold_for_echo(text: str) -> tuple[str, tuple[int, ...]]:
    """``text`` as echoes are compared: NFKC, case folded, invisible characters and spaces
    next to CJK gone (a copy spaced out character by character is still a copy), in one
    Chinese script; and for each folded character the index of the one it came from."""
    if not _NEEDS_WALK.search(text):  # most replies: folded whole, character for character
        folded = unicodedata.normalize("NFKC", text).casefold()
        if len(folded) == len(text):
            scripted = fold_script(folded)
            return (scripted if len(scripted) == len(text) else folded), tuple(range(len(text)))
    chars: list[str] = []
    where: list[int] = []
    for index, char in enumerate(text):
        if char in _INVISIBLE_CHARS:
            continue
        if char.isspace() and (_beside_cjk(text, index) or (chars and chars[-1] == " ")):
            continue
        for folded in unicodedata.normalize("NFKC", char).casefold():
            chars.append(" " if folded.isspace() else folded)
            where.append(index)
    joined = "".join(chars)
    scripted = fold_script(joined)
    return (scripted if len(scripted) == len(joined) else joined), tuple(where)


_INVISIBLE_CHARS = frozenset(INVISIBLE)
# What only the character-by-character walk folds: invisible characters, spaces beside CJK
# characters, runs of spaces, other whitespace.
_NEEDS_WALK = re.compile(rf"[{INVISIBLE}]|[\u3000-\u9fff\uff00-\uffef]\s"
                         r"|\s[\u3000-\u9fff\uff00-\uffef]|\s\s|[^\S ]")


def _beside_cjk(text: str, index: int) -> bool:
    before = text[:index].rstrip()[-1:]
    after = text[index + 1:].lstrip()[:1]
    return bool(_CJK.match(before) or _CJK.match(after))


def remove_partial_echo(text: str, prompt: str, allowed: Iterable[str] = (),
                        n: int = ECHO_NGRAM, fold: Fold | None = None) -> str:
    """Remove every run of ``n``+ characters the reply shares with the prompt. The persona's
    own phrases (``allowed``: names, catchphrases, example answers) are not an echo by
    themselves, but are removed with the run around them when that run is one. With
    ``fold`` (``fold_for_echo``) reply, prompt and phrases are compared folded, and what
    matched is removed from the reply as written."""
    if not prompt or len(text) < ECHO_WORDS:
        return text
    phrases = tuple(sorted({a for a in allowed if a.strip()}, key=len, reverse=True))[:256]
    probe, where = text, tuple(range(len(text)))
    if fold is not None:
        probe, where = fold(text)
        prompt = _folded_prompt(prompt, fold)
        phrases = _folded_phrases(phrases, fold)
    echo = _echo_mask(probe, prompt, phrases, n)
    if echo is None:  # the common case, on the event loop for every preview: nothing to cut
        return text
    cut = [False] * len(text)
    runs = [i for i, echoed in enumerate(echo) if echoed]
    for position in runs:  # with whatever folding dropped between two echoed characters
        cut[where[position]] = True
    for left, right in itertools.pairwise(runs):
        if right == left + 1:
            cut[where[left]:where[right]] = [True] * (where[right] - where[left])
    return "".join(char for char, gone in zip(text, cut, strict=True) if not gone)


@functools.lru_cache(maxsize=32)
def _folded_prompt(prompt: str, fold: Fold) -> str:
    return fold(prompt)[0]


@functools.lru_cache(maxsize=8)
def _folded_phrases(phrases: tuple[str, ...], fold: Fold) -> tuple[str, ...]:
    return tuple(fold(phrase)[0] for phrase in phrases)


def _echo_mask(text: str, prompt: str, phrases: tuple[str, ...], n: int) -> list[bool] | None:
    """Which characters of ``text`` belong to a run shared with ``prompt`` (None: none)."""
    grams = _prompt_ngrams(prompt, phrases, n)
    masked, spans = _mask(text, phrases)
    runs = [(start, start + n - 1) for start in range(len(masked) - n + 1)
            if masked[start:start + n] in grams]
    words = [(m.group().casefold(), m.start(), m.end() - 1) for m in _WORD.finditer(masked)]
    shingles = _prompt_shingles(prompt, phrases)
    keys = [word for word, _, _ in words]
    runs += [(words[i][1], words[i + ECHO_WORDS - 1][2])
             for i in range(len(words) - ECHO_WORDS + 1)
             if tuple(keys[i:i + ECHO_WORDS]) in shingles]
    if not runs:
        return None
    echo = [False] * len(text)
    for first, last in runs:  # masked positions first..last, inclusive
        begin, end = (spans[first][0], spans[last][1]) if spans else (first, last + 1)
        echo[begin:end] = [True] * (end - begin)
    return echo


_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?|[\ue000-\ue0ff]")
ECHO_WORDS = 6  # consecutive words shared with the prompt that make an echo (English)


@functools.lru_cache(maxsize=32)
def _prompt_shingles(prompt: str, allowed: tuple[str, ...]) -> frozenset[tuple[str, ...]]:
    masked, _ = _mask(prompt, allowed)
    words = [m.group().casefold() for m in _WORD.finditer(masked)
             if not _CJK.match(m.group())]
    return frozenset(tuple(words[i:i + ECHO_WORDS])
                     for i in range(len(words) - ECHO_WORDS + 1))


def remove_system_echo(text: str, system_prompt: str) -> str:
    """Remove any line of the system prompt the model copied into its reply."""
    if not system_prompt:
        return text
    prompt_lines = sorted({line.strip() for line in system_prompt.splitlines()
                           if len(line.strip()) >= 8}, key=len, reverse=True)
    for line in prompt_lines:
        text = text.replace(line, "")
    return text
