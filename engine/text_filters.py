"""Output clean-up for model replies. Pure functions: text in, text out, never raises.

Order matters: reasoning blocks and special tokens go first, then a fabricated next turn is cut,
role prefixes are stripped, repeated sentences dropped, and a reply cut by the token limit is
trimmed back to its last complete sentence.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field

_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.S | re.I)
_STRAY_THINK = re.compile(r"</?think>", re.I)
# ChatML / Llama / Mistral control tokens. Anchored on the exact shapes so that ordinary text
# such as "friend", ">_<" or "<3" is never touched (the upstream cut replies at "<|end|>" with
# an unescaped regex that matched the letters e, n, d).
_SPECIAL_TOKENS = re.compile(r"<\|[\w.:-]{1,40}\|>|</s>|<s>|\[/?INST\]", re.I)
_GENERIC_ROLES = (
    "user", "human", "assistant", "system", "ai", "bot", "viewer",
    "用戶", "用户", "使用者", "觀眾", "观众", "助手", "助理", "系統", "系统",
)
# Roles that mean "the model started writing the other side of the conversation".
_OTHER_SIDE = ("user", "human", "viewer", "用戶", "用户", "使用者", "觀眾", "观众")
_SENTENCE = re.compile(r".+?(?:[。！？!?～~…]+[」』”’）)]*|\.(?=\s|$)|\n+|$)", re.S)
_TERMINAL = re.compile(r"(?:[。！？!?～~…]|\.)[」』”’）)]*\s*$")
_MAX_PASSES = 8
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff"), None)


@dataclass(frozen=True, slots=True)
class FilterOptions:
    persona_names: tuple[str, ...] = ()
    filter_repetition: bool = True
    max_sentence_repeat: int = 1
    truncated: bool = False
    fallback: str = "……嗯？"
    system_prompt: str = ""


@dataclass(slots=True)
class FilterResult:
    text: str
    edits: list[str] = field(default_factory=list)


def _role_names(options: FilterOptions) -> list[str]:
    names = [n for n in options.persona_names if n.strip()]
    return [re.escape(n) for n in sorted({*names, *_GENERIC_ROLES}, key=len, reverse=True)]


def strip_reasoning(text: str) -> str:
    return _STRAY_THINK.sub("", _THINK.sub("", text))


def strip_special_tokens(text: str) -> str:
    return _SPECIAL_TOKENS.sub("", text)


def cut_fabricated_turn(text: str) -> str:
    """Drop everything from a line where the model starts speaking as the user."""
    other = "|".join(re.escape(r) for r in _OTHER_SIDE)
    match = re.search(rf"(?:^|\n)\s*(?:{other})\s*[:：]", text, re.I)
    return text[: match.start()] if match and match.start() > 0 else text


def strip_role_prefixes(text: str, options: FilterOptions) -> str:
    names = "|".join(_role_names(options))
    pattern = re.compile(rf"^\s*(?:{names})\s*[:：]\s*", re.I | re.M)
    previous = None
    while previous != text:  # "Assistant: 露米：hi" needs two passes
        previous, text = text, pattern.sub("", text)
    return text


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE.findall(text) if s.strip()]


def _normalise(sentence: str) -> str:
    folded = unicodedata.normalize("NFKC", sentence).casefold()
    return re.sub(r"[\W_]+", "", folded)


def drop_repeated_sentences(text: str, max_repeat: int = 1) -> str:
    seen: dict[str, int] = {}
    kept = []
    for sentence in split_sentences(text):
        key = _normalise(sentence)
        if key:
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > max_repeat:
                continue
        kept.append(sentence)
    return "".join(kept)


def trim_to_last_sentence(text: str) -> str:
    """For a reply cut by the token limit: keep up to the last complete sentence."""
    stripped = text.rstrip()
    if _TERMINAL.search(stripped):
        return stripped
    sentences = split_sentences(stripped)
    complete = [s for s in sentences if _TERMINAL.search(s.rstrip())]
    if not complete:
        return stripped
    last = stripped.rfind(complete[-1].rstrip())
    return stripped[: last + len(complete[-1].rstrip())]


def remove_system_echo(text: str, system_prompt: str) -> str:
    """Remove any line of the system prompt the model copied into its reply."""
    if not system_prompt:
        return text
    prompt_lines = sorted({line.strip() for line in system_prompt.splitlines()
                           if len(line.strip()) >= 8}, key=len, reverse=True)
    for line in prompt_lines:
        text = text.replace(line, "")
    return text


def _tidy(text: str) -> str:
    text = text.translate(_ZERO_WIDTH)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def clean_reply(text: str, options: FilterOptions | None = None) -> FilterResult:
    """Run the whole pipeline; record which steps changed the text (for the trace)."""
    options = options or FilterOptions()
    result = FilterResult(text=text)
    steps: tuple[tuple[str, Callable[[str], str]], ...] = (
        ("reasoning", strip_reasoning),
        ("special_tokens", strip_special_tokens),
        ("fabricated_turn", cut_fabricated_turn),
        ("role_prefix", lambda t: strip_role_prefixes(t, options)),
        ("system_echo", lambda t: remove_system_echo(t, options.system_prompt)),
        ("repetition", lambda t: drop_repeated_sentences(t, options.max_sentence_repeat)
         if options.filter_repetition else t),
        ("truncated_sentence", lambda t: trim_to_last_sentence(t) if options.truncated else t),
        ("tidy", _tidy),
    )
    current = text
    # Removing one token can join its neighbours into a new one ("<|im_<|x|>start|>"), so
    # the pipeline runs to a fixed point; that is also what makes it idempotent.
    for _ in range(_MAX_PASSES):
        before = current
        for name, step in steps:
            updated = step(current)
            if updated != current and name != "tidy" and name not in result.edits:
                result.edits.append(name)
            current = updated
        if current == before:
            break
    if not current:
        result.edits.append("fallback")
        current = options.fallback
    result.text = current
    return result
