"""Chat-template token ids for requests, each system turn tokenized once.

Every viewer's prompt starts with a ~1,200-token persona system turn, and the decode loop
needs its ids on their own (the shared prefix) as well as the whole prompt's: that was two
tokenizations of it per request, ~1 ms of the loop's time each (a burst of 32 paused the
batch ~35 ms more). Now the template is rendered whole, the system turn is tokenized when it
changes (once per persona and language: what differs per viewer comes after it, see
``build_messages``), and only the text past it is tokenized with it, where that gives exactly
the ids of tokenizing everything: the cut falls before a special token (BPE never merges
across one), checked once per tokenizer against the full tokenization. A template that takes
no system turn after the first gets the later ones folded into it.

Text inside a message never becomes one of the tokenizer's special tokens
(``engine/prompt_text.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from engine.prompt_text import defuse
from engine.types import GenerationRequest


@dataclass(frozen=True)
class _SystemTurn:
    content: str  # the system message as given
    rendered: str  # its text in the chat template
    ids: list[int]
    splits: bool  # text after it may be tokenized on its own


class ChatPrompts:
    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self._tokenizer = tokenizer
        self._max_length = max_length
        self._system: _SystemTurn | None = None
        self._specials = tuple(tokenizer.get_added_vocab())
        self._cut_checked: bool | None = None  # the cut gives the full tokenization's ids
        self._special_text = _special_pattern(tokenizer)
        self._fold_system = not _accepts_late_system(tokenizer)

    def ids(self, request: GenerationRequest) -> list[int]:
        """Chat template within the budget. The system prompt (the persona and its rules) is
        never cut: the oldest other turns go first, then the viewer's message is shortened."""
        return self._ids(self._messages(request), request.sampling.max_new_tokens)

    def parts(self, request: GenerationRequest) -> tuple[list[int], list[int]]:
        """(the shared prefix: the system turn alone, if the prompt starts with it; the
        whole prompt)."""
        messages = self._messages(request)
        prompt = self._ids(list(messages), request.sampling.max_new_tokens)
        system = self._system_turn(messages)
        if system is None or prompt[:len(system.ids)] != system.ids:
            return [], prompt
        return system.ids, prompt

    def _ids(self, messages: list[dict[str, Any]], max_new_tokens: int) -> list[int]:
        budget = max(1, self._max_length - max_new_tokens)
        for _ in range(64):
            ids = self._render(messages)
            if len(ids) <= budget:
                return ids
            droppable = [i for i, m in enumerate(messages[:-1]) if m["role"] != "system"]
            if droppable:
                del messages[droppable[0]]
            elif len(messages[-1]["content"]) > 1:
                text = messages[-1]["content"]
                messages[-1] = {**messages[-1], "content": text[:len(text) // 2] + "…"}
            else:
                break
        return ids[:budget]  # a system prompt longer than the context: nothing else fits

    def _messages(self, request: GenerationRequest) -> list[dict[str, Any]]:
        """The request's messages with every special token's text defused
        (``engine/prompt_text.py``)."""
        pattern = self._special_text
        messages = request.as_dicts(fold_system=self._fold_system)
        if pattern is None:
            return messages
        return [{**message, "content": defuse(message["content"], pattern)}
                for message in messages]

    def _render(self, messages: list[dict[str, Any]]) -> list[int]:
        text: str = self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, enable_thinking=False, tokenize=False)
        system = self._system_turn(messages)
        if system is not None and system.splits and text.startswith(system.rendered):
            return system.ids + self._encode(text[len(system.rendered):])
        return self._encode(text)

    def _encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def _system_turn(self, messages: list[dict[str, Any]]) -> _SystemTurn | None:
        if not messages or messages[0]["role"] != "system":
            return None
        content = messages[0]["content"]
        if self._system is None or self._system.content != content:
            rendered: str = self._tokenizer.apply_chat_template(
                messages[:1], enable_thinking=False, tokenize=False)
            ids = self._encode(rendered)
            self._system = _SystemTurn(content, rendered, ids,
                                       self._splits(messages, rendered, ids))
        return self._system

    def _splits(self, messages: list[dict[str, Any]], rendered: str, ids: list[int]) -> bool:
        """Whether text after a system turn may be tokenized on its own: the template starts
        the next turn with a special token, and cutting there gives the full tokenization's
        ids. Both are properties of the template and tokenizer: checked once, with the first
        system turn (``_render`` still checks that each rendering starts with its turn)."""
        if self._cut_checked is not None:
            return self._cut_checked
        probe = [messages[0], {"role": "user", "content": "hello 你好"}]
        text: str = self._tokenizer.apply_chat_template(
            probe, add_generation_prompt=True, enable_thinking=False, tokenize=False)
        self._cut_checked = (
            text.startswith(rendered) and text[len(rendered):].startswith(self._specials)
            and ids + self._encode(text[len(rendered):]) == self._encode(text))
        return self._cut_checked


def _accepts_late_system(tokenizer: Any) -> bool:
    """Whether the chat template renders a system turn after the first (ChatML, Qwen,
    Llama 3 do; Gemma's and Mistral's raise), keeping its text."""
    probe = [{"role": "system", "content": "a"}, {"role": "user", "content": "b"},
             {"role": "system", "content": "c-late"}, {"role": "user", "content": "d"}]
    try:
        text = tokenizer.apply_chat_template(probe, add_generation_prompt=True,
                                             enable_thinking=False, tokenize=False)
    except Exception:  # noqa: BLE001 - jinja's TemplateError, or whatever the template raises
        return False
    return isinstance(text, str) and "c-late" in text


def _special_pattern(tokenizer: Any) -> re.Pattern[str] | None:
    """Matches the text of the tokenizer's special tokens (not its other added tokens: those
    can be ordinary words), longest first so a token that starts another is not matched in
    its place."""
    specials = {token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values()
                if getattr(token, "special", False)}
    specials |= set(getattr(tokenizer, "all_special_tokens", []))
    tokens = sorted((t for t in specials if len(t) > 1), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def template_stop_ids(tokenizer: Any, eos_ids: set[int]) -> frozenset[int]:
    """Where generation stops: the end-of-sequence ids, and every special token the chat
    template writes (start and end of a turn, role headers), so a reply that begins a
    fabricated next turn is cut by token id before any of it is generated. Tokens the
    template writes that are not special (Qwen's ``<think>``) are text, not stops."""
    template = tokenizer.chat_template or ""
    if not isinstance(template, str):  # several named templates
        template = "\n".join(str(value) for value in dict(template).values())
    special = {*tokenizer.all_special_tokens,
               *(added.content for added in getattr(tokenizer, "added_tokens_decoder", {}).values()
                 if added.special)}
    marks = {token for token in special if token and token in template}
    ids = {tokenizer.convert_tokens_to_ids(token) for token in marks}
    return frozenset({*eos_ids, *ids, tokenizer.eos_token_id} - {None, tokenizer.unk_token_id})
