"""Output clean-up for model replies. Pure functions: text in, text out, never raises.

Order matters: reasoning blocks and special tokens go first, then a fabricated next turn is cut,
role prefixes are stripped, repeated sentences dropped, and a reply cut by the token limit is
trimmed back to its last complete sentence.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from engine.echo import remove_partial_echo, remove_system_echo
from engine.prompt_text import CONTROL_TEXT_ANY_CASE, DROP_INVISIBLE, TURN_BOUNDARY

# Reasoning blocks as the families of models write them (Qwen/DeepSeek <think>, others
# <thinking>/<reasoning>/<thought>/<reflection>, Kimi's ◁think▷), spaces inside a tag allowed.
_REASONING_NAMES = r"(?:think|thinking|reasoning|thought|reflection)"
_THINK_OPEN = rf"(?:<\s*{_REASONING_NAMES}\s*>|◁\s*think\s*▷)"
_THINK_CLOSE = rf"(?:<\s*/\s*{_REASONING_NAMES}\s*>|◁\s*/\s*think\s*▷)"
_THINK = re.compile(rf"{_THINK_OPEN}.*?(?:{_THINK_CLOSE}|\Z)", re.S | re.I)
_CLOSE = re.compile(_THINK_CLOSE, re.I)
_STRAY_THINK = re.compile(rf"{_THINK_OPEN}|{_THINK_CLOSE}", re.I)
# Llama 2's system block, opened and maybe never closed.
_SYS_BLOCK = re.compile(r"<<SYS>>.*?(?:<</SYS>>|\Z)", re.S | re.I)
_LEADING_OWN_ROLE = re.compile(r"^\s*(?:assistant|model)\b[ \t]*\n?", re.I)
_TOOL_CALL = re.compile(r"<tool_call>.*?(?:</tool_call>|\Z)", re.S | re.I)
_GENERIC_ROLES = (
    "user", "human", "assistant", "system", "ai", "bot", "viewer",
    "用戶", "用户", "使用者", "觀眾", "观众", "助手", "助理", "系統", "系统",
)
# Roles that mean "the model started writing the other side of the conversation".
_OTHER_SIDE = ("user", "human", "viewer", "system", "用戶", "用户", "使用者", "觀眾", "观众",
               "系統", "系统")
# What a bare role line of a chat template (ChatML, Gemma) says for the model's own side.
_OWN_SIDE = ("assistant", "model", "ai", "bot")
# Where a role label may start in the middle of a line: after a sentence end (and spaces).
# Not after any word: "Note for every viewer: ..." is a sentence, not a turn.
_MID_LINE = r"(?<=[。！？!?～~…\.])[ \t]*"
_SENTENCE = re.compile(r".+?(?:[。！？!?～~…]+[」』”’）)]*|\.(?=\s|$)|\n+|$)", re.S)
_TERMINAL = re.compile(r"(?:[。！？!?～~…]|\.)[」』”’）)]*\s*$")
_MAX_PASSES = 8


@dataclass(frozen=True, slots=True)
class FilterOptions:
    persona_names: tuple[str, ...] = ()
    filter_repetition: bool = True
    max_sentence_repeat: int = 1
    truncated: bool = False
    fallback: str = "……嗯？"
    system_prompt: str = ""
    # Phrases of the prompt the persona may say itself (names, catchphrases, examples).
    echo_allowed: tuple[str, ...] = ()


@dataclass(slots=True)
class FilterResult:
    text: str
    edits: list[str] = field(default_factory=list)


def _folded(word: str) -> str:
    """A pattern for ``word`` that also matches its full-width form (ＵＳＥＲ, ａｉ)."""
    parts = []
    for char in word:
        if char.isascii() and char.isalpha():
            lower, upper = char.lower(), char.upper()
            parts.append(f"[{lower}{upper}{chr(ord(lower) + 0xFEE0)}{chr(ord(upper) + 0xFEE0)}]")
        else:
            parts.append(re.escape(char))
    return "".join(parts)


def _alternatives(words: Iterable[str]) -> str:
    return "|".join(_folded(w) for w in sorted(set(words), key=len, reverse=True))


@functools.lru_cache(maxsize=64)
def _role_prefix(persona_names: tuple[str, ...]) -> re.Pattern[str]:
    """A role label of the persona or a generic role, at a line start or mid-line; built
    once per persona (it was rebuilt for every preview and reply)."""
    names = _alternatives([*(n for n in persona_names if n.strip()), *_GENERIC_ROLES])
    return re.compile(rf"^\s*(?:{names})\s*[:：]\s*|{_MID_LINE}(?:{names})\s*[:：]\s*",
                      re.I | re.M)


def strip_reasoning(text: str) -> str:
    text = _THINK.sub("", text)
    # The opening tag was lost: everything before the last close was thinking. Found by
    # scanning forward: a greedy ``.*close`` retries from every start, quadratic in the text
    # (a second per preview of a 12,000-character reply, on the event loop).
    ends = [match.end() for match in _CLOSE.finditer(text)]
    if ends:
        text = text[ends[-1]:]
    return _STRAY_THINK.sub("", text)


def cut_at_turn_boundary(text: str) -> str:
    """The reply up to the template's next turn boundary; boundaries before any text (the
    model opening its own turn again) go, with the role word after them. Tool-call blocks go
    whole: they are for a program, not for chat."""
    text = _TOOL_CALL.sub("", text)
    while (match := TURN_BOUNDARY.search(text)) is not None:
        if text[:match.start()].strip():
            return text[:match.start()]
        text = _LEADING_OWN_ROLE.sub("", text[match.end():], count=1)
    return text


# Llama's [INST] opens a viewer turn: keep that meaning as a label the turn cutter knows.
_INST_OPEN = re.compile(r"\[INST\]", re.I)


def strip_special_tokens(text: str) -> str:
    text = _INST_OPEN.sub("\nuser: ", _SYS_BLOCK.sub("", text))
    return CONTROL_TEXT_ANY_CASE.sub("", text)


_OTHER_TURN = re.compile(
    rf"(?:^|\n)\s*(?:{_alternatives(_OTHER_SIDE)})\s*(?:[:：]|\n|$)"
    rf"|{_MID_LINE}(?:{_alternatives(_OTHER_SIDE)})\s*[:：]", re.I)
_OWN_ROLE_LINE = re.compile(rf"^\s*(?:{_alternatives(_OWN_SIDE)})\s*$\n?", re.I | re.M)


def cut_fabricated_turn(text: str) -> str:
    """Drop everything from where the model starts speaking as the viewer (or the system):
    a role label at a line start or mid-line, or a bare role line of a chat template. A
    ``user:`` line among other ``key: value`` lines is data (a config a viewer asked for)."""
    for match in _OTHER_TURN.finditer(text):
        label_at = match.start() + len(match.group()) - len(match.group().lstrip())
        if not _in_key_value_block(text, label_at):
            return text[: match.start()]  # at the start: all of it was the other side's
    return text


# A line of data: an ASCII key and a one-word ASCII value ("user: pell", "level: 3").
_KEY_VALUE_LINE = re.compile(r"^[ \t]*[A-Za-z_][\w.-]*[ \t]*:[ \t]+[\w.@/-]+[ \t]*$")


def _in_key_value_block(text: str, at: int) -> bool:
    """Whether the line at ``at`` is a ``key: value`` line next to another one whose key is
    no role (a config a viewer asked for), rather than a turn."""
    start = text.rfind("\n", 0, at) + 1 if at else 0
    lines = text[start:].split("\n", 2)
    before = text[:start - 1].rsplit("\n", 1)[-1] if start else ""
    after = lines[1] if len(lines) > 1 else ""
    return bool(_KEY_VALUE_LINE.match(lines[0])) and any(
        _KEY_VALUE_LINE.match(line) and not _OTHER_TURN.match("\n" + line)
        for line in (before, after))


def _unless_data(text: str, match: re.Match[str]) -> str:
    return match.group(0) if _in_key_value_block(text, match.start()) else ""


def strip_role_prefixes(text: str, options: FilterOptions) -> str:
    pattern = _role_prefix(tuple(options.persona_names))
    previous = None
    while previous != text:  # "Assistant: 露米：hi" needs two passes
        previous = text
        text = pattern.sub(functools.partial(_unless_data, text), text)
        text = _OWN_ROLE_LINE.sub("", text)
    return text


_SENTENCE_END = re.compile(r"[。！？!?～~…]+[」』”’）)]*|\.(?=\s)|\n")


def complete_sentences(text: str) -> str:
    """``text`` up to its last finished sentence ("" if none has finished yet)."""
    ends = list(_SENTENCE_END.finditer(text))
    return text[: ends[-1].end()].rstrip() if ends else ""


def split_sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE.findall(text) if s.strip()]


def _normalise(sentence: str) -> str:
    folded = unicodedata.normalize("NFKC", sentence).casefold()
    return re.sub(r"[\W_]+", "", folded)


CHEER_CHARS = 4  # "加油！", "好耶！", "yay!", "yeah!": said again and again on purpose
CHEER_REPEATS = 5


def drop_repeated_sentences(text: str, max_repeat: int = 1) -> str:
    """Drop a sentence said more than ``max_repeat`` times (a model's loop); a short cheer
    may come ``CHEER_REPEATS`` times."""
    seen: dict[str, int] = {}
    kept = []
    for sentence in split_sentences(text):
        key = _normalise(sentence)
        if key:
            seen[key] = seen.get(key, 0) + 1
            allowed = max(CHEER_REPEATS, max_repeat) if len(key) <= CHEER_CHARS else max_repeat
            if seen[key] > allowed:
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


def _tidy(text: str) -> str:
    text = text.translate(DROP_INVISIBLE)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def clean_reply(text: str, options: FilterOptions | None = None) -> FilterResult:
    """Run the whole pipeline; record which steps changed the text (for the trace)."""
    options = options or FilterOptions()
    result = FilterResult(text=text)
    steps: tuple[tuple[str, Callable[[str], str]], ...] = (
        # U+FFFD: bytes the model wrote that are no character (a broken multi-byte sequence).
        ("undecodable", lambda t: t.replace("\ufffd", "")),
        ("reasoning", strip_reasoning),
        ("turn_boundary", cut_at_turn_boundary),
        ("special_tokens", strip_special_tokens),
        ("fabricated_turn", cut_fabricated_turn),
        ("role_prefix", lambda t: strip_role_prefixes(t, options)),
        ("system_echo", lambda t: remove_partial_echo(
            remove_system_echo(t, options.system_prompt), options.system_prompt,
            options.echo_allowed)),
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
